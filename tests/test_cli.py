"""End to end through the CLI: real b4, real public-inbox, real git, a cache repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kpatchtest.cli import main
from kpatchtest.results import SCHEMA_VERSION
from tests.kernelhist import build

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("cli") / "linux")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("KPATCHTEST_CACHE", str(d))
    return d


def write_spec(tmp_path: Path, hist, keys=("P_clean", "P_conflict", "P_dep"), gates="", branches=("linux-1.0.y",)) -> Path:
    # The series as a commit range: P_* are consecutive on master, so take each one by sha.
    series = "\n".join(f"  - commits: {hist.shas[k]}\n    repo: {hist.path}" for k in keys)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: t\nseries:\n{series}\nkernel:\n  repo: {hist.path}\n  upstream: master\n"
                    f"  branches: [{', '.join(branches)}]\n{gates}")
    return spec


def state(hist) -> dict:
    return {k: hist.git(*k.split()) for k in ("rev-parse HEAD", "status --porcelain",
                                              "for-each-ref --format=%(refname)%(objectname)", "stash list")}


def test_run_writes_reports_and_never_touches_the_users_repo(tmp_path, hist, cache, capsys):
    (hist.path / "dirty.txt").write_text("user's uncommitted work\n")
    before = state(hist)
    out = tmp_path / "out"
    assert main(["run", str(write_spec(tmp_path, hist)), "--out", str(out)]) == 0
    assert state(hist) == before
    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == SCHEMA_VERSION
    b = res["branches"][0]
    assert b["name"] == "linux-1.0.y" and b["apply"]["verdict"] == "partial"
    assert [p["status"] for p in b["apply"]["patches"]] == ["applied", "conflict", "skipped"]
    assert b["apply"]["patches"][1]["conflicts"][0]["file"] == "arch/x86/kvm/mmu/tdp_mmu.c"
    assert {"junit.xml", "summary.md", "report.html", "series.mbox"} <= {p.name for p in out.iterdir()}
    assert "partial" in capsys.readouterr().out
    (hist.path / "dirty.txt").unlink()


def test_rerun_reuses_unchanged_steps_and_offline_works(tmp_path, hist, cache, capsys):
    spec = write_spec(tmp_path, hist)
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--offline"]) == 0
    assert "reused" in capsys.readouterr().err
    again = json.loads((out / "results.json").read_text())
    assert again["branches"] == first["branches"]


def test_gate_failure_exits_1(tmp_path, hist, cache):
    spec = write_spec(tmp_path, hist, gates="gates:\n  apply: clean\n")
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 1
    gates = json.loads((out / "results.json").read_text())["gates"]
    assert gates == [{"name": "apply", "branch": "linux-1.0.y", "passed": False, "expected": "clean", "actual": "partial"}]
    failures = [f.get("message") for f in ET.parse(out / "junit.xml").getroot().iter("failure")]
    assert "expected clean, got partial" in failures


def test_missing_branch_is_exit_2_and_other_branches_still_reported(tmp_path, hist, cache, capsys):
    spec = write_spec(tmp_path, hist, branches=("linux-1.0.y", "linux-0.9.y"))
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    res = json.loads((out / "results.json").read_text())
    good, bad = res["branches"]
    assert good["apply"]["verdict"] == "partial"
    assert "branch 'linux-0.9.y' not found" in bad["error"]


def test_lore_msgid_through_b4_adhoc_apply(tmp_path, lore, lore_repo, cache):
    out = tmp_path / "out"
    code = main(["apply", "--repo", str(lore_repo.path), "--msgid", lore.msgids["v2_cover"], "--midmask",
                 lore.midmask, "--branch", "v2", "--branch", lore_repo.prereq, "--out", str(out), "-q"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["series"]["version"] == 2 and len(res["series"]["patches"]) == 3
    verdicts = {b["name"]: b["apply"]["verdict"] for b in res["branches"]}
    assert verdicts == {"v2": "already-applied", lore_repo.prereq: "clean"}
    # the mail summary names the series and the matrix
    assert res["series"]["title"] in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent/spec.yaml"], "spec file not found"),
    (["run", "SPEC", "--stages", "fetch,bake"], "unknown stage 'bake'"),
    (["run", "SPEC", "--stages", "compare"], "--stages compare needs a workloads: section"),
    (["run", "SPEC", "--stages", "workloads"], "--stages workloads needs a workloads: section"),
    (["run", "SPEC", "--stages", "fetch,apply,build,boot"], "--stages build needs a configs: section"),
    (["run", "SPEC", "--stages", "fetch,apply,build"], "--stages build needs a configs: section"),
    (["run", "SPEC", "--branch", "linux-7.0.y"], "--branch linux-7.0.y: not a branch of"),
    (["apply", "--repo", "/nonexistent", "--mbox", "MBOX", "--branch", "x"], "kernel.repo /nonexistent: no such directory"),
    (["apply", "--repo", "REPO", "--mbox", "GARBAGE", "--branch", "linux-1.0.y"], "GARBAGE"),
    (["apply", "--repo", "REPO", "--msgid", "nothere@example.org", "--midmask", "DEAD", "--branch", "linux-1.0.y"],
     "nothere@example.org"),
])
def test_bad_input_one_line_exit_2_previous_results_intact(tmp_path, hist, lore, cache, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("previous\n")
    garbage = tmp_path / "garbage.mbox"
    garbage.write_bytes(os.urandom(2048))
    subst = {"SPEC": str(write_spec(tmp_path, hist)), "REPO": str(hist.path), "GARBAGE": str(garbage),
             "MBOX": str(garbage), "DEAD": lore.dead_midmask()}
    argv = [subst.get(a, a) for a in args] + ["--out", str(out)]
    message = subst.get(message, message)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("kpatchtest: error: ") and message in err[0], err
    assert (out / "results.json").read_text() == "previous\n"


def test_usage_error_exit_2():
    p = subprocess.run([sys.executable, "-m", "kpatchtest", "run"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "usage:" in p.stderr


def test_two_runs_at_once_do_not_collide(tmp_path, hist, cache):
    spec = write_spec(tmp_path, hist)
    env = dict(os.environ, KPATCHTEST_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-m", "kpatchtest", "run", str(spec), "-q", "--out", str(tmp_path / f"o{i}")],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = (json.loads((tmp_path / f"o{i}" / "results.json").read_text())["branches"] for i in range(2))
    assert a[0]["apply"]["verdict"] == b[0]["apply"]["verdict"] == "partial"


def test_validate_and_help(capsys):
    assert main(["validate", str(ROOT / "series/tdp-roots.yaml")]) == 0
    assert "3 branch(es): linux-5.10.y, linux-5.15.y, linux-6.1.y" in capsys.readouterr().out
    for verb in ("run", "apply", "fetch", "validate", "report"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
