"""kpatchtest.tarball: kernel source tarballs imported as commits of the cache repo.

Synthetic tarballs (made here, in every compression) check the tree, modes, links,
determinism, the cache and the errors; the Debian trees (fixture ``debian_trees`` of
tests/conftest_debian.py) check the real thing and the demo series in series/demo.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from kpatchtest import tarball as tb
from kpatchtest.errors import InputError
from kpatchtest.gitutil import Git
from kpatchtest.tarball import IMPORT_PREFIX, ImportedTree, import_tarball, is_tarball

ROOT = Path(__file__).resolve().parent.parent
DEMO_MBOX = ROOT / "series/demo/kvm-mmu-demo.mbox"
MTIME = 1_700_000_000


def makefile(version: int = 6, patchlevel: int = 1, sublevel: int | str = 192, extra: str = "") -> bytes:
    return (f"# SPDX-License-Identifier: GPL-2.0\nVERSION = {version}\nPATCHLEVEL = {patchlevel}\n"
            f"SUBLEVEL = {sublevel}\nEXTRAVERSION ={' ' + extra if extra else ''}\n"
            f"NAME = Curry Ramen\n\nall:\n\t@echo building\n").encode()


def kernel_members(top: str = "linux-source-6.1", mk: bytes | None = None) -> list[tuple]:
    """(name, kind, data/target, mode) for a small kernel-like tree, Debian style."""
    p = f"{top}/" if top else ""
    members = [
        (f"{p}.gitignore", "file", b"/*\n!/debian/\n", 0o644),      # Debian: ignores everything
        (f"{p}Makefile", "file", makefile() if mk is None else mk, 0o644),
        (f"{p}README", "file", b"Linux kernel\n", 0o644),
        (f"{p}arch/x86/kvm/mmu/tdp_mmu.c", "file", b"// SPDX-License-Identifier: GPL-2.0\nint x;\n", 0o644),
        (f"{p}arch/x86/kvm/mmu/.gitignore", "file", b"*\n", 0o644),
        (f"{p}scripts/checkpatch.pl", "file", b"#!/usr/bin/env perl\nprint 1;\n", 0o755),
        (f"{p}Documentation/process/changes.rst", "file", b"Minimal requirements\n", 0o644),
        (f"{p}Documentation/Changes", "sym", "process/changes.rst", 0o777),
        (f"{p}include/empty.h", "file", b"", 0o644),
        (f"{p}COPYING-hardlink", "link", f"{p}README", 0o644),
    ]
    if top:
        dirs = {f"{top}/"} | {m[0].rsplit("/", 1)[0] + "/" for m in members}
        members = [(d, "dir", None, 0o755) for d in sorted(dirs)] + members
    return members


EXPECTED_TREE = {
    ".gitignore": "100644",
    "Makefile": "100644",
    "README": "100644",
    "arch/x86/kvm/mmu/tdp_mmu.c": "100644",
    "arch/x86/kvm/mmu/.gitignore": "100644",
    "scripts/checkpatch.pl": "100755",
    "Documentation/process/changes.rst": "100644",
    "Documentation/Changes": "120000",
    "include/empty.h": "100644",
    "COPYING-hardlink": "100644",
}


def write_tar(path: Path, members: list[tuple], comp: str = "xz", mtime: int = MTIME) -> Path:
    """Write a tarball; comp is one of tar, gz, bz2, xz, zst."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i, (name, kind, data, mode) in enumerate(members):
            ti = tarfile.TarInfo(name.rstrip("/") if kind == "dir" else name)
            ti.mode, ti.mtime, ti.uname, ti.gname = mode, mtime + i, "root", "root"
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "file":
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, data
                tf.addfile(ti)
    data = raw.getvalue()
    if comp == "tar":
        out = data
    elif comp == "gz":
        import gzip
        out = gzip.compress(data, mtime=0)
    elif comp == "bz2":
        import bz2
        out = bz2.compress(data)
    elif comp == "xz":
        import lzma
        out = lzma.compress(data)
    elif comp == "zst":
        out = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
    else:
        raise ValueError(comp)
    path.write_bytes(out)
    return path


def bare(path: Path) -> Git:
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    return Git(path)


def ls_tree(git: Git, rev: str) -> dict[str, tuple[str, str]]:
    out = git.out("ls-tree", "-r", "-z", "--full-tree", rev).split("\0")
    res = {}
    for line in filter(None, out):
        meta, path = line.split("\t", 1)
        mode, _, oid = meta.split()
        res[path] = (mode, oid)
    return res


def all_refs(git: Git) -> list[str]:
    return git.out("for-each-ref", "--format=%(refname)").split()


@pytest.fixture
def repo(tmp_path) -> Git:
    return bare(tmp_path / "cache.git")


@pytest.fixture
def kernel_tar(tmp_path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    return write_tar(d / "linux-source-6.1.tar.xz", kernel_members())


class _NoRead:
    """Stands in for the decompressor: fails the test if the tarball is streamed."""

    def __init__(self, *a, **kw):
        raise AssertionError("the tarball was read again")


# --------------------------------------------------------------------------- is_tarball

@pytest.mark.parametrize("name,expected", [
    ("linux-source-6.1.tar.xz", True), ("/usr/src/linux-6.12.tar.gz", True), ("x.tgz", True),
    ("x.tar.bz2", True), ("x.tar.zst", True), ("x.tar", True), ("X.TAR.XZ", True), ("x.txz", True),
    ("linux", False), ("/home/me/linux/", False), ("x.xz", False), ("x.zip", False),
    ("https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git", False),
])
def test_is_tarball(name, expected):
    assert is_tarball(name) is expected


# --------------------------------------------------------------------------- importing

@pytest.mark.parametrize("comp", ["xz", "gz", "bz2", "tar", "zst"])
def test_import_keeps_files_modes_and_links(tmp_path, comp):
    if comp == "zst" and not shutil.which("zstd"):
        pytest.skip("zstd not installed")
    suffix = {"tar": ".tar"}.get(comp, f".tar.{comp}")
    path = write_tar(tmp_path / f"linux-source-6.1{suffix}", kernel_members(), comp)
    git = bare(tmp_path / "cache.git")

    t = import_tarball(git, path)

    assert t == ImportedTree(ref=IMPORT_PREFIX + "6.1.192", commit=t.commit, version="6.1.192",
                             tarball=path.resolve())
    assert git.rev_parse(t.ref) == t.commit
    tree = ls_tree(git, t.commit)
    assert {p: m for p, (m, _) in tree.items()} == EXPECTED_TREE     # top dir stripped, .gitignore'd kept
    assert git.out("cat-file", "blob", tree["Documentation/Changes"][1]) == "process/changes.rst"
    assert tree["COPYING-hardlink"][1] == tree["README"][1]
    assert git.run("cat-file", "blob", tree[".gitignore"][1]).stdout == "/*\n!/debian/\n"
    assert git.run("cat-file", "blob", tree["include/empty.h"][1]).stdout == ""

    raw = git.out("cat-file", "commit", t.commit)
    newest = MTIME + len(kernel_members()) - 1
    assert f"author kpatchtest <kpatchtest@localhost> {newest} +0000" in raw
    assert f"committer kpatchtest <kpatchtest@localhost> {newest} +0000" in raw
    assert "parent" not in raw
    msg = git.out("log", "-1", "--format=%B", t.commit)
    assert msg.splitlines()[0] == f"Import {path.name} (Linux 6.1.192)"
    assert f"Tarball-sha256: {hashlib.sha256(path.read_bytes()).hexdigest()}" in msg
    assert "Stripped-directory: linux-source-6.1/" in msg
    assert all_refs(git) == [t.ref]          # no temporary ref left behind


def test_all_compressions_give_the_same_tree(tmp_path):
    trees = set()
    for comp in ("xz", "gz", "bz2", "tar"):
        d = tmp_path / comp
        d.mkdir()
        path = write_tar(d / "linux.tarball", kernel_members(), comp)   # format found by content
        git = bare(d / "cache.git")
        trees.add(git.tree_of(import_tarball(git, path).commit))
    assert len(trees) == 1


def test_python_decompressor_fallback(tmp_path, monkeypatch):
    """Without the xz binary, tarfile's own lzma stream gives the same commit."""
    path = write_tar(tmp_path / "linux-source-6.1.tar.xz", kernel_members())
    expected = import_tarball(bare(tmp_path / "a.git"), path).commit
    monkeypatch.setattr(tb.shutil, "which", lambda name: None)
    assert import_tarball(bare(tmp_path / "b.git"), path).commit == expected


def test_version_with_extraversion_and_flat_tarball(tmp_path, repo):
    members = kernel_members(top="", mk=makefile(6, 13, 0, "-rc4"))
    path = write_tar(tmp_path / "linux.tar.gz", members, "gz")
    t = import_tarball(repo, path)
    assert (t.version, t.ref) == ("6.13.0-rc4", IMPORT_PREFIX + "6.13.0-rc4")
    assert set(ls_tree(repo, t.commit)) == set(EXPECTED_TREE)
    assert "Stripped-directory" not in repo.out("log", "-1", "--format=%B", t.commit)


def test_named_import(repo, kernel_tar):
    t = import_tarball(repo, kernel_tar, name="debian-6.1")
    assert t.ref == IMPORT_PREFIX + "debian-6.1" and t.version == "6.1.192"
    assert all_refs(repo) == [t.ref]


def test_same_tarball_gives_same_commit(tmp_path, kernel_tar):
    a = import_tarball(bare(tmp_path / "a.git"), kernel_tar)
    b = import_tarball(bare(tmp_path / "b.git"), kernel_tar)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(kernel_tar, other / kernel_tar.name)
    c = import_tarball(bare(tmp_path / "c.git"), other / kernel_tar.name)
    assert a.commit == b.commit == c.commit


# --------------------------------------------------------------------------- the cache

def test_second_import_is_a_cache_hit(repo, kernel_tar, monkeypatch):
    first = import_tarball(repo, kernel_tar)
    monkeypatch.setattr(tb, "_Decompressed", _NoRead)
    monkeypatch.setattr(tb, "_sha256", lambda p: pytest.fail("the tarball was hashed again"))
    again = import_tarball(repo, kernel_tar)     # neither decompressed nor hashed again (above)
    assert again == first


def test_touched_tarball_is_hashed_not_reimported(repo, kernel_tar, monkeypatch):
    first = import_tarball(repo, kernel_tar)
    os.utime(kernel_tar, (MTIME, MTIME))             # same content, new stat
    hashed = []
    real_sha = tb._sha256
    monkeypatch.setattr(tb, "_sha256", lambda p: hashed.append(p) or real_sha(p))
    monkeypatch.setattr(tb, "_Decompressed", _NoRead)
    assert import_tarball(repo, kernel_tar) == first
    assert len(hashed) == 1
    assert import_tarball(repo, kernel_tar) == first  # the new stat is remembered
    assert len(hashed) == 1


def test_changed_tarball_is_reimported_even_with_same_size_and_mtime(tmp_path, repo):
    path = write_tar(tmp_path / "linux-source-6.1.tar", kernel_members(), "tar")
    first = import_tarball(repo, path)
    st = path.stat()
    data = path.read_bytes()
    assert data.count(b"Linux kernel\n") == 1
    with open(path, "r+b") as f:                     # in place: same inode, same size
        f.write(data.replace(b"Linux kernel\n", b"Linux kernfl\n"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns

    second = import_tarball(repo, path)
    assert second.ref == first.ref and second.commit != first.commit
    assert repo.rev_parse(first.ref) == second.commit
    assert repo.out("show", f"{second.commit}:README") == "Linux kernfl"


def test_new_version_gets_its_own_ref(tmp_path, repo):
    path = tmp_path / "linux-source-6.1.tar.xz"
    first = import_tarball(repo, write_tar(path, kernel_members()))
    second = import_tarball(repo, write_tar(path, kernel_members(mk=makefile(sublevel=193))))
    assert (first.ref, second.ref) == (IMPORT_PREFIX + "6.1.192", IMPORT_PREFIX + "6.1.193")
    assert repo.rev_parse(first.ref) == first.commit and repo.rev_parse(second.ref) == second.commit


def test_same_content_under_another_name_is_not_read_again(tmp_path, repo, kernel_tar, monkeypatch):
    """A second name, or a copy with another file name, reuses the imported tree and
    still gives exactly the commit a full import would give."""
    first = import_tarball(repo, kernel_tar)
    renamed = tmp_path / "renamed-6.1.tar.xz"
    shutil.copy(kernel_tar, renamed)
    full = import_tarball(bare(tmp_path / "fresh.git"), renamed)      # a real import

    monkeypatch.setattr(tb, "_Decompressed", _NoRead)
    named = import_tarball(repo, kernel_tar, name="debian-6.1")
    assert (named.ref, named.commit) == (IMPORT_PREFIX + "debian-6.1", first.commit)
    copy = import_tarball(repo, renamed)
    assert copy.commit == full.commit != first.commit
    assert repo.tree_of(copy.commit) == repo.tree_of(first.commit)


def test_concurrent_imports_import_once(repo, kernel_tar, monkeypatch):
    calls = []
    real_import = tb._import

    def slow_import(*a, **kw):
        calls.append(1)
        time.sleep(0.3)                              # keep the lock while the other one waits
        return real_import(*a, **kw)

    monkeypatch.setattr(tb, "_import", slow_import)
    results, errors = [], []

    def run():
        try:
            results.append(import_tarball(repo, kernel_tar))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len({r.commit for r in results}) == 1 and len(results) == 3


def test_concurrent_processes(tmp_path, repo, kernel_tar):
    code = ("import sys; from pathlib import Path; from kpatchtest.gitutil import Git; "
            "from kpatchtest.tarball import import_tarball; "
            "print(import_tarball(Git(Path(sys.argv[1])), Path(sys.argv[2])).commit)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([os.sys.executable, "-c", code, str(repo.repo), str(kernel_tar)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1


# --------------------------------------------------------------------------- errors

def _assert_input_error(repo: Git, path: Path, *words: str, name: str | None = None) -> str:
    with pytest.raises(InputError) as ei:
        import_tarball(repo, path, name=name)
    msg = str(ei.value)
    assert "\n" not in msg and str(path.name) in msg
    for w in words:
        assert w in msg, msg
    assert all_refs(repo) == []
    assert not list(repo.repo.glob("fast_import_crash_*"))
    return msg


def test_missing_path(tmp_path, repo):
    _assert_input_error(repo, tmp_path / "linux-source-9.9.tar.xz", "does not exist")


def test_directory(tmp_path, repo):
    (tmp_path / "linux.tar").mkdir()
    _assert_input_error(repo, tmp_path / "linux.tar", "not a regular file")


def test_text_file_named_like_a_tarball(tmp_path, repo):
    path = tmp_path / "linux-source-6.1.tar.xz"
    path.write_text("this is not a tarball\n" * 100)
    _assert_input_error(repo, path, "not a tar archive")


def test_garbage_with_xz_magic(tmp_path, repo):
    path = tmp_path / "linux-source-6.1.tar.xz"
    path.write_bytes(b"\xfd7zXZ\x00" + os.urandom(4096))
    _assert_input_error(repo, path, "cannot import")


def test_truncated_tarball(tmp_path, repo):
    members = kernel_members() + [("linux-source-6.1/big.bin", "file", os.urandom(200_000), 0o644)]
    full = write_tar(tmp_path / "full.tar.xz", members)
    path = tmp_path / "linux-source-6.1.tar.xz"
    path.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    _assert_input_error(repo, path, "corrupt or truncated")


def test_truncated_plain_tar(tmp_path, repo):
    full = write_tar(tmp_path / "full.tar", kernel_members() + [
        ("linux-source-6.1/big.bin", "file", os.urandom(200_000), 0o644)], "tar")
    path = tmp_path / "linux-source-6.1.tar"
    path.write_bytes(full.read_bytes()[:150_000])
    _assert_input_error(repo, path, "corrupt or truncated")


def test_tarball_without_kernel_makefile(tmp_path, repo):
    members = [m for m in kernel_members() if not m[0].endswith("/Makefile")]
    _assert_input_error(repo, write_tar(tmp_path / "linux.tar.xz", members), "no kernel Makefile")


def test_makefile_without_version(tmp_path, repo):
    path = write_tar(tmp_path / "linux.tar.xz", kernel_members(mk=b"all:\n\techo hi\n"))
    _assert_input_error(repo, path, "no kernel Makefile")


def test_invalid_name(repo, kernel_tar):
    _assert_input_error(repo, kernel_tar, "invalid branch name", name="bad..name")


def test_not_a_repository(tmp_path, kernel_tar):
    from kpatchtest.errors import GitError
    with pytest.raises(GitError, match="not a git repository"):
        import_tarball(Git(tmp_path / "nope.git"), kernel_tar)


# --------------------------------------------------------------------------- the Debian trees

def _files(git: Git, commit: str) -> list[str]:
    return git.out("ls-tree", "-r", "--name-only", "--full-tree", commit).splitlines()


@pytest.mark.slow
def test_debian_trees(debian_trees, monkeypatch):
    git, trees = debian_trees
    for key, t in trees.items():
        assert re.fullmatch(re.escape(key) + r"\.\d+", t.version), t.version
        assert t.ref == IMPORT_PREFIX + t.version and git.rev_parse(t.ref) == t.commit
        files = _files(git, t.commit)
        assert 70_000 < len(files) < 100_000, len(files)
        assert "arch/x86/kvm/mmu/tdp_mmu.c" in files
        assert ".gitignore" in files and "/*" in git.out("show", f"{t.commit}:.gitignore").splitlines()
        mk = git.out("show", f"{t.commit}:Makefile")
        assert f"SUBLEVEL = {t.version.rsplit('.', 1)[1]}" in mk
    # cached: no reading, no hashing
    monkeypatch.setattr(tb, "_Decompressed", _NoRead)
    monkeypatch.setattr(tb, "_sha256", lambda p: pytest.fail("hashed again"))
    for key, t in trees.items():
        assert import_tarball(git, t.tarball) == t


def _demo_patches(tmp_path: Path) -> tuple[str, list[Path]]:
    """Split the demo mbox like git am does: (cover letter text, [patch files])."""
    split = tmp_path / "split"
    split.mkdir()
    subprocess.run(["git", "mailsplit", f"-o{split}", str(DEMO_MBOX)], check=True, capture_output=True)
    mails = sorted(split.iterdir())
    assert len(mails) == 4, "cover letter + 3 patches"
    patches = []
    for i, mail in enumerate(mails[1:], 1):
        patch = tmp_path / f"{i}.patch"
        info = subprocess.run(["git", "mailinfo", str(tmp_path / f"{i}.msg"), str(patch)],
                              stdin=open(mail, "rb"), capture_output=True, text=True, check=True).stdout
        assert "Subject: KVM: x86/mmu:" in info
        patches.append(patch)
    return mails[0].read_text(), patches


def _apply(git: Git, index: Path, patch: Path, check: bool = False) -> tuple[bool, str]:
    args = ["apply", "--cached", "-v"] + (["--check"] if check else []) + [str(patch)]
    p = git.with_index(index).run(*args, check=False)
    return p.returncode == 0, p.stdout + p.stderr


def _index(git: Git, tmp_path: Path, name: str, commit: str) -> Path:
    index = tmp_path / f"{name}.index"
    git.with_index(index).run("read-tree", commit)
    return index


@pytest.mark.slow
def test_demo_series_on_debian_trees(debian_trees, tmp_path):
    git, trees = debian_trees
    cover, (p1, p2, p3) = _demo_patches(tmp_path)
    assert re.search(r"^base-commit: [0-9a-f]{40}$", cover, re.M)

    # 6.12: the series' base; all three apply exactly, in order
    index = _index(git, tmp_path, "612", trees["6.12"].commit)
    for p in (p1, p2, p3):
        ok, out = _apply(git, index, p)
        assert ok, out
        assert "offset" not in out and "fuzz" not in out, out

    # 6.1: patch 1 applies (offsets allowed), patch 2 conflicts, patch 3 applies on its own
    base61 = trees["6.1"].commit
    index = _index(git, tmp_path, "61", base61)
    ok, out = _apply(git, index, p1)
    assert ok and "fuzz" not in out, out
    ok, out = _apply(git, index, p2, check=True)
    assert not ok and "patch does not apply" in out, out
    ok, out = _apply(git, index, p3)
    assert ok and "fuzz" not in out, out
    alone = _index(git, tmp_path, "61-alone", base61)
    for p, expect in ((p1, True), (p2, False), (p3, True)):
        assert _apply(git, alone, p, check=True)[0] is expect, p.name


@pytest.mark.slow
def test_demo_base_commit_is_the_612_import(debian_trees, tmp_path):
    git, trees = debian_trees
    cover, _ = _demo_patches(tmp_path)
    base = re.search(r"^base-commit: ([0-9a-f]{40})$", cover, re.M).group(1)
    readme = (ROOT / "series/demo/README.md").read_text()
    expected_sha = re.search(r"sha256 `([0-9a-f]{64})`", readme).group(1)
    msg = git.out("log", "-1", "--format=%B", trees["6.12"].commit)
    if f"Tarball-sha256: {expected_sha}" not in msg:
        pytest.skip("the installed linux-source-6.12 tarball is not the one the demo was written "
                    "against (see series/demo/README.md); its base-commit cannot match")
    assert base == trees["6.12"].commit
