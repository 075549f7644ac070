"""The backend registry (see lab/backends/base.py). Importing this package imports every module in it,
which registers its backend: adding a backend is adding one file here (plus, if it needs a file of its
own, an export hook in training/export_hooks.py)."""
import importlib
import pkgutil

from lab.backends.base import (  # noqa: F401
    Backend,
    BackendUnavailable,
    UnknownBackendError,
    backends_for_files,
    default_backends,
    get_backend,
    list_backends,
    load_backend,
    load_plugins,
    register_backend,
    softmax,
)
for _order in ("onnx", "onnx_int8", "torch_fp32", "torch_bf16"):  # the served default order first
    importlib.import_module(f"{__name__}.{_order}")
for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

load_plugins()
