"""Static INT8 quantization of the simplified ONNX model with onnxruntime.quantization, and the choice of
the recipe on held-out *training* images.

A `Recipe` is one way to quantize: the calibration method (onnxruntime's MinMax, Entropy or Percentile),
per-channel or per-tensor int8 weights, uint8 or int8 activations, and how many training images
calibrate the activation ranges. Always QDQ format, int8 weights. Its name reads
"minmax/per-channel/u8/512"; `Recipe()` is the project's first and default recipe (u8 activations x s8
weights are the fast kernels on x86). The TTA views are part of the graph, so calibration sees them too.

`choose_recipe` quantizes with every candidate and scores each on held-out training images (a fixed
slice of the shuffled training set that no calibration uses) by top-1 agreement with the fp32 model; it
never sees the test set. The export hook that runs it is in training/export_hooks.py.

Cost on this 2-core CPU: MinMax keeps a running min/max per tensor; Entropy and Percentile first keep
every calibrated tensor of every calibration image in memory and then build histograms, so they take
several times longer and memory grows with the number of calibration images: their recipes use fewer.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

METHODS = ("minmax", "entropy", "percentile")   # cheapest first (the order ties are broken in)
ACTIVATIONS = ("u8", "s8")
HELD_OUT_IMAGES = 2000     # training images that score the recipes (at most half the training set)
SHUFFLE_SEED = 99          # the order calibration and held-out images are taken in (calibration: the first N)


@dataclass(frozen=True)
class Recipe:
    """One INT8 recipe. `calibration_images` is how many training images calibrate it (the first N of the
    training set shuffled with SHUFFLE_SEED); quantize_int8 itself calibrates on whatever array it gets."""
    method: str = "minmax"           # "minmax" | "entropy" | "percentile" (onnxruntime's CalibrationMethod)
    per_channel: bool = True         # int8 weights with one scale per output channel, else one per tensor
    activations: str = "u8"          # "u8" (QuantType.QUInt8) | "s8" (QuantType.QInt8)
    calibration_images: int = 512

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"unknown activation type {self.activations!r}; valid: {', '.join(ACTIVATIONS)}")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel must be True or False, got {self.per_channel!r}")
        if not isinstance(self.calibration_images, int) or self.calibration_images < 1:
            raise ValueError(f"calibration_images must be a positive integer, got {self.calibration_images!r}")

    @property
    def name(self) -> str:
        return (f"{self.method}/{'per-channel' if self.per_channel else 'per-tensor'}/{self.activations}/"
                f"{self.calibration_images}")

    @classmethod
    def parse(cls, name: str) -> "Recipe":
        """"minmax/per-channel/u8/512" -> Recipe; a bad name is one line saying what is valid."""
        parts = name.strip().lower().split("/")
        granularity = {"per-channel": True, "per-tensor": False}
        if len(parts) != 4 or parts[1] not in granularity or not parts[3].isdigit():
            raise ValueError(f"bad INT8 recipe name {name!r}: expected <{'|'.join(METHODS)}>/"
                             f"<per-channel|per-tensor>/<{'|'.join(ACTIVATIONS)}>/<calibration images>, "
                             f"e.g. {Recipe().name!r}")
        return cls(parts[0], granularity[parts[1]], parts[2], int(parts[3]))

    def with_images(self, n: int) -> "Recipe":
        return Recipe(self.method, self.per_channel, self.activations, n)

    def to_dict(self) -> dict:
        """The fields (Recipe(**d) without "name" rebuilds it) and the name."""
        return {"name": self.name, **asdict(self)}

    @property
    def simplicity(self) -> tuple:
        """Ties in the held-out score go to the smallest: the cheaper calibration method, fewer calibration
        images, one weight scale per tensor before one per channel, u8 (the default, x86's fast kernels)
        before s8; the name last, so the order is total."""
        return (METHODS.index(self.method), self.calibration_images, self.per_channel,
                ACTIVATIONS.index(self.activations), self.name)

    def ort_options(self) -> dict:
        """quantize_static's keyword arguments for this recipe. On a CPU without int8 dot products (AVX2
        only), weights are quantized to 7 bits (`reduce_range`), as ONNX Runtime advises: its u8 x s8 kernels
        there sum pairs of products in 16 bits, which 8-bit weights overflow (per-channel scales most)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        from lab.hardware import cpu_has_int8_dot

        return dict(quant_format=QuantFormat.QDQ, per_channel=self.per_channel, weight_type=QuantType.QInt8,
                    reduce_range=self.activations == "u8" and not cpu_has_int8_dot(),
                    activation_type={"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[self.activations],
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                      "percentile": CalibrationMethod.Percentile}[self.method])


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a float32 NCHW array."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 64):
        self.chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.input_name = input_name

    def get_next(self):
        return {self.input_name: self.chunks.pop(0)} if self.chunks else None

    def rewind(self):  # not needed by the calibrators used here; part of the protocol
        pass


def prepare(fp32_onnx: Path, dst: Path) -> Path:
    """Graph optimisations (BN folding) and ONNX shape inference, once for every recipe; the symbolic pass
    cannot follow the TTA's batch-dependent Reshape, and the ONNX pass is enough for quantization."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_onnx), str(dst), skip_symbolic_shape=True)
    return dst


def _quantize_prepared(prepared: Path, calibration: np.ndarray, out: Path, recipe: Recipe) -> Path:
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    input_name = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    batch = 64
    if recipe.method != "minmax":
        # the histogram calibrators stack every batch's outputs into one array, so the batches must be of
        # one size (onnxruntime fails on a short last batch): the largest divisor of the count up to 64
        batch = max(b for b in range(1, 65) if len(calibration) % b == 0)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress lines
        quantize_static(str(prepared), str(out), _Batches(calibration.astype(np.float32), input_name, batch),
                        **recipe.ort_options())
    return out


def quantize_int8(fp32_onnx: Path, calibration: np.ndarray, out: Path, recipe: Recipe = Recipe()) -> Path:
    """Write `out`, the INT8 version of `fp32_onnx` made with `recipe`, calibrated on `calibration`
    (float32 NCHW, training images; all of them are used, whatever recipe.calibration_images says)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _quantize_prepared(prepare(fp32_onnx, Path(tmp) / "prepared.onnx"), calibration, out, recipe)


# ---------------------------------------------------------------- the choice, on held-out training images


@dataclass
class Candidate:
    recipe: Recipe                 # as run (calibration images capped to what the training set holds)
    requested: str                 # the name the preset asked for
    path: Path
    agreement: int                 # held-out training images whose INT8 top-1 equals the fp32 top-1
    held_out_images: int
    quantize_seconds: float

    @property
    def score(self) -> float:
        return self.agreement / self.held_out_images

    def to_dict(self) -> dict:
        d = {"name": self.recipe.name, "held_out_agreement": self.score, "held_out_images": self.held_out_images,
             "quantize_seconds": round(self.quantize_seconds, 1)}
        if self.requested != self.recipe.name:
            d["requested"] = self.requested
        return d


def split_training(n_train: int, held_out: int = HELD_OUT_IMAGES) -> tuple[int, int]:
    """(calibration images available, held-out images) of a training set of n_train images: in the order of
    SHUFFLE_SEED, calibration takes from the front and the held-out images are the last ones, disjoint."""
    held = min(held_out, n_train // 2)
    return n_train - held, held


def pick(candidates: Sequence[Candidate]) -> Candidate:
    """The highest held-out agreement; ties to the simplest recipe (Recipe.simplicity): deterministic."""
    if not candidates:
        raise ValueError("no INT8 candidates to choose from")
    return min(candidates, key=lambda c: (-c.agreement / c.held_out_images, c.recipe.simplicity))


def choose_recipe(fp32_onnx: Path, train_set: Any, spec: Any, recipes: Sequence[str | Recipe], work_dir: Path,
                  held_out: int = HELD_OUT_IMAGES, log: Callable[[str], None] = print
                  ) -> tuple[Candidate, list[Candidate]]:
    """Quantize `fp32_onnx` with every recipe (calibrated on the first N images of the training set
    shuffled with SHUFFLE_SEED) into work_dir, score each on the last `held_out` images of that order
    (disjoint from every calibration set) and return (the chosen candidate, all candidates).

    Takes the training set only: the test set cannot take part in the choice.

    The score is top-1 agreement with the fp32 model, not accuracy: what a recipe changes is the
    quantization error, and agreement counts every answer it changes (accuracy lets right->wrong and
    wrong->right flips cancel out), needs no labels, and is not flattered by training images the model
    has fit (its accuracy on them is higher than on unseen images; its agreement is what the test
    bound is about: the points INT8 loses are answers that changed)."""
    from lab.backends.onnx import OnnxBackend
    from training import data as D
    from training.evaluate import predict_backend

    wanted = [r if isinstance(r, Recipe) else Recipe.parse(r) for r in recipes]
    if not wanted:
        raise ValueError("no INT8 recipes to choose from")
    order = D.shuffled(train_set, SHUFFLE_SEED)
    n_calib, n_held = split_training(len(order), held_out)
    if n_held < 1 or n_calib < 1:
        raise ValueError(f"{len(order)} training images are too few to calibrate and score INT8 recipes")
    held = order.subset(slice(len(order) - n_held, len(order)))
    work_dir.mkdir(parents=True, exist_ok=True)
    fp32_top1 = predict_backend(OnnxBackend(fp32_onnx), held, spec).argmax(1)
    prepared = prepare(fp32_onnx, work_dir / "prepared.onnx")
    candidates: list[Candidate] = []
    seen: set[str] = set()
    for want in wanted:
        recipe = want.with_images(min(want.calibration_images, n_calib))
        if recipe.name in seen:  # two requests that the training set's size made the same
            continue
        seen.add(recipe.name)
        calib = D.to_float(order.images[:recipe.calibration_images], spec).numpy()
        path = work_dir / (recipe.name.replace("/", "_") + ".onnx")
        t0 = time.perf_counter()
        _quantize_prepared(prepared, calib, path, recipe)
        seconds = time.perf_counter() - t0
        top1 = predict_backend(OnnxBackend(path), held, spec).argmax(1)
        c = Candidate(recipe, want.name, path, int((top1 == fp32_top1).sum()), n_held, seconds)
        candidates.append(c)
        log(f"  INT8 recipe {recipe.name:30s} held-out top-1 agreement {100 * c.score:6.2f}% "
            f"({c.agreement}/{n_held} training images), quantized in {seconds:.1f} s")
    prepared.unlink(missing_ok=True)
    return pick(candidates), candidates

