"""``DiffusionPosterior``: guided reverse-process sampling of a Pyro model's posterior.

The model is written in Pyro with one latent site distributed as a
:class:`~pyro_diffusion.DiffusionPrior`; the likelihood is read from its observed sites
(:class:`~pyro_diffusion.likelihood.ModelLikelihood`), a guidance
(:mod:`pyro_diffusion.guidance`) turns it into a posterior denoiser, and the prior's reverse
sampler runs with that denoiser in independent batches.
"""

import time
import warnings

import torch
from tqdm.auto import tqdm

from .exact import GaussianDenoiser, GaussianMixtureDenoiser
from .guidance import resolve_guidance
from .inference_data import split_chains, to_inference_data
from .likelihood import ModelLikelihood
from .noise_grid import check_num_steps, noise_grid
from .samplers import check_sampler, reverse_sample
from .seeding import seeded


def _chain_count(sizes):
    """ArviZ chains for batches of ``sizes`` draws: one per batch when there are several of one
    size; else (one batch, or a short last one) the draws, all independent, in the most of 4,
    3 or 2 equal blocks of at least 4 draws (1 if none fits), so that R-hat is defined."""
    if len(sizes) > 1 and len(set(sizes)) == 1:
        return len(sizes)
    total = sum(sizes)
    return next((k for k in (4, 3, 2) if total % k == 0 and total // k >= 4), 1)


class BatchPosterior:
    """Shared machinery of samplers that draw independent batches of posterior samples.

    A subclass sets ``num_samples``, ``batch_size``, ``device``, ``seed`` and ``progress`` and
    implements ``_prepare(lik, prior)`` (called once per run) and
    ``_sample_batch(lik, prior, size, desc)``, which returns ``size`` draws of the latent.
    :meth:`run` seeds, splits the draws into batches, adds the model's deterministic sites
    and records ``wall_time``; each batch becomes one ArviZ chain (one batch, or batches of
    unequal sizes: equal blocks of the draws, see :meth:`get_samples`).
    """

    _samples = _num_chains = wall_time = None
    #: Rows of per-particle data (fit_prior's E-step), passed to ModelLikelihood.
    _num_particles = None

    def _check_sizes(self):
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be positive")

    def _prepare(self, lik, prior):  # pragma: no cover - abstract
        raise NotImplementedError

    def _sample_batch(self, lik, prior, size, desc):  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, *args, **kwargs):
        """Sample the posterior of ``model(*args, **kwargs)``; returns ``self``."""
        lik = ModelLikelihood(self.model, args, kwargs, device=self.device,
                              num_particles=self._num_particles)
        prior = lik.prior
        self._prepare(lik, prior)
        start = time.perf_counter()
        batches = []
        with seeded(self.seed, prior.device):
            sizes = [min(self.batch_size, self.num_samples - i)
                     for i in range(0, self.num_samples, self.batch_size)]
            for b, size in enumerate(tqdm(sizes, desc="posterior batches",
                                          disable=not self.progress or len(sizes) == 1)):
                x = self._sample_batch(lik, prior, size, f"posterior {b + 1}/{len(sizes)}")
                batches.append(x.detach())
        x = torch.cat(batches)
        samples = {lik.site: x}
        samples.update(lik.deterministic(x))
        if x.device.type == "cuda":  # CUDA runs asynchronously: time the finished work
            torch.cuda.synchronize(x.device)
        self.wall_time = time.perf_counter() - start
        self._samples = samples
        self._num_chains = _chain_count(sizes)
        self.likelihood = lik
        return self

    def get_samples(self, group_by_chain=False):
        """Posterior draws as a dict ``{site: (num_samples, ...)}`` (or
        ``(num_chains, draws, ...)`` with ``group_by_chain=True``: one chain per batch when
        there are several batches of one size, else equal blocks of the independent draws)."""
        if self._samples is None:
            raise RuntimeError("call .run(...) first")
        if group_by_chain:
            return split_chains(self._samples, self._num_chains)
        return dict(self._samples)

    def to_inference_data(self, dims=None, coords=None):
        """ArviZ inference data with the independent batches as chains (see
        :meth:`get_samples`)."""
        return to_inference_data(self.get_samples(group_by_chain=True), dims=dims,
                                 coords=coords)


class DiffusionPosterior(BatchPosterior):
    """Posterior samples of a Pyro model whose latent field has a diffusion prior.

    :param callable model: the Pyro model (see :class:`~pyro_diffusion.likelihood.ModelLikelihood`
        for what it must satisfy).
    :param guidance: ``"auto"``, ``"dps"``, ``"mmps"``, ``"evidence"`` or a
        :class:`~pyro_diffusion.guidance.Guidance` instance.
    :param int num_samples: posterior draws.
    :param int num_steps: reverse steps (default: the prior's).
    :param str sampler: ``"ancestral"`` (default), ``"ddim"`` or ``"heun"``. **With a learned
        denoiser use the ancestral sampler.** The deterministic ones (Heun, DDIM with
        ``eta=0``) integrate the guided probability-flow ODE, which carries every error of the
        learned denoiser and of the guidance to the end, where the ancestral sampler's fresh
        noise forgets part of it at each step: on a GP prior trained on 4000 draws, MMPS was
        within 0.03 posterior sds of the exact posterior with the ancestral sampler and
        1.1-2.4 sds off with Heun or DDIM (``bench/deterministic_guidance.py``), and they
        warn. With an exact denoiser (:class:`~pyro_diffusion.GaussianDenoiser`,
        :class:`~pyro_diffusion.GaussianMixtureDenoiser`) and exact guidance Heun keeps the
        posterior variance best: every first-order sampler loses some at small step counts
        (for a sharp Gaussian posterior at 64 steps: ancestral 18 %, DDIM 9 %; Heun within
        1.5 % at 64 steps, 3 % at 32). Heun costs two evaluations a step.
    :param float eta: DDIM stochasticity.
    :param int batch_size: draws per batch; each batch is independent and becomes one ArviZ
        chain (a single batch is split into up to 4 chains of its independent draws).
    :param device: where to sample (default: the prior's device). The prior (in place) and
        the model's tensor arguments are moved there
        (:class:`~pyro_diffusion.likelihood.ModelLikelihood`).
    :param int seed: seed for the run (the global RNG is restored afterwards).
    :param bool progress: show a progress bar over batches and steps.
    """

    def __init__(self, model, guidance="auto", num_samples=1000, num_steps=None,
                 sampler="ancestral", eta=None, batch_size=1000, device=None, seed=None,
                 progress=True):
        self.sampler, self.eta = check_sampler(sampler, eta)
        self.model = model
        self.guidance = guidance
        self.num_samples = int(num_samples)
        self.num_steps = check_num_steps(num_steps)
        self.batch_size = int(batch_size)
        self._check_sizes()
        self.device = device
        self.seed = seed
        self.progress = progress

    def _prepare(self, lik, prior):
        self.guidance_used = resolve_guidance(self.guidance, lik)
        self._denoise = self.guidance_used.posterior_denoiser(lik, prior)
        num_steps = prior.num_steps if self.num_steps is None else self.num_steps
        if self.eta == 0.0 and not isinstance(prior.denoiser, (GaussianDenoiser,
                                                               GaussianMixtureDenoiser)):
            warnings.warn(f"sampler={self.sampler!r} with eta=0 integrates the guided "
                          "probability-flow ODE, which carries the learned denoiser's errors to "
                          "the end (posterior means off by several sds on a GP prior, "
                          "bench/deterministic_guidance.py); use sampler='ancestral' with a "
                          "learned prior", stacklevel=3)
        self._sigmas = noise_grid(num_steps, prior.sigma_min, prior.sigma_max, prior.rho,
                                  dtype=prior.dtype, device=prior.device)

    def _sample_batch(self, lik, prior, size, desc):
        return reverse_sample(self._denoise, prior.initial_noise(size), self._sigmas,
                              sampler=self.sampler, eta=self.eta, progress=self.progress,
                              desc=desc)

