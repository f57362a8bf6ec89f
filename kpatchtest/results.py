"""The one result record every stage appends to; results.json is its serialisation.

Schema history (bump SCHEMA_VERSION on any incompatible change, document it in
docs/results-schema.md):
  1 - series, branches[].apply (verdict, patches, prerequisites), gates.
  2 - branches[].build (baseline, patched, per-patch builds); patches[].commit.
  3 - branches[].boot (one record per build and lab host).
  4 - branches[].workloads (one run per booted build, host and round, each with
      WorkloadRecords); boot[].round.
  5 - apply: an offset-only patch is `applied` (offsets in detail), no longer
      applied-3way; patches[].prerequisites per conflicting patch (verified sets replayed
      the way git am -3 applies them; why, needs); conflict patches' depends_on.
  6 - branches[].compare (tests, metrics and new splats: baseline against patched per host,
      see kpatchtest/compare/model.py); workloads[].rerun.
  7 - what a KCIDB report (report/kcidb.py) needs: run_id (made once per run directory,
      kept by a resumed run), spec_sha256, log_url_base; series.msgid, patches[].sha256;
      branches[].source (git repository or tarball, as a URL); build arch.
  8 - compare.metrics[].ratio is the paired estimate (the median over rounds of each
      round's patched/baseline ratio of medians; before 8, the ratio of the pooled medians),
      its CI bootstrapped the same way; compare.order's default is random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from kpatchtest.compare.model import BranchComparison
from kpatchtest.util import StrictModel
from kpatchtest.workloads.record import WorkloadRecord

SCHEMA_VERSION = 8
# Later versions only added fields (5 narrowed applied-3way, 8 changed how a ratio is
# estimated): older files read as runs without them, with the numbers they were written with.
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)

PatchStatus = Literal["applied", "applied-3way", "already-present", "conflict", "skipped"]
ApplyMethod = Literal["offset", "3way", "fuzz", "rename"]
PresentBy = Literal["patch-id", "upstream-ref", "ancestor", "reverse-apply"]
Verdict = Literal["clean", "three-way", "already-applied", "partial", "conflict"]


class Conflict(StrictModel):
    """One file of a patch that did not apply: how many hunks failed and their text."""

    file: str
    hunks: int
    rejected: list[str] = Field(default_factory=list)
    reason: str = ""          # e.g. "file does not exist on this branch"


class Prerequisite(StrictModel):
    """A commit missing from the branch that a conflicting patch needs first."""

    commit: str
    subject: str
    size: int                       # lines added + removed
    files: list[str] = Field(default_factory=list)
    verified: bool                  # member of a set that, applied in order like git am -3, lets the patch apply
    why: str = ""                   # unverified: why not
    needs: list[str] = Field(default_factory=list)  # commits of the same set this one does not apply without
    for_patches: list[int] = Field(default_factory=list)
    rank: int = 0                   # 0 = part of the smallest sufficient set


class PatchResult(StrictModel):
    index: int
    subject: str
    msgid: str | None = None
    status: PatchStatus
    method: ApplyMethod | None = None       # how it went in: offset (applied), 3way/fuzz/rename (applied-3way)
    detail: str = ""                        # e.g. "hunk 2 at offset +14 lines"
    conflicts: list[Conflict] = Field(default_factory=list)
    present_as: str | None = None           # sha of the branch commit carrying it
    present_by: PresentBy | None = None
    depends_on: list[int] = Field(default_factory=list)  # earlier series patches it needs that did not apply
    commit: str | None = None               # the commit this patch became on the branch
    prerequisites: list[Prerequisite] = Field(default_factory=list)  # conflict: upstream order, the set first


class ApplyResult(StrictModel):
    verdict: Verdict
    branch_commit: str
    base: str | None = None         # what prerequisites were searched against
    patched_commit: str | None = None  # commit (under refs/kpatchtest/) with what applied
    patches: list[PatchResult]
    prerequisites: list[Prerequisite] = Field(default_factory=list)  # union of the patches' (for the summary)
    duration_s: float = 0.0


BuildStatus = Literal["pass", "fail", "skipped"]


class BuildResult(StrictModel):
    """One kernel build: what a reviewer needs to trust it."""

    status: BuildStatus
    reason: str = ""                        # skipped: why; fail: the first error line
    commit: str | None = None
    tree: str | None = None
    duration_s: float = 0.0
    objects_compiled: int = 0
    reused: bool = False                    # identical tree+config+toolchain: artifacts reused, no make
    cache_hit_rate: float | None = None     # ccache, 0..1, this build only
    config_hash: str | None = None
    config_missing: list[str] = Field(default_factory=list)   # requested symbols that did not take
    config_errors: list[str] = Field(default_factory=list)    # required ones among them
    warnings_new: list[str] = Field(default_factory=list)
    warnings_total: int = 0
    error_excerpt: str | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)   # name -> path relative to the run dir
    kernelrelease: str | None = None
    compiler: str | None = None
    arch: str | None = None                 # the make ARCH=, e.g. x86_64 (v7)


class PatchBuild(StrictModel):
    index: int
    status: BuildStatus
    objects_compiled: int = 0
    reason: str = ""


class BranchBuild(StrictModel):
    baseline: BuildResult
    patched: BuildResult
    per_patch: list[PatchBuild] = Field(default_factory=list)
    first_bad_patch: int | None = None


BootStatus = Literal["booted", "boot-failed", "skipped"]


class SplatInfo(StrictModel):
    kind: str                       # panic, oops, bug, warning, kasan, lockdep, rcu-stall, ...
    first_lines: list[str]
    source: str = "console"         # console | dmesg


class BootResult(StrictModel):
    """One boot of one build on one lab host."""

    build: Literal["baseline", "patched"]
    status: BootStatus
    round: int = 1                  # workloads.rounds: the n-th boot of this build
    rerun: int = 0                  # > 0: a boot the compare stage asked for to confirm a regression
    reason: str = ""
    host: str | None = None
    method: str | None = None       # kexec | grub-reboot | command
    duration_s: float = 0.0         # boot command to SSH answering on the new kernel
    kernelrelease: str | None = None    # what `uname -r` said after the boot
    expected_release: str | None = None
    boot_id: str | None = None
    recovered: bool | None = None   # boot-failed: the power cycle brought the known-good kernel back
    splats: list[SplatInfo] = Field(default_factory=list)
    console_log: str | None = None  # paths relative to the run directory
    dmesg: str | None = None
    console_excerpt: str | None = None


class WorkloadRun(StrictModel):
    """The workloads run on one boot of one build (baseline/patched) on one host."""

    build: Literal["baseline", "patched"]
    host: str
    round: int = 1
    rerun: int = 0                  # 0: a round; k: the k-th rerun boot (of that round's tests) for compare
    kernelrelease: str | None = None
    repetitions: int = 1
    records: list[WorkloadRecord] = Field(default_factory=list)
    probes: dict[str, str] = Field(default_factory=dict)   # metric -> the probe that measured it, or why none
    error: str | None = None        # the workloads could not run at all (one line)


class GateResult(StrictModel):
    name: str                       # e.g. "apply"
    branch: str | None = None
    passed: bool
    expected: str
    actual: str


class KernelSource(StrictModel):
    """Where a branch's code came from, spelled as a URL others can read (v7)."""

    kind: Literal["git", "tarball"]
    url: str                        # git: the repository (a remote as given, without credentials;
                                    # a local path as file://); tarball: the tarball as file://
    ref: str | None = None          # git: the ref tested


class BranchResult(StrictModel):
    name: str
    source: KernelSource | None = None   # (v7)
    commit: str | None = None
    error: str | None = None        # the branch could not be processed (one line)
    apply: ApplyResult | None = None
    build: BranchBuild | None = None
    boot: list[BootResult] = Field(default_factory=list)
    workloads: list[WorkloadRun] = Field(default_factory=list)
    compare: BranchComparison | None = None


class SeriesPatchInfo(StrictModel):
    index: int
    subject: str
    msgid: str | None = None
    author: str = ""
    attestation: str = "none"
    attestation_detail: str = ""
    sha256: str | None = None       # (v7) of the patch's mail as applied: its part of series.mbox


class SeriesInfo(StrictModel):
    title: str
    title_note: str | None = None   # why the title is not the cover letter's (a template cover)
    sources: list[str]
    version: int | None = None
    base_commit: str | None = None
    link: str | None = None
    msgid: str | None = None        # (v7) the thread's first message-id: the cover letter, else patch 1
    prerequisite_patch_ids: list[str] = Field(default_factory=list)
    patches: list[SeriesPatchInfo] = Field(default_factory=list)


class RunResult(StrictModel):
    schema_version: int = SCHEMA_VERSION
    tool_version: str
    name: str
    spec: str | None = None
    spec_sha256: str | None = None  # (v7) of the spec file's bytes; None: no file (the apply verb)
    run_id: str | None = None       # (v7) a uuid made once per run directory, kept by a resumed run
    log_url_base: str | None = None  # (v7) public URL of the run directory (--log-url-base)
    started: str
    finished: str | None = None
    stages: list[str] = Field(default_factory=list)
    series: SeriesInfo | None = None
    branches: list[BranchResult] = Field(default_factory=list)
    gates: list[GateResult] = Field(default_factory=list)

    def branch(self, name: str) -> BranchResult:
        for b in self.branches:
            if b.name == name:
                return b
        b = BranchResult(name=name)
        self.branches.append(b)
        return b

    def gates_failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]


def save(result: RunResult, path: Path) -> None:
    """Write atomically so a crash never leaves a half-written results.json."""
    from kpatchtest.util import write_atomic
    write_atomic(path, result.model_dump_json(indent=2) + "\n")


def load(path: Path) -> RunResult:
    from kpatchtest.errors import InputError
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read results: {e}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise InputError(
            f"{path}: results schema version {version!r}, this kpatchtest reads {READABLE_VERSIONS}",
            hint="re-run with a matching kpatchtest version",
        )
    try:
        return RunResult.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        found = json.dumps(err.get("input"))[:80]
        raise InputError(f"{path}: {where or 'top level'}: {err['msg'].lower()}; found {found}"
                         + (f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""),
                         hint="is it a results.json written by kpatchtest?") from None
