"""pyro-diffusion: learned diffusion models as priors in Pyro models."""

from ._version import __version__
from .em import fit_prior
from .exact import GaussianDenoiser, GaussianMixtureDenoiser
from .guidance import DPS, MMPS, EvidenceTrick, Guidance
from .langevin import DiffusionLangevin
from .metrics import sliced_wasserstein
from .mixture_em import fit_gaussian_mixture
from .networks import MLP, UNet, default_network
from .noise_grid import noise_grid
from .posterior import DiffusionPosterior
from .preconditioning import EDMDenoiser
from .prior import DiffusionPrior
from .samplers import reverse_sample
from .serialization import register_denoiser
from .smc import DiffusionSMC

__all__ = [
    "DPS",
    "MMPS",
    "DiffusionLangevin",
    "DiffusionPosterior",
    "DiffusionPrior",
    "DiffusionSMC",
    "EDMDenoiser",
    "EvidenceTrick",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "Guidance",
    "MLP",
    "UNet",
    "__version__",
    "default_network",
    "fit_gaussian_mixture",
    "fit_prior",
    "noise_grid",
    "register_denoiser",
    "reverse_sample",
    "sliced_wasserstein",
]
