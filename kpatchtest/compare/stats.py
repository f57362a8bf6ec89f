"""Patched against baseline for one metric: the paired ratio with a hierarchical bootstrap CI.

Boot-to-boot variation is usually larger than the variation between repetitions on one
boot, so treating every repetition as independent would make the interval far too
narrow. Following Kalibera and Jones ("Rigorous benchmarking in reasonable time", 2013),
the bootstrap resamples rounds (boots), then repetitions within each resampled round.
Rounds are paired (baseline and patched of round k ran next to each other), so the
estimate is the median over rounds of each round's ratio median(patched)/median(baseline),
and one draw of round indices serves both kernels: drift common to a pair cancels. On
one quiet 10 x 5 A/A of the local lab (alternate order) that made the smallest slowdown
detected in 95% of 10-round draws 9.4% instead of 31% for the ratio of pooled medians,
which lets the boot-to-boot spread of both kernels into the interval; a loaded lab needs
more (benchmarks/compare_power.py measures it). The p-value is a paired Wilcoxon
signed-rank test over the per-round medians. The generator is seeded, so the same values
always give the same interval.
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

METHOD = ("ratio: median over the paired rounds of median(patched)/median(baseline) in each round; "
          "95% percentile CI from a hierarchical bootstrap ({n} resamples of the paired rounds, then of "
          "the repetitions within each resampled round; Kalibera & Jones 2013); p: paired Wilcoxon "
          "signed-rank over per-round medians")


def _pad(rounds: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rounds as an R x M array (NaN padded) and each round's count."""
    n = np.array([len(r) for r in rounds], dtype=np.int64)
    data = np.full((len(rounds), int(n.max())), np.nan)
    for i, r in enumerate(rounds):
        data[i, :len(r)] = r
    return data, n


def _resample(data: np.ndarray, n: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For each row of round indices `idx` (B x R): one resample of repetitions within each
    of those rounds (B x R x M, NaN past a short round's own count) and the counts (B x R)."""
    b, r = idx.shape
    m = data.shape[1]
    nn = n[idx]                                                     # B x R repetitions available
    j = (rng.random((b, r, m)) * nn[..., None]).astype(np.int64)    # uniform in [0, nn)
    vals = data[idx[..., None], j]
    vals[np.arange(m) >= nn[..., None]] = np.nan                    # a short round draws only its own count
    return vals, nn


def _median(vals: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Median along the last axis of the first `count` non-NaN values (np.nanmedian loops)."""
    if (count == vals.shape[-1]).all():                             # no short round: no NaN
        return np.median(vals, axis=-1)
    ordered = np.sort(vals, axis=-1)                                # NaN sorts last
    lo = np.take_along_axis(ordered, ((count - 1) // 2)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(ordered, (count // 2)[..., None], axis=-1)[..., 0]
    return (lo + hi) / 2


def paired_ratio(bm: np.ndarray, pm: np.ndarray) -> np.ndarray:
    """Median over the last axis (rounds) of pm/bm: equal medians give 1 (0/0 is no change),
    a 0 baseline under a positive patched median gives inf."""
    return np.median(_ratio(bm, pm), axis=-1)


def _ratio(bm: np.ndarray, pm: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bm == pm, 1.0, pm / bm)


def bootstrap_ratios(baseline: list[list[float]], patched: list[list[float]], resamples: int,
                     seed: int, paired: bool = True) -> np.ndarray:
    """`resamples` bootstrap replicates of the paired ratio, rounds paired by index (one draw
    of round indices for both); unpaired: of median(all patched values)/median(all baseline
    values), each side's rounds drawn on their own."""
    bd, bn = _pad(baseline)
    pd, pn = _pad(patched)
    rng = np.random.default_rng(seed)
    r = len(baseline)
    per = max(1, _CHUNK // (r * max(bd.shape[1], pd.shape[1])))
    out = np.empty(resamples)
    for start in range(0, resamples, per):
        k = min(per, resamples - start)
        idx = rng.integers(0, r, size=(k, r))
        (bv, bc) = _resample(bd, bn, idx, rng)
        (pv, pc) = _resample(pd, pn, idx if paired else rng.integers(0, len(patched), size=(k, len(patched))), rng)
        if paired:
            out[start:start + k] = paired_ratio(_median(bv, bc), _median(pv, pc))
        else:
            out[start:start + k] = _ratio(_median(bv.reshape(k, -1), bc.sum(axis=1)),
                                          _median(pv.reshape(k, -1), pc.sum(axis=1)))
    return out


def paired_p(baseline: list[list[float]], patched: list[list[float]]) -> float | None:
    """Two-sided Wilcoxon signed-rank p over per-round medians (exact for small n); 1.0 when
    every pair is equal (nothing to rank)."""
    b, p = _medians(baseline), _medians(patched)
    if np.all(p == b):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(float(sps.wilcoxon(p, b).pvalue))


def _medians(rounds: list[list[float]]) -> np.ndarray:
    return np.array([np.median(x) for x in rounds], dtype=float)


def words(direction: Direction, time: bool) -> tuple[str, str]:
    """(verdict when patched/baseline is above 1, below 1)."""
    if not time:
        return "more", "less"
    return ("faster", "slower") if direction == "higher" else ("slower", "faster")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def compare(baseline: list[list[float]], patched: list[list[float]], *, direction: Direction, time: bool,
            threshold: float, resamples: int, seed: int, paired: bool = True) -> Estimate:
    """Rounds paired by index, each a list of repetition values (None already dropped, no
    empty round). The verdict comes from the CI only: above 1+threshold or below
    1-threshold as a whole, else no significant change; below MIN_ROUNDS rounds there is no
    interval and no verdict. Direction none: the numbers, no verdict (n/a).

    paired=False, for kernels not measured side by side (a benchmark comparing two lab VMs):
    the ratio of the pooled medians, each side resampled on its own, and a Mann-Whitney p."""
    if paired and len(baseline) != len(patched):
        raise ValueError("rounds must be paired")
    est = Estimate(rounds=min(len(baseline), len(patched)),
                   repetitions=max((len(r) for r in baseline + patched), default=0),
                   baseline_n=sum(map(len, baseline)), patched_n=sum(map(len, patched)))
    if not baseline:
        est.verdict, est.why = "not enough data", "no round measured on both kernels"
        return est
    bmed = float(np.median(np.concatenate([np.asarray(r, float) for r in baseline])))
    pmed = float(np.median(np.concatenate([np.asarray(r, float) for r in patched])))
    est.baseline_median, est.patched_median = bmed, pmed
    est.ratio = _finite(float(paired_ratio(_medians(baseline), _medians(patched)) if paired else _ratio(
        np.asarray(bmed), np.asarray(pmed))))
    if est.rounds < MIN_ROUNDS:
        est.verdict = "not enough data"
        est.why = f"{est.rounds} paired round(s), at least {MIN_ROUNDS} needed for an interval"
        return est
    ratios = bootstrap_ratios(baseline, patched, resamples, seed, paired)
    alpha = (1 - CI_LEVEL) / 2
    # inf (a 0 baseline median) sorts last but breaks interpolation: stand in the largest float
    lo, hi = (np.inf if q >= _HUGE else q for q in
              np.quantile(np.minimum(ratios, np.finfo(float).max), [alpha, 1 - alpha]))
    est.ci_low, est.ci_high = _finite(lo), _finite(hi)
    est.p_value = paired_p(baseline, patched) if paired else _finite(float(sps.mannwhitneyu(
        np.concatenate(patched), np.concatenate(baseline)).pvalue))
    notes = []
    if est.ratio is None:
        notes.append("the baseline median is 0 in half the rounds or more: the ratio is unbounded")
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
