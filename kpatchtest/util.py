"""Small helpers more than one stage needs."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from kpatchtest.errors import InputError

# Write failures that are the user's environment, not our bug: a read-only or full --out.
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def user_path(p: str | os.PathLike) -> Path:
    """A path the user gave, absolute against the directory they ran from (`~` expanded).

    Resolved once, at the edge (CLI, spec, environment): git runs with ``-C <cache repo>``
    and b4 in its own cwd, so a relative path handed to either would land somewhere else."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def utcnow() -> str:
    """Now in UTC, ISO 8601 to the second ("2026-12-02T00:30:32+00:00"): the one clock
    of records and cache entries, so they sort and compare as text."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_text(data: str | bytes) -> str:
    """The hex sha256 of `data` (a str as UTF-8): the one spelling of a content key."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read 1 MiB at a time (a kernel tarball is 200 MB).
    OSError is the caller's to turn into a message that names the file's role."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def output_error(path: Path, e: OSError) -> InputError | None:
    """The one-line error for an OSError caused by where the user asked us to write."""
    # mkdir(exist_ok=True) says EEXIST when a parent on the way is a file, not a directory
    blocked = next((q for q in path.parents if q.exists() and not q.is_dir()), None) if e.errno == errno.EEXIST else None
    if e.errno not in _ENVIRONMENT_ERRNOS and blocked is None:
        return None
    why = f"{blocked} is a file, not a directory" if blocked is not None else e.strerror
    return InputError(f"cannot write {path}: {why}",
                      hint="free some space or choose a writable place (--out, --cache-dir); "
                           "what was there before is intact")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file beside it and a rename: readers see
    the old file or the new one, never half of one, and a failed write (a full disk)
    removes its temporary file instead of leaving it to keep the disk full."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 so the umask applies, as for any file the user creates (mkstemp: 0600)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        err = output_error(path, e)
        if err is None:
            raise
        raise err from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a copy where links cannot be made: another file system),
    put in place by a rename, so a reader sees the old file or the new one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def slug(name: str) -> str:
    """A ref- and file-safe name for a branch (branch names may hold anything)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "branch"
    return s[:80]


class StrictModel(BaseModel):
    """The base of every spec and result model: an unknown field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")
