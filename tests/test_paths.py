"""The CLI run as a user runs it: a real process in another working directory, every
path relative (--out and its default, --cache-dir, KPATCHTEST_CACHE, --repo, the spec,
paths inside the spec). git runs in the cache repo and b4 in a scratch cwd, so a
relative path that reached either would land somewhere else: these tests fail then."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kpatchtest.progress import Progress
from tests.kernelhist import build

KPATCHTEST = [sys.executable, "-m", "kpatchtest"]


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("paths") / "linux")


@pytest.fixture
def user(tmp_path, hist):
    """A user's directory: the kernel repo beside it, a patch mbox in it; runs cd'ed there."""
    home = tmp_path / "work" / "me"
    home.mkdir(parents=True)
    (home / "fix.mbox").write_text(hist.git("format-patch", "-1", "--stdout", hist.shas["P_clean"]))
    env = {k: v for k, v in os.environ.items() if k not in ("KPATCHTEST_CACHE", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path / "home")       # a fresh ~/.cache for the default-cache case

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*KPATCHTEST, *args], cwd=home, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=300)
    return home, run


def test_apply_with_relative_repo_default_out_and_relative_cache_env(user, hist, tmp_path):
    home, run = user
    rel_repo = os.path.relpath(hist.path, home)
    p = run("apply", "--repo", rel_repo, "--mbox", "fix.mbox", "--branch", "linux-1.0.y",
            KPATCHTEST_CACHE="cache")
    assert p.returncode == 0, p.stderr
    res = json.loads((home / "out" / "apply" / "results.json").read_text())   # the default --out, here
    assert [b["apply"]["verdict"] for b in res["branches"]] == ["clean"]
    # the relative cache is the user's ./cache, not one nested in the cache repo or in b4's cwd
    assert (home / "cache" / "repos").is_dir() and (home / "cache" / "series").is_dir()
    assert not list((home / "cache").glob("repos/*/cache")), "cache created inside itself"
    assert not (hist.path / "out").exists() and not (hist.path / "cache").exists()


def test_run_with_relative_spec_out_and_cache_dir_from_another_directory(user, hist, tmp_path):
    """The spec lives in a subdirectory and names its mbox and repo relative to itself;
    `commits:` without `repo:` takes kernel.repo."""
    home, run = user
    specdir = home / "specs"
    specdir.mkdir()
    shutil.copy(home / "fix.mbox", specdir / "fix.mbox")
    repo_from_spec = os.path.relpath(hist.path, specdir)
    (specdir / "s.yaml").write_text(
        "name: rel\nseries:\n  - mbox: fix.mbox\n"
        f"  - commits: {hist.shas['P_offset']}\n"
        f"kernel:\n  repo: {repo_from_spec}\n  upstream: master\n  branches: [linux-1.0.y]\n")
    p = run("run", "specs/s.yaml", "--out", "o/run", "--cache-dir", "./c", "-q")
    assert p.returncode == 0, p.stderr
    res = json.loads((home / "o" / "run" / "results.json").read_text())
    patches = res["branches"][0]["apply"]["patches"]
    assert [x["subject"] for x in patches] == ["KVM: x86/mmu: clean change", hist.git(
        "log", "-1", "--format=%s", hist.shas["P_offset"])]
    assert all(x["status"].startswith("applied") for x in patches), patches
    assert (home / "c" / "repos").is_dir()
    # the default --out of `run` is out/<spec name>, relative to where the user is
    p = run("run", "specs/s.yaml", "--cache-dir", "c", "-q", "--offline")
    assert p.returncode == 0, p.stderr
    assert (home / "out" / "rel" / "results.json").is_file()


def test_progress_bar_goes_to_stderr_never_stdout(capsys):
    """The live display (rich) writes to the stream it was given (stderr by default)."""
    err = io.StringIO()
    prog = Progress(stream=err, live=True)
    with prog.stage("apply", 2):
        prog.step("debian-6.1", "partial")
        prog.step("debian-6.12", "clean")
    assert capsys.readouterr().out == ""
    assert "debian-6.12: clean" in err.getvalue()


def test_summary_alone_on_stdout_when_redirected(user, hist):
    home, run = user
    p = run("apply", "--repo", str(hist.path), "--mbox", "fix.mbox", "--branch", "linux-1.0.y",
            "--cache-dir", "c")
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\r" not in p.stdout
    assert p.stdout.lstrip().startswith("#") or "clean" in p.stdout.splitlines()[0] or "linux-1.0.y" in p.stdout
    assert "[apply]" in p.stderr             # timestamped progress lines, off a terminal


def test_broken_cache_repo_is_an_internal_error_with_command_and_stderr(user, hist):
    """Not the user's input: exit 3, the traceback, the git command and what git said."""
    home, run = user
    assert run("apply", "--repo", str(hist.path), "--mbox", "fix.mbox", "--branch", "linux-1.0.y",
               "--cache-dir", "c", "-q").returncode == 0
    for cfg in (home / "c" / "repos").glob("*/config"):
        cfg.write_text("[core\n\tbroken = \n")
    p = run("apply", "--repo", str(hist.path), "--mbox", "fix.mbox", "--branch", "linux-1.0.y",
            "--cache-dir", "c", "-q", "--out", "o2")
    assert p.returncode == 3, (p.returncode, p.stderr)
    assert "Traceback" in p.stderr and "kpatchtest: internal error: `git -C " in p.stderr
    assert "bad config" in p.stderr
