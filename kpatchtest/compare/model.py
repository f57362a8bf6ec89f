"""The compare stage's records: what changed between baseline and patched, per branch and host.

These are part of results.json (BranchResult.compare), so reports and gates read them
instead of pooling workload results themselves. Statistics are never re-computed by a
report: a re-render shows exactly the numbers the run computed (fixed bootstrap seed).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kpatchtest.util import StrictModel

TestVerdict = Literal["regression", "fixed", "new", "removed", "flaky", "unchanged-pass", "unchanged-fail"]
MetricVerdict = Literal["faster", "slower", "less", "more", "no significant change", "not enough data", "n/a"]
Direction = Literal["lower", "higher", "none"]      # which way is better; none: describes the workload
Outcome = Literal["pass", "fail", "skip"]           # a WorkloadStatus folded: error and timeout are fail


class Counts(StrictModel):
    """How often a test passed, failed (fail/error/timeout) or skipped on one kernel."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.skipped


class TestRound(StrictModel):
    """One round's (or rerun's) outcome of a test on each kernel; None: not run in that round."""

    __test__ = False                        # not a pytest class

    round: int
    rerun: int = 0                          # 0: the round itself; k: its k-th rerun boot
    baseline: Outcome | None = None
    patched: Outcome | None = None


class TestComparison(StrictModel):
    """One test (a kvm-unit-test, a workload) on one host, over all rounds and reruns."""

    __test__ = False                        # not a pytest class

    name: str
    group: str | None = None                # e.g. "kvm-unit-tests"; None for a workload of its own
    host: str
    verdict: TestVerdict
    baseline: Counts = Field(default_factory=Counts)          # the rounds (rerun 0) only
    patched: Counts = Field(default_factory=Counts)
    rerun_baseline: Counts = Field(default_factory=Counts)    # the reruns only
    rerun_patched: Counts = Field(default_factory=Counts)
    reruns_wanted: int = 0                  # compare.reruns when this was a regression candidate, else 0
    rounds: list[TestRound] = Field(default_factory=list)
    detail: str = ""                        # e.g. "failed on patched 2 of 3 rounds"


class Estimate(StrictModel):
    """The numbers of one metric's comparison (compare.stats.compare): baseline_median and
    patched_median over every repetition of every round; ratio: the paired estimate, the
    median over rounds of each round's median(patched)/median(baseline); ci_low/ci_high:
    its 95% percentile interval from the hierarchical bootstrap; p_value:
    paired Wilcoxon signed-rank over the per-round medians. Numbers are None when not
    computed (n/a, not enough data, a zero baseline)."""

    baseline_median: float | None = None
    patched_median: float | None = None
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    rounds: int = 0                         # rounds paired (both kernels measured in them)
    repetitions: int = 0                    # values per round (the most any round had)
    baseline_n: int = 0                     # values that went in, all rounds
    patched_n: int = 0
    verdict: MetricVerdict = "n/a"
    why: str = ""                           # n/a: why; otherwise what else a reader should know


class MetricComparison(Estimate):
    """One metric of one workload on one host: its Estimate, and what it is of."""

    name: str                               # e.g. "wall_time", "kvm.exits"
    workload: str                           # the WorkloadRecord name, e.g. "smm-boot"
    unit: str
    direction: Direction
    host: str
    method: str = ""                        # e.g. "hierarchical bootstrap (rounds, then repetitions), 10000 resamples"
    seed: int | None = None
    threshold: float = 0.02                 # a fraction: 0.02 = 2%


class NewSplat(StrictModel):
    """A kernel splat logged on the patched kernel whose kind and first line baseline never logged."""

    host: str
    round: int = 1
    rerun: int = 0
    kind: str                               # panic, oops, warning, ...
    first_lines: list[str] = Field(default_factory=list)
    where: str = "boot"                     # "boot" (BootResult.splats) or the workload whose dmesg showed it


class BranchComparison(StrictModel):
    tests: list[TestComparison] = Field(default_factory=list)
    metrics: list[MetricComparison] = Field(default_factory=list)
    splats_new: list[NewSplat] = Field(default_factory=list)   # each one a regression of its own
    method: str = ""                        # how metrics were compared (bootstrap + Wilcoxon, pairing)
    seed: int = 1
    bootstrap: int = 10000                  # resamples
    threshold: float = 0.02
    reruns: int = 2                         # compare.reruns the classification asked for
    order: Literal["alternate", "random"] = "random"     # how rounds' B/P order was chosen

    def regressions(self) -> list[TestComparison]:
        return [t for t in self.tests if t.verdict == "regression"]
