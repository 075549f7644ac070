"""The statistics of the study report: a difference between two variants with a 95 % interval that counts
both sources of noise, and a verdict from it corrected for the number of comparisons a section makes.

A cell keeps which test images it got right (`pack_correct`, 1 bit per image). A comparison of variant A
with variant B is the difference of their mean accuracies over seeds, and its uncertainty comes from
  - the seeds (another seed gives another net): resampled with replacement within each variant, and
  - the test images (another test set gives another score): resampled with replacement, the SAME draw
    for A and B, so that the images both find hard cancel out (the comparison is paired per image).
The 95 % interval is the 2.5th and 97.5th percentile of the bootstrap differences; the two-sided
p-value is twice the smaller tail beyond zero. A section declares its comparisons up front and
`compare_all` applies Holm's step-down correction over them: "established" means the Holm-adjusted
p-value is below 0.05, otherwise the report says "not established".

With 3 seeds the seed bootstrap is coarse (it sees at most 3 distinct nets per variant); the intervals
say what these seeds and these images support, not more.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
REPS = 4000          # bootstrap resamples per comparison
SEED = 12345         # the bootstrap's own generator: a rerun of the report prints the same intervals


def pack_correct(correct) -> str:
    """A bool per test image -> a short ASCII string (base64 of the packed bits) for the results database."""
    bits = np.packbits(np.asarray(correct, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    bits = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def correct_matrix(records: list[dict]) -> np.ndarray:
    """(seeds, test images) bool from cells that kept their per-image results."""
    missing = [r.get("cell", "?") for r in records if "test_correct" not in r]
    if missing:
        raise ValueError(f"cells without per-image test results (trained by an older version; rerun the stage "
                         f"with --restart-studies): {', '.join(map(str, missing))}")
    n = records[0]["test_images"]
    return np.stack([unpack_correct(r["test_correct"], n) for r in records])


def bootstrap_differences(a: np.ndarray, b: np.ndarray, reps: int = REPS, seed: int = SEED) -> np.ndarray:
    """Bootstrap distribution of mean accuracy(a) - mean accuracy(b); a, b: (seeds, images) bool on the same
    images. Seeds are resampled within each variant, images once per resample for both (paired)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two variants were scored on different test sets ({a.shape[1]} vs {b.shape[1]} images)")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    out = np.empty(reps)
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, reps, chunk):
        k = min(chunk, reps - start)
        # per resample: which seeds (as counts), then the per-image difference of the two seed means
        wa = rng.multinomial(len(a), np.full(len(a), 1 / len(a)), size=k) / len(a)    # (k, seeds_a)
        wb = rng.multinomial(len(b), np.full(len(b), 1 / len(b)), size=k) / len(b)
        per_image = wa @ a - wb @ b                                                    # (k, images)
        idx = rng.integers(0, n, size=(k, n))
        out[start:start + k] = np.take_along_axis(per_image, idx, axis=1).mean(1)
    return out


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    diff: float          # mean accuracy of a minus b, as a fraction
    lo: float            # 95 % bootstrap interval of diff
    hi: float
    p: float             # two-sided bootstrap p-value
    p_holm: float = 1.0  # after Holm's correction over the section's comparisons
    seeds: tuple[int, int] = (0, 0)
    images: int = 0
    note: str = ""       # what the reader must know about this pair (unmatched sizes, ...)

    @property
    def established(self) -> bool:
        return self.p_holm < ALPHA

    def sentence(self, family: int) -> str:
        """'A - B: +3.8 points, 95 % CI [+1.8, +5.9] (3 and 3 seeds x 10,000 test images); established
        (Holm-adjusted p = 0.004 over 6 comparisons).'"""
        verdict = ("**established**" if self.established else
                   "**not established** (the interval allows no difference, or more seeds are needed)")
        p = f"= {self.p_holm:.3f}" if self.p_holm >= 0.001 else "< 0.001"
        note = f" {self.note}" if self.note else ""
        return (f"{self.a} − {self.b}: **{100 * self.diff:+.1f} points**, 95 % CI [{100 * self.lo:+.1f}, "
                f"{100 * self.hi:+.1f}] ({self.seeds[0]} and {self.seeds[1]} seeds x {self.images:,} test images); "
                f"{verdict}, Holm-adjusted p {p} over {family} comparison{'s' if family != 1 else ''}.{note}")


def compare_pair(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray, note: str = "",
                 reps: int = REPS) -> Comparison:
    d = bootstrap_differences(a, b, reps=reps)
    lo, hi = np.percentile(d, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    p = min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()) + 1 / reps)
    diff = float(np.asarray(a, dtype=float).mean() - np.asarray(b, dtype=float).mean())
    return Comparison(name_a, name_b, diff, float(lo), float(hi), float(p), seeds=(len(a), len(b)),
                      images=int(np.asarray(a).shape[1]), note=note)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def compare_all(pairs: list[tuple[str, np.ndarray, str, np.ndarray, str]], reps: int = REPS) -> list[Comparison]:
    """Every declared comparison (name_a, correct_a, name_b, correct_b, note), Holm-corrected together."""
    from dataclasses import replace

    out = [compare_pair(na, a, nb, b, note, reps=reps) for na, a, nb, b, note in pairs]
    return [replace(c, p_holm=ph) for c, ph in zip(out, holm([c.p for c in out]))]
