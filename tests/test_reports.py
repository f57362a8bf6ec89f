"""Reports are pure functions of results.json: render, parse back, re-render."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kpatchtest import __version__
from kpatchtest.apply import ApplyContext, BranchTarget, apply_series
from kpatchtest.cli import main
from kpatchtest.gitutil import Git
from kpatchtest.report import junit, summary, write_all
from kpatchtest.results import SCHEMA_VERSION, BranchResult, RunResult, load
from tests.kernelhist import build


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
    junit.write(r, path)
    root = ET.parse(path).getroot()
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"linux-1.0.y", "linux-9.9.y"}
    cases = suites["linux-1.0.y"].findall("testcase")
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
    junit.write(r2, path)
    assert "bad\\x01byte" in path.read_text()
