"""Patched against baseline for one metric: ratio of medians with a hierarchical bootstrap CI.

Boot-to-boot variation is usually larger than the variation between repetitions on one
boot, so treating every repetition as independent would make the interval far too
narrow. Following Kalibera and Jones ("Rigorous benchmarking in reasonable time", 2013),
the bootstrap resamples rounds (boots), then repetitions within each resampled round.
Rounds are paired (baseline and patched of round k ran next to each other), so one draw
of round indices serves both kernels and drift common to a pair cancels. The p-value is a
paired Wilcoxon signed-rank test over the per-round medians. The generator is seeded, so
the same values always give the same interval.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats as sps

from kpatchtest.compare.model import Direction, Estimate

MIN_ROUNDS = 3
CI_LEVEL = 0.95
_HUGE = 1e300           # a quantile this large came from inf ratios
_CHUNK = 4_000_000      # values drawn per chunk of resamples: bounds memory for many repetitions

METHOD = ("ratio of medians patched/baseline; 95% percentile CI from a hierarchical bootstrap "
          "({n} resamples of the paired rounds, then of the repetitions within each resampled round; "
          "Kalibera & Jones 2013); p: paired Wilcoxon signed-rank over per-round medians")


def _pad(rounds: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rounds as an R x M array (NaN padded) and each round's count."""
    n = np.array([len(r) for r in rounds], dtype=np.int64)
    data = np.full((len(rounds), int(n.max())), np.nan)
    for i, r in enumerate(rounds):
        data[i, :len(r)] = r
    return data, n


def _medians_of_resamples(data: np.ndarray, n: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row of round indices `idx` (B x R): the median of one resample of repetitions
    within each of those rounds, pooled."""
    b, r = idx.shape
    m = data.shape[1]
    nn = n[idx]                                                     # B x R repetitions available
    j = (rng.random((b, r, m)) * nn[..., None]).astype(np.int64)    # uniform in [0, nn)
    vals = data[idx[..., None], j]
    if (n == m).all():
        return np.median(vals.reshape(b, r * m), axis=1)
    vals[np.arange(m) >= nn[..., None]] = np.nan                    # a short round draws only its own count
    ordered = np.sort(vals.reshape(b, r * m), axis=1)               # NaN sorts last (np.nanmedian loops per row)
    count = nn.sum(axis=1)
    rows = np.arange(b)
    return (ordered[rows, (count - 1) // 2] + ordered[rows, count // 2]) / 2


def bootstrap_ratios(baseline: list[list[float]], patched: list[list[float]], resamples: int,
                     seed: int) -> np.ndarray:
    """`resamples` bootstrap replicates of median(patched)/median(baseline), rounds paired by index.

    Both medians 0 give 1 (no change); a 0 baseline under a positive patched median gives inf."""
    bd, bn = _pad(baseline)
    pd, pn = _pad(patched)
    rng = np.random.default_rng(seed)
    r = len(baseline)
    per = max(1, _CHUNK // (r * max(bd.shape[1], pd.shape[1])))
    out = np.empty(resamples)
    for start in range(0, resamples, per):
        k = min(per, resamples - start)
        idx = rng.integers(0, r, size=(k, r))
        bm = _medians_of_resamples(bd, bn, idx, rng)
        pm = _medians_of_resamples(pd, pn, idx, rng)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + k] = np.where(bm == pm, 1.0, pm / bm)
    return out


def paired_p(baseline: list[list[float]], patched: list[list[float]]) -> float | None:
    """Two-sided Wilcoxon signed-rank p over per-round medians (exact for small n); 1.0 when
    every pair is equal (nothing to rank)."""
    b = np.array([np.median(x) for x in baseline])
    p = np.array([np.median(x) for x in patched])
    if np.all(p == b):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(float(sps.wilcoxon(p, b).pvalue))


def words(direction: Direction, time: bool) -> tuple[str, str]:
    """(verdict when patched/baseline is above 1, below 1)."""
    if not time:
        return "more", "less"
    return ("faster", "slower") if direction == "higher" else ("slower", "faster")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def compare(baseline: list[list[float]], patched: list[list[float]], *, direction: Direction, time: bool,
            threshold: float, resamples: int, seed: int) -> Estimate:
    """Rounds paired by index, each a list of repetition values (None already dropped, no
    empty round). The verdict comes from the CI only: above 1+threshold or below
    1-threshold as a whole, else no significant change; below MIN_ROUNDS rounds there is no
    interval and no verdict. Direction none: the numbers, no verdict (n/a)."""
    if len(baseline) != len(patched):
        raise ValueError("rounds must be paired")
    est = Estimate(rounds=len(baseline),
                   repetitions=max((len(r) for r in baseline + patched), default=0),
                   baseline_n=sum(map(len, baseline)), patched_n=sum(map(len, patched)))
    if not baseline:
        est.verdict, est.why = "not enough data", "no round measured on both kernels"
        return est
    bmed = float(np.median(np.concatenate([np.asarray(r, float) for r in baseline])))
    pmed = float(np.median(np.concatenate([np.asarray(r, float) for r in patched])))
    est.baseline_median, est.patched_median = bmed, pmed
    est.ratio = 1.0 if bmed == pmed else (_finite(pmed / bmed) if bmed else None)
    if len(baseline) < MIN_ROUNDS:
        est.verdict = "not enough data"
        est.why = f"{len(baseline)} paired round(s), at least {MIN_ROUNDS} needed for an interval"
        return est
    ratios = bootstrap_ratios(baseline, patched, resamples, seed)
    alpha = (1 - CI_LEVEL) / 2
    # inf (a 0 baseline median) sorts last but breaks interpolation: stand in the largest float
    lo, hi = (np.inf if q >= _HUGE else q for q in
              np.quantile(np.minimum(ratios, np.finfo(float).max), [alpha, 1 - alpha]))
    est.ci_low, est.ci_high = _finite(lo), _finite(hi)
    est.p_value = paired_p(baseline, patched)
    notes = []
    if est.ratio is None:
        notes.append("baseline median 0: the ratio is unbounded")
    elif est.ci_high is None:
        notes.append("some resamples have a 0 baseline median: the interval is unbounded above")
    up, down = words(direction, time)
    if direction == "none":
        est.verdict = "n/a"
        notes.insert(0, "describes the workload (direction none): not judged")
    elif lo > 1 + threshold:
        est.verdict = up
    elif hi < 1 - threshold:
        est.verdict = down
    else:
        est.verdict = "no significant change"
        if lo > 1 or hi < 1:
            notes.append(f"the interval excludes 1 but not wholly beyond ±{threshold:.0%}")
    est.why = "; ".join(notes)
    return est
