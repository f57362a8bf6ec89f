"""Gates: pure functions from the spec's gates and a RunResult to pass/fail lines.

No stage runs here; a gate only reads records, so `kpatchtest report` can re-judge
an old results.json the same way the run did.
"""

from __future__ import annotations

from kpatchtest.results import GateResult, RunResult
from kpatchtest.spec import GATE_ACCEPTS, LoadedSpec

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


def _workloads_state(b) -> tuple[str, int]:
    """Patched failures the baseline shares (same workload, same host) are SOFT: not the series'
    doing. A failure the baseline did not show, or did not run, counts as new."""
    patched = [w for w in b.workloads if w.build == "patched"]
    if not patched:
        return "workloads not run", FAILED
    broken = [w for w in patched if w.error]
    if broken:
        return broken[0].error, FAILED
    baseline_bad = {(w.host, r.name) for w in b.workloads if w.build == "baseline" for r in w.records
                    if r.status not in ("pass", "skip")}
    failed = sorted({(w.host, r.name) for w in patched for r in w.records if r.status not in ("pass", "skip")})
    if not failed:
        return "pass", CLEAN
    new = [name for host, name in failed if (host, name) not in baseline_bad]
    if new:
        return f"{len(new)} new failure(s): {', '.join(new[:5])}", FAILED
    return f"{len(failed)} failure(s), all failing on baseline too", SOFT


def evaluate_gates(loaded: LoadedSpec, result: RunResult) -> None:
    result.gates = []
    gates = loaded.spec.gates
    for b in result.branches:
        level = gates.apply_level(b.name)
        if level:
            actual = b.apply.verdict if b.apply else "error"
            result.gates.append(GateResult(name="apply", branch=b.name, passed=actual in GATE_ACCEPTS[level],
                                           expected=level, actual=actual))
        for name, expected, lenient, state in (("build", gates.build, "pass", _build_state),
                                                ("boot", gates.boot, "booted", _boot_state),
                                                ("workloads", gates.workloads, "no-new-failures", _workloads_state)):
            if expected and name in result.stages:
                actual, severity = state(b)
                ok = severity == CLEAN or (severity == SOFT and expected == lenient)
                result.gates.append(GateResult(name=name, branch=b.name, passed=ok, expected=expected, actual=actual))
