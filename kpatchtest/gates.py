"""Gates: pure functions from the spec's gates and a RunResult to pass/fail lines.

No stage runs here; a gate only reads records, so `kpatchtest report` can re-judge
an old results.json the same way the run did.
"""

from __future__ import annotations

from kpatchtest.compare.model import BranchComparison, TestComparison
from kpatchtest.compare.stage import compare_branch
from kpatchtest.compare.tests import classify
from kpatchtest.results import GateResult, RunResult
from kpatchtest.spec import GATE_ACCEPTS, LoadedSpec, MetricGate

# Build and boot states for gates: (what to show, 0 clean / 1 soft problem / 2 failed).
# The lenient gate level (build: pass, boot: booted) accepts soft problems.
CLEAN, SOFT, FAILED = 0, 1, 2


def _build_state(b) -> tuple[str, int]:
    if not b.build:
        return "not built", FAILED
    p = b.build.patched
    if p.status != "pass":
        return f"patched build {p.status}", FAILED
    return (f"{len(p.warnings_new)} new warning(s)", SOFT) if p.warnings_new else ("pass", CLEAN)


def _boot_state(b) -> tuple[str, int]:
    patched = [r for r in b.boot if r.build == "patched"]
    if not patched:
        return "not booted", FAILED
    bad = [r for r in patched if r.status != "booted"]
    if bad:
        return f"patched {bad[0].status} on {bad[0].host}", FAILED
    splats = sum(len(r.splats) for r in patched)
    return (f"booted with {splats} splat(s)", SOFT) if splats else ("booted", CLEAN)


def _workloads_state(b, tests: list[TestComparison]) -> tuple[str, int]:
    """Patched failures the baseline shares (same test, same host, in a round or a rerun) are
    SOFT: not the series' doing. A failure the baseline did not show, or did not run, is new."""
    patched = [w for w in b.workloads if w.build == "patched"]
    if not patched:
        return "workloads not run", FAILED
    broken = [w for w in patched if w.error]
    if broken:
        return broken[0].error, FAILED
    failed = [t for t in tests if t.patched.failed or t.rerun_patched.failed]
    if not failed:
        return "pass", CLEAN
    new = [t.name for t in failed if not _failed_on_baseline(t)]
    if new:
        return f"{len(new)} new failure(s): {', '.join(new[:5])}", FAILED
    return f"{len(failed)} failure(s), all failing on baseline too", SOFT


def _failed_on_baseline(t: TestComparison) -> bool:
    return bool(t.baseline.failed or t.rerun_baseline.failed)


def _regressions_state(b, c: BranchComparison, level: str) -> tuple[str, int]:
    """none: no regression, no new splat, no flaky test that failed on patched only;
    allow-flaky: flaky tests pass."""
    if not b.workloads:
        return "workloads not run", FAILED
    bad = [f"{t.name} on {t.host} ({t.detail})" for t in c.regressions()]
    if level == "none":
        bad += [f"{t.name} on {t.host} (flaky: {t.detail})" for t in c.tests
                if t.verdict == "flaky" and (t.patched.failed or t.rerun_patched.failed) and not _failed_on_baseline(t)]
    bad += [f"new {s.kind} on {s.host} round {s.round} ({s.where}): {(s.first_lines or [''])[0]}" for s in c.splats_new]
    if not bad:
        return "no regressions", CLEAN
    return f"{len(bad)} regression(s): " + "; ".join(bad[:3]) + (f"; +{len(bad) - 3} more" if len(bad) > 3 else ""), FAILED


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.2f}"


def _pct(x: float) -> str:
    return f"{x * 100:g}%"


def _metric_gate(b, c: BranchComparison, name: str, gate: MetricGate) -> tuple[bool, str]:
    """Broken only when the whole 95% CI lies above 1 + limit: never from medians alone. A metric
    that cannot be checked (not measured, n/a, too few rounds) fails: the gate asked for it."""
    limit = f"{gate.key} {_pct(gate.limit)}"
    found = [m for m in c.metrics if m.name == name]
    if not found:
        return False, f"{name} on {b.name}: not measured, cannot check {limit}"
    lines, ok = [], True
    for m in found:
        where = f"{name} on {b.name}/{m.host}" + (f" ({m.workload})" if len({x.workload for x in found}) > 1 else "")
        if m.verdict in ("n/a", "not enough data"):
            ok = False
            lines.append(f"{where}: {m.verdict} ({m.why}), cannot check {limit}")
            continue
        low = m.ci_low if m.ci_low is not None else (float("inf") if m.verdict in ("slower", "more") else None)
        numbers = f"patched/baseline {_num(m.ratio)} [{_num(m.ci_low)}, {_num(m.ci_high)}]"
        if low is not None and low > 1 + gate.limit:
            ok = False
            lines.append(f"{where}: {numbers} > {limit}")
        else:
            lines.append(f"{where}: {numbers} within {limit}")
    lines.sort(key=lambda line: "cannot check" not in line and " > " not in line)   # the broken ones first
    return ok, lines[0] + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "")


def evaluate_gates(loaded: LoadedSpec, result: RunResult) -> None:
    result.gates = []
    spec = loaded.spec
    gates = spec.gates
    for b in result.branches:
        level = gates.apply_level(b.name)
        if level:
            actual = b.apply.verdict if b.apply else "error"
            result.gates.append(GateResult(name="apply", branch=b.name, passed=actual in GATE_ACCEPTS[level],
                                           expected=level, actual=actual))
        # an old results.json has no comparison: the same pure functions make it here
        ran = "workloads" in result.stages
        comparison = b.compare or (compare_branch(b, spec) if ran and (gates.regressions or gates.metrics) else None)
        tests = comparison.tests if comparison else classify(b, spec.compare.reruns)
        for name, expected, lenient, state in (("build", gates.build, "pass", _build_state),
                                                ("boot", gates.boot, "booted", _boot_state),
                                                ("workloads", gates.workloads, "no-new-failures",
                                                 lambda b, tests=tests: _workloads_state(b, tests))):
            if expected and name in result.stages:
                actual, severity = state(b)
                ok = severity == CLEAN or (severity == SOFT and expected == lenient)
                result.gates.append(GateResult(name=name, branch=b.name, passed=ok, expected=expected, actual=actual))
        if not ran or comparison is None:
            continue
        if gates.regressions:
            actual, severity = _regressions_state(b, comparison, gates.regressions)
            result.gates.append(GateResult(name="regressions", branch=b.name, passed=severity == CLEAN,
                                           expected=gates.regressions, actual=actual))
        for metric, gate in gates.metrics.items():
            ok, actual = _metric_gate(b, comparison, metric, gate)
            result.gates.append(GateResult(name="metrics", branch=b.name, passed=ok,
                                           expected=f"{metric} {gate.key} {_pct(gate.limit)}", actual=actual))
