"""The model registry: every tool builds architectures by name through here.

    @register_model
    def mlp(num_classes=10, in_channels=3, image_size=32, **kw) -> ImageClassifier: ...

    net = create_model("mlp", num_classes=10, in_channels=1, image_size=28, seed=3)

Every architecture takes `num_classes`, `in_channels` and `image_size` and returns an
`ImageClassifier` (models/base.py), which declares its head and other roles. `seed` makes the
initial weights a function of the seed alone (the global RNG is left as it was).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn as nn

from .base import ImageClassifier

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
REQUIRED_ARGS = ("num_classes", "in_channels", "image_size")


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    missing = [a for a in REQUIRED_ARGS if a not in inspect.signature(fn).parameters]
    if missing:
        raise TypeError(f"model {name!r} must take {', '.join(REQUIRED_ARGS)}; it lacks {', '.join(missing)}")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def describe_model(name: str) -> str:
    """The first line of the architecture's docstring."""
    doc = inspect.getdoc(_get(name)) or ""
    return doc.splitlines()[0] if doc else ""


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


def create_model(name: str, *, seed: int | None = None, **kwargs) -> ImageClassifier:
    fn = _get(name)
    accepted = inspect.signature(fn).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise TypeError(
            f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted)}"
        )
    if seed is None:
        model = fn(**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = fn(**kwargs)
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"model {name!r} returned a {type(model).__name__}, not an ImageClassifier "
                        f"(models/base.py): declare its head and roles")
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
