"""KCIDB v5 JSON of a run (`kpatchtest report RESULTS --kcidb FILE`), checked with
kcidb-io's own schema before it is written, so what a KCIDB submitter sends is valid.

A pure function of a RunResult, like every report. The mapping (docs/results-schema.md,
"KCIDB") follows KCIDB's model, where a checkout is a base commit plus a patchset:

  checkouts  two per branch: `baseline` (the branch commit, empty patchset) and `patched`
             (the series as patchset: patchset_hash over each patch's sha256, the thread's
             message_id, `valid` from the apply verdict); a build of the branch alone is
             not a build of the series, so it gets a checkout of its own.
  builds     one per checkout (the BuildResult of that build), status PASS/FAIL/SKIP.
  tests      one per boot (path `boot`), per workload record (`kvm-unit-tests.<test>`,
             `smm-boot`), per metric of a record (`<record>.<metric>`, status DONE, the
             median over repetitions as `number`), and a MISS for a boot whose workloads
             could not run at all.

Ids are `<origin>:<run id>:<branch>:<build>[:<host>:r<round>[.<rerun>]:<path>]`: a
re-render of the same results.json gives the same ids (results without a run id, schema
< 7, get one derived from their name and start time). URLs of logs, configs and kernels
are the results' run-directory paths under a public base URL (`--log-url-base`); without
one there are none, never a local path dressed up as a URL. What KCIDB has no field for
(hosts, rounds, splats, per-repetition values, non-https repositories, tarballs) goes to
`misc`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import uuid
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

import jsonschema
from kcidb_io.schema import V5_3

from kpatchtest.errors import EXIT_INTERNAL, InputError, KpatchtestError
from kpatchtest.results import BootResult, BranchResult, BuildResult, RunResult, WorkloadRun
from kpatchtest.urls import is_web_url
from kpatchtest.workloads.record import Metric, WorkloadRecord

SCHEMA = V5_3                       # the version written (and validated against)
DEFAULT_ORIGIN = "kpatchtest"
EXCERPT_MAX = 16384                 # KCIDB's log_excerpt limit

_ORIGIN_RE = re.compile(r"^[a-z0-9_]+$")
_SEGMENT_RE = re.compile(r"[^A-Za-z0-9_-]+")
_VALID_VERDICTS = {"clean", "three-way", "already-applied"}   # the series' code could be combined
_BUILD_STATUS = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}
_BOOT_STATUS = {"booted": "PASS", "boot-failed": "FAIL", "skipped": "SKIP"}
# timeout: stopped by the time limit, so the tested code's status is unknown, as for error
_RECORD_STATUS = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "error": "ERROR", "timeout": "ERROR"}


class KcidbInvalid(KpatchtestError):
    """The rendered KCIDB data does not validate: a bug in this module, not the user's input."""

    exit_code = EXIT_INTERNAL


def check_origin(origin: str) -> str:
    if not _ORIGIN_RE.match(origin):
        raise InputError(f"--kcidb-origin {origin!r}: a KCIDB origin is lowercase letters, digits and _ only",
                         hint=f"e.g. --kcidb-origin {DEFAULT_ORIGIN}")
    return origin


def _conforms(value: str, fmt: str) -> bool:
    """Does `value` pass the schema's format check (the validator kcidb-io uses)?"""
    return jsonschema.Draft7Validator.FORMAT_CHECKER.conforms(value, fmt)


def check_log_url_base(url: str) -> str:
    """--log-url-base: an http(s) URL without query or fragment, since run-directory paths are appended to it."""
    parts = urlsplit(url) if is_web_url(url) else None
    if not parts or not parts.netloc or parts.query or parts.fragment or not _conforms(url, "uri"):
        raise InputError(f"--log-url-base {url!r}: not an http(s) URL (ASCII, percent-encoded, no query) to append run-directory paths to",
                         hint="give the public URL of the run directory, e.g. https://ci.example.org/job/42/artifact/out/demo")
    return url.rstrip("/")


def validate(data: dict) -> dict:
    """kcidb-io's v5 validation; a failure is ours (KcidbInvalid, exit 3) with where and why."""
    try:
        return SCHEMA.validate(data)
    except jsonschema.exceptions.ValidationError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
        raise KcidbInvalid(f"KCIDB output does not validate against kcidb-io's schema v{SCHEMA.major}.{SCHEMA.minor} "
                           f"at {where or 'top level'}: {e.message[:200]}",
                           hint="a bug in kpatchtest, please report it") from None


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def render(result: RunResult, origin: str = DEFAULT_ORIGIN, log_url_base: str | None = None) -> dict:
    """The run as validated KCIDB v5 data; log_url_base overrides the one the run recorded."""
    return _Renderer(result, check_origin(origin), log_url_base or result.log_url_base).data()


def run_id(result: RunResult) -> str:
    """The record's run id; a file from before schema 7 has none: one derived from what names the run."""
    return result.run_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"kpatchtest:{result.name}:{result.started}"))


def patchset_hash(sha256s: list[str]) -> str:
    """KCIDB's: sha256 over each patch's sha256, newline-terminated, in order ('' for no patches)."""
    return hashlib.sha256("".join(h + "\n" for h in sha256s).encode()).hexdigest() if sha256s else ""


def _segment(text: str) -> str:
    return _SEGMENT_RE.sub("_", text).strip("_") or "_"


def _clean(text: str | None) -> str:
    """KCIDB strings outside misc hold no NUL."""
    return (text or "").replace("\0", "")


def _median(values: list[float | None]) -> tuple[float | None, list[float | None]]:
    measured = [v if v is not None and math.isfinite(v) else None for v in values]
    present = [v for v in measured if v is not None]
    return (statistics.median(present) if present else None), measured


class _Renderer:
    def __init__(self, result: RunResult, origin: str, base: str | None):
        self.r = result
        self.origin = origin
        self.base = check_log_url_base(base) if base else None
        self.run = run_id(result)
        self.checkouts: list[dict] = []
        self.builds: list[dict] = []
        self.tests: list[dict] = []
        self._test_ids: set[str] = set()

    # -- ids and URLs ---------------------------------------------------------------------
    def _id(self, *parts: str) -> str:
        return ":".join((self.origin, self.run) + parts)

    def _url(self, rel: str | None) -> str | None:
        """A run-directory path under the public base; none for a path that leaves the run directory."""
        p = PurePosixPath(rel or "")
        if not self.base or not rel or p.is_absolute() or ".." in p.parts:
            return None
        return f"{self.base}/{quote(str(p), safe='/')}"

    def _files(self, rels: list[str]) -> list[dict]:
        """KCIDB resources, named by their file names (what a download is saved as)."""
        return [{"name": _clean(PurePosixPath(rel).name) or "file", "url": url}
                for rel in rels if (url := self._url(rel))]

    # -- the three lists ------------------------------------------------------------------
    def data(self) -> dict:
        for b in self.r.branches:
            self._branch(b)
        data = {"version": {"major": SCHEMA.major, "minor": SCHEMA.minor},
                "checkouts": self.checkouts, "builds": self.builds, "tests": self.tests}
        return validate(data)

    def _branch(self, b: BranchResult) -> None:
        for kind in ("baseline", "patched"):
            cid = self._id(b.name, kind)
            self.checkouts.append(self._checkout(b, kind, cid))
            build = getattr(b.build, kind) if b.build else None
            if build is not None:
                self.builds.append(self._build(b, kind, build, cid))
        for boot in b.boot:
            self._boot(b, boot)
        for run in b.workloads:
            self._workloads(b, run)

    def _checkout(self, b: BranchResult, kind: str, cid: str) -> dict:
        c: dict[str, Any] = {"id": cid, "origin": self.origin, "tree_name": _clean(b.name)}
        misc: dict[str, Any] = {"build": kind}
        src = b.source
        if src and src.kind == "git":
            if src.url.startswith("https://") and _conforms(src.url, "uri"):
                c["git_repository_url"] = src.url
            else:
                misc["repository_url"] = src.url     # KCIDB takes https:// repositories only
            if src.ref:
                c["git_repository_branch"] = _clean(src.ref)
        elif src:
            misc["tarball_url"] = src.url            # no git repository: the code is a tarball import
        commit = b.apply.branch_commit if b.apply else b.commit
        if commit:
            if src and src.kind == "git" and re.fullmatch(r"[0-9a-f]{40}", commit):
                c["git_commit_hash"] = commit
            else:
                misc["commit"] = commit               # a tarball's import commit exists only in our cache
        if _conforms(self.r.started, "date-time"):
            c["start_time"] = self.r.started
        if kind == "baseline":
            c["patchset_hash"] = ""
            c["comment"] = _clean(f"{b.name} without the series")
            c["valid"] = bool(commit)
        else:
            self._patchset(b, c, misc)
        if b.error:
            c["comment"] = _clean(f"{b.name}: {b.error}")
        c["misc"] = misc
        return c

    def _patchset(self, b: BranchResult, c: dict, misc: dict) -> None:
        series = self.r.series
        patches = series.patches if series else []
        if patches and all(p.sha256 for p in patches):
            c["patchset_hash"] = patchset_hash([p.sha256 for p in patches])  # type: ignore[misc]
        msgid = (series.msgid if series else None) or next((p.msgid for p in patches if p.msgid), None)
        if msgid and _conforms(msgid, "email"):
            c["message_id"] = msgid
        if series:
            c["comment"] = _clean(series.title)
        applied = {p.index: p for p in b.apply.patches} if b.apply else {}
        misc["patches"] = [{"index": p.index, "subject": p.subject, "msgid": p.msgid, "sha256": p.sha256,
                            "status": applied[p.index].status if p.index in applied else None} for p in patches]
        if b.apply:
            c["valid"] = b.apply.verdict in _VALID_VERDICTS
            misc["verdict"] = b.apply.verdict
            if b.apply.patched_commit:
                misc["patched_commit"] = b.apply.patched_commit
        elif b.error:
            c["valid"] = False

    def _build(self, b: BranchResult, kind: str, res: BuildResult, cid: str) -> dict:
        out: dict[str, Any] = {"id": cid, "checkout_id": cid, "origin": self.origin,
                               "status": _BUILD_STATUS[res.status], "duration": res.duration_s,
                               "comment": _clean(f"{b.name} {kind}" + (f": {res.reason}" if res.reason else ""))}
        if res.arch:
            out["architecture"] = res.arch
        if res.compiler:
            out["compiler"] = _clean(res.compiler)
        if res.config_hash:
            out["config_name"] = res.config_hash     # the same options give the same name
        arts = dict(res.artifacts)
        if url := self._url(arts.pop("config", None)):
            out["config_url"] = url
        if url := self._url(arts.pop("build.log", None)):
            out["log_url"] = url
        if files := self._files(list(arts.values())):
            out["output_files"] = files
        if res.error_excerpt:
            out["log_excerpt"] = _clean(res.error_excerpt)[-EXCERPT_MAX:]
        out["misc"] = {"commit": res.commit, "tree": res.tree, "kernelrelease": res.kernelrelease,
                       "config_hash": res.config_hash, "reused": res.reused,
                       "objects_compiled": res.objects_compiled, "cache_hit_rate": res.cache_hit_rate,
                       "warnings_total": res.warnings_total, "warnings_new": res.warnings_new,
                       "config_missing": res.config_missing, "config_errors": res.config_errors}
        return out

    def _test(self, b: BranchResult, build: str, host: str | None, round_: int, rerun: int, path: str,
              status: str, misc: dict, **fields: Any) -> dict:
        where = f"{_clean(host or 'no-host')}:r{round_}" + (f".{rerun}" if rerun else "")
        tid = base_id = self._id(b.name, build, where, path)
        n = 1
        while tid in self._test_ids:          # two records of one name on one boot: keep both
            n += 1
            tid = f"{base_id}#{n}"
        self._test_ids.add(tid)
        t: dict[str, Any] = {"id": tid, "build_id": self._id(b.name, build), "origin": self.origin,
                             "path": path, "status": status}
        if host:
            t["environment"] = {"comment": _clean(f"lab host {host}"), "misc": {"host": host}}
        t.update({k: v for k, v in fields.items() if v not in (None, "", [])})
        t["misc"] = {"host": host, "round": round_, "rerun": rerun, **misc}
        self.tests.append(t)
        return t

    def _boot(self, b: BranchResult, boot: BootResult) -> None:
        self._test(b, boot.build, boot.host, boot.round, boot.rerun, "boot", _BOOT_STATUS[boot.status],
                   {"method": boot.method, "kernelrelease": boot.kernelrelease,
                    "expected_release": boot.expected_release, "boot_id": boot.boot_id,
                    "recovered": boot.recovered, "splats": [s.model_dump() for s in boot.splats]},
                   comment=_clean(boot.reason), duration=boot.duration_s, log_url=self._url(boot.console_log),
                   output_files=self._files([boot.dmesg] if boot.dmesg else []),
                   log_excerpt=_clean(boot.console_excerpt)[-EXCERPT_MAX:])

    def _workloads(self, b: BranchResult, run: WorkloadRun) -> None:
        common = {"kernelrelease": run.kernelrelease, "repetitions": run.repetitions}
        if run.error:
            self._test(b, run.build, run.host, run.round, run.rerun, "workloads", "MISS", common,
                       comment=_clean(run.error))
        for rec in run.records:
            path = ".".join(dict.fromkeys(_segment(x) for x in (rec.group, rec.name) if x))
            self._test(b, run.build, run.host, run.round, run.rerun, path, _RECORD_STATUS[rec.status],
                       {**common, "status": rec.status, "group": rec.group},
                       comment=_clean(rec.detail), duration=rec.duration_s,
                       log_url=self._url(rec.logs[0] if rec.logs else None),
                       output_files=self._files(rec.logs[1:]))
            for m in rec.metrics:
                self._metric(b, run, rec, path, m, common)

    def _metric(self, b: BranchResult, run: WorkloadRun, rec: WorkloadRecord, path: str, m: Metric,
                common: dict) -> None:
        value, values = _median(m.values)
        # DONE: a measurement; SKIP: the metric does not exist on this kernel; MISS: nothing measured
        status = "DONE" if value is not None else ("SKIP" if not m.available else "MISS")
        self._test(b, run.build, run.host, run.round, run.rerun, f"{path}.{_segment(m.name)}", status,
                   {**common, "metric": m.name, "unit": m.unit, "values": values, "available": m.available},
                   comment=_clean(m.note or (f"median of {sum(v is not None for v in values)} repetition(s)"
                                             if value is not None else "")),
                   number={"value": value, "unit": _clean(m.unit)} if value is not None else None)
