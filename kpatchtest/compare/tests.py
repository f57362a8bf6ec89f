"""Per test and host: what its outcomes over the rounds say changed, and new kernel splats.

A test is whatever a WorkloadRecord names: each kvm-unit-test, the SMM-heavy boot. One
failure is not a regression: lab hosts and tests are noisy, so a test that passed on
baseline and failed on patched in every round is re-run `compare.reruns` more times on
both kernels (WorkloadRuns with `rerun` > 0, the same records as any round) and is a
regression only if patched still fails every time and baseline still passes; anything
else is flaky, with the counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kpatchtest.compare.model import (
    Counts,
    NewSplat,
    Outcome,
    TestComparison,
    TestRound,
)
from kpatchtest.lab.splats import normalise
from kpatchtest.results import BranchResult

_OUTCOME: dict[str, Outcome] = {"pass": "pass", "skip": "skip", "fail": "fail", "error": "fail", "timeout": "fail"}


@dataclass
class _Seen:
    group: str | None
    rounds: dict[tuple[int, int], TestRound]


def _collect(branch: BranchResult) -> dict[tuple[str, str], _Seen]:
    """(host, test name) -> its outcome per (round, rerun) on each kernel."""
    seen: dict[tuple[str, str], _Seen] = {}
    for w in branch.workloads:
        for rec in w.records:
            s = seen.setdefault((w.host, rec.name), _Seen(rec.group, {}))
            tr = s.rounds.setdefault((w.round, w.rerun), TestRound(round=w.round, rerun=w.rerun))
            old = getattr(tr, w.build)
            new = _OUTCOME[rec.status]
            if old is None or (old, new) == ("pass", "fail") or old == "skip":  # run twice in one boot: worst
                setattr(tr, w.build, new)
    return seen


def _count(outcomes: list[Outcome]) -> Counts:
    return Counts(passed=outcomes.count("pass"), failed=outcomes.count("fail"), skipped=outcomes.count("skip"))


def _of(rounds: list[TestRound], build: str) -> list[Outcome]:
    return [o for o in (getattr(r, build) for r in rounds) if o is not None]


def _side(name: str, c: Counts) -> str:
    ran = c.passed + c.failed
    return f"{name} passed {c.passed} of {ran}" if ran else f"{name} {'skipped' if c.skipped else 'did not run'}"


def _classify(name: str, group: str | None, host: str, s: _Seen, reruns: int) -> TestComparison:
    ordered = [s.rounds[k] for k in sorted(s.rounds)]
    main = [r for r in ordered if r.rerun == 0]
    extra = [r for r in ordered if r.rerun > 0]
    t = TestComparison(name=name, group=group, host=host, verdict="unchanged-pass", rounds=ordered,
                       baseline=_count(_of(main, "baseline")), patched=_count(_of(main, "patched")),
                       rerun_baseline=_count(_of(extra, "baseline")), rerun_patched=_count(_of(extra, "patched")))
    b = {o for o in _of(main, "baseline") if o != "skip"}
    p = {o for o in _of(main, "patched") if o != "skip"}
    counts = f"{_side('baseline', t.baseline)}, {_side('patched', t.patched)}"
    if len(b) > 1 or len(p) > 1:
        t.verdict, t.detail = "flaky", f"differs across rounds: {counts}"
    elif not b and not p:
        t.verdict, t.detail = "unchanged-pass", "skipped on both kernels" if (t.baseline.skipped or t.patched.skipped) else ""
    elif not b:
        t.verdict, t.detail = "new", counts
    elif not p:
        t.verdict, t.detail = "removed", counts
    elif b == p:
        t.verdict = "unchanged-pass" if b == {"pass"} else "unchanged-fail"
    elif p == {"pass"}:
        t.verdict, t.detail = "fixed", counts
    else:
        _confirm(t, reruns)
    return t


def _confirm(t: TestComparison, reruns: int) -> None:
    """A regression candidate (passed on baseline, failed on patched, every round): the reruns decide."""
    t.reruns_wanted = reruns
    rb, rp = t.rerun_baseline, t.rerun_patched
    done = min(rb.passed + rb.failed, rp.passed + rp.failed)
    again = f"reruns: baseline passed {rb.passed} of {rb.passed + rb.failed}, patched failed {rp.failed} of {rp.passed + rp.failed}"
    if rb.failed or rp.passed:
        t.verdict, t.detail = "flaky", f"failed on patched in every round, but {again}"
        return
    t.verdict = "regression"
    t.detail = f"failed on patched in all {t.patched.failed} round(s), passed on baseline in all {t.baseline.passed}"
    if reruns:
        t.detail += f"; {again}" if done >= reruns else f"; not confirmed: {done} of {reruns} reruns ran"


def classify(branch: BranchResult, reruns: int) -> list[TestComparison]:
    return [_classify(name, s.group, host, s, reruns) for (host, name), s in sorted(_collect(branch).items())]


def reruns_missing(t: TestComparison) -> int:
    """How many more reruns on each kernel a regression needs before it is confirmed."""
    if t.verdict != "regression":
        return 0
    done = min(t.rerun_baseline.passed + t.rerun_baseline.failed, t.rerun_patched.passed + t.rerun_patched.failed)
    return max(0, t.reruns_wanted - done)


# -- splats -----------------------------------------------------------------------------

# What workloads record of a splat in dmesg while they ran (workloads/dmesgwatch.py).
_WORKLOAD_SPLAT = re.compile(r"kernel (\S+) in dmesg during the run: (.+?)(?: \(\+\d+ more splats\))?(?:; |$)")
_NUMBER = re.compile(r"0x[0-9a-f]+|\d+", re.IGNORECASE)


def _signature(kind: str, first_line: str) -> tuple[str, str]:
    """A splat's identity across boots: CPU, PID, addresses and source line numbers vary
    (the patch itself moves lines), the kind and the text around them do not."""
    return kind, _NUMBER.sub("N", normalise(first_line))


def _splats(branch: BranchResult) -> list[tuple[str, str, NewSplat]]:
    """(build, signature key, splat) for every splat the boots and workloads recorded."""
    out = []
    for boot in branch.boot:
        for sp in boot.splats:
            out.append((boot.build, _signature(sp.kind, (sp.first_lines or [""])[0]),
                        NewSplat(host=boot.host or "", round=boot.round, kind=sp.kind,
                                 first_lines=sp.first_lines, where="boot")))
    for w in branch.workloads:
        for rec in w.records:
            for kind, line in _WORKLOAD_SPLAT.findall(rec.detail):
                out.append((w.build, _signature(kind, line),
                            NewSplat(host=w.host, round=w.round, rerun=w.rerun, kind=kind, first_lines=[line],
                                     where=rec.name)))
    return out


def new_splats(branch: BranchResult) -> list[NewSplat]:
    """Splats on the patched kernel whose signature baseline never logged on that host, the
    first time each was seen."""
    all_ = _splats(branch)
    baseline = {(s.host, sig) for build, sig, s in all_ if build == "baseline"}
    seen: set[tuple[str, tuple[str, str]]] = set()
    out = []
    for build, sig, s in sorted(all_, key=lambda x: (x[2].host, x[2].rerun, x[2].round)):
        key = (s.host, sig)
        if build == "patched" and key not in baseline and key not in seen:
            seen.add(key)
            out.append(s)
    return out

