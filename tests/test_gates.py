"""Gates: which results fail `kpatchtest run` with exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from kpatchtest.pipeline import evaluate_gates
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
