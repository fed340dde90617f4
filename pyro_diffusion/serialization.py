"""Denoisers as plain data: a registry of classes, their configs and weights.

A denoiser that can be saved is an ``nn.Module`` class registered with
:func:`register_denoiser` that implements ``get_config()``, returning the keyword arguments of
its constructor as plain data (numbers, strings, lists, dicts, tensors, or nested denoisers and
networks, which are stored the same way). Checkpoints then hold only tensors and primitives and
load with ``torch.load(..., weights_only=True)``: nothing is ever unpickled.
"""

import torch
from torch import nn

_REGISTRY = {}


def register_denoiser(cls):
    """Class decorator: make a denoiser or network class savable by name.

    The class must implement ``get_config()`` returning its constructor's keyword arguments.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_denoiser expects an nn.Module subclass, got {cls!r}")
    if not callable(getattr(cls, "get_config", None)):
        raise TypeError(f"{cls.__name__} must implement get_config() to be registered")
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"another class is already registered under the name {name!r}")
    _REGISTRY[name] = cls
    return cls


def _encode(value):
    if isinstance(value, nn.Module):
        # Nested modules keep only their config: the outer state_dict holds their weights.
        return module_to_dict(value, with_state=False)
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a config value of type {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict):
        if "__module__" in value:
            return module_from_dict(value)
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def module_to_dict(module, with_state=True):
    """Describe a registered module as ``{"__module__": name, "config": ..., "state": ...}``."""
    cls = type(module)
    if _REGISTRY.get(cls.__name__) is not cls:
        raise TypeError(
            f"{cls.__name__} is not a registered denoiser or network, so it cannot be saved; "
            "decorate its class with pyro_diffusion.register_denoiser and give it get_config(), "
            "or save its state_dict yourself"
        )
    spec = {"__module__": cls.__name__, "config": _encode(module.get_config())}
    if with_state:
        spec["state"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return spec


def module_from_dict(spec):
    """Rebuild a module written by :func:`module_to_dict`."""
    name = spec.get("__module__")
    if name not in _REGISTRY:
        raise ValueError(f"checkpoint names an unknown denoiser or network class {name!r}; "
                         f"known: {', '.join(sorted(_REGISTRY))}")
    module = _REGISTRY[name](**_decode(spec["config"]))
    if "state" in spec:
        module.load_state_dict(spec["state"])
    return module
