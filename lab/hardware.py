"""What this machine can do, without importing torch."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


def cores() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's total)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(w for line in text.splitlines() if line.startswith("flags") for w in line.split(":", 1)[1].split())


def cpu_flags() -> dict[str, bool]:
    """The CPU features the ladder's rungs depend on."""
    flags = _cpu_flags()
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")}


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work at full speed on this CPU."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX: int8 dot products that accumulate in 32 bits. Without them ONNX Runtime's
    u8 x s8 kernels add pairs of products in 16 bits (AVX2's vpmaddubsw), which saturates on large weights."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
