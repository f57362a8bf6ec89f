"""`kpatchtest report --merge`: per-branch runs of one spec -> one record (fast: records
written here, merged through the command line as the Jenkinsfile's merge stage runs it)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from kpatchtest import __version__
from kpatchtest.cli import main
from kpatchtest.results import (ApplyResult, BootResult, BranchBuild, BuildResult, GateResult, PatchResult,
                                RunResult, SeriesInfo, SeriesPatchInfo, WorkloadRun, load)
from kpatchtest.rundir import RunDir
from kpatchtest.workloads.record import WorkloadRecord

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "series" / "demo.yaml"      # branches debian-6.1, debian-6.12; gates: apply debian-6.12 clean, ...
SUBJECTS = ["KVM: x86/mmu: one", "KVM: x86/mmu: two"]


def run_of(branch: str, verdict: str = "clean", *, started: str = "2026-12-01T10:00:00+00:00",
           finished: str | None = "2026-12-01T10:05:00+00:00", spec: Path = DEMO, name: str = "demo",
           subjects: list[str] = SUBJECTS, stages: tuple[str, ...] = ("fetch", "apply")) -> RunResult:
    """The record `kpatchtest run SPEC --branch BRANCH --stages ...` writes (its gates as that run judged them)."""
    r = RunResult(tool_version=__version__, name=name, spec=str(spec), started=started, finished=finished,
                  stages=list(stages),
                  series=SeriesInfo(title="KVM: x86/mmu: cleanups", sources=["mbox:/ws/x.mbox"], version=2,
                                    patches=[SeriesPatchInfo(index=i, subject=s, msgid=f"{i}@x")
                                             for i, s in enumerate(subjects, 1)]))
    b = r.branch(branch)
    b.apply = ApplyResult(verdict=verdict, branch_commit="a" * 40, patches=[
        PatchResult(index=i, subject=s, status="applied" if verdict == "clean" else "conflict")
        for i, s in enumerate(subjects, 1)])
    r.gates = [GateResult(name="apply", branch=branch, passed=True, expected="any", actual=verdict)]
    return r


def save(tmp: Path, *runs: RunResult, names: list[str] | None = None) -> list[Path]:
    paths = []
    for i, r in enumerate(runs):
        d = tmp / "out" / (names[i] if names else r.branches[0].name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(r.model_dump_json(indent=2))
        paths.append(d / "results.json")
    return paths


def merge_cli(paths: list[Path], out: Path, capsys) -> tuple[int, str]:
    code = main(["report", "--merge", *map(str, paths), "--out", str(out)])
    return code, capsys.readouterr().err


# -- refusals: exit 2, one line naming both files and what differs ---------------------------

def _refused(code: int, err: str, a: Path, b: Path, what: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("kpatchtest: error:")]
    assert len(lines) == 1 and len(err.strip().splitlines()) == 1, err
    assert str(a) in lines[0] and str(b) in lines[0] and what in lines[0], lines[0]


def test_runs_of_different_specs_are_refused(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12", name="other"))
    _refused(*merge_cli([a, b], tmp_path / "all", capsys), a, b, "spec name demo vs other")
    assert not (tmp_path / "all" / "results.json").exists()


def test_runs_of_different_series_are_refused(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12", subjects=[SUBJECTS[0], "KVM: x86/mmu: 2nd"]))
    _refused(*merge_cli([a, b], tmp_path / "all", capsys), a, b, "series patch 2")


def test_runs_of_different_schemas_are_refused(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12"))
    old = json.loads(b.read_text())
    old["schema_version"] = 5
    b.write_text(json.dumps(old))
    _refused(*merge_cli([a, b], tmp_path / "all", capsys), a, b, "results schema")


@pytest.mark.skipif("spec_sha256" not in RunResult.model_fields, reason="results.json has no spec_sha256 yet")
def test_runs_of_a_changed_spec_are_refused_by_its_hash(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1").model_copy(update={"spec_sha256": "1" * 64}),
                run_of("debian-6.12").model_copy(update={"spec_sha256": "2" * 64}))
    _refused(*merge_cli([a, b], tmp_path / "all", capsys), a, b, "spec sha256")


def test_the_same_branch_twice_is_refused(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.1"), names=["one", "two"])
    _refused(*merge_cli([a, b], tmp_path / "all", capsys), a, b, "both have branch debian-6.1")


def test_merging_into_a_part_is_refused(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12"))
    before = a.read_text()
    code, err = merge_cli([a, b], a.parent, capsys)
    assert code == 2 and "would overwrite it" in err, err
    assert a.read_text() == before


def test_several_files_without_merge_and_merge_without_out_are_usage_errors(tmp_path, capsys):
    a, b = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12"))
    assert main(["report", str(a), str(b)]) == 2
    assert "without --merge" in capsys.readouterr().err
    assert main(["report", "--merge", str(a), str(b)]) == 2
    assert "needs --out" in capsys.readouterr().err


# -- what a merge gives ----------------------------------------------------------------------

def test_branches_in_the_specs_order_times_and_stages_merged(tmp_path, capsys):
    # given in the reverse of the spec's order, the later run first
    b, a = save(tmp_path, run_of("debian-6.12", started="2026-12-01T11:00:00+00:00", finished="2026-12-01T11:30:00+00:00",
                                 stages=("fetch", "apply", "build")),
                run_of("debian-6.1", started="2026-12-01T10:00:00+00:00", finished="2026-12-01T10:20:00+00:00"))
    code, err = merge_cli([b, a], tmp_path / "all", capsys)
    merged = load(tmp_path / "all" / "results.json")
    assert [x.name for x in merged.branches] == ["debian-6.1", "debian-6.12"]
    assert (merged.started, merged.finished) == ("2026-12-01T10:00:00+00:00", "2026-12-01T11:30:00+00:00")
    assert merged.stages == ["fetch", "apply", "build"]
    assert "different stages" in err            # debian-6.1 is judged on a build it never ran
    assert code == 1                            # ... and fails the spec's build gate for it
    assert any(g.name == "build" and g.branch == "debian-6.1" and not g.passed for g in merged.gates)


def test_an_unfinished_run_leaves_the_merge_unfinished_and_says_so(tmp_path, capsys):
    paths = save(tmp_path, run_of("debian-6.1"), run_of("debian-6.12", finished=None))
    code, err = merge_cli(paths, tmp_path / "all", capsys)
    assert code == 0, err
    assert load(tmp_path / "all" / "results.json").finished is None
    assert f"{paths[1]}: the run did not finish" in err


def test_gates_are_judged_again_with_the_spec(tmp_path, capsys):
    # each run judged its own apply gate 'passed'; the spec asks debian-6.12 for clean
    paths = save(tmp_path, run_of("debian-6.1", "partial"), run_of("debian-6.12", "partial"))
    code, err = merge_cli(paths, tmp_path / "all", capsys)
    merged = load(tmp_path / "all" / "results.json")
    assert code == 1, err                       # a gate of the merged record failed, as `run` says it
    gates = {(g.name, g.branch): g for g in merged.gates}
    assert not gates["apply", "debian-6.12"].passed and gates["apply", "debian-6.12"].expected == "clean"
    assert ("apply", "debian-6.1") not in gates        # the demo spec gates apply on 6.12 only
    junit = ET.parse(tmp_path / "all" / "junit.xml").getroot()
    assert any(c.find("failure") is not None for c in junit.iter("testcase") if "gate" in (c.get("classname") or ""))


def test_without_a_readable_spec_order_is_first_seen_and_gates_are_the_runs(tmp_path, capsys):
    gone = tmp_path / "gone.yaml"
    paths = save(tmp_path, run_of("debian-6.12", spec=gone), run_of("debian-6.1", spec=gone))
    code, err = merge_cli(paths, tmp_path / "all", capsys)
    merged = load(tmp_path / "all" / "results.json")
    assert code == 0 and "spec not readable" in err, err
    assert [b.name for b in merged.branches] == ["debian-6.12", "debian-6.1"]
    assert [(g.branch, g.expected) for g in merged.gates] == [("debian-6.12", "any"), ("debian-6.1", "any")]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.hrefs += [v for k, v in attrs if k == "href" and v and "://" not in v]


def _booted_run(tmp: Path, branch: str) -> RunResult:
    """A run with a build, boots and a workload whose logs exist in its run directory, at the
    paths (relative to it) that RunDir spells."""
    d = tmp / "out" / branch
    r = run_of(branch, stages=("fetch", "apply", "build", "boot", "workloads"))
    r.gates = []
    log = f"{RunDir.artifacts(branch, 'patched')}/build.log"
    console = f"{RunDir.boot(branch, 'patched', 1, 'local-0')}/console.log"
    wl = f"{RunDir.workloads(branch, 'patched', 1, 'local-0')}/smm-boot/smm-boot-1.log"
    for rel, text in ((log, "CC arch/x86/kvm/mmu/tdp_mmu.o\n"), (console, "Linux version 6.x\n"),
                      (wl, f"smm boot on {branch}: 806 transitions\n")):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    built = BuildResult(status="pass", artifacts={"build.log": log, "bzImage": f"{RunDir.artifacts(branch, 'patched')}/bzImage"})
    b = r.branches[0]
    b.build = BranchBuild(baseline=built, patched=built)
    b.boot = [BootResult(build="patched", status="booted", host="local-0", console_log=console)]
    b.workloads = [WorkloadRun(build="patched", host="local-0", records=[
        WorkloadRecord(name="smm-boot", status="fail", logs=[wl])])]
    return r


def test_log_links_of_the_merged_report_resolve(tmp_path, capsys):
    paths = save(tmp_path, _booted_run(tmp_path, "debian-6.1"), _booted_run(tmp_path, "debian-6.12"))
    out = tmp_path / "out" / "all"             # beside the runs, as in the Jenkinsfile
    code, err = merge_cli(paths, out, capsys)
    assert err.count("1 file(s) its record names are not there") == 2, err   # each branch's bzImage
    merged = load(out / "results.json")
    # the merged directory has the layout one run of both branches has: the same paths, its own files
    assert merged.branches[0].boot[0].console_log == "boot/debian-6.1/patched-r1/local-0/console.log"
    bz = out / merged.branches[1].build.patched.artifacts["bzImage"]
    assert not bz.exists()                   # named, never written by the run: nothing to gather
    log = out / merged.branches[1].build.patched.artifacts["build.log"]
    assert log.read_text() == "CC arch/x86/kvm/mmu/tdp_mmu.o\n"
    assert log.stat().st_ino == (tmp_path / "out" / "debian-6.12" / merged.branches[1].build.patched.artifacts["build.log"]).stat().st_ino
    page = _Links()
    page.feed((out / "report.html").read_text())
    logs = [h for h in page.hrefs if h.endswith(".log")]
    assert len(logs) == 2 * 4            # per branch: build.log (baseline, patched), console, workload
    missing = [h for h in page.hrefs if not (out / unquote(h)).is_file()]
    assert not missing, missing
    # junit.xml quotes the end of each workload's log, read through the rebased path
    text = (out / "junit.xml").read_text()
    assert re.search(r"smm boot on debian-6\.1: 806", text) and "smm boot on debian-6.12: 806" in text
