"""The compare stage: fill each branch's `compare` from its workload runs (pure over records).

compare_run only reads what the workloads stage recorded, so `kpatchtest report` and the
gates can recompute the same comparison for an old results.json; the fixed seed makes
the numbers identical. Reruns of regression candidates are more WorkloadRuns (rerun > 0):
needs_reruns says which the pipeline should boot for, then compare_run runs again.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from kpatchtest.compare import stats
from kpatchtest.compare.metrics import metric_info
from kpatchtest.compare.model import BranchComparison, MetricComparison
from kpatchtest.compare.tests import classify, new_splats, reruns_missing
from kpatchtest.results import BranchResult, RunResult
from kpatchtest.spec import CompareSpec, Spec, WorkloadsSpec
from kpatchtest.stage import Stage

Build = str     # "baseline" | "patched"


@dataclass(frozen=True)
class RerunNeed:
    """Boot both kernels of a branch on `host` `times` more times and run these tests."""

    host: str
    tests: tuple[str, ...]          # record names, kvm-unit-tests names or "smm-boot"
    times: int
    first_rerun: int                # the WorkloadRun.rerun number the first of them gets


@dataclass
class _Series:
    """One metric of one workload on one host: values per round on each kernel."""

    unit: str
    values: dict[str, dict[int, list[float]]]       # build -> round -> values
    unavailable: dict[str, str]                     # build -> why (available False)


def _metric_series(branch: BranchResult) -> dict[tuple[str, str, str], _Series]:
    """(host, workload, metric) -> values of the rounds (reruns are for pass/fail only)."""
    out: dict[tuple[str, str, str], _Series] = {}
    for w in branch.workloads:
        if w.rerun:
            continue
        for rec in w.records:
            for m in rec.metrics:
                s = out.setdefault((w.host, rec.name, m.name), _Series(m.unit, defaultdict(dict), {}))
                vals = [v for v in m.values if v is not None]
                s.values[w.build].setdefault(w.round, []).extend(vals)
                if not m.available:
                    s.unavailable.setdefault(w.build, m.note or "marked unavailable")
    return out


def _compare_metric(host: str, workload: str, name: str, s: _Series, cfg: CompareSpec) -> MetricComparison:
    info = metric_info(name, s.unit)
    direction = info.direction if info else "none"
    mc = {"name": name, "workload": workload, "unit": s.unit, "direction": direction, "host": host,
          "seed": cfg.seed, "threshold": cfg.threshold, "method": stats.METHOD.format(n=cfg.bootstrap)}
    base, pat = s.values.get("baseline", {}), s.values.get("patched", {})
    for build, vals in (("baseline", base), ("patched", pat)):
        if not any(vals.values()):
            why = s.unavailable.get(build) or ("not recorded" if not vals else "no repetition measured")
            return MetricComparison(**mc, verdict="n/a", why=f"unavailable on {build}: {why}",
                                    baseline_n=sum(map(len, base.values())), patched_n=sum(map(len, pat.values())))
    paired = sorted(r for r in base if base[r] and pat.get(r))
    est = stats.compare([base[r] for r in paired], [pat[r] for r in paired], direction=direction,
                        time=bool(info and info.time), threshold=cfg.threshold, resamples=cfg.bootstrap,
                        seed=cfg.seed)
    why = est.why
    if info is None:
        why = "; ".join(x for x in ("a metric kpatchtest has no direction for", why) if x)
    return MetricComparison(**mc, **est.model_dump(exclude={"why"}), why=why)


def compare_branch(branch: BranchResult, spec: Spec) -> BranchComparison:
    cfg = spec.compare
    metrics = [_compare_metric(host, workload, name, s, cfg)
               for (host, workload, name), s in sorted(_metric_series(branch).items())]
    return BranchComparison(
        tests=classify(branch, cfg.reruns), metrics=metrics, splats_new=new_splats(branch),
        method=stats.METHOD.format(n=cfg.bootstrap) + f"; rounds paired by number; a change only when the CI lies wholly beyond ±{cfg.threshold * 100:g}%",
        seed=cfg.seed, bootstrap=cfg.bootstrap, threshold=cfg.threshold, reruns=cfg.reruns,
        order=spec.workloads.order if spec.workloads else "random")


def compare_run(result: RunResult, spec: Spec) -> None:
    """Every branch that ran workloads gets its comparison; others keep compare None."""
    for b in result.branches:
        b.compare = compare_branch(b, spec) if b.workloads else None


def needs_reruns(branch: BranchResult, spec: Spec) -> list[RerunNeed]:
    """Per host: the regression candidates still short of compare.reruns reruns, and how many
    more boots of each kernel that takes."""
    tests = branch.compare.tests if branch.compare else classify(branch, spec.compare.reruns)
    by_host: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for t in tests:
        if missing := reruns_missing(t):
            by_host[t.host].append((t.name, missing))
    done = defaultdict(int)
    for w in branch.workloads:
        done[w.host] = max(done[w.host], w.rerun)
    return [RerunNeed(host=h, tests=tuple(n for n, _ in ts), times=max(m for _, m in ts), first_rerun=done[h] + 1)
            for h, ts in sorted(by_host.items())]


def round_orders(workloads: WorkloadsSpec) -> list[tuple[Build, Build]]:
    """Which kernel boots first in each round: B then P (alternate), or a seeded shuffle of
    as many B-first as P-first rounds (random; an odd count's last one by a coin), so the same
    spec boots the same way and an effect of the slot (the second boot of a pair ran 6% slower
    in an A/A here) falls on both kernels alike instead of on patched. The boot stage records
    what it did by the order of its BootResults."""
    if workloads.order == "alternate":
        return [("baseline", "patched")] * workloads.rounds
    rng = np.random.default_rng(workloads.seed)
    half = workloads.rounds // 2
    flips = [0] * half + [1] * half + ([int(rng.integers(0, 2))] if workloads.rounds % 2 else [])
    rng.shuffle(flips)
    return [("patched", "baseline") if f else ("baseline", "patched") for f in flips]


class CompareStage(Stage[BranchResult, BranchComparison]):
    """One unit per branch that ran workloads; pure, so no step cache (it takes milliseconds)."""

    name = "compare"
    record_type = BranchComparison

    def units(self) -> list[BranchResult]:
        return [b for b in self.ctx.result.branches if b.workloads]

    def label(self, unit: BranchResult) -> str:
        return unit.name

    def run(self, unit: BranchResult) -> BranchComparison:
        return compare_branch(unit, self.ctx.spec)

    def record(self, unit: BranchResult, record: BranchComparison) -> None:
        unit.compare = record

    def describe(self, unit: BranchResult, record: BranchComparison) -> str:
        changed = [m for m in record.metrics if m.verdict in ("faster", "slower", "less", "more")]
        regressions = record.regressions()
        return (f"{len(regressions)} regression(s), " if regressions else "no regression, ") + \
            (f"{len(changed)} metric change(s): " + ", ".join(f"{m.name} {m.verdict}" for m in changed[:4])
             if changed else "no significant metric change")
