"""Architectures and their registry: the one vocabulary training, serving and the benchmarks share.

Pure torch.nn: nothing here reads files or imports the rest of the project. One family per file;
importing a family registers it.
"""
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

from . import mlp, simple_cnn, airbench, custom_cnn  # noqa: F401,E402
