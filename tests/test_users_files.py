"""A run writes only to --out and the cache: nothing under $HOME, not a byte or an mtime
of the user's repository (its .git included)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from kpatchtest.cli import main
from kpatchtest.fetch.b4 import b4_env
from tests.kernelhist import build

GITCONFIG = "[b4]\n\tcache-expire = 10\n"     # the user's own global config: read, never written


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: (type, bytes' sha256, mtime_ns); directories by mtime too,
    since a created-and-deleted file still bumps its directory."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
            out[str(p.relative_to(root))] = (p.is_dir(), digest, st.st_mtime_ns)
    return out


def changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture
def run(tmp_path, monkeypatch):
    """run(branch, commit, *args) -> (changes under $HOME, user's repo before, after): the real CLI
    on a series of one commit and one mbox, with $HOME an empty temp dir but for a
    .gitconfig, and no XDG_* variable set (so every default points under $HOME)."""
    hist = build(tmp_path / "linux")
    mbox = tmp_path / "one.mbox"
    mbox.write_text(hist.git("format-patch", "--stdout", "-1", hist.shas["P_offset"]) + "\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG)
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME",
                "GNUPGHOME", "KPATCHTEST_CACHE", "GIT_CONFIG_GLOBAL"):
        monkeypatch.delenv(var, raising=False)

    def go(branch: str, commit: str = "P_clean", *args: str):
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"name: t\nseries:\n  - commits: {hist.shas[commit]}\n    repo: {hist.path}\n"
                        f"  - mbox: {mbox}\n"
                        f"kernel:\n  repo: {hist.path}\n  upstream: master\n  branches: [{branch}]\n")
        home_before, repo_before = snapshot(home), snapshot(hist.path)
        out = tmp_path / "out"
        assert main(["run", str(spec), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args]) == 0
        assert (out / "results.json").is_file()
        return changed(home_before, snapshot(home)), repo_before, snapshot(hist.path)
    return go


def test_a_run_leaves_home_and_the_users_repository_as_they_were(run):
    home, before, after = run("linux-1.0.y")
    assert home == []
    assert changed(before, after) == []


def test_only_gits_freshening_of_an_object_it_rewrites_changes_an_mtime(run):
    """P_dep conflicts on the stable branch: git apply --3way writes the blobs it merges,
    which the user's repo has, and git then refreshes the mtime of the user's copy through
    alternates (freshen_file). That is git's doing (README says so); the bytes stay."""
    home, before, after = run("linux-1.0.y", "P_dep", "--no-hints")
    assert home == []
    for path in changed(before, after):
        assert path.startswith(".git/objects/") and before[path][:2] == after[path][:2], path


def test_b4_reads_the_users_git_config_and_keyring_but_writes_neither(tmp_path, monkeypatch):
    """b4.* settings and the `b4 kr` keyring are the user's to keep using; a write by
    `git config --global` under b4's environment lands in the scratch dir."""
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".config" / "git" / "config").write_text('[b4]\n\tmidmask = "http://mirror/%s"\n')
    (home / ".gitconfig").write_text(GITCONFIG)
    (home / ".local" / "share" / "b4" / "keyring").mkdir(parents=True)
    scratch.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_GLOBAL", "GNUPGHOME"):
        monkeypatch.delenv(var, raising=False)
    before = snapshot(home)
    env = b4_env(scratch)

    def git(*args):
        return subprocess.run(["git", "config", *args], env=env, cwd=scratch, capture_output=True,
                              text=True, check=True).stdout.strip()
    assert git("--get", "b4.midmask") == "http://mirror/%s"
    assert git("--get", "b4.cache-expire") == "10"
    git("--global", "b4.written", "yes")
    assert git("--get", "b4.written") == "yes"
    assert changed(before, snapshot(home)) == []
    assert (Path(env["XDG_DATA_HOME"]) / "b4" / "keyring").resolve() == home / ".local" / "share" / "b4" / "keyring"
    assert Path(env["GNUPGHOME"]).parent == scratch     # no ~/.gnupg: gpg must not create one
