"""Golden answers: every stored model carries a fixed set of images and its reference outputs on them, and
every backend must reproduce them, within the tolerance recorded for it, on the machine that serves it.

At publish (an export hook for trained models, training/import_onnx.py for imported ones):

    images = golden_images(test_images_uint8)                  # GOLDEN_IMAGES of them, uint8 NHWC
    outputs = run(reference_backend, images, spec)             # the fp32 reference's outputs
    record = agreement(run(backend, images, spec), outputs)    # per backend, measured where it was exported
    tolerance = tolerance_for(record)                          # what the serving machine must meet

The two arrays go into the model folder as GOLDEN_IMAGES_FILE / GOLDEN_OUTPUTS_FILE (.npy, read with
allow_pickle=False, hashed in the card like every file); the card's `golden` holds the reference's name
and, per backend, what was measured and its tolerance. At load (serving/catalog.py) `prove()` runs a
backend on the images and compares: a backend whose top-1 agreement with the reference or whose output
difference is outside its tolerance computes another function on this machine and is refused.

What is compared:
  - top-1 agreement: the share of golden images whose argmax equals the reference's;
  - the output difference: mean |output - reference| over every image and class, in units of the
    reference outputs' standard deviation (so logits and probabilities, large and small, read alike).
A recorded tolerance keeps the measured agreement minus AGREEMENT_SLACK (a CPU with other kernels
rounds near-ties another way) and allows DIFF_FACTOR times the measured difference, at least DIFF_FLOOR
(fp32 runtimes differ by float rounding only: about 1e-7 of the spread). A backend measured nowhere
(its runtime did not run where the model was exported) gets DEFAULT_TOLERANCE. NumPy only: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.card import GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE  # noqa: F401  (the two files' names)

GOLDEN_IMAGES = 256                         # images in a golden set
AGREEMENT_SLACK = 0.02                      # 5 of 256 images may flip beyond what was measured
DIFF_FACTOR = 4.0
DIFF_FLOOR = 0.005                          # in reference standard deviations
DEFAULT_TOLERANCE = {"min_agreement": 0.95, "max_mean_diff": 0.10}
RUNG_MAX_DROP = 0.005                       # a default rung loses at most this much test accuracy against the
                                            # reference rung (training/ladder.py's bound, the service's too)
PROOF_BATCH = 64                            # images per call while proving (the service's largest batch)


@dataclass(frozen=True)
class Agreement:
    agreement: float        # top-1 agreement with the reference, 0..1
    mean_diff: float        # mean |output - reference| / std(reference)
    max_diff: float         # max  |output - reference| / std(reference)
    images: int

    def to_dict(self) -> dict:
        return {"agreement": round(self.agreement, 6), "mean_diff": float(f"{self.mean_diff:.4g}"),
                "max_diff": float(f"{self.max_diff:.4g}"), "images": self.images}


def golden_images(images: np.ndarray, n: int = GOLDEN_IMAGES, seed: int = 1234) -> np.ndarray:
    """A fixed sample of n uint8 NHWC images (all of them when there are fewer), in a seeded order."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"golden images are uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    order = np.random.default_rng(seed).permutation(len(images))[:n]
    return np.ascontiguousarray(images[np.sort(order)])


def run(backend, images: np.ndarray, spec, batch: int = PROOF_BATCH) -> np.ndarray:
    """The backend's outputs on uint8 NHWC images, through the card's normalisation, in batches."""
    from lab.preprocess import normalize

    outs = [np.asarray(backend.predict(normalize(images[i:i + batch], spec)), dtype=np.float32)
            for i in range(0, len(images), batch)]
    return np.concatenate(outs)


def agreement(outputs: np.ndarray, reference: np.ndarray) -> Agreement:
    outputs, reference = np.asarray(outputs, np.float64), np.asarray(reference, np.float64)
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs of shape {outputs.shape}, the golden reference has {reference.shape}")
    if not np.all(np.isfinite(outputs)):
        return Agreement(0.0, float("inf"), float("inf"), len(outputs))
    scale = float(reference.std()) or 1.0
    diff = np.abs(outputs - reference) / scale
    return Agreement(float((outputs.argmax(1) == reference.argmax(1)).mean()), float(diff.mean()),
                     float(diff.max()), len(outputs))


def tolerance_for(measured: Agreement) -> dict:
    """What a serving machine must meet, from what the exporting machine measured."""
    return {"min_agreement": round(max(0.0, measured.agreement - AGREEMENT_SLACK), 6),
            "max_mean_diff": float(f"{max(DIFF_FLOOR, DIFF_FACTOR * measured.mean_diff):.4g}")}


def record(outputs: np.ndarray, reference: np.ndarray) -> dict:
    """A backend's golden record for the card: what it measured here and the tolerance it must keep."""
    measured = agreement(outputs, reference)
    return {"measured": measured.to_dict(), "tolerance": tolerance_for(measured)}


def write(folder: Path, images: np.ndarray, reference: np.ndarray) -> dict[str, Path]:
    """The two golden files in `folder`; returns {file name: path}."""
    folder = Path(folder)
    paths = {GOLDEN_IMAGES_FILE: folder / GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE: folder / GOLDEN_OUTPUTS_FILE}
    np.save(paths[GOLDEN_IMAGES_FILE], np.ascontiguousarray(images, np.uint8), allow_pickle=False)
    np.save(paths[GOLDEN_OUTPUTS_FILE], np.ascontiguousarray(reference, np.float32), allow_pickle=False)
    return paths


def load(folder: Path, card) -> tuple[np.ndarray, np.ndarray]:
    """The golden images and reference outputs of a stored model (its card vouches for their hashes)."""
    from lab.card import IntegrityError, inside, verify_files

    verify_files(folder, card, only=[GOLDEN_IMAGES_FILE, GOLDEN_OUTPUTS_FILE])
    images = np.load(inside(folder, GOLDEN_IMAGES_FILE), allow_pickle=False)
    reference = np.load(inside(folder, GOLDEN_OUTPUTS_FILE), allow_pickle=False)
    spec = card.preprocessing
    want = (spec.size[0], spec.size[1], spec.channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise IntegrityError(f"{GOLDEN_IMAGES_FILE} holds {images.dtype} {images.shape}, expected uint8 (N, {want})")
    if reference.shape != (len(images), len(card.classes)):
        raise IntegrityError(f"{GOLDEN_OUTPUTS_FILE} has shape {reference.shape}, expected "
                             f"({len(images)}, {len(card.classes)})")
    return images, reference


class ProofFailed(RuntimeError):
    """A backend that does not reproduce its model's golden answers on this machine."""


def prove(backend, name: str, images: np.ndarray, reference: np.ndarray, spec, golden: dict) -> dict:
    """Run `backend` on the golden images; return what it measured here and the tolerance it met, or
    raise ProofFailed naming what is off. `golden` is the card's golden section."""
    rec = (golden.get("backends") or {}).get(name)
    tolerance = dict(rec["tolerance"]) if rec else dict(DEFAULT_TOLERANCE)
    source = "recorded at export" if rec else "the default: nothing was recorded for this backend"
    here = agreement(run(backend, images, spec), reference)
    result = {"measured_here": here.to_dict(), "tolerance": tolerance, "tolerance_source": source,
              "reference": golden.get("reference", "")}
    problems = []
    if here.agreement < tolerance["min_agreement"]:
        problems.append(f"top-1 agrees with the reference on {100 * here.agreement:.1f}% of {here.images} golden "
                        f"images (tolerance >= {100 * tolerance['min_agreement']:.1f}%)")
    if not here.mean_diff <= tolerance["max_mean_diff"]:
        problems.append(f"mean output difference {here.mean_diff:.3g} reference std (tolerance <= "
                        f"{tolerance['max_mean_diff']:.3g})")
    if problems:
        raise ProofFailed(f"golden answers not reproduced on this machine: {'; '.join(problems)}")
    return result
