"""Gates: which results fail `kpatchtest run` with exit 1."""

from __future__ import annotations

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


def test_workloads_gate_reads_the_comparison_reruns_included(tmp_path):
    """A patched failure whose baseline failed on a rerun is shared, not new."""
    from kpatchtest.results import WorkloadRun
    from kpatchtest.workloads.record import WorkloadRecord
    loaded = parse_spec(SPEC.replace("gates: {build: %s, boot: %s}", "gates: {workloads: no-new-failures}"),
                        tmp_path / "s.yaml")
    r = RunResult(tool_version="t", name="g", started="now", stages=["workloads"])
    runs = [WorkloadRun(build=bld, host="h", round=1, rerun=k, records=[WorkloadRecord(name="t", status=st)])
            for bld, k, st in (("baseline", 0, "pass"), ("patched", 0, "fail"), ("baseline", 1, "fail"),
                               ("patched", 1, "fail"))]
    r.branches.append(BranchResult(name="b", workloads=runs))
    evaluate_gates(loaded, r)
    assert (r.gates[0].passed, r.gates[0].actual) == (True, "1 failure(s), all failing on baseline too")
    r.branches[0].workloads = runs[:2]
    evaluate_gates(loaded, r)
    assert (r.gates[0].passed, r.gates[0].actual) == (False, "1 new failure(s): t")


def comparison(tests=(), metrics=(), splats=()):
    from kpatchtest.compare.model import BranchComparison
    return BranchComparison(tests=list(tests), metrics=list(metrics), splats_new=list(splats))


def tc(verdict: str, name: str = "t", baseline_failed: int = 0, patched_failed: int = 1):
    from kpatchtest.compare.model import Counts, TestComparison
    return TestComparison(name=name, host="local", verdict=verdict, detail="the counts",
                          baseline=Counts(passed=3 - baseline_failed, failed=baseline_failed),
                          patched=Counts(passed=3 - patched_failed, failed=patched_failed))


def judged(tmp_path, gates: str, c) -> list:
    from kpatchtest.results import WorkloadRun
    loaded = parse_spec(SPEC.replace("gates: {build: %s, boot: %s}", f"gates: {gates}"), tmp_path / "s.yaml")
    r = RunResult(tool_version="t", name="g", started="now", stages=["workloads"])
    r.branches.append(BranchResult(name="debian-6.1", compare=c,
                                   workloads=[WorkloadRun(build="patched", host="local")]))
    evaluate_gates(loaded, r)
    return r.gates


@pytest.mark.parametrize("level, tests, splats, passed, actual", [
    ("none", [tc("unchanged-pass", patched_failed=0), tc("fixed", "f", baseline_failed=3, patched_failed=0)], [],
     True, "no regressions"),
    ("none", [tc("regression")], [], False, "1 regression(s): t on local (the counts)"),
    ("allow-flaky", [tc("regression")], [], False, "1 regression(s)"),
    ("none", [tc("flaky")], [], False, "t on local (flaky: the counts)"),
    ("allow-flaky", [tc("flaky")], [], True, "no regressions"),
    # flaky on baseline as well: not the series' doing
    ("none", [tc("flaky", baseline_failed=1)], [], True, "no regressions"),
    ("allow-flaky", [], ["splat"], False, "new warning on local round 2 (boot): WARNING: x"),
])
def test_regressions_gate(tmp_path, level, tests, splats, passed, actual):
    from kpatchtest.compare.model import NewSplat
    news = [NewSplat(host="local", round=2, kind="warning", first_lines=["WARNING: x"])] if splats else []
    (g,) = judged(tmp_path, f"{{regressions: {level}}}", comparison(tests, splats=news))
    assert (g.name, g.passed, g.expected) == ("regressions", passed, level)
    assert actual in g.actual, g.actual


def mc(name: str, verdict: str, ratio=None, lo=None, hi=None, host="local", why=""):
    from kpatchtest.compare.model import MetricComparison
    return MetricComparison(name=name, workload="smm-boot", unit="s", direction="lower", host=host, ratio=ratio,
                            ci_low=lo, ci_high=hi, verdict=verdict, why=why)


@pytest.mark.parametrize("metrics, passed, actual", [
    ([mc("wall_time", "slower", 1.12, 1.08, 1.16)], False,
     "wall_time on debian-6.1/local: patched/baseline 1.12 [1.08, 1.16] > max_slowdown 5%"),
    # slower, but the interval reaches below the limit: not proven to break it
    ([mc("wall_time", "slower", 1.06, 1.03, 1.09)], True,
     "wall_time on debian-6.1/local: patched/baseline 1.06 [1.03, 1.09] within max_slowdown 5%"),
    ([mc("wall_time", "no significant change", 1.0, 0.99, 1.01, host="a"), mc("wall_time", "slower", 1.3, 1.2, 1.4, host="b")],
     False, "wall_time on debian-6.1/b: patched/baseline 1.30 [1.20, 1.40] > max_slowdown 5% (+1 more)"),
    ([mc("wall_time", "not enough data", 1.5, why="2 paired round(s)")], False,
     "wall_time on debian-6.1/local: not enough data (2 paired round(s)), cannot check max_slowdown 5%"),
    ([], False, "wall_time on debian-6.1: not measured, cannot check max_slowdown 5%"),
])
def test_metric_gate_says_which_number_broke_it(tmp_path, metrics, passed, actual):
    (g,) = judged(tmp_path, "{metrics: {wall_time: {max_slowdown: 5%}}}", comparison(metrics=metrics))
    assert (g.name, g.passed, g.expected, g.actual) == ("metrics", passed, "wall_time max_slowdown 5%", actual)


def test_max_increase_zero_and_an_unbounded_rise(tmp_path):
    gates = "{metrics: {root_allocs: {max_increase: 0%}}}"
    (g,) = judged(tmp_path, gates, comparison(metrics=[mc("root_allocs", "more", 50.0, 40.0, 60.0)]))
    assert not g.passed and "50.00 [40.00, 60.00] > max_increase 0%" in g.actual
    (g,) = judged(tmp_path, gates, comparison(metrics=[mc("root_allocs", "more", None, None, None)]))
    assert not g.passed and "[inf, inf] > max_increase 0%" in g.actual
    (g,) = judged(tmp_path, gates, comparison(metrics=[mc("root_allocs", "no significant change", 1.0, 0.97, 1.03)]))
    assert g.passed


def test_gates_compute_the_comparison_an_old_results_json_lacks(tmp_path):
    from tests.test_compare import smm_result
    r = smm_result(4, slow=1.3)
    loaded = parse_spec(SPEC.replace("gates: {build: %s, boot: %s}",
                                     "gates: {regressions: none, metrics: {wall_time: {max_slowdown: 5%}}}"),
                        tmp_path / "s.yaml")
    assert r.branches[0].compare is None
    evaluate_gates(loaded, r)
    by = {(g.name, g.branch): g for g in r.gates}
    assert by[("regressions", "debian-6.1")].passed
    wall = by[("metrics", "debian-6.1")]
    assert not wall.passed and " > max_slowdown 5%" in wall.actual
    assert not by[("metrics", "no-workloads")].passed and by[("regressions", "no-workloads")].actual == "workloads not run"
