"""Reports are pure functions of results.json: render, parse back, re-render."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kpatchtest import __version__
from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series
from kpatchtest.cli import main
from kpatchtest.gitutil import Git
from kpatchtest.report import junit, summary, write_all
from kpatchtest.results import SCHEMA_VERSION, BranchResult, RunResult, load
from tests.kernelhist import build


XSD = Path(__file__).parent / "data" / "junit-10.xsd"


def assert_junit_10(path: Path) -> None:
    """Valid against the junit-10.xsd of Jenkins' xUnit plugin (a copy in tests/data)."""
    xmlschema = pytest.importorskip("xmlschema", reason="pip install -e '.[test]'")
    errors = [f"{e.path}: {e.reason}" for e in xmlschema.XMLSchema(str(XSD)).iter_errors(str(path))]
    assert not errors, errors[:5]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    hist = build(tmp_path_factory.mktemp("rep") / "linux")
    ctx = ApplyContext(git=Git(hist.path), scratch=tmp_path_factory.mktemp("scratch"), base=hist.shas["REV"],
                       upstream="master", ref_prefix="refs/kpatchtest/rep")
    series = hist.series(["P_clean", "P_needs_ab", "P_pid", "P_offset"])
    r = RunResult(tool_version=__version__, name="t", started="2026-11-22T00:00:00+00:00")
    from kpatchtest.pipeline import series_info
    r.series = series_info(series)
    b = r.branch("linux-1.0.y")
    b.apply = apply_series(ctx, series, BranchTarget("linux-1.0.y", hist.git("rev-parse", "linux-1.0.y")))
    r.branches.append(BranchResult(name="linux-9.9.y", error="branch 'linux-9.9.y' not found in /x"))
    return r, hist


def test_junit_is_what_jenkins_reads(result, tmp_path):
    r, _ = result
    path = tmp_path / "junit.xml"
    path.write_text(junit.render(r))
    assert_junit_10(path)
    root = ET.parse(path).getroot()
    assert "disabled" not in path.read_text()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"linux-1.0.y", "linux-9.9.y"}
    cases = suites["linux-1.0.y"].findall("testcase")
    # Jenkins splits a classname at its last dot: package = stage, class = branch, dots escaped
    assert {c.get("classname") for c in cases} == {"apply.linux-1_0_y"}
    assert suites["linux-1.0.y"].find("testcase").get("classname").rsplit(".", 1) == ["apply", "linux-1_0_y"]
    assert len(cases) == 4
    failure = cases[1].find("failure")
    assert failure is not None and "tdp_mmu.c (1 hunks)" in failure.get("message")
    assert "needs A and B" in failure.text and "verified" in failure.text
    assert cases[2].find("skipped") is not None and "patch-id" in cases[2].find("skipped").get("message")
    assert cases[0].find("failure") is None and cases[0].find("skipped") is None
    assert suites["linux-9.9.y"].find("testcase/error") is not None


def test_summary_matrix_and_hints(result):
    r, hist = result
    text = summary.render(r)
    assert "| #  | patch" in text or "| # | patch" in text
    row = next(line for line in text.splitlines() if "context came from A and B" in line)
    assert "CONFLICT tdp_mmu.c:1" in row
    assert f'{hist.shas["A"][:12]} ("KVM: x86/mmu: adjust fn3")' in text
    assert "needs first (verified" in text
    assert "partial" in text and "ERROR" in text
    assert all(ord(c) < 128 for c in text)      # mail-safe


def test_summary_prerequisites_per_patch_and_offsets(result):
    r, hist = result
    text = summary.render(r)
    assert ("patch 2: needs first (verified: git am -3 of these in this order, then the patch, applies; "
            "2 commit(s), 4 lines):") in text
    row = next(line for line in text.splitlines() if "change needing an offset" in line)
    assert "applied (offsets)" in row and "patch 4: applied at offsets: hunk 1 at offset +3 lines" in text


def test_schema_4_results_still_render(result, tmp_path):
    """Before 5: prerequisites only per branch, offsets counted as applied-3way."""
    r, hist = result
    data = json.loads(r.model_dump_json())
    data["schema_version"] = 4
    apply = data["branches"][0]["apply"]
    for p in apply["patches"]:
        p.pop("prerequisites")
        if p["method"] == "offset":
            p["status"] = "applied-3way"
    for q in apply["prerequisites"]:
        q.pop("why"), q.pop("needs")
    p = tmp_path / "results.json"
    p.write_text(json.dumps(data))
    assert main(["report", str(p), "--out", str(tmp_path / "re")]) == 0
    text = (tmp_path / "re" / "summary.md").read_text()
    assert 'patch 2: needs first (verified' in text and hist.shas["A"][:12] in text
    assert "offset" in next(line for line in text.splitlines() if "change needing an offset" in line)
    assert "verified" in (tmp_path / "re" / "junit.xml").read_text()


def test_results_roundtrip_and_report_command(result, tmp_path):
    r, _ = result
    write_all(r, tmp_path)
    again = load(tmp_path / "results.json")
    assert again == r
    (tmp_path / "summary.md").unlink()
    assert main(["report", str(tmp_path / "results.json"), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "summary.md").read_text() == summary.render(r)
    assert (tmp_path / "re" / "report.html").read_text().startswith("<!doctype html>")


def test_results_schema_version_mismatch_is_input_error(result, tmp_path, capsys):
    r, _ = result
    write_all(r, tmp_path)
    p = tmp_path / "results.json"
    p.write_text(p.read_text().replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99'))
    assert main(["report", str(p)]) == 2
    assert "schema version 99" in capsys.readouterr().err


def test_junit_keeps_control_characters_visible(result, tmp_path):
    r, _ = result
    r2 = r.model_copy(deep=True)
    r2.branches[0].apply.patches[1].conflicts[0].rejected = ["+bad\x01byte\n"]
    path = tmp_path / "j.xml"
    path.write_text(junit.render(r2))
    assert "bad\\x01byte" in path.read_text()


# -- workloads (schema 4) ----------------------------------------------------------------

from kpatchtest.report import html  # noqa: E402
from kpatchtest.results import BootResult, GateResult, WorkloadRun  # noqa: E402
from kpatchtest.workloads.record import Metric, WorkloadRecord  # noqa: E402

KUT = "kvm-unit-tests"
SCRIPT = "<script>alert(1)</script>"
NO_PROBE = "no probe took (tried kprobe:kvm_tdp_mmu_put_root)"


def _kut(name, status, detail="", metrics=(), logs=()):
    return WorkloadRecord(name=name, status=status, detail=detail, metrics=list(metrics), logs=list(logs),
                          duration_s=1.5, group=KUT)


def _run(build, rnd, smptest, vmx, cpuid, allocs, pages, logdir):
    """One boot's workloads: kvm-unit-tests (pass, fail, skip, timeout) and the SMM-heavy boot."""
    return WorkloadRun(
        build=build, host="lab1", round=rnd, kernelrelease=f"6.1.119-kpt{build[0]}", repetitions=3,
        probes={"smm_transitions": "tracepoint:kvm:kvm_smm_transition", "root_allocs": "kprobe:tdp_mmu_alloc_sp",
                "root_puts": NO_PROBE},
        records=[
            _kut("emulator", "pass"),
            _kut("smptest", smptest, "" if smptest == "pass" else "2 unexpected failures",
                 logs=[f"{logdir}/smptest.log", f"{logdir}/run_tests.out"]),
            _kut("vmx", vmx, "" if vmx == "pass" else "run_tests.sh stopped after 1800 s while the test was running"),
            _kut("hyperv_synic", "skip", "hyperv not supported"),
            _kut("pmu", "fail", f"bad counter {SCRIPT}"),
            _kut("vmexit_cpuid", "pass", metrics=[Metric(name="cycles", unit="cycles", values=[cpuid])]),
            WorkloadRecord(name="smm-boot", status="pass", duration_s=42.0, group="smm-boot",
                           logs=[f"{logdir}/smm-boot.log"],
                           metrics=[Metric(name="smm_transitions", unit="events", values=[806.0, 806.0, 806.0]),
                                    Metric(name="root_allocs", unit="roots", values=allocs),
                                    Metric(name="root_puts", unit="calls", values=[None, None, None],
                                           available=False, note=NO_PROBE),
                                    Metric(name="tdp_pages_allocated", unit="pages", values=pages)]),
        ])


@pytest.fixture
def workloads_run(tmp_path):
    """Two rounds, B1 P1 B2 P2 on one host; a second branch whose workloads could not run."""
    run_dir = tmp_path / "run"
    for build, rnd in (("baseline", 1), ("patched", 1), ("baseline", 2), ("patched", 2)):
        d = run_dir / f"workloads/linux-6.1.y/{build}-r{rnd}"
        d.mkdir(parents=True)
        (d / "smptest.log").write_text("x" * 5000 + "\n\x1b[31mFAIL\x1b[0m smptest: cpu 1 did not answer\n"
                                       "SUMMARY: 5 tests, 2 unexpected failures\n")
        (d / "smm-boot.log").write_text("nested boot done, 200 reads\n")
    r = RunResult(tool_version=__version__, name="w", started="2026-11-22T00:00:00+00:00",
                  stages=["fetch", "apply", "build", "boot", "workloads"])
    b = r.branch("linux-6.1.y")
    b.boot = [BootResult(build=x, status="booted", round=n, host="lab1", method="kexec", duration_s=30)
              for n in (1, 2) for x in ("baseline", "patched")]
    d = "workloads/linux-6.1.y"
    b.workloads = [
        _run("baseline", 1, "pass", "pass", 1200.0, [811.0, 811.0, 812.0], [100.0, 101.0, 102.0], f"{d}/baseline-r1"),
        _run("patched", 1, "fail", "timeout", 1250.0, [3.0, 3.0, 3.0], [100.0, None, 102.0], f"{d}/patched-r1"),
        _run("baseline", 2, "pass", "pass", 1210.0, [811.0, 811.0, 811.0], [100.0, 101.0, 102.0], f"{d}/baseline-r2"),
        _run("patched", 2, "pass", "timeout", 1260.0, [3.0, 3.0, 3.0], [None, None, 102.0], f"{d}/patched-r2"),
    ]
    other = r.branch("linux-6.12.y")
    other.workloads = [WorkloadRun(build="patched", host="lab1", error="kvm-unit-tests: no x86/ tests on the host")]
    r.gates = [GateResult(name="workloads", branch="linux-6.1.y", passed=False, expected="no-new-failures",
                          actual="2 new failure(s): smptest, vmx")]
    return r, run_dir


def test_junit_workloads_statuses_properties_and_log_tail(workloads_run, tmp_path):
    r, run_dir = workloads_run
    path = tmp_path / "junit.xml"
    path.write_text(junit.render(r, run_dir))
    assert_junit_10(path)
    suites = {s.get("name"): s for s in ET.parse(path).getroot().iter("testsuite")}
    cases = {c.get("name"): c for c in suites["linux-6.1.y"].findall("testcase")}
    assert "boot patched on lab1 round 2" in cases          # boots of two rounds keep distinct names
    # a suite per workload run, its records as testcases, its metrics as the suite's properties
    runs = {n: s for n, s in suites.items() if n.startswith("linux-6.1.y workloads ")}
    assert sorted(runs) == [f"linux-6.1.y workloads {b} on lab1 round {n}" for b in ("baseline", "patched")
                            for n in (1, 2)]
    work = {c.get("name"): c for s in runs.values() for c in s.findall("testcase")}
    assert len(work) == 4 * 7                               # a testcase per record, per run
    assert {c.get("classname") for c in work.values()} == {"workloads.linux-6_1_y"}
    smp = work["kvm-unit-tests/smptest patched on lab1 round 1"]
    assert smp.find("failure").get("message") == "2 unexpected failures"
    out = smp.find("system-out").text
    assert "log: workloads/linux-6.1.y/patched-r1/smptest.log" in out
    assert out.endswith("FAIL smptest: cpu 1 did not answer\nSUMMARY: 5 tests, 2 unexpected failures")
    assert "\x1b" not in out and "[... last 4096 of" in out and "x" * 100 not in out   # the tail, capped, no colours
    vmx = work["kvm-unit-tests/vmx patched on lab1 round 2"].find("error")
    assert vmx.get("type") == "timeout" and vmx.get("message").startswith("timeout: run_tests.sh stopped")
    assert work["kvm-unit-tests/hyperv_synic baseline on lab1 round 1"].find("skipped").get("message") \
        == "hyperv not supported"
    assert work["kvm-unit-tests/smptest patched on lab1 round 2"].find("failure") is None
    smm = work["smm-boot patched on lab1 round 1"]
    assert smm.find("failure") is None and smm.find("error") is None
    assert smm.find("properties") is None                   # junit-10.xsd has no testcase properties
    props = {p.get("name"): p.get("value")
             for p in runs["linux-6.1.y workloads patched on lab1 round 1"].findall("properties/property")}
    assert props["smm-boot.smm_transitions.events.1"] == "806" and props["smm-boot.root_allocs.roots.3"] == "3"
    assert props["smm-boot.root_puts.calls.2"] == "n/a" and props["smm-boot.root_puts.available"] == "false"
    assert props["smm-boot.tdp_pages_allocated.pages.2"] == "n/a"
    assert props["smm-boot.root_allocs.probe"] == "kprobe:tdp_mmu_alloc_sp"
    assert props["kvm-unit-tests/vmexit_cpuid.cycles.cycles.1"] == "1250"
    assert props["branch"] == "linux-6.1.y" and props["round"] == "1" and props["build"] == "patched"
    assert "nested boot done" in smm.find("system-out").text
    # the branch whose workloads could not run: one error testcase
    [err] = suites["linux-6.12.y workloads patched on lab1 round 1"].findall("testcase")
    assert err.get("name") == "workloads patched on lab1" and "no x86/ tests" in err.find("error").get("message")
    [gate] = suites["gates"].findall("testcase")
    assert gate.get("name") == "workloads linux-6.1.y" and gate.find("failure") is not None


def test_junit_workloads_without_run_dir_name_the_logs(workloads_run):
    r, _ = workloads_run
    root = ET.fromstring(junit.render(r).encode())
    smp = next(c for c in root.iter("testcase") if c.get("name") == "kvm-unit-tests/smptest patched on lab1 round 1")
    out = smp.find("system-out").text
    assert "log: workloads/linux-6.1.y/patched-r1/smptest.log" in out and "SUMMARY" not in out


def test_junit_workload_logs_stay_in_the_run_dir(workloads_run, tmp_path):
    r, run_dir = workloads_run
    (tmp_path / "secret").write_text("SECRET\n")
    r.branches[0].workloads[0].records[1].logs = ["../secret", str(tmp_path / "secret")]
    assert "SECRET" not in junit.render(r, run_dir)


def test_summary_workloads_medians_side_by_side(workloads_run):
    r, _ = workloads_run
    text = summary.render(r)
    assert all(ord(c) < 128 for c in text)
    lines = text.splitlines()
    assert "workloads, baseline -> patched (2 rounds on lab1, 3 repetitions each; metrics are medians):" in text
    assert "    kvm-unit-tests: 8 pass, 2 fail, 2 skip -> 5 pass, 3 fail, 2 timeout, 2 skip" in lines
    assert "      baseline fail: pmu" in lines
    assert "      patched fail: smptest (new, 1 of 2 runs), pmu; timeout: vmx (new)" in lines
    assert "      vmexit_cpuid cycles: 1205 -> 1255 cycles" in lines
    assert "    smm-boot: 2 pass -> 2 pass" in lines
    assert "      smm_transitions: 806 -> 806 events" in lines
    assert "      root_allocs: 811 -> 3 roots" in lines
    assert f"      root_puts: n/a -> n/a (unavailable: {NO_PROBE})" in lines
    assert "      tdp_pages_allocated: 101 pages -> 102 pages (3 of 6 values)" in lines   # None is left out
    root_puts = next(line for line in lines if "root_puts" in line)
    assert "0" not in root_puts.split("(")[0]           # unavailable is never 0
    assert "  patched on lab1: not run: kvm-unit-tests: no x86/ tests on the host" in text
    assert "| workloads patched  | 7 pass, 3 FAIL, 2 TIMEOUT, 2 skip | 1 run NOT RUN |" in text
    assert "Gates: workloads on linux-6.1.y: expected no-new-failures, got 2 new failure(s)" in text


def test_summary_workloads_one_build_only_and_unavailable_on_one_side(workloads_run):
    r, _ = workloads_run
    b = r.branches[0]
    only = b.model_copy(deep=True)
    only.workloads = [w for w in only.workloads if w.build == "patched"]
    text = "\n".join(summary.render(RunResult(tool_version="x", name="w", started="s", branches=[only])).splitlines())
    assert "workloads, patched only" in text
    assert f"      root_puts: n/a (unavailable: {NO_PROBE})" in text
    assert "      root_allocs: 3 roots" in text and "->" not in text.split("workloads, patched only")[1]
    for w in b.workloads:
        if w.build == "baseline":
            w.records[-1].metrics[1] = Metric(name="root_allocs", unit="roots", values=[None], available=False,
                                              note="probe kvm_tdp_mmu_alloc_root not found")
    assert "      root_allocs: n/a (unavailable: probe kvm_tdp_mmu_alloc_root not found) -> 3 roots" \
        in summary.render(r).splitlines()


def test_html_workloads_table_escapes(workloads_run):
    r, _ = workloads_run
    page = html.render(r)
    assert SCRIPT not in page and "bad counter &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<h2>linux-6.1.y: workloads</h2>" in page
    assert ">806 events</td>" in page and ">3 roots</td>" in page and ">811 roots</td>" in page
    assert f"n/a (unavailable: {NO_PROBE})" in page
    assert "smptest: fail (new, 1 of 2 runs) - 2 unexpected failures" in page
    r.branches[0].workloads[0].records[0].name = SCRIPT
    r.branches[0].workloads[0].host = '"><img src=x>'
    page = html.render(r)
    assert SCRIPT not in page and "<img" not in page


def test_write_all_with_workloads_roundtrips(workloads_run, tmp_path):
    r, run_dir = workloads_run
    paths = write_all(r, run_dir)
    assert load(run_dir / "results.json") == r
    assert "SUMMARY: 5 tests" in (run_dir / "junit.xml").read_text()     # logs read from the run dir
    assert main(["report", str(run_dir / "results.json"), "--out", str(tmp_path / "re")]) == 0
    assert (tmp_path / "re" / "summary.md").read_text() == paths[2].read_text()


def test_schema_3_results_still_render(result, tmp_path):
    r, _ = result
    data = json.loads(r.model_dump_json())
    data["schema_version"] = 3
    for b in data["branches"]:
        b.pop("workloads")
        b["boot"] = [{"build": "patched", "status": "booted", "host": "lab1", "method": "kexec", "duration_s": 12.0}]
    p = tmp_path / "results.json"
    p.write_text(json.dumps(data))
    old = load(p)
    assert old.branches[0].workloads == [] and old.branches[0].boot[0].round == 1
    assert main(["report", str(p), "--out", str(tmp_path / "re")]) == 0
    text = (tmp_path / "re" / "summary.md").read_text()
    assert "workloads" not in text and "boot patched on lab1: booted" in text
    root = ET.parse(tmp_path / "re" / "junit.xml").getroot()
    assert not [c for c in root.iter("testcase") if c.get("classname", "").startswith("workloads.")]
    assert "boot patched on lab1" in {c.get("name") for c in root.iter("testcase")}
    assert "workloads" not in (tmp_path / "re" / "report.html").read_text()


# -- compare (schema 6) ------------------------------------------------------------------

from kpatchtest.compare.model import BranchComparison, Counts, MetricComparison, NewSplat, TestComparison  # noqa: E402
from kpatchtest.results import SeriesInfo, SeriesPatchInfo  # noqa: E402

COVER = "20261122000000.1000-0-demo@kpatchtest.invalid"


def _metric(name, unit, direction, base, patched, ratio, lo, hi, p, verdict, why=""):
    return MetricComparison(name=name, workload="smm-boot", unit=unit, direction=direction, host="lab1",
                            baseline_median=base, patched_median=patched, ratio=ratio, ci_low=lo, ci_high=hi,
                            p_value=p, rounds=10, repetitions=5, baseline_n=50, patched_n=50, verdict=verdict,
                            why=why, method="hierarchical bootstrap", seed=1)


@pytest.fixture
def compared(workloads_run):
    """The workloads run with a comparison per branch: 6.1 regressed (a test, wall_time, root
    allocations; its gate broke), 6.12 unchanged; a series with a cover letter on lore."""
    r, run_dir = workloads_run
    r.series = SeriesInfo(title="KVM: x86/mmu: Small TDP MMU cleanups", sources=["mbox:x.mbox"], version=2,
                          link=f"https://patch.msgid.link/{COVER}",
                          patches=[SeriesPatchInfo(index=i, subject=f"KVM: patch {i}",
                                                   msgid=f"20261122000000.1000-{i}-demo@kpatchtest.invalid")
                                   for i in (1, 2, 3)])
    b = r.branches[0]
    b.compare = BranchComparison(
        method="hierarchical bootstrap over rounds then repetitions; paired Wilcoxon over rounds; \u00b12%", seed=7,
        tests=[TestComparison(name="smptest", group=KUT, host="lab1", verdict="regression",
                              baseline=Counts(passed=10), patched=Counts(failed=10),
                              rerun_baseline=Counts(passed=2), rerun_patched=Counts(failed=2), reruns_wanted=2),
               TestComparison(name="vmx", group=KUT, host="lab1", verdict="flaky",
                              baseline=Counts(passed=10), patched=Counts(passed=7, failed=3),
                              rerun_baseline=Counts(passed=2), rerun_patched=Counts(passed=1, failed=1), reruns_wanted=2),
               TestComparison(name="emulator", group=KUT, host="lab1", verdict="unchanged-pass",
                              baseline=Counts(passed=10), patched=Counts(passed=10))],
        metrics=[_metric("wall_time", "s", "lower", 12.1, 13.4, 1.1074, 1.0823, 1.1312, 0.00195, "slower"),
                 _metric("root_allocs", "roots", "lower", 3.0, 806.0, 268.67, 250.1, 280.2, 0.00195, "more"),
                 _metric("tdp_pages_allocated", "pages", "lower", 101.0, 101.5, 1.005, 0.99, 1.02, 0.43,
                         "no significant change"),
                 _metric("root_puts", "calls", "lower", None, None, None, None, None, None, "n/a", why=NO_PROBE),
                 _metric("smm_transitions", "events", "none", 806.0, 806.0, 1.0, 1.0, 1.0, None, "n/a",
                         why="describes the workload")],
        splats_new=[NewSplat(host="lab1", round=2, kind="warning",
                             first_lines=["WARNING: CPU: 1 PID: 77 at arch/x86/kvm/mmu/tdp_mmu.c:123"])])
    other = r.branches[1]
    other.compare = BranchComparison(
        tests=[TestComparison(name="emulator", group=KUT, host="lab1", verdict="unchanged-pass",
                              baseline=Counts(passed=3), patched=Counts(passed=3))],
        metrics=[_metric("wall_time", "s", "lower", 12.1, 12.15, 1.004, 0.985, 1.019, 0.77, "no significant change")])
    r.gates.append(GateResult(name="metrics", branch="linux-6.1.y", passed=False, expected="wall_time max_slowdown 5%",
                              actual="wall_time on linux-6.1.y/lab1: patched/baseline 1.11 [1.08, 1.13] > max_slowdown 5%"))
    return r, run_dir


def test_junit_compare_suite_fails_with_the_numbers(compared, tmp_path):
    r, run_dir = compared
    path = tmp_path / "junit.xml"
    path.write_text(junit.render(r, run_dir))
    assert_junit_10(path)
    suite = next(s for s in ET.parse(path).getroot().iter("testsuite") if s.get("name") == "compare")
    every = suite.findall("testcase")
    cases = {c.get("name"): c for c in every if c.get("classname") == "compare.linux-6_1_y"}
    assert {c.get("classname") for c in every} == {"compare.linux-6_1_y", "compare.linux-6_12_y"}
    for c in every:
        assert "." not in c.get("classname").split(".", 1)[1]          # the branch part has no dot
    # one testcase per test comparison and per metric comparison (+ the new splat), both branches
    assert len(suite.findall("testcase")) == (3 + 5 + 1) + (1 + 1)
    reg = cases["test kvm-unit-tests/smptest on lab1"].find("failure")
    assert reg.get("type") == "regression"
    assert "baseline 10 pass, 0 fail; patched 0 pass, 10 fail" in reg.get("message")
    assert "reruns (2 wanted): baseline 2 pass, 0 fail; patched 0 pass, 2 fail" in reg.get("message")
    assert cases["test kvm-unit-tests/vmx on lab1"].find("failure") is None        # flaky is no regression
    assert "flaky: baseline 10 pass" in cases["test kvm-unit-tests/vmx on lab1"].find("system-out").text
    gate = cases["metric smm-boot wall_time on lab1"].find("failure")
    assert gate.get("message") == ("gate metrics failed: expected wall_time max_slowdown 5%, got wall_time on "
                                   "linux-6.1.y/lab1: patched/baseline 1.11 [1.08, 1.13] > max_slowdown 5%: slower, "
                                   "12.1 -> 13.4 s, ratio 1.107 [1.082, 1.131], p = 0.00195, 10 rounds x 5 repetitions")
    # significant without a gate: passes, numbers in system-out; unchanged branch: no failures
    more = cases["metric smm-boot root_allocs on lab1"]
    assert more.find("failure") is None and "ratio=268.67" in more.find("system-out").text
    assert cases["new splat warning on lab1 round 2"].find("failure") is not None
    props = {p.get("name"): p.get("value") for p in suite.findall("properties/property")}
    assert props["linux-6.1.y:smm-boot.wall_time@lab1.ci_low"] == "1.0823"
    assert props["linux-6.12.y:smm-boot.wall_time@lab1.verdict"] == "no significant change"
    assert props["linux-6.1.y:seed"] == "7"
    assert not [c for c in every if c.get("classname") == "compare.linux-6_12_y" and c.find("failure") is not None]


def test_summary_is_a_reply_starting_with_what_changed(compared):
    r, _ = compared
    text = summary.render(r)
    lines = text.splitlines()
    assert lines[:4] == [f"In-Reply-To: <{COVER}>", f"References: <{COVER}>",
                         "Subject: Re: [PATCH v2 0/3] KVM: x86/mmu: Small TDP MMU cleanups", ""]
    assert lines[4].startswith("What changed")
    changed = text[:text.index("kpatchtest: ")]
    assert "linux-6.1.y:\n  REGRESSION kvm-unit-tests/smptest on lab1: baseline 10 pass, 0 fail; patched 0 pass" in changed
    assert ("  smm-boot wall_time on lab1: slower, 12.1 -> 13.4 s, ratio 1.107 [1.082, 1.131], p = 0.00195, "
            "10 rounds x 5 repetitions") in lines
    assert "  smm-boot root_allocs on lab1: more, 3 -> 806 roots, ratio 268.670 [250.100, 280.200]" in changed
    assert "  NEW SPLAT on patched (lab1 round 2, boot): warning: WARNING: CPU: 1 PID: 77" in changed
    assert ("  gate metrics FAILED: expected wall_time max_slowdown 5%, got wall_time on linux-6.1.y/lab1: "
            "patched/baseline 1.11 [1.08, 1.13] > max_slowdown 5%") in lines
    assert "  flaky, not counted as a regression: kvm-unit-tests/vmx on lab1" in changed
    assert f"  n/a: smm-boot root_puts on lab1 ({NO_PROBE})" in lines
    assert "smm_transitions" not in changed                     # describes the workload, judges nothing
    assert ("linux-6.12.y: no significant change (1 test(s) compared, 1 metric(s) within +-2%; "
            "10 rounds x 5 repetitions)") in lines
    assert "tdp_pages_allocated" not in changed                 # within the threshold: counted, not listed
    assert all(ord(c) < 128 for c in text) and "over rounds; +-2%; seed 7" in text
    # the workloads notes quote the comparison, not their own pooling
    assert "      root_allocs: 3 -> 806 roots, ratio 268.670 [250.100, 280.200]: more" in lines
    assert "      patched fail: smptest (regression, 1 of 2 runs), pmu; timeout: vmx (flaky)" in lines


def test_summary_reply_headers_without_a_cover(compared):
    r, _ = compared
    r.series.link = None
    assert summary.render(r).splitlines()[:3] == [
        "In-Reply-To: <20261122000000.1000-1-demo@kpatchtest.invalid>",
        "References: <20261122000000.1000-1-demo@kpatchtest.invalid>",
        "Subject: Re: [PATCH v2 1/3] KVM: patch 1"]
    r.series.version = 1
    r.series.patches = r.series.patches[:1]
    assert summary.render(r).splitlines()[2] == "Subject: Re: [PATCH] KVM: patch 1"
    for b in r.branches:
        b.compare = None
    r.series = None
    text = summary.render(r)
    assert text.startswith("kpatchtest: w") and "What changed" not in text     # nothing compared: no section


def test_html_plots_links_and_csp(compared, tmp_path):
    r, run_dir = compared
    page = html.render(r)
    assert "style=" not in page and "<style" not in page and "<script" not in page.lower()
    assert "data:" not in page and "<image" not in page
    # the forest plot, a strip plot per measured metric (root_puts has no value); no apply: no heatmap
    assert page.count("<svg") == 1 + 4
    assert '<link rel=stylesheet href="report.css">' in page
    assert f'href="https://lore.kernel.org/r/{COVER}"' in page
    assert 'href="https://lore.kernel.org/r/20261122000000.1000-3-demo@kpatchtest.invalid"' in page
    for run in r.branches[0].workloads:
        for rec in run.records:
            for log in rec.logs:
                assert f'href="{log}"' in page
    assert ">slower; gate FAILED: wall_time on linux-6.1.y/lab1: patched/baseline 1.11 [1.08, 1.13] &gt; max_slowdown 5%</td>" in page
    ids = [m for m in __import__("re").findall(r' id="([^"]+)"', page)]
    assert len(ids) == len(set(ids))                # several SVGs, one document: ids stay unique
    paths = write_all(r, run_dir)
    assert (run_dir / "report.css").read_text() == html.CSS and run_dir / "report.css" in paths
    assert html.render(r) == page                   # deterministic: a re-render is the same file


def test_html_heatmap_by_status(result):
    r, _ = result
    page = html.render(r)
    assert page.count("<svg") == 1 and "style=" not in page and "<style" not in page
    assert "data:" not in page                  # no raster images: img-src 'self' would block them
    heat = page[page.index("<svg"):page.index("</svg>")]
    for colour in ("#8fd19e", "#f1948a", "#9ec5fe"):           # applied, conflict, already present
        assert colour in heat
    assert "CONFLICT tdp_mmu.c:1" in heat                      # the cell says what the matrix says


CSP = "sandbox; default-src 'none'; img-src 'self'; style-src 'self';"      # Jenkins' default


@pytest.mark.slow
def test_html_under_jenkins_csp_in_chromium(compared, tmp_path):
    """Served with Jenkins' CSP header, headless Chromium loads report.css and reports no
    violation (an inline style, a data: image or a script would each log one)."""
    import functools
    import http.server
    import shutil
    import subprocess
    import threading

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium (apt-get install chromium)")
    r, run_dir = compared
    write_all(r, run_dir)
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def end_headers(self):
            self.send_header("Content-Security-Policy", CSP)
            super().end_headers()

        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(run_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                            "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                            f"http://127.0.0.1:{server.server_port}/report.html"],
                           capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert "Content Security Policy" not in p.stderr, [x for x in p.stderr.splitlines() if "Security" in x][:3]
    assert "/report.css" in requests
    assert p.stdout.count("<svg") == 5 and "lore.kernel.org/r/" in p.stdout


def test_a_metric_gate_fails_the_comparisons_beyond_its_limit():
    """gates.py breaks a gate on a comparison whose whole CI lies beyond the limit, or that it
    cannot check; a 'slower' one inside the limit is not what broke it."""
    from kpatchtest.report.compare_cells import gate_broken_by
    beyond = _metric("wall_time", "s", "lower", 12.1, 13.4, 1.107, 1.082, 1.131, 0.002, "slower")
    inside = _metric("wall_time", "s", "lower", 12.1, 12.5, 1.035, 1.031, 1.04, 0.002, "slower")
    few = _metric("wall_time", "s", "lower", 12.1, 12.5, 1.035, None, None, None, "not enough data")
    inside.host, few.host = "lab2", "lab3"
    c = BranchComparison(metrics=[beyond, inside, few])
    gate = GateResult(name="metrics", branch="b", passed=False, expected="wall_time max_slowdown 5%", actual="x")
    assert gate_broken_by(c, "wall_time", gate) == [beyond, few]
    gate.expected = "wall_time max_slowdown 2%"
    assert gate_broken_by(c, "wall_time", gate) == [beyond, inside, few]
