r"""``DiffusionLangevin``: kinetic Langevin posterior sampling with a diffusion prior.

Guided reverse samplers (:class:`~pyro_diffusion.DiffusionPosterior`) approximate the
likelihood of a *noisy* latent, and that approximation's error stays in the draws however many
are made. This sampler uses the model's exact likelihood instead. It targets the split-Gibbs
(plug-and-play) joint of Vono et al. (2019) with the diffusion prior as the prior factor
(Xu and Chi, 2024):

.. math::

    \pi_\rho(x, z) \propto p(z)\, N(x; z, \rho^2 I)\, p(y \mid x).

Its two marginals and one conditional are all within reach of a denoiser :math:`D`:

- :math:`x`'s marginal is :math:`p_\rho(x)\, p(y \mid x)`, with :math:`p_\rho` the prior
  convolved with :math:`N(0, \rho^2 I)`, whose score is Tweedie's
  :math:`(D(x; \rho) - x) / \rho^2`: one network evaluation per gradient, no backpropagation
  through the network;
- :math:`z \mid x` is the denoising posterior :math:`p(z \mid z + \rho\varepsilon = x)`,
  sampled by the prior's own reverse process started at noise level :math:`\rho` from
  :math:`x`;
- :math:`z`'s marginal is :math:`p(z)\, (p(y \mid \cdot) * N(0, \rho^2 I))(z)`, the posterior
  with a likelihood blurred by :math:`\rho`, which tends to the posterior as
  :math:`\rho \to 0` (the blur adds about :math:`\rho^2` to each observation's noise variance on
  the latent's scale).

So the sampler runs underdamped Langevin dynamics (the BAOAB splitting of Leimkuhler and
Matthews, 2013) on :math:`x` and returns :math:`z` drawn from the reverse process from
``rho_min``. With the diagonal preconditioner (priors without a Gaussian part) :math:`\rho`
falls geometrically from ``rho_max`` to ``rho_min`` over the first ``anneal`` fraction of the
steps and then stays there, and the mass matrix is diagonal,
:math:`M = 1/\rho^2 + \mathrm{diag}(-\nabla^2 \log p(y \mid x))`, refreshed each step with a
Rademacher Hessian-vector product of the log-likelihood (exact when each observation depends on
one coordinate, as for counts per area; unbiased otherwise), so the step size is a
dimensionless fraction of the stiffest local oscillation and informative observations do not
destabilise it. Momentum damping makes smooth, weakly identified directions (large posterior
variance) travel ballistically rather than diffusively, in :math:`O(s / \rho)` steps for
posterior sd :math:`s` instead of :math:`O(s^2 / \rho^2)`.

When the prior has a Gaussian part :math:`N(m, U \Lambda U^\top)` (a trained
:class:`~pyro_diffusion.EDMDenoiser` with the Gaussian skip, an exact Gaussian denoiser, or an
estimate from prior draws), the sampler does not anneal. It first finds the Laplace
approximation of the blurred posterior with that Gaussian in place of the prior: the mode of
:math:`N(x; m, U (\Lambda + \rho^2) U^\top)\, p(y \mid x)` by damped Newton steps from the
prior mean (no network evaluations), and the precision there,
:math:`P = U (\Lambda + \rho^2)^{-1} U^\top + {\rm diag}(c)` with :math:`c` the likelihood's
curvature from Hessian-vector probes. Chains start from :math:`N(\hat x, P^{-1})` and run the
dynamics at ``rho_min`` with :math:`P` as a dense mass matrix, in whitened coordinates where it
is the identity, with the diffusion prior's own score. The Langevin steps then only have to
correct what the approximation misses (the prior's non-Gaussian part, the likelihood's
curvature away from the mode), and every direction, smooth or rough, well or weakly
identified, moves at the same pace: on GP fields with 256 or 1024 Poisson or Binomial counts
and fixed kernel hyperparameters 20 steps match long NUTS runs (``bench/vs_nuts.py``), where
the annealed diagonal dynamics need 200. A prior that declares itself a Gaussian mixture
(:func:`declares_mixture`: a mixture skip, as trained for fields under hyperpriors) gets 40
steps at twice the blur instead (see ``rho_min``).
For a Gaussian prior with Gaussian observations the approximation is the target itself, and
BAOAB keeps it exactly (its position marginal is exact for Gaussian targets), so the draws are
exact after any number of steps.

The mass and the start then use the prior's own curvature at the mode instead of its Gaussian
part's (``local_curvature=True``, the default): by Tweedie's formula the blurred prior's
Hessian is :math:`-\nabla^2 \log p_\rho(x) = (I - \partial D(x, \rho)/\partial x)/\rho^2`,
read from the denoiser's Jacobian at :math:`\hat x` (``d`` evaluations, once per run). For a
Gaussian prior it is the same :math:`P`. For a scale mixture, such as a field under hyperpriors
on its lengthscale and variance, the overall Gaussian is much rougher than the components the
data favour; a mass built from it leaves their smooth directions too stiff for the step, the
chains escape to rougher components, and the draws come out about 20 % too wide (GP fields of
64 points with Poisson counts, ``bench/vs_nuts.py`` run 14; 2-4 % with the local curvature).
The start moves too (``mode_iterations``): from the Gaussian part's Laplace mode to the mode of
the blurred posterior with the prior itself, by quasi-Newton steps with the local mass (one
denoiser evaluation of one point each), and the local mass is rebuilt there. The slow,
hyperparameter-like directions of a scale mixture do not recover from an offset start within a
few dozen steps: with 500 Binomial counts on 64 points, 20 steps from the Gaussian part's mode
left means 0.18 posterior sds off and sds 7 % too wide with the exact prior; from the refined
mode, 0.09 and 3 %, and with a learned prior (8-Gaussian skip) 0.22 and 11 % became 0.07 and
-3 % (``bench/vs_nuts.py`` run 16).

The result is approximate in two controlled ways: the blur :math:`\rho_{\min}` (smaller is more
exact and mixes slower) and the unadjusted Langevin discretisation (smaller ``step_size`` is
more exact). Neither depends on how well a guidance approximates :math:`p(y \mid x_\sigma)`.
Like any Langevin method it is made for unimodal (or mildly multimodal) posteriors, such as
latent fields under generalised linear observations: the annealing reaches separated modes but
does not weigh them correctly, and the Gaussian start begins near one of them (on the
25-component mixture benchmark it is no better than guided MMPS,
``bench/langevin_mixture.py``); :class:`~pyro_diffusion.DiffusionSMC` is the tool for those.

With a *learned* denoiser the dynamics lean on the network's score at noise :math:`\rho` in
every direction, including the smooth ones that carry a field's large-scale uncertainty, and
those are what a plain network learns worst at small noise: on the GP priors of
``bench/vs_nuts.py`` a trained MLP without the Gaussian skip has a score at
:math:`\rho = 0.1` within 5-14 % of the exact one overall but off by 22 % (1-D grid) to 180 %
(2-D grid) in the 20 smoothest directions, and Langevin dynamics at fixed noise integrates that
error wherever the data leave the field free (a patch of zero counts drifted to several times
the reference posterior's spread). The Gaussian skip of
:class:`~pyro_diffusion.EDMDenoiser` (``gaussian_skip=True``) removes most of it (0.3-3.6 %
in the smooth directions), and the sampler then matches NUTS with learned priors too. For a
network trained without it, check on a stand-in problem with an exact prior (or NUTS) first
(``bench/score_error.py`` measures the score error).

On a Gaussian prior with Gaussian observations the target is closed form (the test suite checks
it), and on GP fields with 256 Poisson or Binomial counts it matches long NUTS runs with the
exact GP denoiser (``bench/vs_nuts.py``).

References:

- Vono, Dobigeon, Chainais (2019), *Split-and-augmented Gibbs sampler*.
- Xu, Chi (2024), *Provably robust score-based diffusion posterior sampling for plug-and-play
  image reconstruction*; Wu, Sun, Chen, Zhang, Yue, Bouman (2024), *Principled probabilistic
  imaging using diffusion models as plug-and-play priors*.
- Leimkuhler, Matthews (2013), *Rational construction of stochastic numerical methods for
  molecular sampling* (BAOAB).
"""

import copy
import math
import warnings

import pyro
import torch
from tqdm.auto import tqdm

from .covariance import shrunk_eigh
from .exact import GaussianMixtureDenoiser
from .noise_grid import noise_grid
from .posterior import BatchPosterior
from .samplers import reverse_sample
from .seeding import forked, manual_seed

PRECONDITIONERS = ("auto", "gaussian", "diagonal")
#: Default Langevin steps and final denoising steps for each preconditioner; ``"mixture"`` is
#: the Gaussian preconditioner with a prior that declares itself a Gaussian mixture
#: (:func:`declares_mixture`).
DEFAULT_STEPS = {"gaussian": 20, "mixture": 40, "diagonal": 200}
DEFAULT_DENOISE_STEPS = {"gaussian": 8, "mixture": 8, "diagonal": 32}
#: Default final blur, in units of the denoiser's ``data_std``, as :data:`DEFAULT_STEPS`.
DEFAULT_RHO_MIN = {"gaussian": 0.05, "mixture": 0.1, "diagonal": 0.1}


def gaussian_part(prior):
    """``(mean (d,), eigenvalues (d,), eigenvectors (d, d))`` of the prior's denoiser's own
    Gaussian part, in the data's units, or ``None`` when it has none."""
    den = prior.denoiser
    if getattr(den, "gaussian_skip", False):
        return (den.mean.reshape(-1), den.skip_eigenvalues * den.std ** 2, den.skip_basis)
    evals, evecs = getattr(den, "evals", None), getattr(den, "evecs", None)
    if isinstance(evals, torch.Tensor) and isinstance(evecs, torch.Tensor) \
            and evecs.dim() == 2 and evals.shape == evecs.shape[-1:] \
            and evecs.shape[0] == prior.event_shape.numel():
        return den.data_mean.reshape(-1), evals, evecs
    return None


def declares_mixture(prior):
    """Whether the prior's denoiser is built on a Gaussian mixture of more than one component:
    an :class:`~pyro_diffusion.EDMDenoiser` with a mixture skip (``gaussian_skip=K``,
    ``K > 1``, as trained for fields under hyperpriors) or an exact
    :class:`~pyro_diffusion.GaussianMixtureDenoiser`. :class:`DiffusionLangevin` then uses
    the ``"mixture"`` entries of :data:`DEFAULT_STEPS` and :data:`DEFAULT_RHO_MIN`.

    :param DiffusionPrior prior: the prior.
    :rtype: bool
    """
    den = prior.denoiser
    if getattr(den, "skip_components", 0) > 1:
        return True
    return isinstance(den, GaussianMixtureDenoiser) and den.log_weights.numel() > 1


def estimated_gaussian(prior, num_draws):
    """Mean and eigendecomposition of the covariance of ``num_draws`` prior draws."""
    with torch.no_grad():
        x = prior.sample((num_draws,)).reshape(num_draws, -1)
    mean = x.mean(0)
    evals, evecs = shrunk_eigh((x - mean).cpu())
    return mean, evals.to(x), evecs.to(x)


def _positive(value, name):
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    return value


class DiffusionLangevin(BatchPosterior):
    r"""Posterior samples by kinetic Langevin dynamics with the model's exact likelihood.

    The model is written as for :class:`~pyro_diffusion.DiffusionPosterior`: one latent site
    distributed as a :class:`~pyro_diffusion.DiffusionPrior`, observed sites with their Pyro
    distributions. Every observed site's ``log_prob`` must be differentiable in the latent (any
    continuous function of it: counts, Gaussian, Gamma, ...). See the module documentation for
    the algorithm.

    :param callable model: the Pyro model.
    :param int num_samples: posterior draws (independent chains of the dynamics).
    :param int num_steps: Langevin steps per draw; each costs one denoiser evaluation and
        two passes through the likelihood. The final denoising adds ``denoise_steps``.
        Default 20 with the Gaussian preconditioner, 40 with it when the prior declares a
        Gaussian mixture (:func:`declares_mixture`), 200 with the diagonal preconditioner.
    :param float rho_max: the blur at the start of the annealing (diagonal preconditioner
        only; default: the denoiser's ``data_std``, else 1).
    :param float rho_min: the blur at the end, and throughout with the Gaussian
        preconditioner (default: ``0.05 * data_std`` with the Gaussian preconditioner,
        ``0.1 * data_std`` with it when the prior declares a Gaussian mixture, and with the
        diagonal one). The draws target the posterior with each
        observation's likelihood blurred by :math:`N(0, \rho_{\min}^2)` on the latent's scale:
        choose it below the posterior standard deviations you care about. The blur's bias on
        a smooth direction grows with the number of observations that inform it: on GP fields
        of 1024 points 0.1 left means 0.11-0.14 posterior sds off and 0.05 0.04-0.05
        (``bench/vs_nuts.py``). Smaller leans harder on a learned denoiser's score at small
        noise, where its relative error grows, and, with the diagonal preconditioner only,
        mixes slower. For priors that declare a Gaussian mixture, such as fields under
        hyperpriors trained with a mixture skip, both effects call for the larger default: the
        blur smooths the curvature that changes from one component to the next, and the
        learned mixture priors measured broke down below about ``0.08 * data_std``. On GP
        fields under lengthscale and variance hyperpriors (learned priors with an 8-Gaussian
        skip, 40 steps) a blur of 0.09-0.13 left means 0.07-0.10 posterior sds off on 256
        points and 0.06-0.08 on 64 (Binomial counts), where 0.05 left 0.38 and 0.12 on 256
        points (Poisson, Binomial) and 0.56 on 64, and 0.07 or 0.08 produced divergences or
        sds 16 % too wide (``bench/vs_nuts.py`` run 20). With the exact scale mixture 0.05 is
        accurate on 64 points; the breakdown is the learned score's.
    :param float anneal: fraction of the steps spent lowering the blur; the rest run at
        ``rho_min`` (diagonal preconditioner only).
    :param float step_size: the BAOAB step, as a fraction of the stiffest local period (with
        the Gaussian preconditioner: of the Laplace approximation's period, the same in every
        direction); stable below 2, 0.5 keeps the discretisation bias small for priors close
        to Gaussian near the posterior. For scale mixtures in many dimensions (fields under
        hyperpriors) at the small blur of a Gaussian prior it does not: on GP fields of 256
        points with Poisson counts under lengthscale and variance hyperpriors, at a blur of
        ``0.05 * data_std``, 0.5 left means 0.42 posterior sds off and sds 19 % too wide, at
        20 steps as at 100, with the exact prior as with a learned one, and 0.35 needed 100
        steps to match NUTS (``bench/vs_nuts.py`` run 18). At the mixture default blur
        (``rho_min``) 0.5 with 40 steps matched NUTS there (run 20). Check such a prior on a
        stand-in problem with a reference.
    :param float persistence: the fraction of the momentum kept at each step (0: overdamped
        Langevin; close to 1: Hamiltonian-like, less random-walk behaviour).
    :param int denoise_steps: ancestral reverse steps from ``rho_min`` to 0 for the final draw
        of :math:`z \mid x`. Default 8 with the Gaussian preconditioner, 32 with the diagonal
        one.
    :param str preconditioner: ``"gaussian"``: start the chains from the Laplace
        approximation of the blurred posterior with a Gaussian approximation
        :math:`N(m, U \Lambda U^\top)` of the prior in its place, and use that approximation's
        precision (the Gaussian's, blurred, plus the likelihood's curvature at the mode) as a
        dense mass matrix, at ``rho_min`` without annealing. Every direction then moves at the
        same pace and the steps only correct the approximation, which takes far fewer steps on
        fields. The Gaussian comes from the denoiser when it has one (an
        :class:`~pyro_diffusion.EDMDenoiser` with the Gaussian skip, a
        :class:`~pyro_diffusion.GaussianDenoiser`), else from the mean and covariance of
        ``max(2 d, 1000)`` prior draws; its cost grows as :math:`d^3` (a Cholesky factor per
        Newton step) and :math:`d^2` per draw and step. ``"diagonal"``: annealed dynamics with
        the mass :math:`1/\rho^2` plus the likelihood's curvature per coordinate (for priors
        far from Gaussian). ``"auto"`` (default): ``"gaussian"`` when the denoiser has a
        Gaussian part, else ``"diagonal"``.
    :param bool local_curvature: with the Gaussian preconditioner, build the mass matrix and
        the chains' start from the prior's own curvature at the Laplace mode, the blurred
        prior's Hessian :math:`(I - \partial D / \partial x)/\rho^2` (Tweedie; the
        denoiser's Jacobian, ``d`` evaluations in float64, once per run), in place of its
        Gaussian part's. This matters when the prior near the posterior is much narrower in
        some directions than its Gaussian part, as for fields under hyperpriors (a scale
        mixture): the Gaussian part's mass then leaves those directions too stiff for the step,
        and the chains escape to rougher components (draws 20 % too wide on GP fields of 64
        points with Poisson counts; 2 % with it). For a Gaussian prior both are the same.
        Denoisers that are not an ``nn.Module`` keep the Gaussian part's.
    :param int mode_iterations: with ``local_curvature``, move the chains' start from the
        Laplace mode of the prior's Gaussian part towards the mode of the blurred posterior with
        the prior itself, by this many damped fixed-point steps
        :math:`b \leftarrow b + \tfrac12 \nabla_b \log \pi_\rho` in the whitened coordinates
        of the local mass (one denoiser evaluation of a single point each), then rebuild the
        local mass there. For a Gaussian prior the two modes are the same. For a scale mixture
        they are not (the Gaussian part is rougher than the components the data favour), and
        the slow, hyperparameter-like directions did not recover from the offset start within
        the steps: on GP fields of 64 points with 500 Binomial counts under hyperpriors, 20 steps
        left means 0.18 posterior sds off and sds 7 % too wide with the exact prior, 0.09 and
        3 % with it (``bench/vs_nuts.py`` run 16). 0 keeps the Gaussian part's mode.
    :param int batch_size: draws per batch; each batch is independent and becomes one ArviZ
        chain (a single batch is split into up to 4 chains of its independent draws).
    :param device: where to sample (default: the prior's device). The prior (in place) and
        the model's tensor arguments are moved there
        (:class:`~pyro_diffusion.likelihood.ModelLikelihood`).
    :param int seed: seed for the run (the global RNG is restored afterwards).
    :param bool progress: show a progress bar over the steps.

    After :meth:`run`, ``wall_time`` holds the seconds spent, ``divergences`` the number of
    chain-steps that produced a non-finite state and were undone (their momentum is redrawn;
    :meth:`run` warns when there are any),
    ``num_evaluations`` the denoiser evaluations per draw, ``newton_iterations`` the Newton
    steps the Laplace approximation took (Gaussian preconditioner), ``mode_shift`` the length of
    the start's move by ``mode_iterations`` (in sds of the local mass; 0 without it),
    ``mode_gradient`` the gradient's norm in those units where it stopped, ``mode`` the chains'
    start centre (flattened, in the data's units; Gaussian preconditioner), and
    ``preconditioner_used``,
    ``num_steps_used``, ``denoise_steps_used``, ``rho_min_used`` and ``rho_max_used`` the
    settings the defaults resolved to.
    """

    def __init__(self, model, num_samples=1000, num_steps=None, *, rho_max=None, rho_min=None,
                 anneal=0.5, step_size=0.5, persistence=0.8, denoise_steps=None,
                 preconditioner="auto", local_curvature=True, mode_iterations=40,
                 batch_size=1000, device=None, seed=None, progress=True):
        self.model = model
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self._check_sizes()
        self.num_steps = None if num_steps is None else int(num_steps)
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        self.rho_max = None if rho_max is None else _positive(rho_max, "rho_max")
        self.rho_min = None if rho_min is None else _positive(rho_min, "rho_min")
        self.anneal = float(anneal)
        if not 0.0 <= self.anneal <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got {anneal}")
        self.step_size = _positive(step_size, "step_size")
        if self.step_size >= 2.0:
            raise ValueError(f"step_size must be below 2 (the stability limit), got {step_size}")
        self.persistence = float(persistence)
        if not 0.0 <= self.persistence < 1.0:
            raise ValueError(f"persistence must be in [0, 1), got {persistence}")
        self.denoise_steps = None if denoise_steps is None else int(denoise_steps)
        if self.denoise_steps is not None and self.denoise_steps < 1:
            raise ValueError(f"denoise_steps must be at least 1, got {denoise_steps}")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {', '.join(PRECONDITIONERS)}, got "
                             f"{preconditioner!r}")
        self.preconditioner = preconditioner
        self.local_curvature = bool(local_curvature)
        self.mode_iterations = int(mode_iterations)
        if self.mode_iterations < 0:
            raise ValueError(f"mode_iterations must be non-negative, got {mode_iterations}")
        self.device = device
        self.seed = seed
        self.progress = progress
        self.divergences = 0
        self.num_evaluations = None

    def run(self, *args, **kwargs):
        """Sample the posterior of ``model(*args, **kwargs)``; returns ``self``. Warns
        (``RuntimeWarning``) when chain-steps diverged (``divergences``)."""
        super().run(*args, **kwargs)
        if self.divergences:
            total = self.num_samples * self.num_steps_used
            warnings.warn(
                f"DiffusionLangevin: {self.divergences} of {total} chain-steps reached a "
                f"non-finite state and were undone; such runs can return draws far off or far "
                f"too wide. Lower step_size (now {self.step_size:g}) or raise rho_min (now "
                f"{self.rho_min_used:.3g}): a learned prior's score at small noise can be "
                f"unreliable", RuntimeWarning, stacklevel=2)
        return self

    def _prepare(self, lik, prior):
        self.divergences = 0
        self._gaussian = None
        self._laplace_state = None
        self.newton_iterations = 0
        self.mode_shift, self.mode_gradient, self.mode = 0.0, None, None
        extra = 0
        if self.preconditioner != "diagonal":
            part = gaussian_part(prior)
            if part is None and self.preconditioner == "gaussian":
                draws = max(2 * prior.event_shape.numel(), 1000)
                # Seeded like the run (which seeds only after _prepare), global RNG untouched.
                with forked(prior.device):
                    if self.seed is not None:
                        manual_seed(self.seed, prior.device)
                    part = estimated_gaussian(prior, draws)
                extra = prior.num_evaluations * draws / self.num_samples
            if part is not None:
                self._gaussian = tuple(t.to(device=prior.device, dtype=prior.dtype)
                                       for t in part)
        gaussian = self._gaussian is not None
        self.preconditioner_used = "gaussian" if gaussian else "diagonal"
        regime = ("mixture" if declares_mixture(prior) else "gaussian") if gaussian \
            else "diagonal"
        steps = self.num_steps or DEFAULT_STEPS[regime]
        denoise = self.denoise_steps or DEFAULT_DENOISE_STEPS[regime]
        self.num_steps_used, self.denoise_steps_used = steps, denoise
        scale = float(getattr(prior.denoiser, "data_std", 1.0))
        self.rho_max_used = self.rho_max if self.rho_max is not None else scale
        self.rho_min_used = self.rho_min if self.rho_min is not None \
            else DEFAULT_RHO_MIN[regime] * scale
        if self.rho_min_used > self.rho_max_used:
            raise ValueError(f"rho_min ({self.rho_min_used:.4g}) must not exceed rho_max "
                             f"({self.rho_max_used:.4g})")
        if self.rho_min_used < prior.sigma_min:
            raise ValueError(f"rho_min ({self.rho_min_used:.4g}) is below the prior's sigma_min "
                             f"({prior.sigma_min:.4g}), where its denoiser was not trained")
        n_anneal = max(1, round(self.anneal * steps))
        log_rhos = torch.linspace(math.log(self.rho_max_used), math.log(self.rho_min_used),
                                  n_anneal, dtype=torch.float64)
        rhos = log_rhos.exp().tolist()
        self._rhos = (rhos + [self.rho_min_used] * steps)[:steps]
        self._num_anneal = min(n_anneal, steps)
        self._final_sigmas = noise_grid(denoise, prior.sigma_min, self.rho_min_used,
                                        prior.rho, dtype=prior.dtype, device=prior.device)
        self.num_evaluations = steps + 1 + denoise + extra

    @staticmethod
    def _likelihood_gradient(lik, x, curvature=True):
        r"""``(log_lik, grad, square)``: :math:`\log p(y \mid x)` per row, its gradient and,
        with ``curvature``, a Rademacher probe of the squared rows of its Hessian,
        :math:`(H\xi)^2`, whose mean is :math:`\sum_j H_{ij}^2` (zeros otherwise)."""
        with torch.enable_grad(), pyro.validation_enabled(False):
            xg = x.detach().requires_grad_(True)
            log_lik = lik.log_likelihood(xg)
            (grad,) = torch.autograd.grad(log_lik.sum(), xg, create_graph=curvature)
            hvp = None
            if curvature and grad.requires_grad:
                probe = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
                (hvp,) = torch.autograd.grad((grad * probe).sum(), xg, allow_unused=True)
        square = torch.zeros_like(x) if hvp is None else hvp.detach().square()
        return log_lik.detach(), grad.detach(), square

    def _force(self, lik, prior, x, rho, curvature=True):
        r"""The gradient of :math:`\log p_\rho(x) + \log p(y \mid x)` and, with
        ``curvature``, the likelihood's Hessian probe (:meth:`_likelihood_gradient`)."""
        n = x.shape[0]
        with torch.no_grad():
            # One level broadcast over the chains (a stride-0 view): the network sees it is
            # shared without reading it back from the device.
            sigma = torch.full((1,), rho, dtype=x.dtype, device=x.device).expand(n)
            x0 = prior.denoise(x, sigma)
        _, grad, square = self._likelihood_gradient(lik, x, curvature)
        return (x0 - x) / rho ** 2 + grad, square

    def _sample_batch(self, lik, prior, size, desc):
        if self._gaussian is not None:
            return self._sample_gaussian(lik, prior, size, desc)
        return self._sample_diagonal(lik, prior, size, desc)

    @staticmethod
    def _prior_curvature(den, x, rho, event_shape, chunk=256):
        r"""The blurred prior's Hessian :math:`-\nabla^2 \log p_\rho(x) = (I - J_s)/\rho^2` at
        ``x`` ``(d,)``, with :math:`J_s` the symmetric part of the Jacobian of the (float64)
        denoiser ``den`` (Tweedie: :math:`\rho^2 J` is the covariance of :math:`x_0` given
        :math:`x`), by rows in chunks of ``chunk``."""
        d = x.shape[0]
        rows = []
        with torch.enable_grad():
            for start in range(0, d, chunk):
                n = min(chunk, d - start)
                xs = x.expand(n, d).clone().requires_grad_(True)
                sigma = torch.full((n,), rho, dtype=x.dtype, device=x.device)
                out = den(xs.reshape((n,) + tuple(event_shape)), sigma).reshape(n, d)
                idx = torch.arange(n, device=x.device)
                diag = out[idx, idx + start]
                (jac,) = torch.autograd.grad(diag.sum(), xs)
                rows.append(jac)
        jac = torch.cat(rows)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return (eye - 0.5 * (jac + jac.T)) / rho ** 2

    def _local_mass(self, prior, a_mode, c):
        r"""The Cholesky factor, in the coordinates :math:`a`, of the blurred posterior's
        precision at the Laplace mode, the likelihood's curvature ``c`` there (from
        :meth:`_laplace`) plus the prior's own curvature (:meth:`_prior_curvature`) in place
        of its Gaussian part's, eigenvalues taken by their
        size (a mixture torn between components can curve the wrong way) and floored at the
        Gaussian part's smallest precision; ``None`` when it is not finite or the denoiser is
        not an ``nn.Module`` (which cannot be copied to float64)."""
        if not isinstance(prior.denoiser, torch.nn.Module):
            return None
        m, lam, basis = (t.double() for t in self._gaussian)
        rho = self.rho_min_used
        floor = float(1.0 / (lam.max() + rho ** 2))
        x = m + basis @ a_mode
        den = copy.deepcopy(prior.denoiser).double()
        hess = self._prior_curvature(den, x, rho, prior.event_shape)
        prec = basis.T @ (hess + torch.diag(c)) @ basis
        evals, evecs = torch.linalg.eigh(0.5 * (prec + prec.T))
        if not bool(torch.isfinite(evals).all()):
            return None
        return torch.linalg.cholesky((evecs * evals.abs().clamp(min=floor)) @ evecs.T)

    def _probe_likelihood(self, lik, prior, x, probes):
        r"""At one point ``x`` ``(d,)`` (float64, the data's units): the log-likelihood, its
        gradient (float64) and :math:`c`, the norms of its Hessian's rows from ``probes``
        Rademacher probes (:meth:`_likelihood_gradient`; :math:`|H_{ii}|` exactly when each
        observation depends on one coordinate), non-finite values set to 0.

        The curvature is probed at ``x`` moved by the prior's noise floor ``sigma_min`` along a
        random sign per coordinate: torch writes the Binomial and Bernoulli log-densities with
        :math:`|\mathrm{logit}|`, whose autograd second derivative is 0 at a logit of exactly
        0 (a zero-mean prior's mean), where the true curvature is largest."""
        x = x.to(prior.dtype).expand(probes, -1).reshape((probes,) + prior.event_shape)
        log_lik, grad, _ = self._likelihood_gradient(lik, x[:1], curvature=False)
        jitter = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        _, _, square = self._likelihood_gradient(lik, x + prior.sigma_min * jitter)
        c = square.reshape(probes, -1).double().mean(0).sqrt()
        return (float(log_lik[0]), grad.reshape(-1).double(),
                torch.nan_to_num(c, nan=0.0, posinf=0.0))

    def _refine_mode(self, lik, prior, a_mode, chol, probes=8):
        r"""Move the start ``a_mode`` towards the mode of the blurred posterior with the prior's
        own score: ``mode_iterations`` damped fixed-point steps :math:`b \leftarrow b +
        \tfrac12 g(b)` in the whitened coordinates :math:`b = L^\top a` of the local mass
        ``chol`` (where the Hessian is about the identity, so the steps are quasi-Newton
        steps), each with the gradient :math:`g` of :math:`\log p_\rho + \log p(y \mid x)`
        at one point; a step to a non-finite gradient ends them, and the iterate with the
        smallest gradient is kept (on a mixture the steps can cycle). Then the local mass is
        rebuilt there (:meth:`_local_mass`, with the likelihood's curvature probed there),
        unless the start moved less than 0.001 sds.
        Returns the new mode and factor (the old factor if the new one is not finite)."""
        m, lam, basis = (t.double() for t in self._gaussian)
        k = torch.linalg.solve_triangular(chol, basis.T, upper=False).T  # x = m + k b
        rho, shape = self.rho_min_used, (1,) + prior.event_shape

        def gradient(b):
            x = (m + k @ b).to(prior.dtype).reshape(shape)
            force, _ = self._force(lik, prior, x, rho, curvature=False)
            return k.T @ force.reshape(-1).double()

        b0 = a_mode @ chol
        b, g = b0, gradient(b0)
        best, evaluations = (float(g.norm()), b), 1
        for _ in range(self.mode_iterations):
            b = b + 0.5 * g
            g = gradient(b)
            evaluations += 1
            norm = float(g.norm())
            if not math.isfinite(norm):
                break
            if norm < best[0]:
                best = (norm, b)
        self.num_evaluations += evaluations / self.num_samples
        self.mode_gradient, b = best
        self.mode_shift = float((b - b0).norm())
        if self.mode_shift < 1e-3:  # not worth a new Jacobian (a Gaussian prior: round-off)
            return a_mode, chol
        a = torch.linalg.solve_triangular(chol, b[None], upper=False, left=False)[0]
        _, _, c = self._probe_likelihood(lik, prior, m + basis @ a, probes)
        local = self._local_mass(prior, a, c)
        self.num_evaluations += prior.event_shape.numel() / self.num_samples
        return (a_mode, chol) if local is None else (a, local)

    def _laplace(self, lik, prior, probes=8, max_iter=50):
        r"""The Laplace approximation of :math:`N(x; m, U (\Lambda + \rho^2) U^\top)\,
        p(y \mid x)` at :math:`\rho` = ``rho_min``: its mode by damped Newton from the prior
        mean, in the coordinates :math:`a = U^\top (x - m)`, and the Cholesky factor
        :math:`L` of its precision :math:`(\Lambda + \rho^2)^{-1} + U^\top {\rm diag}(c)\,
        U` there, with :math:`c` the norms of the log-likelihood's Hessian rows (from
        ``probes`` Rademacher probes; :math:`|H_{ii}|` exactly when each observation depends on
        one coordinate). Float64; counts ``newton_iterations``. Returns the mode, the factor
        and :math:`c` at the mode."""
        m, lam, basis = self._gaussian
        rho = self.rho_min_used
        lam, basis, m = lam.double(), basis.double(), m.double()
        prec = 1.0 / (lam + rho ** 2)

        def evaluate(a):
            log_lik, g, c = self._probe_likelihood(lik, prior, m + basis @ a, probes)
            value = log_lik - 0.5 * float((a.square() * prec).sum())
            return value, basis.T @ g - a * prec, c

        def factor(c):
            mass = (basis.T * c) @ basis
            mass.diagonal().add_(prec)
            return torch.linalg.cholesky(mass)

        a = torch.zeros_like(lam)
        value, grad, c = evaluate(a)
        if not (math.isfinite(value) and bool(torch.isfinite(grad).all())):
            raise ValueError(
                f"the log-likelihood or its gradient is not finite at the prior mean of "
                f"{lik.site!r}: check the observed sites' parameters (NaN or infinite values, "
                f"or a link that overflows)")
        for _ in range(max_iter):
            chol = factor(c)
            step = torch.cholesky_solve(grad[:, None], chol)[:, 0]
            # Newton decrement: the step's length in the approximation's sds, squared.
            if float(grad @ step) < 1e-4:
                break
            self.newton_iterations += 1
            tolerance = 1e-6 * abs(value) + 1e-3  # float32 log-likelihood round-off
            t = 1.0
            for _ in range(40):  # halve until finite and not worse
                new = evaluate(a + t * step)
                if math.isfinite(new[0]) and new[0] >= value - tolerance \
                        and bool(torch.isfinite(new[1]).all()):
                    break
                t *= 0.5
            else:
                break
            a = a + t * step
            value, grad, c = new
        else:  # out of iterations: factor the last curvature (a break leaves chol current)
            chol = factor(c)
        return a, chol, c

    def _baoab(self, q, p, force, force_at, mass=None):
        r"""One B A O A B step of kinetic Langevin dynamics (Leimkuhler and Matthews 2013)
        for the batch of chains ``q`` with momenta ``p``, ``force`` at ``q``, and a diagonal
        ``mass`` (``None``: unit mass). ``force_at(q) -> (force, extra)``.

        A chain whose step produced a non-finite position, force or momentum (a divergence)
        keeps its old position and force and takes the O step's fresh draw as its momentum,
        all on the device: no chain is read back to the host. Returns ``(q, p, force, extra,
        ok)`` with ``ok`` of shape ``(n, 1)``, False where the step was undone.
        """
        h, keep = self.step_size, self.persistence
        refresh = math.sqrt(1.0 - keep ** 2)

        def kick(momentum, f):
            step = 0.5 * h * f
            return momentum + (step if mass is None else step / mass)

        p_new = kick(p, force)
        q_new = q + 0.5 * h * p_new
        noise = torch.randn_like(p_new)
        o = refresh * noise
        p_new = keep * p_new + (o if mass is None else o / mass.sqrt())
        q_new = q_new + 0.5 * h * p_new
        force_new, extra = force_at(q_new)
        p_new = kick(p_new, force_new)
        ok = (torch.isfinite(q_new).all(-1) & torch.isfinite(force_new).all(-1)
              & torch.isfinite(p_new).all(-1)).unsqueeze(-1)
        fresh = noise if mass is None else noise / mass.sqrt()
        return (torch.where(ok, q_new, q), torch.where(ok, p_new, fresh),
                torch.where(ok, force_new, force), extra, ok)

    def _sample_gaussian(self, lik, prior, size, desc):
        r"""BAOAB with the Laplace approximation's precision as a dense mass, run in whitened
        coordinates :math:`b = L^\top a` (unit mass; :math:`x = m + K b`,
        :math:`K = U L^{-\top}`), chains started from the approximation."""
        if self._laplace_state is None:  # once per run, under the run's seed
            a_mode, chol, c = self._laplace(lik, prior)
            if self.local_curvature:
                local = self._local_mass(prior, a_mode, c)
                # d Jacobian rows, once per run.
                self.num_evaluations += prior.event_shape.numel() / self.num_samples
                if local is not None and self.mode_iterations > 0:
                    a_mode, local = self._refine_mode(lik, prior, a_mode, local)
                chol = chol if local is None else local
            m, lam, basis = self._gaussian
            k = torch.linalg.solve_triangular(chol, basis.double().T, upper=False).T
            self._laplace_state = ((a_mode @ chol).to(prior.dtype), k.to(prior.dtype))
            self.mode = (m.double() + basis.double() @ a_mode).to(prior.dtype)
        b_mode, k = self._laplace_state
        m = self._gaussian[0]
        shape = (size,) + prior.event_shape
        rho = self.rho_min_used

        def to_x(b):
            return (m + b @ k.T).reshape(shape)

        def force_at(b):
            force, _ = self._force(lik, prior, to_x(b), rho, curvature=False)
            return force.reshape(size, -1) @ k

        b = b_mode + torch.randn((size, b_mode.shape[0]), dtype=prior.dtype,
                                 device=prior.device)
        force = force_at(b)
        bad = ~torch.isfinite(force).all(-1)
        if bool(bad.any()):  # start those chains at the mode instead
            b = torch.where(bad[:, None], b_mode, b)
            force = force_at(b)
        u = torch.randn_like(b)
        diverged = torch.zeros((), dtype=torch.long, device=b.device)
        for _ in tqdm(range(self.num_steps_used), desc=desc, disable=not self.progress,
                      leave=False):
            b, u, force, _, ok = self._baoab(b, u, force, lambda q: (force_at(q), None))
            diverged = diverged + (~ok).sum()
        self.divergences += int(diverged)  # one read per batch
        with torch.no_grad():
            return reverse_sample(prior.denoise, to_x(b), self._final_sigmas,
                                  sampler="ancestral")

    def _sample_diagonal(self, lik, prior, size, desc):
        r"""Annealed BAOAB with a diagonal mass: the blurred prior's largest precision
        :math:`1/\rho^2` plus the likelihood's curvature per coordinate."""
        rhos = self._rhos
        shape = (size,) + prior.event_shape
        mean = getattr(prior.denoiser, "data_mean", 0.0)
        mean = torch.as_tensor(mean, dtype=prior.dtype, device=prior.device).reshape(-1)

        def to_x(a):
            return (mean + a).reshape(shape)

        a = rhos[0] * torch.randn((size, prior.event_shape.numel()), dtype=prior.dtype,
                                  device=prior.device)
        start = torch.zeros_like(a)

        def force_at(a, rho, curv=True):
            force, square = self._force(lik, prior, to_x(a), rho, curvature=curv)
            return force.reshape(size, -1), torch.nan_to_num(square.reshape(size, -1), nan=0.0,
                                                      posinf=0.0)

        force, square = force_at(a, rhos[0])
        bad = ~torch.isfinite(force).all(-1)
        if bool(bad.any()):  # start those chains at the prior mean instead
            a = torch.where(bad[:, None], start, a)
            force, square = force_at(a, rhos[0])
            if not bool(torch.isfinite(force).all()):
                raise ValueError(
                    f"the gradient of the log-likelihood is not finite at the prior mean of "
                    f"{lik.site!r}: check the observed sites' parameters (NaN or infinite "
                    f"values, or a link that overflows)")
        # Curvature scale of the likelihood per coordinate: the root of an exponential average
        # of (H xi)^2, i.e. the norm of each Hessian row (|H_ii| when observations depend on
        # one coordinate each). It adapts during the annealing and is frozen afterwards, so the
        # dynamics at rho_min has a fixed mass matrix.
        row2 = square
        mass = 1.0 / rhos[0] ** 2 + square.sqrt()
        v = torch.randn_like(a) / mass.sqrt()
        frozen = False
        diverged = torch.zeros((), dtype=torch.long, device=a.device)
        for i, rho in enumerate(tqdm(rhos, desc=desc, disable=not self.progress, leave=False)):
            if not frozen:  # the larger of the running average and the latest probe
                mass = 1.0 / rho ** 2 + torch.maximum(row2, square).sqrt()
                frozen = i >= self._num_anneal
            a, v, force, square, ok = self._baoab(
                a, v, force, lambda q, rho=rho, curv=not frozen: force_at(q, rho, curv), mass)
            square = torch.where(ok, square, row2)
            diverged = diverged + (~ok).sum()
            if not frozen:
                row2 = 0.8 * row2 + 0.2 * square
        self.divergences += int(diverged)  # one read per batch
        with torch.no_grad():
            return reverse_sample(prior.denoise, to_x(a), self._final_sigmas,
                                  sampler="ancestral")
