"""The model registry: every tool builds architectures by name through here.

    @register_model
    def mlp(num_classes=10, in_channels=3, image_size=32, **kw): ...

    net = create_model("mlp", num_classes=10, in_channels=1, image_size=28)
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_defaults(name: str) -> dict:
    """The keyword arguments an architecture accepts, with their defaults."""
    fn = _get(name)
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty
    }


def _get(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; valid models: {', '.join(list_models())}"
        ) from None


def create_model(name: str, **kwargs) -> nn.Module:
    fn = _get(name)
    accepted = inspect.signature(fn).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(
            f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}"
        )
    return fn(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
