r"""EDM preconditioning: a trainable denoiser in the data's own units.

A network :math:`F` is wrapped as

.. math::

    D(x; \sigma) = c_{\rm skip}(\sigma)\,x + c_{\rm out}(\sigma)\,
    F\big(c_{\rm in}(\sigma)\,x,\ c_{\rm noise}(\sigma)\big),

with :math:`c_{\rm skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)`,
:math:`c_{\rm out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}`,
:math:`c_{\rm in} = 1/\sqrt{\sigma^2+\sigma_d^2}` and :math:`c_{\rm noise} = \ln(\sigma)/4`,
applied to standardised data :math:`z = (x - m)/s` with a per-coordinate mean :math:`m` and one
global scale :math:`s` (a global scale keeps the noise isotropic, so
:math:`D_x(x; \sigma) = m + s\,D_z((x - m)/s;\ \sigma/s)`).

Reference: Karras, Aittala, Aila, Laine (2022), *Elucidating the Design Space of
Diffusion-Based Generative Models*, Table 1.
"""

import math

import torch
from torch import nn

from .serialization import register_denoiser


@register_denoiser
class EDMDenoiser(nn.Module):
    """Preconditioned denoiser ``D(x, sigma)`` around a noise-conditioned network.

    :param nn.Module net: network ``net(z, c_noise) -> F`` on standardised inputs.
    :param torch.Tensor mean: per-coordinate data mean, of the event's shape (or a scalar).
    :param float std: global data scale; the standardised data has unit mean variance.
    :param float sigma_data: standard deviation assumed for the standardised data.
    :param tuple event_shape: the event's shape.
    """

    def __init__(self, net, event_shape, mean=0.0, std=1.0, sigma_data=1.0):
        super().__init__()
        self.net = net
        self.event_shape = tuple(int(n) for n in event_shape)
        std = float(std)
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std}")
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
        self.register_buffer("mean", mean.expand(self.event_shape).clone())
        self.std = std
        self.sigma_data = float(sigma_data)

    @classmethod
    def from_samples(cls, net, samples):
        """Wrap ``net`` with the standardisation read from ``samples`` ``(n, *event_shape)``."""
        mean = samples.mean(0)
        std = samples.var(0, unbiased=False).mean().sqrt().item()
        if not std > 0:
            raise ValueError("the training samples are all identical: nothing to learn")
        return cls(net, samples.shape[1:], mean=mean, std=std)

    def get_config(self):
        return {"net": self.net, "event_shape": list(self.event_shape), "mean": self.mean,
                "std": self.std, "sigma_data": self.sigma_data}

    @property
    def data_mean(self):
        return self.mean

    @property
    def data_std(self):
        return self.std * self.sigma_data

    def standardized(self, x, sigma):
        """The preconditioned network's output in standardised units: ``(D_z, z, sigma_z)``."""
        shape = (-1,) + (1,) * len(self.event_shape)
        z = (x - self.mean) / self.std
        s = (sigma / self.std).reshape(shape)
        sd2 = self.sigma_data ** 2
        var = s.square() + sd2
        c_skip = sd2 / var
        c_out = s * self.sigma_data * var.rsqrt()
        c_in = var.rsqrt()
        c_noise = s.reshape(-1).clamp(min=1e-20).log() / 4
        out = self.net(c_in * z, c_noise.to(z.dtype))
        return c_skip * z + c_out * out, z, s

    def forward(self, x, sigma):
        d_z, _, _ = self.standardized(x, sigma)
        return self.mean + self.std * d_z
