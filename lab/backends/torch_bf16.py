"""torch_bf16: the torch backend under bf16 autocast, where the hardware has native bf16."""
from __future__ import annotations

from lab.backends.base import BackendUnavailable, register_backend
from lab.backends.torch_fp32 import TorchBackend, torch_device
from lab.hardware import cpu_has_native_bf16


@register_backend
class TorchBf16Backend(TorchBackend):
    name = "torch_bf16"
    description = "PyTorch eager, bf16 autocast (AVX-512 BF16 / AMX CPUs, CUDA)"
    precision = "bf16"

    @classmethod
    def check_available(cls) -> None:
        super().check_available()
        if torch_device() == "cpu" and not cpu_has_native_bf16():
            raise BackendUnavailable("this CPU has no native bf16")
