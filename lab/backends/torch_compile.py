"""torch_compile: the torch backend compiled by torch.compile (inductor) once, when it is built.

Compiling takes seconds to minutes (it generates and builds C++ kernels on the CPU; a C++ compiler is
needed) and happens at load: the backend runs a batch of 1 and of 64 before it is used, and keeps how
long that took in `compile_seconds`. Not served by default (LAB_BACKENDS=...,torch_compile)."""
from __future__ import annotations

import shutil
import time

import numpy as np

from lab.backends.base import BackendUnavailable, register_backend
from lab.backends.torch_fp32 import TorchBackend


@register_backend
class TorchCompileBackend(TorchBackend):
    name = "torch_compile"
    description = "PyTorch, torch.compile (inductor), fp32"
    serve_by_default = False

    @classmethod
    def check_available(cls) -> None:
        super().check_available()
        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            raise BackendUnavailable("torch.compile (inductor) needs a C++ compiler on the CPU; none is on PATH")

    def __init__(self, path, card, threads: int | None = None):
        super().__init__(path, card, threads=threads)
        t0 = time.perf_counter()
        self.model = self.torch.compile(self.model, dynamic=True)  # one graph for every batch size
        shape = (card.preprocessing.channels, *card.preprocessing.size)
        for n in (1, 64):
            self.predict(np.zeros((n, *shape), np.float32))
        self.compile_seconds = time.perf_counter() - t0

