r"""Disease mapping with a CAR prior: the model behind ``make demo`` and the SIDS tutorial.

Counts :math:`y_i` of deaths in area :math:`i` with expected counts :math:`E_i` (internal
standardisation) follow :math:`y_i \sim \mathrm{Poisson}(E_i e^{f_i})`, where the log relative
risk is an intercept plus a proper conditional autoregressive (CAR) field with hyperpriors:

.. math::

    \mu \sim N(0, 0.3^2), \quad \rho \sim U(0, 0.99), \quad \tau \sim \mathrm{Gamma}(2, 1),
    \quad \phi \sim N\big(0, [\tau (D - \rho W)]^{-1}\big), \quad f = \mu + \phi,

with :math:`W` the areas' adjacency and :math:`D` its degree matrix. The same prior is written
twice: :func:`sample_log_risk` draws fields to train a :class:`~pyro_diffusion.DiffusionPrior`
(which then absorbs the hyperpriors), and :func:`car_model` is the Pyro model NUTS samples
(non-centred: :math:`\phi = L^{-\top} z` with :math:`\tau (D - \rho W) = L L^\top`), so the two
posteriors can be compared on the same data. :func:`diffusion_model` is the measurement model
with the diffusion prior.

The package ships a prior trained this way on the North Carolina counties
(:func:`load_nc_sids_prior`); ``scripts/train_nc_sids_prior.py`` retrains it.

References: Besag, York, Mollié (1991), *Bayesian image restoration, with two applications in
spatial statistics*; Cressie, Chan (1989), *Spatial modeling of regional variables* (the SIDS
data).
"""

import os

import pyro
import pyro.distributions as dist
import torch

from .datasets import sample_car
from .prior import DiffusionPrior

__all__ = ["INTERCEPT_SD", "RHO_MAX", "TAU_PRIOR", "car_model", "diffusion_model",
           "load_nc_sids_prior", "nc_sids_prior_path", "sample_log_risk"]

#: Prior sd of the intercept :math:`\mu` (log relative risk).
INTERCEPT_SD = 0.3
#: Upper end of the uniform prior on the spatial dependence :math:`\rho`.
RHO_MAX = 0.99
#: Gamma(concentration, rate) prior of the CAR precision :math:`\tau`.
TAU_PRIOR = (2.0, 1.0)


def _hyperpriors():
    return (torch.distributions.Uniform(0.0, RHO_MAX),
            torch.distributions.Gamma(*TAU_PRIOR))


def sample_log_risk(num_samples, adjacency, *, seed=0):
    """Draws of the log relative risk :math:`f = \\mu + \\phi` under the CAR prior with its
    hyperpriors, float32 ``(num_samples, n)``.

    :param int num_samples: number of fields.
    :param torch.Tensor adjacency: symmetric 0/1 ``(n, n)`` adjacency (every area with at
        least one neighbour).
    :param int seed: seed of the draws (the global RNG is left alone).
    """
    rho, tau = _hyperpriors()
    phi = sample_car(num_samples, adjacency, model="proper", rho=rho, tau=tau, seed=seed)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    mu = INTERCEPT_SD * torch.randn(num_samples, 1, generator=gen)
    return (phi + mu).float()


def car_model(adjacency, expected, y=None):
    """The Pyro model with the CAR prior itself (for NUTS), non-centred.

    :param torch.Tensor adjacency: ``(n, n)`` adjacency.
    :param torch.Tensor expected: expected counts ``(n,)``.
    :param torch.Tensor y: observed counts ``(n,)`` (``None`` to simulate).
    """
    W = adjacency.to(expected.dtype)
    n = W.shape[0]
    D = torch.diag(W.sum(-1))
    mu = pyro.sample("mu", dist.Normal(expected.new_tensor(0.0), INTERCEPT_SD))
    rho = pyro.sample("rho", dist.Uniform(expected.new_tensor(0.0), RHO_MAX))
    tau = pyro.sample("tau", dist.Gamma(expected.new_tensor(TAU_PRIOR[0]), TAU_PRIOR[1]))
    z = pyro.sample("z", dist.Normal(expected.new_zeros(n), 1.0).to_event(1))
    L = torch.linalg.cholesky(tau * (D - rho * W))
    phi = torch.linalg.solve_triangular(L.transpose(-1, -2), z.unsqueeze(-1), upper=True)
    f = pyro.deterministic("f", mu + phi.squeeze(-1))
    with pyro.plate("areas", n):
        pyro.sample("y", dist.Poisson(expected * f.exp()), obs=y)


def diffusion_model(prior, expected, y=None):
    """The same measurement model with the log relative risk's prior a ``DiffusionPrior``.

    :param DiffusionPrior prior: a prior over ``(n,)`` log relative risks.
    :param torch.Tensor expected: expected counts ``(n,)``.
    :param torch.Tensor y: observed counts ``(n,)``.
    """
    f = pyro.sample("f", prior)
    with pyro.plate("areas", expected.shape[-1]):
        pyro.sample("y", dist.Poisson(expected * f.exp()), obs=y)


def nc_sids_prior_path():
    """Where the shipped North Carolina CAR prior lives inside the package."""
    return os.path.join(os.path.dirname(__file__), "weights", "nc_sids_car.pt")


def load_nc_sids_prior(**settings):
    """The shipped :class:`~pyro_diffusion.DiffusionPrior` over the log relative risks of the
    100 North Carolina counties (order of :func:`~pyro_diffusion.datasets.load_nc_sids`),
    trained on draws of :func:`sample_log_risk`; ``settings`` override its sampling settings."""
    path = nc_sids_prior_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: run scripts/train_nc_sids_prior.py to "
                                "train the North Carolina prior")
    return DiffusionPrior.load(path, **settings)
