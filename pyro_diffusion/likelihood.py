"""Reading the likelihood of a Pyro model whose latent field has a ``DiffusionPrior``.

Users never restate their likelihood. :class:`ModelLikelihood` traces the model once to find
its :class:`~pyro_diffusion.DiffusionPrior` site and its observed sites, then evaluates the
observed sites for a whole batch of latent values in one trace: the diffusion site's value is
set to the batch, and each observed site keeps its own Pyro distribution, whose parameters are
then differentiable functions of the latent. No plate dim is reserved for the particles: they
are the leading dim of the latent, so the user's plates keep their own dims.

The model must broadcast over one leading batch dimension of the latent value: inside
:meth:`ModelLikelihood.trace` the value has shape ``(n, *event_shape)``, so index it with
``f[..., idx]`` (not ``f[idx]``) and let the observed sites' batch shape be ``(n, *plates)``.
"""

import copy
import math
import re

import pyro
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .evidence import check_counts
from .prior import DiffusionPrior

__all__ = ["ModelLikelihood", "site_weight", "tensor_devices", "to_device"]


#: Wrappers that keep the family of the distribution inside (a TransformedDistribution such
#: as LogNormal does not: its base_dist is another family).
_WRAPPERS = (torch.distributions.Independent, MaskedDistribution, ExpandedDistribution)


def _unwrap(fn):
    """The distribution under Independent / Masked / Expanded wrappers."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def _mask_factor(mask, shape, event_dims, like):
    """A mask (``None``, a bool or a bool tensor over batch dims) as a float factor
    broadcastable to ``shape`` (batch dims, then ``event_dims`` event dims)."""
    if mask is None or mask is True:
        return None
    if mask is False:
        return like.new_zeros(())
    factor = mask.to(dtype=like.dtype, device=like.device)
    return factor.reshape(factor.shape + (1,) * event_dims)


def site_weight(site):
    r"""The weight of each scalar observation of an observed site, shape ``site["fn"].shape()``,
    or ``None`` when every weight is 1.

    It is the product of the site's ``poutine.mask`` (0 where masked), its ``poutine.scale`` (or
    a subsampling plate's scale) and the masks of ``.mask(...)`` wrappers in its distribution;
    :meth:`ModelLikelihood.site_log_prob` is the weighted sum of the observations' log-densities.

    :param dict site: an observed site of a trace (:meth:`ModelLikelihood.trace`).
    :returns: a floating tensor on the observations' device (in their dtype, or the default
        floating dtype for integer counts), or ``None``.
    """
    fn = site["fn"]
    shape = fn.shape()
    value = site.get("value")
    # On the observations' device; their dtype if floating (integer counts: the default
    # floating dtype, which callers cast to that of what they weight).
    like = torch.zeros((), dtype=torch.get_default_dtype(),
                       device=value.device if isinstance(value, torch.Tensor) else None)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        like = value
    factors = [_mask_factor(site.get("mask"), shape, len(fn.event_shape), like)]
    scale = site.get("scale", 1.0)
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        scale = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
        factors.append(scale.reshape(scale.shape + (1,) * len(fn.event_shape)))
    while isinstance(fn, _WRAPPERS):  # .mask(...) at any depth under Independent / Expanded
        if isinstance(fn, MaskedDistribution):
            factors.append(_mask_factor(fn._mask, shape, len(fn.event_shape), like))
        fn = fn.base_dist
    factors = [f for f in factors if f is not None]
    if not factors:
        return None
    weight = like.new_ones(shape)
    for factor in factors:
        weight = weight * factor
    return weight


def _is_diffusion_site(site):
    return (site["type"] == "sample" and not site["is_observed"]
            and isinstance(_unwrap(site["fn"]), DiffusionPrior))


# torch's wordings of a device mismatch (eager and reference kernels); only the message's first
# line is read, as Pyro appends the model's site names and shapes to errors raised inside it.
_DEVICE_MISMATCH = re.compile(r"same device|expected device|found at least two devices")


def _map_tensors(value, fn):
    """``value`` with ``fn`` applied to every tensor in it, also inside tuples (named ones
    too), lists and dicts (copied); other objects are returned as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):  # a copy keeps a subclass's state (a defaultdict's factory)
        mapped = copy.copy(value)
        for k, v in value.items():
            mapped[k] = _map_tensors(v, fn)
        return mapped
    return value


def to_device(value, device):
    """``value`` with every tensor in it, also inside tuples (named ones too), lists and
    dicts, moved to ``device``; other objects are returned as they are.

    :param value: a tensor, a container of them, or anything else.
    :param device: the device.
    """
    return _map_tensors(value, lambda t: t.to(device))


def tensor_devices(value):
    """The devices of the tensors in ``value``, searched as :func:`to_device` moves them (also
    inside tuples, lists and dicts), in order of first appearance; ``run_nuts`` seeds the
    generators of those that are accelerators.

    :param value: a tensor, a container of them, or anything else.
    :returns: a list of ``torch.device`` (empty when ``value`` holds no tensor).
    """
    found = []

    def record(t):
        if t.device not in found:
            found.append(t.device)
        return t

    _map_tensors(value, record)
    return found


class _SetDiffusionValue(Messenger):
    """Give each ``DiffusionPrior`` site a value instead of running its reverse process (with
    no value: zeros, on ``device`` if given, else on the prior's device)."""

    def __init__(self, value=None, device=None, batch_shape=()):
        super().__init__()
        self.value = value
        self.device = device
        self.batch_shape = tuple(batch_shape)

    def _pyro_sample(self, msg):
        if msg["is_observed"] or not isinstance(_unwrap(msg["fn"]), DiffusionPrior):
            return
        fn = msg["fn"]
        if self.value is None:
            msg["value"] = torch.zeros(self.batch_shape + tuple(fn.shape()),
                                       dtype=_unwrap(fn).dtype,
                                       device=self.device or _unwrap(fn).device)
        else:
            msg["value"] = self.value
        msg["infer"] = dict(msg["infer"], _diffusion_site=True)


def _check_observation(name, fn, value):
    """Clear errors for observed values a count likelihood cannot take."""
    if not isinstance(value, torch.Tensor):
        return
    if value.is_floating_point() and torch.isnan(value).any():
        raise ValueError(f"observed site {name!r} contains NaN values "
                         f"({int(torch.isnan(value).sum())} of {value.numel()}); "
                         "set them to any valid value (0, say) and mask them "
                         "(with poutine.mask(mask=~y.isnan()): masked observations are left "
                         "out of the likelihood and the guidance), or drop them from the data")
    base = _unwrap(fn)
    kind = type(base).__name__
    total = {"Binomial": getattr(base, "total_count", None), "Bernoulli": 1}.get(kind)
    if kind not in ("Poisson", "Binomial", "Bernoulli", "NegativeBinomial"):
        return
    try:
        check_counts(value, total, name=name)
    except ValueError as e:
        raise ValueError(f"observed site {name!r} ({kind}): {e}") from None


def _latent_sites_message(latent, observed):
    names = ", ".join(map(repr, latent))
    imputed = [n for n in latent if n.endswith("_unobserved")
               and n[:-len("_unobserved")] + "_observed" in observed]
    if imputed:
        return (f"latent site(s) {names} come from pyro.sample(..., obs_mask=...), which "
                "imputes the missing values as latent sites; the diffusion samplers take only "
                "the DiffusionPrior site as latent. Mask the missing values instead: set them "
                "to any valid value and sample with obs=y inside "
                "poutine.mask(mask=observed_mask)")
    return (f"latent site(s) {names} are not DiffusionPrior sites, and the diffusion samplers "
            "take exactly one latent site. If they are known, observe them, fix them with "
            "poutine.condition or make them pyro.deterministic; if they have a prior (an "
            "intercept, a variance), train the diffusion prior on draws that integrate them "
            "(f = mu + phi for an intercept mu, as the disease-mapping tutorial does) or on "
            "joint draws with them appended to the field's event")


class ModelLikelihood:
    """The observed part of a Pyro model, as a function of its ``DiffusionPrior`` site.

    :param callable model: a Pyro model with exactly one latent site distributed as a
        :class:`~pyro_diffusion.DiffusionPrior`, observed sites (``obs=...``) and optionally
        ``pyro.deterministic`` sites.
    :param tuple args: positional arguments of the model.
    :param dict kwargs: keyword arguments of the model.
    :param device: if given, move the tensors among ``args`` and ``kwargs`` (:func:`to_device`)
        and the prior (in place, as ``nn.Module.to`` does) to this device. Tensors the model
        takes from elsewhere (a closure, a global) are not moved: pass them as arguments.
    :param int num_particles: for data laid out one row per particle (as
        :func:`~pyro_diffusion.fit_prior` passes its chunks), the number of rows: the model is
        then first traced with a latent of that leading size, so that ``Normal(f, s)`` with
        ``y`` of shape ``(n, d)`` matches. ``None`` (default): one data set shared by all
        particles, traced with an unbatched latent.
    :raises ValueError: for a model without, or with more than one, diffusion site, for other
        latent sites, for observations of the wrong shape, NaNs, or impossible counts, and
        for a model that mixes devices.
    """

    def __init__(self, model, args=(), kwargs=None, device=None, num_particles=None):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        if device is not None:
            device = torch.device(device)
            self.args, self.kwargs = to_device(self.args, device), to_device(self.kwargs, device)
        try:
            with torch.no_grad():
                probe = _SetDiffusionValue(device=device, batch_shape=(
                    () if num_particles is None else (int(num_particles),)))
                trace = pyro.poutine.trace(probe(model)).get_trace(*self.args, **self.kwargs)
        except RuntimeError as e:
            first = (str(e).splitlines() or [""])[0]
            if not _DEVICE_MISMATCH.search(first):
                raise
            where = f"moved to {device}" if device is not None else "on the prior's device"
            raise ValueError(
                f"the model mixes devices when traced with its DiffusionPrior site's value "
                f"{where}: {first}. Pass the model's data as arguments and "
                f"give the sampler device=... (tensor arguments and the prior are moved "
                f"there), or move them yourself") from e
        diffusion, latent, observed, deterministic = [], [], [], []
        max_dim = 0
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site_is_subsample(site):
                size = getattr(site["fn"], "size", None)
                if size is not None and site["value"].numel() < size:
                    raise ValueError(
                        f"plate {name!r} subsamples {site['value'].numel()} of {size}: each "
                        "trace of the model would see other observations; the samplers need "
                        "them all (drop subsample_size)")
                continue
            max_dim = max(max_dim, self.plate_depth(site))
            if site["infer"].get("_diffusion_site"):
                diffusion.append(name)
            elif site["infer"].get("_deterministic"):
                deterministic.append(name)
            elif site["is_observed"]:
                observed.append(name)
            elif not site["infer"].get("is_auxiliary"):
                latent.append(name)
        if not diffusion:
            raise ValueError("the model has no sample site distributed as a DiffusionPrior; "
                             "write e.g. f = pyro.sample('f', prior) with a DiffusionPrior prior")
        if len(diffusion) > 1:
            raise ValueError(f"the model has {len(diffusion)} DiffusionPrior sites "
                             f"({', '.join(map(repr, diffusion))}); exactly one is supported")
        if latent:
            raise ValueError(_latent_sites_message(latent, observed))
        if not observed:
            raise ValueError("the model has no observed sites: pass data with obs=...")
        site = trace.nodes[diffusion[0]]
        for frame in site["cond_indep_stack"]:
            if frame.vectorized:
                raise ValueError(f"the DiffusionPrior site {diffusion[0]!r} is inside plate "
                                 f"{frame.name!r}; put it outside all plates")
        prior = _unwrap(site["fn"])
        if tuple(site["fn"].shape()) != tuple(prior.event_shape):
            raise ValueError(
                f"the DiffusionPrior site {diffusion[0]!r} has shape "
                f"{tuple(site['fn'].shape())}, not the prior's event shape "
                f"{tuple(prior.event_shape)}: the samplers take one field, so sample the prior "
                "itself (not expanded or batched); for several fields, train it on the stacked "
                "event")
        for name in observed:
            obs = trace.nodes[name]
            value, fn = obs["value"], obs["fn"]
            if not isinstance(value, (torch.Tensor, int, float)):
                raise ValueError(f"observed site {name!r} holds a {type(value).__name__}; pass "
                                 "a tensor (torch.as_tensor(...))")
            if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(fn.shape()):
                raise ValueError(
                    f"observed site {name!r} has a value of shape {tuple(value.shape)} but the "
                    f"model's distribution there has shape {tuple(fn.shape())} (batch "
                    f"{tuple(fn.batch_shape)}, event {tuple(fn.event_shape)})")
            _check_observation(name, fn, value)
        self.site = diffusion[0]
        self.prior = prior
        if device is not None:
            self.prior.to(device)
        self.observed_sites = observed
        self.deterministic_sites = deterministic
        #: Plate dims the model uses (for callers that add their own plates to the left).
        self.max_plate_nesting = max_dim
        if num_particles is None:
            self._check_broadcasting(trace)

    def _check_broadcasting(self, trace, n=3):
        """Trace the model with a batch of ``n`` distinct fields: each observed site must gain
        that leading dim (or not depend on the field), and each field's log-likelihood must be
        what the model gives it alone, as the samplers' batches need."""
        d = math.prod(self.event_shape)
        dtype, device = self.prior.dtype, self.prior.device
        mean = torch.as_tensor(getattr(self.prior.denoiser, "data_mean", 0.0), dtype=dtype,
                               device=device).reshape(-1)
        scale = float(getattr(self.prior.denoiser, "data_std", 1.0))
        # Distinct, positive offsets of a tenth of the data's scale (keep rates positive).
        pattern = torch.linspace(0.5, 1.5, d, dtype=dtype, device=device)
        steps = torch.arange(1, n + 1, dtype=dtype, device=device)[:, None]
        x = (mean + 0.1 * scale * steps * pattern).reshape((n,) + tuple(self.event_shape))
        hint = (f"the samplers give the DiffusionPrior site {self.site!r} a batch of fields, "
                f"shape (batch, *event_shape); the model must broadcast over that leading dim: "
                "index the field as f[..., idx] (not f[idx]) and reduce over its last dims "
                "(f.sum(-1), not f.sum())")
        try:
            with torch.no_grad(), pyro.validation_enabled(False):
                batched = self.trace(x)
                joint = self._trace_log_likelihood(batched, x)
                alone = torch.cat([self.log_likelihood(x[i:i + 1]) for i in range(n)])
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"the model fails with a batch of {n} fields "
                             f"({type(e).__name__}: {first}); {hint}") from e
        for name in self.observed_sites:
            single = tuple(trace.nodes[name]["fn"].shape())
            shape = tuple(batched.nodes[name]["fn"].shape())
            if shape not in (single, (n,) + single):
                raise ValueError(f"observed site {name!r} has shape {shape} for a batch of {n} "
                                 f"fields and {single} for one; {hint}")
        if joint.shape != alone.shape or not torch.allclose(
                joint, alone, rtol=1e-4, atol=1e-4, equal_nan=True):
            raise ValueError(f"the log-likelihood of a batch of {n} fields, {joint.tolist()}, "
                             f"is not that of each field alone, {alone.tolist()}: the fields "
                             f"mix; {hint}")

    @property
    def event_shape(self):
        return self.prior.event_shape

    def trace(self, x):
        """Trace the model with the diffusion site set to the batch ``x`` ``(n, *event_shape)``.

        The model sees the value with its leading batch dim; its observed sites then hold
        distributions of batch shape ``(n, *plates)`` whose parameters depend on ``x``
        (differentiably, if ``x`` requires grad). Plates keep their own dims, to the right of
        the particles, so no plate dim is reserved for them.
        """
        return pyro.poutine.trace(_SetDiffusionValue(x)(self.model)).get_trace(
            *self.args, **self.kwargs)

    @staticmethod
    def plate_depth(site):
        """How many plate dims (counted from the right) a trace site uses."""
        dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
        return max(dims, default=0)

    def per_particle(self, value, site, n, event_dim=0):
        """Split a site quantity of shape ``(n, *plates, *event)`` into ``(n, -1)``; a value
        without the particle dim (a site that does not depend on the latent) is repeated."""
        depth = self.plate_depth(site) + event_dim
        if value.dim() > depth + 1:
            raise ValueError(f"site {site['name']!r} has shape {tuple(value.shape)}: more dims "
                             f"than its plate and event dims and one particle dim; the model "
                             "must broadcast over one leading batch dim of the latent")
        if value.dim() == depth + 1 and value.shape[0] == n:
            return value.reshape(n, -1)
        return value.reshape(1, -1).expand(n, -1)

    def site_log_prob(self, site, n):
        """Per-particle log-likelihood ``(n,)`` of one observed site of a :meth:`trace`."""
        lp = site["fn"].log_prob(site["value"])
        mask = site.get("mask")
        if isinstance(mask, torch.Tensor):
            lp = lp.masked_fill(~mask, 0.0)
        elif mask is False:
            lp = torch.zeros_like(lp)
        return self.per_particle(lp * site.get("scale", 1.0), site, n).sum(-1)

    def log_likelihood(self, x):
        """Per-particle :math:`\\log p(y \\mid x)` summed over observed sites, shape ``(n,)``."""
        return self._trace_log_likelihood(self.trace(x), x)

    def _trace_log_likelihood(self, trace, x):
        """:meth:`log_likelihood` of ``x`` from its :meth:`trace`."""
        n = x.shape[0]
        total = x.new_zeros(n)
        for name in self.observed_sites:
            total = total + self.site_log_prob(trace.nodes[name], n)
        return total

    def deterministic(self, x):
        """Values of the model's ``pyro.deterministic`` sites for the batch ``x``, each of shape
        ``(n, *site_shape)``."""
        with torch.no_grad():
            trace = self.trace(x) if self.deterministic_sites else None
        out, n = {}, x.shape[0]
        for name in self.deterministic_sites:
            # By the model's broadcasting contract a value that depends on the latent leads
            # with the particle dim; anything else is a constant, repeated for each particle.
            v = trace.nodes[name]["value"]
            out[name] = v if v.dim() and v.shape[0] == n else v.expand((n,) + v.shape)
        return out
