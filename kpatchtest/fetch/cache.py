"""The series cache: ``cache_dir/series/<key>/`` holds one source as fetched.

An entry is b4's output dir (series.maildir, series.cover), the mails as sent (sent/)
and meta.json (b4's summary, the source, the format). The key is a readable prefix and
the hash of everything that shapes the result (CACHE_FORMAT included, so a new format
never reads an old entry). An entry is produced in a temp dir beside it and renamed
into place, replacing an older one; a failed fetch, or one the attestation policy
refuses, is never cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from kpatchtest.errors import FetchError
from kpatchtest.fetch import mail
from kpatchtest.fetch.mail import Fetched
from kpatchtest.util import sha256_text, utcnow, write_atomic
from kpatchtest.rundir import CacheDir

CACHE_FORMAT = 2             # 2: entries keep the mails as sent (sent/) for byte-faithful diffs


def root(cache_dir: Path) -> Path:
    return CacheDir(Path(cache_dir)).series


def key(kind: str, ident: str, version: int | None, attestation: str, keyring: Path | None) -> str:
    """Cache directory name: readable prefix + hash of everything that shapes the result.
    Attestation counts as on or off only: softfail and hardfail fetch the same thing."""
    att = "off" if attestation == "off" else "on"
    ring = str(keyring) if keyring and att == "on" else ""
    h = sha256_text(f"{CACHE_FORMAT}\0{kind}\0{ident}\0{version}\0{att}\0{ring}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ident)[:60] if kind == "msgid" else ident[:16]
    return f"{kind}-{slug}-v{version or 'latest'}-{h[:16]}"


def write_meta(outdir: Path, summary: dict, **source) -> None:
    """meta.json of an entry: b4's summary (b4.summary), what was fetched, the format."""
    meta = {"format": CACHE_FORMAT, "fetched_at": utcnow(), **summary, **source}
    write_atomic(outdir / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load(outdir: Path, what: str, with_msgids: bool = True,
         upstream: dict[str, str] | None = None) -> Fetched:
    """The patches of an entry (or of any dir laid out like one)."""
    meta = json.loads((outdir / "meta.json").read_text())
    return mail.parse_output(outdir, meta, what, with_msgids=with_msgids, upstream=upstream)


def fetch(cache_dir: Path, key: str, what: str, produce: Callable[[Path], object] | None, *,
          use_cache: bool, check: Callable[[Fetched], None]) -> Fetched:
    """Serve cache_dir/series/<key> if `use_cache` and it is there, else `produce` it into
    a temp dir and cache it. `check` (the attestation policy) runs on either, before a
    produced entry is cached. No `produce` (offline): a miss is a FetchError."""
    base = root(cache_dir)
    entry = base / key
    if use_cache:
        hit = _read(entry, what)
        if hit is not None:
            check(hit)
            return hit
    if produce is None:
        raise FetchError(f"{what}: not in the cache ({base}) and --offline forbids fetching it",
                         hint="run once without --offline to fetch and cache it")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:40]}-", dir=base))
    try:
        produce(tmp)
        fetched = load(tmp, what)
        check(fetched)
        _commit(tmp, entry)
        return fetched
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read(entry: Path, what: str) -> Fetched | None:
    if not (entry / "meta.json").is_file():
        return None
    try:
        return load(entry, what)
    except (ValueError, OSError, KeyError):
        return None         # unreadable entry: treat as a miss


def _commit(tmp: Path, entry: Path) -> None:
    """Move a complete temp dir into place atomically (replacing an older entry)."""
    old = None
    if entry.exists():
        old = entry.with_name(f".old-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(entry, old)
    try:
        os.rename(tmp, entry)
    except OSError:
        if old is not None and not entry.exists():
            os.rename(old, entry)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
