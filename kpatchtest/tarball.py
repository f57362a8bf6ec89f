"""Import a kernel source tarball as a branch of the (bare) cache repo.

The tarball is streamed (decompressor subprocess -> ``tarfile`` in stream mode ->
``git fast-import``): nothing is extracted to disk and nothing goes through an
index, so ``.gitignore`` files inside the tarball (Debian's top-level ``/*``) play
no part. The single top-level directory is stripped; file modes (executable bit),
symlinks and hard links are kept. The result is one root commit with a fixed
identity, dated with the newest mtime in the tarball, whose message records the
tarball's sha256: the same tarball always gives the same commit id.

Cache: ``<git-dir>/kpatchtest-imports.json`` remembers, per tarball path and
name, the file's stat key (size, mtime, ctime, inode), its sha256 and the commit.
A call whose stat key matches and whose ref still points at that commit returns
without reading the tarball (a few ms). If the stat key changed, the tarball is
hashed (0.1 to 0.4 s for 140 MB) and an import ref whose commit message records
the same sha256 is reused; only a tarball with new content is imported again.
Imports into one repo are serialised with an exclusive ``flock`` on
``<git-dir>/kpatchtest-import.lock``; the ref is written only after
``git fast-import`` succeeded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from kpatchtest.errors import GitError, InputError
from kpatchtest.gitutil import Git
from kpatchtest.locks import exclusive
from kpatchtest.util import sha256_file, write_atomic

IMPORT_PREFIX = "refs/kpatchtest/imports/"
_TMP_PREFIX = "refs/kpatchtest/tmp/import-"
_RECORDS = "kpatchtest-imports.json"
_LOCK = "kpatchtest-import.lock"
_IDENT = "kpatchtest <kpatchtest@localhost>"

_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz",
             ".tar.zst", ".tzst")

# magic bytes -> (format, external decompressor candidates, tarfile stream mode fallback)
_FORMATS: tuple[tuple[bytes, str, tuple[tuple[str, ...], ...], str | None], ...] = (
    (b"\xfd7zXZ\x00", "xz", (("xz", "-T0", "-dc"),), "r|xz"),
    (b"\x1f\x8b", "gzip", (("pigz", "-dc"), ("gzip", "-dc")), "r|gz"),
    (b"BZh", "bzip2", (("lbzip2", "-dc"), ("pbzip2", "-dc"), ("bzip2", "-dc")), "r|bz2"),
    (b"\x28\xb5\x2f\xfd", "zstd", (("zstd", "-dc", "-q"),), None),
)

# fast-import dominates an import (xz -T0 needs ~4 s of the 6.1 tree's ~25 s). Measured
# on the 6.1 tree (2 cores): zlib level 1 instead of the default: 28 s instead of 39 s
# for 291 MB instead of 245 MB of pack; --depth=0 skips the delta search against the
# previous, unrelated blob, which cost 17 s and saved nothing.
_PIPE_SIZE = 8 << 20
_FAST_IMPORT = ("-c", "pack.compression=1", "fast-import", "--quiet", "--done",
                "--date-format=raw", "--depth=0")


@dataclass(frozen=True)
class ImportedTree:
    ref: str          # e.g. "refs/kpatchtest/imports/6.1.192"
    commit: str
    version: str      # VERSION.PATCHLEVEL.SUBLEVEL + EXTRAVERSION from the top Makefile
    tarball: Path


def is_tarball(path: str) -> bool:
    """True if the name looks like a (possibly compressed) tar archive."""
    return str(path).lower().endswith(_SUFFIXES)


def import_tarball(git: Git, tarball: Path, name: str | None = None) -> ImportedTree:
    """Import ``tarball`` as ``refs/kpatchtest/imports/<name>`` (default name: the
    kernel version) and return what was imported. Cheap when already imported."""
    path = Path(tarball).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"kernel tarball {path} does not exist",
                         hint="check the path in the spec, e.g. /usr/src/linux-source-6.1.tar.xz") from None
    except OSError as e:
        raise InputError(f"cannot read kernel tarball {path}: {e.strerror}") from None
    if not path.is_file():
        raise InputError(f"kernel tarball {path} is not a regular file",
                         hint="give the path of a .tar, .tar.gz, .tar.xz, .tar.bz2 or .tar.zst file")
    path = path.resolve()
    gitdir = _git_dir(git)
    key = _stat_key(st)

    hit = _cached(git, gitdir, path, name, key)     # one `git rev-parse`, a few ms
    if hit:
        return hit
    if name is not None:
        _check_name(git, name, path)
    with exclusive(gitdir / _LOCK):
        hit = _cached(git, gitdir, path, name, key)      # another run may have just done it
        if hit:
            return hit
        sha = _sha256(path)
        tree = _reuse(git, path, name, sha)
        if tree is None:
            tree = _import(git, gitdir, path, name, sha)
        _save_record(gitdir, path, name, key, sha, tree)
        return tree


# ---------------------------------------------------------------- cache

def _git_dir(git: Git) -> Path:
    repo = Path(git.repo)
    if (repo / "HEAD").is_file() and (repo / "objects").is_dir() and (repo / "refs").is_dir():
        return repo.resolve()                       # a bare repo (the cache): no subprocess
    try:
        p = git.run("rev-parse", "--git-common-dir", check=False)
    except FileNotFoundError:
        raise InputError("git is not installed", hint="apt-get install git") from None
    if p.returncode != 0:
        raise GitError(f"{git.repo} is not a git repository",
                       hint="create the cache repo with `git init --bare`")
    d = Path(p.stdout.strip())
    return d if d.is_absolute() else (Path(git.repo) / d).resolve()


def _check_name(git: Git, name: str, path: Path) -> None:
    if not name or not git.ok("check-ref-format", IMPORT_PREFIX + name):
        raise InputError(f"cannot import {path}: invalid branch name {name!r}",
                         hint="use a git ref name such as 6.1.192 or debian-6.1")


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _record_id(path: Path, name: str | None) -> str:
    return f"{path}\0{name or ''}"


def _load_records(gitdir: Path) -> dict:
    try:
        data = json.loads((gitdir / _RECORDS).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_record(gitdir: Path, path: Path, name: str | None, key: list[int], sha: str,
                 tree: ImportedTree) -> None:
    records = _load_records(gitdir)
    records[_record_id(path, name)] = {
        "stat": key, "sha256": sha, "ref": tree.ref, "commit": tree.commit, "version": tree.version,
    }
    write_atomic(gitdir / _RECORDS, json.dumps(records, indent=1, sort_keys=True))


def _cached(git: Git, gitdir: Path, path: Path, name: str | None, key: list[int]) -> ImportedTree | None:
    rec = _load_records(gitdir).get(_record_id(path, name))
    if not rec or rec.get("stat") != key:
        return None
    ref, commit = rec.get("ref"), rec.get("commit")
    if not ref or not commit or git.rev_parse(ref) != commit:
        return None
    return ImportedTree(ref=ref, commit=commit, version=rec["version"], tarball=path)


_FIELD_RE = re.compile(r"^(Tarball-sha256|Kernel-version|Stripped-directory): (.*\S)$", re.M)


def _reuse(git: Git, path: Path, name: str | None, sha: str) -> ImportedTree | None:
    """If any import ref holds this tarball content (perhaps under another name or
    from a file of another name), make the commit a full import would make, from its
    tree and date, without reading the tarball again."""
    out = git.out("for-each-ref", "--format=%(objectname) %(tree) %(committerdate:raw)%00%(contents)%00%00",
                  IMPORT_PREFIX)
    for chunk in out.split("\0\0"):
        head, _, msg = chunk.strip("\n").partition("\0")
        fields = dict(_FIELD_RE.findall(msg))
        if fields.get("Tarball-sha256") != sha or "Kernel-version" not in fields:
            continue
        try:
            commit, tree, when = head.split(" ", 2)
        except ValueError:
            continue
        version = fields["Kernel-version"]
        ref = IMPORT_PREFIX + (name if name is not None else version)
        msg = _message(path, version, fields.get("Stripped-directory", ""), sha)
        env = {"GIT_AUTHOR_DATE": "@" + when, "GIT_COMMITTER_DATE": "@" + when}
        new = git.out("commit-tree", tree, input=msg, env=env)
        git.run("update-ref", "-m", f"kpatchtest: import {path.name}", ref, new)
        return ImportedTree(ref=ref, commit=new, version=version, tarball=path)
    return None


def _message(path: Path, version: str, stripped: str, sha: str) -> str:
    """The commit message of an import: a pure function of name, content and version."""
    return (f"Import {path.name} (Linux {version})\n\n"
            f"Imported by kpatchtest from a kernel source tarball.\n\n"
            f"Tarball: {path.name}\n"
            f"Tarball-sha256: {sha}\n"
            f"Kernel-version: {version}\n"
            + (f"Stripped-directory: {stripped}\n" if stripped else ""))


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise InputError(f"cannot read kernel tarball {path}: {e.strerror}",
                         hint="check the file's permissions") from None


# ---------------------------------------------------------------- import

def _grow_pipe(f: IO[bytes] | None) -> None:
    """Bigger pipe buffers let decompressor, parser and fast-import overlap instead of
    taking turns (the 64 KiB default keeps them in lock step)."""
    if f is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    for size in (_PIPE_SIZE, 1 << 20):
        try:
            fcntl.fcntl(f.fileno(), fcntl.F_SETPIPE_SZ, size)
            return
        except OSError:
            continue


class _CorruptTarball(Exception):
    pass


class _HashingReader:
    """File wrapper that hashes what is read (for the in-process decompressors)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


class _Decompressed:
    """A readable tar stream for ``path``: an external decompressor fed by a thread
    that also hashes the compressed bytes, or an in-process tarfile stream mode."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(6)
        self.format, cmds, self.mode = "tar", (), "r|"
        for m, fmt, candidates, mode in _FORMATS:
            if magic.startswith(m):
                self.format, cmds, self.mode = fmt, candidates, mode
                break
        self.cmd = next((c for c in cmds if shutil.which(c[0])), None)
        if self.format != "tar" and self.cmd is None and self.mode is None:
            raise InputError(f"cannot read {path}: no {self.format} decompressor installed",
                             hint=f"install {self.format} (apt-get install {self.format})")
        self.proc: subprocess.Popen | None = None
        self.feeder: threading.Thread | None = None
        self.feed_error: BaseException | None = None
        self.hash = hashlib.sha256()
        self.file: IO[bytes] | None = None
        self.errfile: IO[bytes] | None = None

    def open(self) -> tuple[IO[bytes], str]:
        """Return (stream, tarfile mode)."""
        if self.cmd is None:
            self.file = open(self.path, "rb")
            self.reader = _HashingReader(self.file)
            return self.reader, self.mode or "r|"
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(list(self.cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errfile, bufsize=0)
        _grow_pipe(self.proc.stdout)
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()
        return self.proc.stdout, "r|"

    def _feed(self) -> None:
        assert self.proc and self.proc.stdin
        try:
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.hash.update(chunk)
                    self.proc.stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.feed_error = e
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def finish(self) -> str:
        """Drain, check the decompressor's exit status; return the sha256 of the input."""
        if self.proc is None:
            assert self.file
            while self.reader.read(1 << 20):        # the tail after the end-of-archive blocks
                pass
            self.file.close()
            return self.reader.h.hexdigest()
        assert self.proc.stdout
        while self.proc.stdout.read(1 << 20):
            pass
        rc = self.proc.wait()
        if self.feeder:
            self.feeder.join()
        if self.feed_error:
            raise self.feed_error
        if rc != 0:
            raise _CorruptTarball(self._stderr() or f"{self.cmd[0]} exited with status {rc}")
        return self.hash.hexdigest()

    def _stderr(self) -> str:
        if not self.errfile:
            return ""
        self.errfile.seek(0)
        lines = self.errfile.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def abort(self) -> str:
        """Stop everything; return the decompressor's complaint, if any."""
        msg = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.feeder:
                self.feeder.join()
            if self.proc.stdout:
                self.proc.stdout.close()
            if self.proc.returncode not in (0, -9):
                msg = self._stderr()
        if self.file:
            self.file.close()
        return msg

    def close(self) -> None:
        if self.errfile:
            self.errfile.close()


def _fi_path(p: bytes) -> bytes:
    if b"\n" in p or p.startswith(b'"'):
        return b'"' + p.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"'
    return p


def _norm(name: str) -> str:
    parts = [c for c in name.split("/") if c not in ("", ".")]
    if any(c == ".." for c in parts):
        raise _CorruptTarball(f"unsafe member path {name!r}")
    return "/".join(parts)


_MK_RE = re.compile(rb"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)[ \t]*=[ \t]*(.*?)[ \t]*$", re.M)


def _kernel_version(makefile: bytes) -> str | None:
    fields: dict[bytes, bytes] = {}
    for k, v in _MK_RE.findall(makefile[:8192]):
        fields.setdefault(k, v)
    v, p = fields.get(b"VERSION", b""), fields.get(b"PATCHLEVEL", b"")
    s, e = fields.get(b"SUBLEVEL", b""), fields.get(b"EXTRAVERSION", b"")
    if not (v.isdigit() and p.isdigit()) or (s and not s.isdigit()):
        return None
    version = v.decode() + "." + p.decode() + (("." + s.decode()) if s else "") + e.decode(errors="replace")
    return version if re.fullmatch(r"[0-9A-Za-z._+~-]+", version) else None


class _Stream:
    """Members of the tar stream turned into fast-import blobs with marks."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.entries: dict[str, tuple[bytes, int]] = {}   # path -> (mode, mark)
        self.dirs: set[str] = set()
        self.makefiles: dict[str, bytes] = {}             # "Makefile" or "<top>/Makefile"
        self.mark = 0
        self.pending = 0                                  # bytes still owed to the open blob
        self.newest = 0
        self.members = 0

    def blob(self, data_len: int, chunks: Iterator[bytes]) -> int:
        self.mark += 1
        self.out.write(b"blob\nmark :%d\ndata %d\n" % (self.mark, data_len))
        self.pending = data_len
        for c in chunks:
            if len(c) > self.pending:
                raise _CorruptTarball("member longer than its header says")
            self.out.write(c)
            self.pending -= len(c)
        if self.pending:
            raise _CorruptTarball("unexpected end of data")
        self.out.write(b"\n")
        return self.mark

    def finish_partial_blob(self) -> None:
        """After a failure inside a blob: pad it to its announced length, so that
        fast-import can end cleanly (the blob is garbage nothing refers to)."""
        zeros = bytes(min(self.pending, 1 << 20))
        while self.pending > 0:
            n = min(self.pending, len(zeros))
            self.out.write(zeros[:n])
            self.pending -= n
        self.out.write(b"\n")

    def feed(self, tf: tarfile.TarFile) -> None:
        for m in tf:
            self.members += 1
            self.newest = max(self.newest, int(m.mtime or 0))
            path = _norm(m.name)
            if not path or ".git" in path.lower().split("/"):
                continue    # a tarred checkout's .git is not source (and git refuses to check it out)
            if m.isdir():
                self.dirs.add(path)
                continue
            if m.isreg():
                mode = b"100755" if m.mode & 0o111 else b"100644"
                f = tf.extractfile(m)
                assert f is not None
                keep = path.count("/") <= 1 and path.rsplit("/", 1)[-1] == "Makefile"
                kept: list[bytes] = []

                def chunks() -> Iterator[bytes]:
                    left = m.size
                    while left > 0:
                        c = f.read(min(left, 1 << 20))
                        if not c:
                            return
                        left -= len(c)
                        if keep:
                            kept.append(c)
                        yield c
                mark = self.blob(m.size, chunks())
                if keep:
                    self.makefiles[path] = b"".join(kept)
            elif m.issym():
                target = m.linkname.encode("utf-8", "surrogateescape")
                mode, mark = b"120000", self.blob(len(target), iter((target,)))
            elif m.islnk():
                target = self.entries.get(_norm(m.linkname))
                if target is None:
                    raise _CorruptTarball(f"hard link {m.name!r} to missing member {m.linkname!r}")
                mode, mark = target
            else:
                continue        # devices, fifos: not source
            self.entries[path] = (mode, mark)

    def layout(self) -> tuple[str, dict[str, tuple[bytes, int]]]:
        """Strip a single top-level directory: (prefix stripped, entries by final path)."""
        tops = {p.split("/", 1)[0] for p in self.entries} | {d.split("/", 1)[0] for d in self.dirs}
        if len(tops) == 1:
            top = next(iter(tops))
            if top not in self.entries:
                n = len(top) + 1
                return top + "/", {p[n:]: v for p, v in self.entries.items()}
        return "", dict(self.entries)


def _import(git: Git, gitdir: Path, path: Path, name: str | None, sha: str) -> ImportedTree:
    # Under the import lock: temporary refs left by a killed run are stale.
    for stale in git.out("for-each-ref", "--format=%(refname)", _TMP_PREFIX.rsplit("/", 1)[0]).split():
        git.run("update-ref", "-d", stale, check=False)
    tmp_ref = f"{_TMP_PREFIX}{os.getpid()}"
    src = _Decompressed(path)
    fi_err = tempfile.TemporaryFile()
    # raw Popen: GitPython's as_process always pipes stderr (fast-import's goes to a file so a long
    # failure report cannot block the stream) and kills the process when its wrapper is garbage-collected
    fi = subprocess.Popen(["git", "-C", str(git.repo), *_FAST_IMPORT], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, stderr=fi_err, env=git._env(None))
    assert fi.stdin
    _grow_pipe(fi.stdin)
    out = open(fi.stdin.fileno(), "wb", buffering=1 << 20, closefd=False)
    stream = _Stream(out)
    failure: BaseException | None = None
    version = ""
    try:
        version = _stream_commit(git, path, name, sha, src, stream, tmp_ref)
    except BaseException as e:  # noqa: BLE001 - re-raised below, after fast-import is done
        failure = e
        src.abort()
    finally:
        src.close()
        try:
            # A clean end also on failure: fast-import keeps the blobs already sent
            # (unreferenced; `git gc` prunes them) instead of dying with a crash report.
            if failure is not None and stream.pending:
                stream.finish_partial_blob()
            out.write(b"done\n")
            out.flush()
        except OSError:
            pass
        out.close()
        try:
            fi.stdin.close()
        except OSError:
            pass
        rc = fi.wait()
        fi_err.seek(0)
        err = fi_err.read().decode(errors="replace").strip().splitlines()
        fi_err.close()
    if failure is not None and not isinstance(failure, BrokenPipeError):
        git.run("update-ref", "-d", tmp_ref, check=False)
        raise failure
    if rc != 0 or failure is not None:
        git.run("update-ref", "-d", tmp_ref, check=False)
        raise GitError(f"git fast-import failed in {git.repo} while importing {path}: "
                       f"{err[-1] if err else 'exit ' + str(rc)}")
    commit = git.rev_parse(tmp_ref)
    if not commit:
        raise GitError(f"git fast-import did not create {tmp_ref} in {git.repo}")
    ref = IMPORT_PREFIX + (name if name is not None else version)
    git.run("update-ref", "-m", f"kpatchtest: import {path.name}", ref, commit)
    git.run("update-ref", "-d", tmp_ref, check=False)
    return ImportedTree(ref=ref, commit=commit, version=version, tarball=path)


def _stream_commit(git: Git, path: Path, name: str | None, sha: str, src: _Decompressed,
                   stream: _Stream, tmp_ref: str) -> str:
    """Send every member as a blob, then the commit; return the kernel version."""
    try:
        fileobj, mode = src.open()
        try:
            with tarfile.open(fileobj=fileobj, mode=mode, bufsize=1 << 16) as tf:
                stream.feed(tf)
        except BrokenPipeError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error,
                _CorruptTarball) as e:
            complaint = src.abort()
            raise _CorruptTarball(complaint or str(e) or type(e).__name__) from e
        got = src.finish()
    except _CorruptTarball as e:
        if stream.members:
            what = f"corrupt or truncated tarball ({e})"
        elif src.format == "tar":
            what = "not a tar archive (neither xz, gzip, bzip2 nor zstd compressed, and no tar header)"
        else:
            what = f"not a {src.format} compressed tar archive ({e})"
        raise InputError(f"cannot import {path}: {what}",
                         hint="re-download it, or give a .tar/.tar.gz/.tar.xz/.tar.bz2/.tar.zst "
                              "kernel source tarball") from None
    if got != sha:
        raise InputError(f"cannot import {path}: the file changed while it was being imported",
                         hint="run again once the download or copy has finished")
    prefix, entries = stream.layout()
    version = _kernel_version(stream.makefiles.get(prefix + "Makefile", b""))
    if version is None:
        raise InputError(f"cannot import {path}: no kernel Makefile (VERSION, PATCHLEVEL, SUBLEVEL) "
                         f"at the top of the archive",
                         hint="give a Linux kernel source tarball such as /usr/src/linux-source-6.1.tar.xz")
    if name is None:
        _check_name(git, version, path)
    msg = _message(path, version, prefix, sha).encode()
    when = b"%d +0000" % stream.newest
    out = stream.out
    out.write(b"commit %s\nauthor %s %s\ncommitter %s %s\ndata %d\n%s\n"
              % (tmp_ref.encode(), _IDENT.encode(), when, _IDENT.encode(), when, len(msg), msg))
    for p in sorted(entries):
        mode, mark = entries[p]
        out.write(b"M %s :%d %s\n" % (mode, mark, _fi_path(p.encode("utf-8", "surrogateescape"))))
    out.write(b"\n")
    return version
