"""The git adapter against real repositories: every byte of what it hands git and reads
back (see rawtext), stdin, timeouts, errors, and an environment that never reaches the
caller's repository or index."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from kpatchtest import rawtext
from kpatchtest.errors import EXIT_INTERNAL, GitError, ToolError
from kpatchtest.gitutil import Git, GitTimeout

RAW = b"/* Copyright (C) 1996 Ren\xe9 Lef\xe8vre */\r\nint a;\n"


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="u", GIT_AUTHOR_EMAIL="u@x", GIT_COMMITTER_NAME="u", GIT_COMMITTER_EMAIL="u@x")
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def bare(tmp_path: Path) -> Git:
    _sh("git", "init", "-q", "--bare", tmp_path / "r.git")
    return Git(tmp_path / "r.git")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with one commit and one staged change: an index worth protecting."""
    repo = tmp_path / "work"
    _sh("git", "init", "-q", repo)
    (repo / "a.c").write_text("int a;\n")
    _sh("git", "add", "a.c", cwd=repo)
    _sh("git", "commit", "-q", "-m", "one", cwd=repo)
    (repo / "a.c").write_text("int a;\nint staged;\n")
    _sh("git", "add", "a.c", cwd=repo)
    return repo


def test_str_with_raw_bytes_round_trips_through_git(bare):
    text = rawtext.decode(RAW)
    assert "\udce9" in text
    sha = bare.out("hash-object", "-w", "--stdin", input=text)
    assert sha == _blob_sha(RAW)                     # the bytes git got are the file's
    assert bare.run("cat-file", "blob", sha).stdout == text       # and they come back, CR too
    assert bare.run("cat-file", "blob", sha, text=False).stdout == RAW
    # stderr is display text: undecodable bytes shown, not kept
    p = bare.run("cat-file", "-t", "Ren\udce9", check=False)
    assert p.returncode != 0 and "Ren\ufffd" in p.stderr


def test_bytes_in_bytes_out_unchanged(bare):
    sha = bare.out("hash-object", "-w", "--stdin", input=RAW)
    p = bare.run("cat-file", "blob", sha, text=False)
    assert isinstance(p.stdout, bytes) and p.stdout == RAW         # final newline kept too
    assert isinstance(p.stderr, bytes)
    assert bare.run("cat-file", "blob", sha).stdout.endswith("int a;\n")


def test_big_stdin_and_stdout_do_not_block(bare):
    data = os.urandom(3 << 20) + b"\n" * (3 << 20)         # more than any pipe buffer, both ways
    sha = bare.out("hash-object", "-w", "--stdin", input=data)
    assert sha == _blob_sha(data)
    assert bare.run("cat-file", "blob", sha, text=False).stdout == data


def test_without_input_stdin_is_empty(bare):
    # git reads stdin to its end: an inherited terminal would wait, an empty stdin does not
    assert bare.out("hash-object", "--stdin", timeout=30) == _blob_sha(b"")


def test_failing_command_raises_with_the_command_and_stderr(bare, tmp_path):
    with pytest.raises(GitError) as e:
        bare.run("rev-parse", "--verify", "no-such-ref")
    msg = str(e.value)
    assert f"`git -C {tmp_path / 'r.git'} rev-parse --verify no-such-ref` failed (exit 128)" in msg
    assert "fatal: Needed a single revision" in msg
    assert isinstance(e.value, ToolError) and e.value.exit_code == EXIT_INTERNAL
    # check=False hands the failure back instead
    p = bare.run("rev-parse", "--verify", "no-such-ref", check=False)
    assert p.returncode == 128 and "fatal: Needed a single revision" in p.stderr
    assert not bare.ok("rev-parse", "--verify", "no-such-ref") and bare.rev_parse("no-such-ref") is None


def test_private_index_is_named_in_the_error(bare, tmp_path):
    with pytest.raises(GitError, match=r"with GIT_INDEX_FILE=.*idx: fatal:"):
        bare.with_index(tmp_path / "idx").run("read-tree", "no-such-tree")


def test_timeout_kills_git_and_its_children(bare, tmp_path):
    pid_file = tmp_path / "child.pid"
    hang = f"!echo $$ > '{pid_file}'; exec sleep 60"
    t0 = time.monotonic()
    with pytest.raises(GitTimeout, match=r"gave no answer within 1 s and was killed"):
        bare.run("-c", f"alias.hang={hang}", "hang", check=False, timeout=1)
    assert time.monotonic() - t0 < 10
    child = int(pid_file.read_text())
    for _ in range(50):                                  # SIGKILLed; reaped by init shortly
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"git's child {child} survived the timeout")
    assert bare.out("rev-parse", "--is-bare-repository", timeout=30) == "true"    # in time: no error


def test_private_index_leaves_the_repository_index_untouched(checkout, tmp_path):
    index = checkout / ".git" / "index"
    before = index.read_bytes()
    staged = _sh("git", "diff", "--cached", cwd=checkout)
    git = Git(checkout)
    private = git.with_index(tmp_path / "private.idx")
    private.run("read-tree", "HEAD")
    private.run("apply", "--cached", "-", input="--- a/a.c\n+++ b/a.c\n@@ -1 +1,2 @@\n int a;\n+int mine;\n")
    tree = private.out("write-tree")
    assert private.run("show", f"{tree}:a.c").stdout == "int a;\nint mine;\n"
    assert (tmp_path / "private.idx").is_file()
    assert index.read_bytes() == before                          # the user's index, byte for byte
    assert _sh("git", "diff", "--cached", cwd=checkout) == staged
    assert git.run("show", ":a.c").stdout == "int a;\nint staged;\n"   # no index_file: the repo's own


def test_callers_git_environment_is_ignored(checkout, bare, tmp_path, monkeypatch):
    """A hook that runs us exports GIT_DIR and GIT_INDEX_FILE: git still works on the repo asked for."""
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "r.git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(tmp_path))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "callers.idx"))
    git = Git(checkout)
    assert Path(git.out("rev-parse", "--absolute-git-dir")) == checkout / ".git"
    assert git.run("show", ":a.c").stdout == "int a;\nint staged;\n"
    assert not (tmp_path / "callers.idx").exists()
    private = git.with_index(tmp_path / "p.idx")
    private.run("read-tree", "HEAD")
    assert (tmp_path / "p.idx").is_file() and not (tmp_path / "callers.idx").exists()


def test_identity_and_protocol_allow_list(bare, tmp_path):
    tree = bare.out("mktree", input="")
    commit = bare.out("commit-tree", tree, "-m", "x")
    assert bare.out("log", "-1", "--format=%an <%ae> / %cn", commit) == \
        "kpatchtest <kpatchtest@localhost> / kpatchtest"
    marker = tmp_path / "ran"
    p = bare.run("ls-remote", f"ext::sh -c touch% {marker}", check=False, timeout=30)
    assert p.returncode != 0 and "transport 'ext' not allowed" in p.stderr
    assert not marker.exists()
    # extra env wins over the defaults
    assert bare.out("var", "GIT_AUTHOR_IDENT", env={"GIT_AUTHOR_NAME": "other"}).startswith("other ")


def test_missing_git_is_one_error_with_a_hint(bare, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GitError, match=r"git is not installed or not on PATH; install git"):
        bare.run("status", check=False)


def test_display_shows_raw_bytes_as_replacement_characters():
    assert rawtext.display(rawtext.decode(RAW)) == RAW.decode("utf-8", "replace")
    assert rawtext.display("Zo\u00eb") == "Zo\u00eb"
