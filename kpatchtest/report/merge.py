"""`kpatchtest report --merge`: one RunResult from per-branch runs of one spec.

A CI matrix (the Jenkinsfile) runs `kpatchtest run SPEC --branch B --out out/B` per
branch on separate agents; the merge gives the record one run of all branches would have
written, so the reports, the gates and the exit code speak for the whole series.

`merge` is pure (parts in, RunResult out); `merge_files` does the reading around it and
gathers the logs and kernels the records name into the merged directory, at the paths they
have (RunDir spells them per branch: boot/<branch>/..., so they never collide).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import urljoin

from kpatchtest.errors import InputError
from kpatchtest.results import BranchResult, RunResult, SeriesInfo, load
from kpatchtest.spec import LoadedSpec
from kpatchtest.util import link_or_copy, output_error


@dataclass(frozen=True)
class Part:
    """One per-branch run: its record and where it came from (named in refusals)."""

    source: str
    result: RunResult


def _series_key(s: SeriesInfo | None) -> tuple | None:
    """What makes two records the same series; sources are left out: an mbox path
    differs between agents' workspaces."""
    if s is None:
        return None
    return s.title, s.version, tuple((p.msgid, p.subject) for p in s.patches)


def _series_difference(a: SeriesInfo | None, b: SeriesInfo | None) -> str | None:
    if _series_key(a) == _series_key(b):
        return None
    if a is None or b is None:
        return "series recorded in one only"
    if (a.title, a.version) != (b.title, b.version):
        return f"series {a.title!r} v{a.version} vs {b.title!r} v{b.version}"
    if len(a.patches) != len(b.patches):
        return f"series of {len(a.patches)} vs {len(b.patches)} patches"
    pa, pb = next((pa, pb) for pa, pb in zip(a.patches, b.patches) if (pa.msgid, pa.subject) != (pb.msgid, pb.subject))
    return f"series patch {pa.index}: {pa.msgid or pa.subject!r} vs {pb.msgid or pb.subject!r}"


def _difference(a: RunResult, b: RunResult) -> str | None:
    """Why two records are not runs of one spec and series by one kpatchtest, or None."""
    checks: list[tuple[str, object, object]] = [
        ("results schema", a.schema_version, b.schema_version),
        ("kpatchtest", a.tool_version, b.tool_version),
        ("spec name", a.name, b.name)]
    if a.spec_sha256 and b.spec_sha256:
        checks.append(("spec sha256", a.spec_sha256[:12], b.spec_sha256[:12]))
    else:   # older records: the spec's file name (agents' workspaces differ in the directories)
        checks.append(("spec file", Path(a.spec or "").name, Path(b.spec or "").name))
    for what, x, y in checks:
        if x != y:
            return f"{what} {x} vs {y}"
    return _series_difference(a.series, b.series)


def named_files(b: BranchResult) -> list[str]:
    """The files a branch's record names, relative to its run directory (logs, kernels)."""
    paths = [p for r in ((b.build.baseline, b.build.patched) if b.build else ()) for p in r.artifacts.values()]
    paths += [p for r in b.boot for p in (r.console_log, r.dmesg) if p]
    paths += [p for w in b.workloads for rec in w.records for p in rec.logs]
    return list(dict.fromkeys(paths))


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def merge(parts: Sequence[Part], loaded: LoadedSpec | None = None) -> RunResult:
    """The record one run of every part's branches would have written.

    Refuses (InputError) parts of different specs, series, kpatchtest versions or schemas,
    and a branch in two parts. Branches come in the spec's order (`loaded`), else in the
    order first seen; gates are judged again with gates.evaluate_gates when the spec is
    given, else each part's gates of its own branches are kept (every gate is per branch)."""
    from kpatchtest.gates import evaluate_gates
    from kpatchtest.pipeline import STAGES

    if not parts:
        raise InputError("report --merge: no results.json given", hint="e.g. report --merge out/*/results.json --out out/all")
    first = parts[0]
    owner: dict[str, Part] = {}
    for part in parts:
        why = _difference(first.result, part.result)
        if why:
            raise InputError(f"{first.source} and {part.source}: not runs of one spec: {why}",
                             hint="merge only per-branch runs of the same spec and series")
        for b in part.result.branches:
            if b.name in owner:
                raise InputError(f"{owner[b.name].source} and {part.source}: both have branch {b.name}",
                                 hint="merge one run per branch (kpatchtest run SPEC --branch B --out out/B)")
            owner[b.name] = part
    order = [b.name for b in loaded.spec.kernel.branches] if loaded else []
    names = sorted(owner, key=lambda n: (order.index(n) if n in order else len(order), list(owner).index(n)))
    stages = {s for p in parts for s in p.result.stages}
    finished = [p.result.finished for p in parts]
    merged = first.result.model_copy(deep=True, update={
        "started": min((p.result.started for p in parts), key=_when),
        "finished": None if None in finished else max(finished, key=_when),
        "stages": [s for s in STAGES if s in stages] + sorted(stages - set(STAGES)),
        "branches": [next(b for b in owner[n].result.branches if b.name == n).model_copy(deep=True) for n in names],
        "gates": []})
    # the merge is a run of its own: one id, the same for the same parts
    ids = sorted(str(p.result.run_id) for p in parts)
    merged.run_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "kpatchtest-merge:" + ",".join(ids)))
    if loaded:
        evaluate_gates(loaded, merged)
    else:
        merged.gates = [g.model_copy() for n in names for g in owner[n].result.gates if g.branch == n]
    return merged


def _merged_url(parts: Sequence[Part], paths: Sequence[Path], out: Path, notes: list[str]) -> str | None:
    """The merged run directory's public URL, where the parts' URLs (--log-url-base) all
    point at it through the same layout as on disk (archiveArtifacts keeps it); else None."""
    bases = [p.result.log_url_base for p in parts]
    if not any(bases):
        return None
    urls = {urljoin(b.rstrip("/") + "/", Path(os.path.relpath(out, path.parent)).as_posix() + "/") if b else None
            for b, path in zip(bases, paths)}
    if len(urls) == 1:
        return urls.pop()
    notes.append("the runs' --log-url-base do not share one layout: the merge records none "
                 "(give report --log-url-base)")
    return None


def _gather(merged: RunResult, parts: Sequence[Part], paths: Sequence[Path], out: Path, notes: list[str]) -> None:
    """Hard-link (else copy) each branch's named files from its run directory into `out`."""
    run_dir = {b.name: path.parent for part, path in zip(parts, paths) for b in part.result.branches}
    missing: dict[Path, int] = {}
    for b in merged.branches:
        for rel in named_files(b):
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
                continue                    # not inside the run directory: nothing to gather
            src, dst = run_dir[b.name] / rel, out / rel
            if not src.is_file():
                missing[run_dir[b.name]] = missing.get(run_dir[b.name], 0) + 1
                continue
            try:
                link_or_copy(src, dst)
            except OSError as e:
                raise (output_error(dst, e) or e) from None
    notes += [f"{d}: {n} file(s) its record names are not there (not stashed?)" for d, n in missing.items()]


def merge_files(paths: Sequence[Path], out: Path) -> tuple[RunResult, list[str]]:
    """Read the parts and the spec their records name, merge, and gather into `out` the files
    the records name (RunDir's paths are per branch, so the merged directory has the layout
    one run of all branches would have, and can be published alone).
    Returns the merged record and notes for stderr (a run not finished, the spec unreadable)."""
    from kpatchtest.spec import load_spec
    from kpatchtest.util import sha256_file

    notes: list[str] = []
    parts = []
    for path in paths:
        if path.parent.resolve() == out.resolve():
            raise InputError(f"--out {out}: is the run directory of {path}, the merge would overwrite it",
                             hint="write the merge elsewhere, e.g. --out out/all")
        parts.append(Part(source=str(path), result=load(path)))
    loaded = None
    spec_path = parts[0].result.spec if parts else None
    if spec_path:
        try:
            loaded = load_spec(spec_path)
        except InputError as e:
            notes.append(f"spec not readable ({e}): branches in the order given, gates as each run judged them")
        else:
            want = parts[0].result.spec_sha256
            if want and sha256_file(loaded.path) != want:
                notes.append(f"{spec_path} changed since the runs: branches in the order given, "
                             "gates as each run judged them")
                loaded = None
    merged = merge(parts, loaded)
    _gather(merged, parts, paths, out, notes)
    merged.log_url_base = _merged_url(parts, paths, out, notes)
    if len({tuple(p.result.stages) for p in parts}) > 1:
        notes.append("the runs ran different stages (" + "; ".join(f"{p.source}: {','.join(p.result.stages)}" for p in parts)
                     + "): the merge judges every branch on all of them")
    for p in parts:
        if p.result.finished is None:
            notes.append(f"{p.source}: the run did not finish (no 'finished' time), so neither does the merge")
    return merged, notes
