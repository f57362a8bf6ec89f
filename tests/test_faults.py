"""The user's environment failing under us: a read-only --out, a full disk, a results.json
that is not ours. One line, exit 2, no temporary file left, earlier results intact."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kpatchtest.cli import main
from tests.kernelhist import build

MARK = "previous good results\n"


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("faults") / "linux")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (needs root, as on CI); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


def apply_argv(hist, out: Path, tmp_path: Path) -> list[str]:
    mbox = tmp_path / "fix.mbox"
    mbox.write_text(hist.git("format-patch", "-1", "--stdout", hist.shas["P_clean"]))
    return ["apply", "--repo", str(hist.path), "--mbox", str(mbox), "--branch", "linux-1.0.y",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_read_only_out_is_one_line_exit_2(hist, tmp_path, mount_tmpfs, capsys):
    ro = mount_tmpfs("ro", "ro,size=1m")
    assert main(apply_argv(hist, ro / "out", tmp_path) + ["-q"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("kpatchtest: error: cannot write ") and "Read-only" in lines[0], lines


def test_full_disk_is_one_line_and_never_a_torn_record(hist, tmp_path, mount_tmpfs, capsys):
    """results.json is rewritten after every unit: on a full disk it is the previous record
    or this run's partial one (finished unset), whole either way, and no temp file is left."""
    disk = mount_tmpfs("full", "size=256k")
    out = disk / "out"
    out.mkdir()
    (out / "results.json").write_text(MARK)
    # fill the disk but for a few pages: the run's small state files may fit, its reports do not
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(disk / "filler", os.path.getsize(disk / "filler") - 3 * 4096)
    assert main(apply_argv(hist, out, tmp_path) + ["-q"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cannot write" in lines[0] and "No space left" in lines[0], lines
    text = (out / "results.json").read_text()
    if text != MARK:
        partial = json.loads(text)
        assert partial["finished"] is None and partial["branches"][0]["apply"]["verdict"] == "clean"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], list(out.rglob("*"))


def test_run_that_produces_nothing_keeps_the_previous_results(hist, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(apply_argv(hist, out, tmp_path) + ["-q"]) == 0
    good = (out / "results.json").read_text()
    argv = apply_argv(hist, out, tmp_path)
    argv[argv.index("linux-1.0.y")] = "linux-0.9.y"       # the only branch is missing
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "branch 'linux-0.9.y' not found" in err and "kept the previous" in err
    assert (out / "results.json").read_text() == good
    # and the series file beside it is still the one that record refers to
    assert b"clean change" in (out / "series.mbox").read_bytes()


def test_report_on_a_wrong_field_says_where_and_needs_no_write_access(hist, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(apply_argv(hist, out, tmp_path) + ["-q"]) == 0
    res = out / "results.json"
    data = json.loads(res.read_text())
    before = (res.read_bytes(), res.stat().st_mtime_ns)
    os.chmod(res, 0o444)
    (out / "summary.md").unlink()
    assert main(["report", str(res)]) == 0            # in place: the input is only read
    assert (res.read_bytes(), res.stat().st_mtime_ns) == before
    assert (out / "summary.md").is_file()
    data["branches"][0]["apply"]["patches"][0]["index"] = "one"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["report", str(bad)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and f"{bad}: branches[0].apply.patches[0].index: " in lines[0] and '"one"' in lines[0], lines


def test_repo_that_is_not_git_is_refused_before_anything_is_written(hist, tmp_path, capsys):
    notgit = tmp_path / "not-a-repo"
    notgit.mkdir()
    (notgit / "README").write_text("just files\n")
    argv = apply_argv(hist, tmp_path / "out", tmp_path)
    argv[argv.index(str(hist.path))] = str(notgit)
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "not a git repository" in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "repos").exists()


def test_quiet_silences_progress_never_errors(hist, tmp_path, capsys):
    argv = apply_argv(hist, tmp_path / "out", tmp_path) + ["-q"]
    argv[argv.index("linux-1.0.y")] = "linux-0.9.y"
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("kpatchtest: error: branch linux-0.9.y: ") and "not found" in lines[0], lines
    assert captured.out == ""


def test_run_files_get_the_users_umask(hist, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(apply_argv(hist, tmp_path / "out", tmp_path) + ["-q"]) == 0
    finally:
        os.umask(old)
    for name in ("results.json", "junit.xml", "summary.md", "report.html", "series.mbox"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
