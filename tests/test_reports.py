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
