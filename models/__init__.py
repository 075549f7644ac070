"""Architectures and their registry: the one vocabulary training, serving and the benchmarks share.

Pure torch.nn: nothing here reads files or imports the rest of the project. One family per file:
every module of this package is imported below, which registers its architectures, so adding an
architecture is adding one file.
"""
import importlib
import pkgutil

from .base import ImageClassifier  # noqa: F401
from .tta import TTA, with_tta  # noqa: F401
from .registry import (  # noqa: F401
    UnknownModelError,
    count_parameters,
    create_model,
    describe_model,
    list_models,
    model_defaults,
    register_model,
)

_INFRASTRUCTURE = {"base", "registry", "tta", "receptive_field", "custom_layers", "__main__"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _INFRASTRUCTURE and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
