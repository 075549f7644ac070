"""Export a trained model for serving: .pth, ONNX (dynamic batch), onnxsim-simplified ONNX, verified.

The verification runs the simplified graph in onnxruntime on a held-out batch of real images and
compares it with the torch model: the largest |logit difference| must be within `atol` times the
logits' scale (their largest magnitude, at least 1: float32 keeps about 7 digits of any number, so a
net whose logits reach 1e4 differs by more than 1e-3 between two correct runtimes) and every top-1 must
agree, or `ExportError` is raised and nothing is published.

Export hooks make the files of further backends (lab.backends): a hook gets the verified fp32 export
and returns the file it made for publishing (a list when several; None when it is not good enough) and
its record:

    @export_hook("int8")
    def int8(ctx: ExportContext) -> tuple[str | None, dict]: ...
"""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from lab.backends.onnx import OnnxBackend
from models import with_tta

OPSET = 18
PARITY_ATOL = 1e-3  # fp32 torch vs fp32 onnxruntime logits


class ExportError(RuntimeError):
    pass


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    images: int
    atol: float
    scale: float = 1.0            # max(1, the largest |logit| torch gives): the tolerance is atol * scale

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol * self.scale and self.top1_agreement == 1.0

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "top1_agreement": self.top1_agreement,
                "images": self.images, "atol": self.atol, "scale": self.scale, "ok": self.ok}


def save_state_dict(net: nn.Module, path: Path) -> Path:
    """A plain state_dict, loadable with torch.load(path, weights_only=True)."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    torch.save(state, path)
    return path


def export_onnx(net: nn.Module, tta_level: int, input_shape: tuple[int, int, int], path: Path) -> Path:
    """The eval-mode fp32 model (with its TTA) as ONNX with a dynamic batch axis."""
    model = with_tta(net, tta_level).eval().float().to(memory_format=torch.contiguous_format)
    example = torch.zeros((2, *input_shape))
    try:
        with redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=OPSET,
                input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        program.save(str(path))
    except Exception as e:
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e
    return path


def simplify_onnx(src: Path, dst: Path) -> Path:
    import onnx
    import onnxsim

    model = onnx.load(str(src))
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as e:
        raise ExportError(f"onnxsim failed on {src.name}: {type(e).__name__}: {e}") from e
    if not ok:
        raise ExportError(f"onnxsim could not validate the simplified {src.name}")
    onnx.checker.check_model(simplified)
    onnx.save(simplified, str(dst))
    return dst


def check_parity(net: nn.Module, tta_level: int, onnx_path: Path, batch: np.ndarray,
                 atol: float = PARITY_ATOL) -> Parity:
    """Compare torch (fp32) and onnxruntime logits on `batch` (float32 NCHW, real images)."""
    model = with_tta(net, tta_level).eval().float()
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    got = OnnxBackend(onnx_path, threads=min(4, os.cpu_count() or 1)).predict(batch)
    if got.shape != expected.shape:
        raise ExportError(f"{onnx_path.name} returns shape {got.shape}, torch {expected.shape}")
    return Parity(max_abs_diff=float(np.abs(got - expected).max()),
                  top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
                  images=len(batch), atol=atol, scale=max(1.0, float(np.abs(expected).max())))


def export_verified(net: nn.Module, tta_level: int, batch: np.ndarray, out_dir: Path,
                    atol: float = PARITY_ATOL) -> dict:
    """Write model.pth, model.onnx and model.sim.onnx into out_dir and verify both ONNX files.

    Returns {"files": {...paths}, "parity": {...}}; raises ExportError when a check fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.eval().float().cpu().to(memory_format=torch.contiguous_format)
    pth = save_state_dict(net, out_dir / "model.pth")
    raw = export_onnx(net, tta_level, tuple(batch.shape[1:]), out_dir / "model.onnx")
    sim = simplify_onnx(raw, out_dir / "model.sim.onnx")
    parity = {}
    for key, path in (("onnx", raw), ("onnx_simplified", sim)):
        p = check_parity(net, tta_level, path, batch, atol)
        parity[key] = p.to_dict()
        if not p.ok:
            raise ExportError(
                f"{path.name} disagrees with torch on {p.images} held-out images: max |logit diff| "
                f"{p.max_abs_diff:.3g} (tolerance {atol:g} x logit scale {p.scale:.3g}), top-1 agreement "
                f"{100 * p.top1_agreement:.2f}%")
    return {"files": {"model.pth": pth, "model.onnx": raw, "model.sim.onnx": sim}, "parity": parity}


# ---------------------------------------------------------------- hooks for further backends


@dataclass
class ExportContext:
    """What a hook gets: the verified fp32 export and the data it may calibrate or check against."""
    net: nn.Module
    tta_level: int
    out_dir: Path                 # holds model.pth, model.onnx, model.sim.onnx
    spec: Any                     # lab.preprocess.Preprocessing
    train_set: Any                # training.data.ArrayDataset (calibration data: never the test set)
    test: Any                     # the test split, to measure accuracy
    parity_batch: np.ndarray      # held-out real test images, normalised (float32 NCHW)
    fp32: OnnxBackend             # the simplified fp32 model
    fp32_logits: np.ndarray       # its logits on `test`
    settings: dict                # the preset's knobs (calibration_images, int8_max_drop, ...)
    log: Callable[[str], None] = print
    previous: dict = field(default_factory=dict)  # hook name -> record, of the hooks that ran before this one
    files: list = field(default_factory=list)     # the files to be published so far (the hooks' included)
    architecture: dict | None = None              # {"name": ..., "kwargs": ...}: what model.pth holds


ExportHook = Callable[[ExportContext], "tuple[str | list[str] | None, dict]"]
EXPORT_HOOKS: dict[str, ExportHook] = {}


def export_hook(name: str) -> Callable[[ExportHook], ExportHook]:
    def register(fn: ExportHook) -> ExportHook:
        if name in EXPORT_HOOKS:
            raise ValueError(f"export hook {name!r} registered twice")
        EXPORT_HOOKS[name] = fn
        return fn
    return register
