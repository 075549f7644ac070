"""The optimization ladder: every rung (backend) of one trained model measured side by side.

For each rung: accuracy on the whole test set, its top-1 changes and the 95 % interval of its accuracy
difference against the reference rung (the served fp32 graph), paired per image; latency at batch 1
(p50, p99) and throughput at batch 64, the runs of every rung interleaved round by round so that the
ratios hold on a noisy machine; load and warm-up time; file size. The export hook `ladder` measures the
rungs a model is published with (their accuracy and speed go into the card, with the best rung);
bench/ladder.py measures every rung of a stored model and writes the page.

    rungs = measure({"onnx": lambda: OnnxBackend(path), ...}, test, spec, reference="onnx")
    best = best_rung(rungs, reference="onnx", max_drop=0.005)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lab.golden import RUNG_MAX_DROP as MAX_DROP  # the bound of the "best" rung; the service chooses by it too
from lab.hardware import cpu_flags  # noqa: F401  (recorded with the ladder)

Z95 = 1.959964     # the 95 % two-sided normal quantile


@dataclass
class Rung:
    backend: str
    accuracy: float = 0.0
    top1_changes: int = 0               # test images whose top-1 differs from the reference rung's
    diff: float = 0.0                   # accuracy - reference accuracy
    diff_ci95: tuple[float, float] = (0.0, 0.0)  # paired per image (normal approximation)
    ms_b1_p50: float = 0.0              # latency of one image (batch 1), ms
    ms_b1_p99: float = 0.0
    images_per_s_b64: float = 0.0       # throughput at batch 64
    load_s: float = 0.0                 # building the backend (compiling, for torch.compile / OpenVINO)
    warmup_s: float = 0.0               # its first batch-1 and batch-64 calls
    bytes: int = 0                      # its file
    note: str = ""
    correct: np.ndarray | None = field(default=None, repr=False)  # per test image: top-1 right

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("correct")
        d["diff_ci95"] = list(self.diff_ci95)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def paired_diff(correct: np.ndarray, ref: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Accuracy difference of two classifiers on the same images and its 95 % interval, paired per image:
    the mean of d_i = correct_i - ref_i in {-1, 0, 1}, mean +- 1.96 standard errors of that mean."""
    d = correct.astype(np.float64) - ref.astype(np.float64)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return mean, (mean - Z95 * se, mean + Z95 * se)


def verdict(diff: float, ci: tuple[float, float]) -> str:
    if ci[0] > 0:
        return "better"
    if ci[1] < 0:
        return "worse"
    return "not established"


def measure(builders: dict[str, Callable[[], object]], test, spec, *,
            reference: str, files: dict[str, Path] | None = None, rounds: int = 5, b1_calls: int = 20,
            b64_calls: int = 3, log=print, progress: bool = True) -> dict[str, Rung]:
    """Measure each rung on `test` (a training.data.ArrayDataset of test images); `builders` make
    the backends (a builder that raises BackendUnavailable or fails is skipped with its reason in `note`).
    The reference rung must build: every accuracy difference is against it."""
    from tqdm import tqdm

    from lab.preprocess import normalize
    from training.evaluate import predict_backend

    images, labels = test.images.permute(0, 2, 3, 1).numpy(), test.labels.numpy()
    rungs: dict[str, Rung] = {}
    built: dict[str, object] = {}
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(0)
    b1 = normalize(images[rng.choice(len(images), 32)], spec)
    b64 = normalize(images[rng.choice(len(images), 64)], spec)
    for name, build in builders.items():
        try:
            t0 = time.perf_counter()
            backend = build()
            load = time.perf_counter() - t0
            t0 = time.perf_counter()
            backend.predict(b1[:1])
            backend.predict(b64)
            warm = time.perf_counter() - t0
        except Exception as e:  # BackendUnavailable: not here; anything else: a rung that does not work
            skipped[name] = f"{type(e).__name__}: {e}".splitlines()[0]
            log(f"  ladder: {name} skipped ({skipped[name]})")
            continue
        built[name] = backend
        size = (files or {}).get(name)
        rungs[name] = Rung(name, load_s=load, warmup_s=warm, bytes=size.stat().st_size if size else 0)
    if reference not in built:
        raise RuntimeError(f"the reference rung {reference!r} could not be built: {skipped.get(reference)}")

    # accuracy on every test image
    pred = {}
    for i, name in enumerate(tqdm(list(built), desc="ladder: accuracy", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        pred[name] = predict_backend(built[name], test, spec, batch_size=250).argmax(1)
        rungs[name].correct = pred[name] == labels
        rungs[name].accuracy = float(rungs[name].correct.mean())
        if not progress:  # a line per rung where no bar shows the way (the run log)
            log(f"  ladder: accuracy of {name} ({i + 1}/{len(built)}): {100 * rungs[name].accuracy:.2f}% of "
                f"{len(labels)} images in {time.perf_counter() - t0:.0f} s")
    for name, r in rungs.items():
        r.top1_changes = int((pred[name] != pred[reference]).sum())
        r.diff, r.diff_ci95 = paired_diff(r.correct, rungs[reference].correct)

    # speed, interleaved: each round runs every rung once, in a rotated order
    lat: dict[str, list[float]] = {n: [] for n in built}
    thr: dict[str, list[float]] = {n: [] for n in built}
    order = list(built)
    for k in tqdm(range(rounds), desc="ladder: speed", disable=not progress, leave=False):
        for name in order[k % len(order):] + order[:k % len(order)]:
            backend = built[name]
            for i in range(b1_calls):
                x = b1[i % len(b1)][None]
                t0 = time.perf_counter()
                backend.predict(x)
                lat[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(b64_calls):
                backend.predict(b64)
            thr[name].append(64 * b64_calls / (time.perf_counter() - t0))
        if not progress:
            log(f"  ladder: speed, round {k + 1}/{rounds} of every rung done")
    for name, r in rungs.items():
        ms = np.array(lat[name]) * 1000
        r.ms_b1_p50, r.ms_b1_p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        r.images_per_s_b64 = float(np.median(thr[name]))
    for name, why in skipped.items():
        rungs[name] = Rung(name, note=why)
    return rungs


def best_rung(rungs: dict[str, Rung], reference: str, max_drop: float = MAX_DROP) -> tuple[str, str]:
    """The fastest rung at batch 64 whose test accuracy is at most `max_drop` below the reference's;
    returns it and the rule as words."""
    ref = rungs[reference].accuracy
    ok = [r for r in rungs.values() if not r.note and r.accuracy >= ref - max_drop - 1e-12]
    best = max(ok, key=lambda r: r.images_per_s_b64)
    return best.backend, (f"the fastest rung at batch 64 within {100 * max_drop:.1f} points of {reference}'s "
                          f"test accuracy ({100 * ref:.2f}%)")
