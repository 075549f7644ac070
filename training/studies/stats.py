"""The statistics of the study report: a difference between two variants with a 95 % interval that has
the coverage it claims at 3 seeds, and a verdict from it, corrected over every comparison the report makes.

A cell keeps which test images it got right (`pack_correct`, 1 bit per image). Variant A has n_A seeds,
each a net scored on the same N test images: c[s, i] = 1 when seed s's net got image i right. A
comparison states D = mean accuracy of A's seeds - mean accuracy of B's seeds, an estimate of
Delta = E[accuracy of a net of A] - E[accuracy of a net of B], the expectation over the seeds (another
seed, another net) and over test images (another test set from the same distribution, another score).

Where its uncertainty comes from. Write mu_A(x) for the chance that a net of A, over seeds, gets image x
right, and c_A[s, i] = mu_A(x_i) + e_A[s, i], the e zero-mean given the image. Then
    D = mean_i (mu_A(x_i) - mu_B(x_i)) + mean_i (mean_s e_A[s, i]) - mean_i (mean_s e_B[s, i])
and the three terms are uncorrelated:
  - the seeds of A: Var(mean_i e_A[s, i]) is the variance of one net's accuracy on this test set, seed to
    seed. It is everything a seed changes, the net's general level and which images it happens to get
    right alike (that part, the "test-image noise of each net", is in it already), and the sample
    variance s_A^2 of A's per-seed accuracies estimates it without bias: the term is s_A^2 / n_A;
  - the seeds of B, likewise: s_B^2 / n_B (A's and B's seeds are different nets: unpaired. Where seed s
    gives both variants the same initial weights and batch order, their accuracies may correlate
    positively, and ignoring that only widens the interval);
  - the test images, which A and B share: delta(x) = mu_A(x) - mu_B(x) varies from image to image, and
    another test set would give another mean of it, Var_x(delta) / N. The images both variants find
    hard or easy cancel in delta: the comparison is paired per image. The per-image difference of the
    seed means, d_i = mean_s c_A[s, i] - mean_s c_B[s, i], has variance Var_x(delta) + E[v_A(x) / n_A +
    v_B(x) / n_B] over images, v(x) the variance of c[s, i] over seeds at image x; that second part is
    the seeds' noise again, already counted in s_A^2 and s_B^2. So the image term is
    (var_i(d_i) - mean_i(v_A,i / n_A + v_B,i / n_B)) / N, v_A,i the sample variance over A's seeds at
    image i (unbiased), floored at 0. Taking var_i(d_i) / N whole would count the seeds' per-image
    noise twice.
SE^2 = s_A^2/n_A + s_B^2/n_B + image term. With 3 seeds the first two are estimated from 2 degrees of
freedom each, so D / SE is not normal: it follows Student's t with the Welch-Satterthwaite degrees of
freedom df = SE^4 / ((s_A^2/n_A)^2/(n_A-1) + (s_B^2/n_B)^2/(n_B-1) + (image term)^2/(N-1)), between
n_A - 1 (when A's seeds dominate) and n_A + n_B - 2; the image term, estimated from N images, barely
lowers it. The interval is D +- t_{0.975, df} SE and the two-sided p-value is P(|T_df| > |D| / SE)
(lab/student_t.py).

Why not the bootstrap that was here: resampling 3 seeds with replacement sees at most 3 distinct nets,
its seed variance is (n - 1) / n of s^2 / n (two thirds at 3 seeds), and its percentile quantiles are
normal ones where t with 2-4 degrees of freedom is needed (t_{0.975, 4} = 2.78, not 1.96). Under a true
null, at 3 seeds x 10,000 images, it said "established" 9.2, 15.5 and 18.5 % of the time with seeds
spread by 1, 2 and 3 points; this interval says it 2.5, 3.8 and 2.0 % of the time, and finds a true
3.5-point difference at 1 point of spread 79 % of the time (tests/test_study_science.py simulates it;
docs/studies.md has the figures).

Multiplicity: the report makes many comparisons, and one family holds them all, declared in
training/studies/family.py before any cell runs. `holm` adjusts the p-values of a family; "established"
means the Holm-adjusted p-value is below 0.05 (and, for variants whose LR was swept, that each one's sweep
bracketed its choice). A comparison carries the family's name and size and its sentence says both.
`compare_all` treats the pairs it is given as one family (a script comparing two variants, the tests);
the report's stages use the report's family (Section.write, write_report).

Measures with one value per seed (the optimizers' stability: how often a loss curve rose, how much it
went up and down) are compared by `compare_values`: Welch's t over the seeds, in the one family too.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, replace

import numpy as np

from lab import student_t

ALPHA = 0.05


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


@dataclass(frozen=True)
class Uncertainty:
    """The parts of a difference's variance (fractions squared) and its degrees of freedom."""
    seeds_a: float       # s_A^2 / n_A
    seeds_b: float       # s_B^2 / n_B
    images: float        # the shared test images' term, paired per image
    df: float

    @property
    def se(self) -> float:
        return math.sqrt(self.seeds_a + self.seeds_b + self.images)


def uncertainty(a: np.ndarray, b: np.ndarray) -> Uncertainty:
    """The standard error's parts and Welch-Satterthwaite degrees of freedom of mean acc(a) - mean acc(b);
    a, b: (seeds, images) correctness on the same images (the module docstring derives it)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"the two variants were scored on different test sets ({a.shape} vs {b.shape})")
    (na, n), nb = a.shape, len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds per variant (got {na} and {nb})")
    seeds_a, seeds_b = a.mean(1).var(ddof=1) / na, b.mean(1).var(ddof=1) / nb
    d = a.mean(0) - b.mean(0)                                         # per image: the seed means' difference
    seed_noise = (a.var(0, ddof=1) / na + b.var(0, ddof=1) / nb).mean()  # of d_i, already in seeds_a + seeds_b
    images = max(0.0, float(d.var(ddof=1) - seed_noise)) / n if n > 1 else 0.0
    total = seeds_a + seeds_b + images
    parts = seeds_a ** 2 / (na - 1) + seeds_b ** 2 / (nb - 1) + (images ** 2 / (n - 1) if n > 1 else 0.0)
    df = total ** 2 / parts if parts > 0 else float(na + nb - 2)
    return Uncertainty(float(seeds_a), float(seeds_b), float(images), float(df))


class Sentence(str):
    """A comparison's sentence in the report: the text, and the comparison it states (`.comparison`), so
    that the section can correct it over the report's family and write it to the results files."""
    comparison: "Comparison"
    prefix: str


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    diff: float          # mean accuracy of a minus b, as a fraction
    lo: float            # 95 % t-interval of diff
    hi: float
    p: float             # two-sided p-value, before any correction
    se: float = 0.0      # standard error of diff
    df: float = 0.0      # Welch-Satterthwaite degrees of freedom
    p_holm: float = 1.0  # after Holm's correction over its family
    family: str = "this comparison alone"   # what the correction runs over
    family_size: int = 1
    seeds: tuple[int, int] = (0, 0)
    images: int = 0
    note: str = ""       # what the reader must know about this pair (unmatched sizes, ...)
    mean_a: float | None = None   # the two sides' means (fractions for test accuracy)
    mean_b: float | None = None
    measure: str = ""    # "" for test accuracy; else the per-seed measure compared (`compare_values`)
    lower: str = ""      # for a measure: what a negative established difference says of a ("more stable")
    higher: str = ""     # ... and a positive one ("less stable")
    test: str = "t"      # "t": Welch's t-interval; "permutation": no spread within either side (see below)
    unbracketed: str = ""  # variants whose LR sweep left its choice at the edge of the grid: no verdict

    @property
    def established(self) -> bool:
        """Holm-adjusted p below ALPHA, and both sides at a learning rate their sweep bracketed: a variant
        whose best LR sat at the edge of its sweep may do better at an LR not tried, so no difference
        involving it is taken as found."""
        return self.p_holm < ALPHA and not self.unbracketed

    def verdict(self) -> str:
        """The verdict as the report writes it (bold), without its p-values."""
        if self.unbracketed:
            return (f"**not established (LR not bracketed)**: the best LR of {self.unbracketed} sat at the edge "
                    "of the LRs swept")
        if not self.established and self.p < ALPHA:  # the interval is this comparison's alone, not the family's
            alone = "its p is below 0.05" if self.test == "permutation" else "its 95 % interval excludes 0"
            return f"**not established** over the family (alone, {alone}; its Holm-adjusted p is not below 0.05)"
        if not self.established:
            return "**not established** (the interval allows no difference, or more seeds are needed)"
        if self.measure:
            return f"**{self.lower if self.diff < 0 else self.higher}**"
        return "**established**"

    def sentence(self, family: int | None = None, prefix: str = "") -> Sentence:
        """'A - B: +3.8 points, 95 % CI [+1.8, +5.9] (t, 3.9 df; 3 and 3 seeds x 10,000 test images);
        established (Holm-adjusted p = 0.004 over the report's 30 declared comparisons).'
        A measure's comparison ('adam − sgd, training-loss rises: −0.67 (adam 0.00, sgd 0.67), ...; more
        stable / less stable / not established') gives its difference in the measure's own units.
        `family` (a count) is ignored: the comparison knows its family."""
        p = f"= {self.p_holm:.3f}" if self.p_holm >= 0.001 else "< 0.001"
        raw = f"{self.p:.3f}" if self.p >= 0.001 else "< 0.001"
        note = f" {self.note}" if self.note else ""
        size = self.family_size
        if self.measure:
            means = ("" if self.mean_a is None or self.mean_b is None else
                     f" ({self.a} {self.mean_a:.3g}, {self.b} {self.mean_b:.3g})")
            if self.test == "t":
                how = f", 95 % CI [{self.lo:+.3g}, {self.hi:+.3g}] (t-interval, {self.df:.1f} df"
            else:
                how = (", no interval (no variation within either side's seeds, so no t: exact permutation test "
                       "over the seeds")
            head = (f"{prefix}{self.a} − {self.b}, {self.measure}: **{self.diff:+.3g}**{means}{how}; "
                    f"{self.seeds[0]} and {self.seeds[1]} seeds)")
        else:
            head = (f"{prefix}{self.a} − {self.b}: **{100 * self.diff:+.1f} points**, 95 % CI [{100 * self.lo:+.1f}, "
                    f"{100 * self.hi:+.1f}] (t-interval, {self.df:.1f} df; {self.seeds[0]} and {self.seeds[1]} seeds x "
                    f"{self.images:,} test images)")
        text = (f"{head}; {self.verdict()}, Holm-adjusted p {p} over {size} "
                f"comparison{'s' if size != 1 else ''} ({self.family}; unadjusted p {raw}).{note}")
        out = Sentence(text)
        out.comparison, out.prefix = self, prefix
        return out

    @classmethod
    def from_row(cls, row: dict) -> "Comparison":
        return cls(row["a"], row["b"], row["diff"], row["ci_lo"], row["ci_hi"], row["p"], se=row["se"], df=row["df"],
                   p_holm=row["p_holm"], family=row["family"], family_size=row["family_size"],
                   seeds=(row["seeds_a"], row["seeds_b"]), images=row["images"], note=row["note"],
                   mean_a=row.get("mean_a"), mean_b=row.get("mean_b"), measure=row.get("measure", ""),
                   lower=row.get("lower", ""), higher=row.get("higher", ""), test=row.get("test", "t"),
                   unbracketed=row.get("unbracketed", ""))

    def row(self) -> dict:
        """The comparison as the results files hold it (fractions, not points)."""
        return {"a": self.a, "b": self.b, "diff": self.diff, "ci_lo": self.lo, "ci_hi": self.hi, "se": self.se,
                "df": self.df, "p": self.p, "p_holm": self.p_holm, "established": self.established,
                "family": self.family, "family_size": self.family_size, "seeds_a": self.seeds[0],
                "seeds_b": self.seeds[1], "images": self.images, "note": self.note, "mean_a": self.mean_a,
                "mean_b": self.mean_b, "measure": self.measure, "lower": self.lower, "higher": self.higher,
                "test": self.test, "unbracketed": self.unbracketed}


def compare_pair(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray, note: str = "") -> Comparison:
    """A - B with its 95 % t-interval and two-sided p-value (not yet corrected for multiplicity)."""
    u = uncertainty(a, b)
    diff = float(np.asarray(a, dtype=np.float64).mean(1).mean() - np.asarray(b, dtype=np.float64).mean(1).mean())
    se = u.se
    if se > 0:
        half = student_t.ppf(1 - ALPHA / 2, u.df) * se
        p = student_t.two_sided_p(diff / se, u.df)
    else:  # every seed of both scored the same on every image: the difference is exact
        half, p = 0.0, (1.0 if diff == 0 else 0.0)
    return Comparison(name_a, name_b, diff, diff - half, diff + half, float(p), se=se, df=u.df, p_holm=float(p),
                      seeds=(len(a), len(b)), images=int(np.asarray(a).shape[1]), note=note,
                      mean_a=float(np.asarray(a, dtype=np.float64).mean()),
                      mean_b=float(np.asarray(b, dtype=np.float64).mean()))


def compare_values(name_a: str, values_a, name_b: str, values_b, *, measure: str, lower: str = "lower",
                   higher: str = "higher", note: str = "") -> Comparison:
    """mean(values_a) - mean(values_b) of a measure with one value per seed (a loss curve's rises, say): Welch's
    t-interval, s_a^2/n_a + s_b^2/n_b with Welch-Satterthwaite degrees of freedom, and its two-sided p-value (not
    yet corrected for multiplicity). There are no test images to pair here: each seed's value is the whole
    observation.

    When neither side's values vary (a count that is 0 on every seed of both, or 0 on one and 2 on the other)
    the t-statistic is undefined; the p-value is then the exact permutation test's over the seeds (every way
    to split the pooled values into groups of n_a and n_b, the share at least as far apart as observed), which
    at 3 seeds against 3 is never below 0.1: three seeds that agree do not establish a difference on their own."""
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds per variant (got {na} and {nb})")
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / na, b.var(ddof=1) / nb
    se = math.sqrt(va + vb)
    kw = dict(seeds=(na, nb), note=note, mean_a=float(a.mean()), mean_b=float(b.mean()), measure=measure,
              lower=lower, higher=higher)
    if se > 0:
        df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
        half = student_t.ppf(1 - ALPHA / 2, df) * se
        p = student_t.two_sided_p(diff / se, df)
        return Comparison(name_a, name_b, diff, diff - half, diff + half, float(p), se=se, df=float(df),
                          p_holm=float(p), **kw)
    p = permutation_p(a, b)  # the interval collapses onto the difference; `test` says why
    return Comparison(name_a, name_b, diff, diff, diff, p, se=0.0, df=0.0, p_holm=p, test="permutation", **kw)


def permutation_p(a, b) -> float:
    """Two-sided exact permutation p-value of mean(a) - mean(b): the share of all splits of the pooled values
    into groups of len(a) and len(b) whose difference of means is at least as large in size."""
    from itertools import combinations

    pooled = np.concatenate([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    na, total = len(a), pooled.sum()
    observed = abs(pooled[:na].mean() - pooled[na:].mean())
    splits = extreme = 0
    for idx in combinations(range(len(pooled)), na):
        s = pooled[list(idx)].sum()
        extreme += abs(s / na - (total - s) / (len(pooled) - na)) >= observed - 1e-12
        splits += 1
    return extreme / splits


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    order = np.argsort(p_values, kind="stable")
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def as_family(comparisons: list[Comparison], family: str = "the comparisons of this run") -> list[Comparison]:
    """The comparisons Holm-corrected as one family."""
    name = family if len(comparisons) > 1 else "this comparison alone"
    return [replace(c, p_holm=ph, family=name, family_size=len(comparisons))
            for c, ph in zip(comparisons, holm([c.p for c in comparisons]))]


def compare_all(pairs: list[tuple[str, np.ndarray, str, np.ndarray, str]],
                family: str = "the comparisons of this run") -> list[Comparison]:
    """Every comparison given (name_a, correct_a, name_b, correct_b, note), Holm-corrected as one family."""
    return as_family([compare_pair(na, a, nb, b, note) for na, a, nb, b, note in pairs], family)
