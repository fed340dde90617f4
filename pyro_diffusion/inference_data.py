"""Build ArviZ inference data from posterior samples on both ArviZ 0.x and ArviZ 1.x.

ArviZ 0.x (the last releases supporting Python 3.11) and ArviZ 1.x (Python 3.12+) disagree:

* 0.x: ``az.from_dict(posterior=..., observed_data=..., sample_stats=..., dims=..., coords=...)``
  takes one keyword argument per group and returns an ``arviz.InferenceData``;
  ``az.from_pyro`` exists.
* 1.x: ``arviz`` re-exports ``arviz_base.from_dict(data, *, name=None, sample_dims=None, ...,
  coords=None, dims=None, ...)``, which takes a single dict of groups
  (``{"posterior": {...}, "observed_data": {...}}``) and returns an ``xarray.DataTree``;
  ``from_pyro`` is gone.

:func:`to_inference_data` is the only place in the package that deals with this; everything
else passes plain dicts of ``(num_chains, num_draws, *shape)`` arrays or tensors to it.
"""

import inspect
import numbers
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["arviz_major_version", "split_chains", "to_inference_data"]

_SAMPLE_DIMS = ("chain", "draw")


def _import_arviz():
    """Import :mod:`arviz`, with an actionable message when it is missing."""
    try:
        with warnings.catch_warnings():
            # ArviZ 0.2x warns on import about its coming 1.x refactor, which this module handles.
            warnings.filterwarnings(
                "ignore",
                message=r"\s*ArviZ is undergoing a major refactor",
                category=FutureWarning,
            )
            import arviz
    except ImportError as err:
        raise ImportError(
            "pyro_diffusion.inference_data needs ArviZ to build inference data; install it with "
            "`pip install arviz` (ArviZ 0.16+ on Python 3.10/3.11, or ArviZ 1.x on Python 3.12+)."
        ) from err
    return arviz


def _parse_major(version):
    """Leading integer of a version string such as ``"0.23.4"`` or ``"1.0.0.dev0"``, or None."""
    match = re.match(r"\s*v?(\d+)", str(version))
    return int(match.group(1)) if match else None


def _uses_group_dict_api(from_dict, major):
    """Whether ``from_dict`` is the ArviZ 1.x ``from_dict(data, *, ...)`` taking a dict of groups.

    The signature decides when it is conclusive (a ``posterior`` parameter means 0.x; a leading
    positional ``data`` parameter means 1.x); otherwise the major version does.
    """
    try:
        params = inspect.signature(from_dict).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        params = None
    if params is not None:
        if "posterior" in params:
            return False
        first = next(iter(params.values()), None)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if first is not None and first.name == "data" and first.kind in positional:
            return True
    return major is not None and major >= 1


def arviz_major_version():
    """Major version of the installed ArviZ: ``0`` for the 0.x series, ``1`` for 1.x.

    Read from ``arviz.__version__``; if that cannot be parsed, inferred from the signature of
    ``arviz.from_dict`` (``1`` if it takes a dict of groups, else ``0``).

    :returns: an int.
    :raises ImportError: if ArviZ is not installed.
    """
    az = _import_arviz()
    major = _parse_major(getattr(az, "__version__", ""))
    if major is None:
        major = 1 if _uses_group_dict_api(az.from_dict, None) else 0
    return major


def _to_numpy(value):
    """A numpy array from a tensor (detached, moved to CPU), array, list or scalar."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _convert_group(group, name, sampled):
    """Convert a ``name -> array-like`` mapping to ``name -> numpy array``.

    With ``sampled=True`` every value must lead with the same ``(num_chains, num_draws)``.
    """
    if not isinstance(group, Mapping):
        raise TypeError(f"{name} must be a dict of name -> array, got {type(group).__name__}")
    out = {}
    for var, value in group.items():
        array = _to_numpy(value)
        if sampled and array.ndim < 2:
            raise ValueError(
                f"{name}[{var!r}] has shape {array.shape}; expected (num_chains, num_draws, "
                "*shape). Use split_chains() to reshape flat (num_samples, ...) samples."
            )
        out[var] = array
    return out


def _check_sample_shape(groups):
    """Raise unless every sampled variable shares one ``(num_chains, num_draws)``."""
    expected = None
    for group_name, group in groups.items():
        for var, array in group.items():
            lead = array.shape[:2]
            if expected is None:
                expected = (lead, f"{group_name}[{var!r}]")
            elif lead != expected[0]:
                raise ValueError(
                    f"{group_name}[{var!r}] has (num_chains, num_draws) = {lead}, but "
                    f"{expected[1]} has {expected[0]}"
                )


def to_inference_data(posterior, *, observed_data=None, sample_stats=None, dims=None, coords=None):
    """Wrap posterior samples as ArviZ inference data, whichever ArviZ major version is installed.

    The result works with ``az.summary``, ``az.ess``, ``az.rhat`` and the plotting functions of
    the installed ArviZ. Torch tensors are detached and copied to CPU numpy arrays.

    Example::

        samples = mcmc.get_samples(group_by_chain=True)  # name -> (chains, draws, ...)
        idata = to_inference_data(samples, observed_data={"y": y},
                                  dims={"x": ["pixel"]}, coords={"pixel": range(64)})
        az.summary(idata)

    :param dict posterior: ``name -> tensor/array`` shaped ``(num_chains, num_draws, *shape)``;
        must not be empty. Flat ``(num_samples, *shape)`` samples can be reshaped with
        :func:`split_chains`.
    :param dict observed_data: optional ``name -> tensor/array`` (no chain or draw dimension).
    :param dict sample_stats: optional ``name -> tensor/array`` shaped
        ``(num_chains, num_draws[, ...])``, e.g. ``{"lp": ..., "diverging": ...}``.
    :param dict dims: optional ``name -> list of dimension names`` for the dimensions after
        ``chain`` and ``draw`` (or, for observed data, for all dimensions), as in ArviZ.
    :param dict coords: optional ``dimension name -> coordinate values``, as in ArviZ.
    :returns: an ``arviz.InferenceData`` (ArviZ 0.x) or an ``xarray.DataTree`` (ArviZ 1.x),
        with groups ``posterior`` and, when given, ``observed_data`` and ``sample_stats``.
    :raises ImportError: if ArviZ is not installed.
    :raises ValueError: if ``posterior`` is empty or a sampled variable does not lead with the
        common ``(num_chains, num_draws)``.
    :raises TypeError: if a group is not a dict.
    """
    az = _import_arviz()
    post = _convert_group(posterior, "posterior", sampled=True)
    if not post:
        raise ValueError("posterior is empty; pass a dict of name -> (num_chains, num_draws, ...)")
    groups = {"posterior": post}
    if sample_stats:
        groups["sample_stats"] = _convert_group(sample_stats, "sample_stats", sampled=True)
    _check_sample_shape(groups)
    if observed_data:
        groups["observed_data"] = _convert_group(observed_data, "observed_data", sampled=False)
    if dims is not None:
        dims = {var: list(var_dims) for var, var_dims in dims.items()}
    if coords is not None:
        coords = {
            dim: _to_numpy(values) if isinstance(values, torch.Tensor) else values
            for dim, values in coords.items()
        }

    from_dict = az.from_dict
    major = _parse_major(getattr(az, "__version__", ""))
    if _uses_group_dict_api(from_dict, major):
        # ArviZ 1.x (arviz_base.from_dict): one dict of groups; groups whose name contains
        # "data" get no sample dims. Name the sample dims explicitly rather than relying on
        # the user-configurable rcParams["data.sample_dims"].
        kwargs = {"dims": dims, "coords": coords}
        try:
            if "sample_dims" in inspect.signature(from_dict).parameters:
                kwargs["sample_dims"] = list(_SAMPLE_DIMS)
        except (TypeError, ValueError):
            pass
        return from_dict(groups, **kwargs)
    # ArviZ 0.x: one keyword argument per group.
    return from_dict(**groups, dims=dims, coords=coords)


def split_chains(samples, num_chains):
    """Reshape flat samples ``(num_samples, ...)`` to ``(num_chains, num_samples // num_chains,
    ...)``.

    Chains are taken as contiguous blocks, so chain ``c`` holds samples
    ``c * num_draws`` to ``(c + 1) * num_draws - 1``: the layout of Pyro's
    ``MCMC.get_samples(group_by_chain=False)`` and of independently sampled batches stacked in
    order. Torch tensors stay tensors (a view when possible), numpy arrays stay arrays, anything
    else becomes a numpy array.

    :param dict samples: ``name -> tensor/array`` shaped ``(num_samples, *shape)``, all with the
        same ``num_samples``.
    :param int num_chains: number of chains, at least 1, dividing ``num_samples``.
    :returns: a dict ``name -> (num_chains, num_samples // num_chains, *shape)``.
    :raises ValueError: if ``num_chains`` is not a positive integer, if a value has no sample
        dimension, if the values disagree on ``num_samples``, or if ``num_samples`` is not
        divisible by ``num_chains``.
    """
    if (
        isinstance(num_chains, bool)
        or not isinstance(num_chains, numbers.Integral)
        or num_chains < 1
    ):
        raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")
    num_chains = int(num_chains)
    out = {}
    num_samples = None
    for name, value in samples.items():
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            value = np.asarray(value)
        shape = tuple(value.shape)
        if not shape:
            raise ValueError(f"samples[{name!r}] is a scalar; expected shape (num_samples, ...)")
        if num_samples is None:
            num_samples = shape[0]
        elif shape[0] != num_samples:
            raise ValueError(
                f"samples[{name!r}] has {shape[0]} samples but earlier values have {num_samples}"
            )
        if shape[0] % num_chains:
            raise ValueError(
                f"samples[{name!r}] has {shape[0]} samples, which is not divisible by "
                f"num_chains={num_chains}"
            )
        out[name] = value.reshape(num_chains, shape[0] // num_chains, *shape[1:])
    return out
