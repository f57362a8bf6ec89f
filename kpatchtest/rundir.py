"""The two directories a run writes: the run directory (--out) and the cache (--cache-dir).

Every path inside them is spelled here, once, so a reader (and a resumed run) finds
each unit's files in one place:

    <out>/results.json                 the record, rewritten atomically after every unit
    <out>/series.mbox                  the series as applied
    <out>/run.log                      library logging (ssh, fabric)
    <out>/state/steps/<stage>/<key>.json   a finished unit's record, keyed by its inputs
    <out>/state/scratch/               private index files
    <out>/artifacts/<branch>/<label>/  built kernels (links into the cache)
    <out>/boot/<branch>/<build>-r<N>/<host>/       console, dmesg
    <out>/workloads/<branch>/<build>-r<N>/<host>/  workload logs
    <out>/lab/                         the local lab's VM files
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kpatchtest.errors import InputError
from kpatchtest.util import output_error, slug, write_atomic


class _RunLog(logging.FileHandler):
    """run.log is best effort: a full disk must not print logging's own tracebacks."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def input_key(*parts: object) -> str:
    """A step cache key: the hash of everything a unit's record depends on."""
    h = hashlib.sha256()
    for p in parts:
        h.update((p if isinstance(p, bytes) else str(p).encode("utf-8", "surrogateescape")) + b"\0")
    return h.hexdigest()[:24]


class RunDir:
    """--out: one run at a time (flock), the path scheme above, and the step cache."""

    def __init__(self, path: Path):
        self.path = path
        self.results = path / "results.json"
        self.state = path / "state"
        self.steps = self.state / "steps"
        self.scratch = self.state / "scratch"
        self.lab = path / "lab"
        self._lock = None
        self._log_handler: logging.Handler | None = None

    # -- the path scheme (relative paths are what results.json records) -----------------
    @staticmethod
    def artifacts(branch: str, label: str) -> str:
        return f"artifacts/{slug(branch)}/{label}"

    @staticmethod
    def boot(branch: str, build: str, round_: int, host: str) -> str:
        return f"boot/{slug(branch)}/{build}-r{round_}/{slug(host)}"

    @staticmethod
    def workloads(branch: str, build: str, round_: int, host: str) -> str:
        return f"workloads/{slug(branch)}/{build}-r{round_}/{slug(host)}"


    @property
    def ref_prefix(self) -> str:
        """Private refs of this run in the cache repo (patched heads), never the user's."""
        return "refs/kpatchtest/runs/" + hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]

    # -- lifetime ----------------------------------------------------------------------
    def __enter__(self) -> "RunDir":
        try:
            self.scratch.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".kpatchtest.lock", "a")
        except OSError as e:
            raise (output_error(self.path, e) or e) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{self.path}: another kpatchtest run is using this output directory",
                             hint="wait for it, or pass a different --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._log_handler:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        if self._lock:
            self._lock.close()

    def capture_library_logs(self) -> None:
        """Send Python logging (paramiko's banner timeouts while a host boots, fabric,
        kpatchtest's own records) to run.log here instead of the terminal."""
        handler = _RunLog(self.path / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        self._log_handler = handler

    # -- the step cache ------------------------------------------------------------------
    def _step(self, stage: str, key: str) -> Path:
        return self.steps / stage / f"{key}.json"

    def cached(self, stage: str, key: str) -> dict | None:
        """A finished unit's record; a torn or unreadable one counts as not finished."""
        try:
            data = json.loads(self._step(stage, key).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def store(self, stage: str, key: str, data: str) -> None:
        write_atomic(self._step(stage, key), data)


@dataclass(frozen=True)
class CacheDir:
    """--cache-dir: what outlives a run, shared by runs (each part locks what it writes).

        repos/            bare kernel repositories and tarball imports (kernelrepo)
        series/  b4/      fetched series by content; b4's own dirs (fetch)
        build/            worktrees and object dirs per repo and branch (build)
        artifacts/        built kernels by tree+config+toolchain; configs/ merged configs
        ccache/           the compiler cache
        kvm-unit-tests/   sources and builds per commit, arch and compiler (workloads)
        lab/              the local lab's image, keys and known-good kernels
        lab-state/        host locks and quarantine of real lab hosts
    """

    path: Path

    repos = property(lambda self: self.path / "repos")
    series = property(lambda self: self.path / "series")
    b4 = property(lambda self: self.path / "b4")
    build = property(lambda self: self.path / "build")
    artifacts = property(lambda self: self.path / "artifacts")
    configs = property(lambda self: self.path / "configs")
    ccache = property(lambda self: self.path / "ccache")
    kvm_unit_tests = property(lambda self: self.path / "kvm-unit-tests")
    lab = property(lambda self: self.path / "lab")
    lab_state = property(lambda self: self.path / "lab-state")
