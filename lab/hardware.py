"""What this machine can do, without importing torch."""
from __future__ import annotations

import os
from pathlib import Path


def cores() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's total)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix work at full speed on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_int8_dot() -> bool:
    """AVX-512 VNNI, AVX-VNNI or AMX: int8 dot products that accumulate in 32 bits. Without them ONNX Runtime's
    u8 x s8 kernels add pairs of products in 16 bits (AVX2's vpmaddubsw), which saturates on large weights."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
