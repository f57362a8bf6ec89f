"""Gates: which results fail `kpatchtest run` with exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpatchtest.gates import evaluate_gates
from kpatchtest.results import BootResult, BranchBuild, BranchResult, BuildResult, RunResult, SplatInfo
from kpatchtest.spec import parse_spec

SPEC = """name: g
series: [{mbox: x.mbox}]
kernel: {repo: /r, branches: [b]}
gates: {build: %s, boot: %s}
"""


def run_with(warnings: list[str], boot_status: str, splats: int) -> RunResult:
    r = RunResult(tool_version="t", name="g", started="now", stages=["fetch", "apply", "build", "boot"])
    patched = BuildResult(status="pass", warnings_new=warnings)
    boot = BootResult(build="patched", status=boot_status, host="h",
                      splats=[SplatInfo(kind="warning", first_lines=["WARNING: CPU: 0"])] * splats)
    r.branches.append(BranchResult(name="b", build=BranchBuild(baseline=BuildResult(status="pass"), patched=patched),
                                   boot=[boot]))
    return r


@pytest.mark.parametrize("build_gate, boot_gate, warnings, boot_status, splats, expected", [
    ("pass", "booted", ["w"], "booted", 1, [True, True]),
    ("no-new-warnings", "no-splats", ["w"], "booted", 1, [False, False]),
    ("no-new-warnings", "no-splats", [], "booted", 0, [True, True]),
    ("pass", "booted", [], "boot-failed", 0, [True, False]),
])
def test_lenient_and_strict_levels(tmp_path, build_gate, boot_gate, warnings, boot_status, splats, expected):
    loaded = parse_spec(SPEC % (build_gate, boot_gate), tmp_path / "s.yaml")
    r = run_with(warnings, boot_status, splats)
    evaluate_gates(loaded, r)
    assert [g.passed for g in r.gates] == expected
    assert [g.name for g in r.gates] == ["build", "boot"]


def workload_run(build: str, statuses: dict[str, str], error: str | None = None):
    from kpatchtest.results import WorkloadRun
    from kpatchtest.workloads.record import WorkloadRecord
    return WorkloadRun(build=build, host="h", error=error,
                       records=[WorkloadRecord(name=n, status=s) for n, s in statuses.items()])


@pytest.mark.parametrize("gate, baseline, patched, error, passed, actual", [
    ("pass", {"access": "pass"}, {"access": "pass", "smm-boot": "skip"}, None, True, "pass"),
    ("pass", {"access": "fail"}, {"access": "fail"}, None, False, "all failing on baseline too"),
    ("no-new-failures", {"access": "fail"}, {"access": "fail"}, None, True, "all failing on baseline too"),
    ("no-new-failures", {"access": "pass"}, {"access": "timeout"}, None, False, "1 new failure(s): access"),
    # the baseline did not run it: a patched failure cannot be called pre-existing
    ("no-new-failures", {}, {"smm-boot": "fail"}, None, False, "1 new failure(s): smm-boot"),
    ("no-new-failures", {"access": "pass"}, {}, "h: not run: host busy", False, "h: not run: host busy"),
])
def test_workloads_gate(tmp_path, gate, baseline, patched, error, passed, actual):
    loaded = parse_spec(SPEC.replace("gates: {build: %s, boot: %s}", f"gates: {{workloads: {gate}}}"),
                        tmp_path / "s.yaml")
    r = RunResult(tool_version="t", name="g", started="now", stages=["fetch", "apply", "build", "boot", "workloads"])
    r.branches.append(BranchResult(name="b", workloads=[workload_run("baseline", baseline),
                                                        workload_run("patched", patched, error)]))
    evaluate_gates(loaded, r)
    (g,) = r.gates
    assert (g.name, g.passed) == ("workloads", passed)
    assert actual in g.actual
