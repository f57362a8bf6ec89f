"""Apply stage: per branch, apply the series patch by patch and classify each.

No checkout: every branch is a tree in a private index (WorkIndex), so an 80k
file kernel tree costs well under a second per patch. Patched results are
committed under a private ref namespace for later stages (build) to check out.
"""

from __future__ import annotations

import email.utils
import re
import time
import threading
from dataclasses import dataclass, field
from pathlib import Path

from kpatchtest.apply.history import RangeIndex, is_ancestor, merge_base, oldest_fork_point, patch_id_of_diff
from kpatchtest.apply.prereqs import ConflictSite, PrerequisiteFinder, SeriesMembers
from kpatchtest.apply.workindex import WorkIndex
from kpatchtest.util import slug  # noqa: F401  (re-exported: the apply stage names branches)
from kpatchtest.diffparse import FileDiff, Hunk, parse_diff
from kpatchtest.gitutil import Git
from kpatchtest.patchset import Patch, Series
from kpatchtest.results import ApplyResult, Conflict, PatchResult, Prerequisite


@dataclass(frozen=True)
class BranchTarget:
    name: str       # as the user wrote it
    commit: str     # resolved in the cache repo


@dataclass(frozen=True)
class ApplyContext:
    git: Git                # the cache repository
    scratch: Path           # private per-run directory for index files
    base: str | None        # commit prerequisites are searched against
    upstream: str | None    # where merged versions of the series' patches are looked up
    ref_prefix: str         # private refs namespace of this run
    hints: bool = True
    branches: tuple[str, ...] = ()          # every branch commit of the run: bounds the upstream scan
    prerequisite_budget_s: float = 30.0     # per conflicting patch (spec apply.prerequisite_budget_s)
    _upstream: dict[str, RangeIndex] = field(default_factory=dict, compare=False, repr=False)
    _forks: dict[tuple[str, ...], str | None] = field(default_factory=dict, compare=False, repr=False)
    # branches apply in parallel threads (--jobs): the shared upstream index is built once, under this
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def upstream_index(self, branch_commit: str) -> RangeIndex | None:
        """Upstream commits since the oldest fork point of the run's branches (and the base):
        one index for all branches, so a series merged before a branch's tag is still found."""
        if not self.upstream:
            return None
        # every branch of a run asks with the same commits: the merge-bases are computed once
        commits = tuple(dict.fromkeys([*self.branches, branch_commit, *([self.base] if self.base else [])]))
        with self._lock:
            if commits not in self._forks:
                self._forks[commits] = oldest_fork_point(self.git, self.upstream, list(commits))
            fork = self._forks[commits]
            if fork is None:
                return None
            if fork not in self._upstream:
                self._upstream[fork] = RangeIndex(self.git, self.upstream, fork)
            return self._upstream[fork]


def verdict(statuses: list[str]) -> str:
    """The branch's word for its patches: offsets are `applied`, so they stay clean."""
    failed = {"conflict", "skipped"}
    if not any(s in failed for s in statuses):
        if all(s == "already-present" for s in statuses):
            return "already-applied"
        return "three-way" if "applied-3way" in statuses else "clean"
    return "partial" if any(s not in failed for s in statuses) else "conflict"


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def builds_on(files: list[FileDiff], failed: list[FileDiff]) -> bool:
    """Does a later patch touch lines that a patch which did not apply wrote?"""
    for f in files:
        for g in failed:
            if not g.new_path or g.new_path != f.old_path:
                continue
            if g.old_path is None:          # the failed patch created this file
                return True
            if any(_overlaps(h.old_range(), gh.changed_new_range()) for h in f.hunks for gh in g.hunks):
                return True
    return False


def _commit_env(patch: Patch) -> dict[str, str]:
    name, addr = email.utils.parseaddr(patch.author)
    env = {"GIT_AUTHOR_NAME": name or "unknown", "GIT_AUTHOR_EMAIL": addr or "unknown"}
    if patch.date:
        env["GIT_AUTHOR_DATE"] = patch.date
    return env


class BranchApplier:
    """Applies one series to one branch; one instance per (series, branch)."""

    def __init__(self, ctx: ApplyContext, series: Series, target: BranchTarget):
        self.ctx = ctx
        self.git = ctx.git
        self.series = series
        self.target = target
        self.mb = merge_base(self.git, target.commit, ctx.base) if ctx.base else None
        self.branch_hist = RangeIndex(self.git, target.commit, self.mb)
        self.upstream_hist = ctx.upstream_index(target.commit)
        self._renames: dict[str, str] | None = None
        self.members = SeriesMembers()      # the series' own patches, by upstream sha and patch-id
        self._upstream_of: dict[int, str] = {}

    # -- presence ---------------------------------------------------------
    def _upstream_commit(self, patch: Patch, pid: str | None) -> str | None:
        """The upstream commit of a patch: from a `commits:` source, else by patch-id or Link."""
        ups = patch.upstream_commit
        if not ups and self.upstream_hist:
            ups = self.upstream_hist.by_patch_id(pid) or self.upstream_hist.by_msgid(patch.msgid)
        return (self.git.rev_parse(ups) or ups) if ups else None  # a backport may cite a sha the cache lacks

    def _present(self, pid: str | None, ups: str | None) -> tuple[str, str] | None:
        hit = self.branch_hist.by_patch_id(pid)
        if hit:
            return hit, "patch-id"
        if ups:
            hit = self.branch_hist.by_upstream(ups)
            if hit:
                return hit, "upstream-ref"
            if is_ancestor(self.git, ups, self.target.commit):
                return ups, "ancestor"
        return None

    # -- renames ----------------------------------------------------------
    def _rename_pairs(self, a: str, b: str) -> list[tuple[str, str]]:
        out = self.git.out("diff", "-M", "--name-status", "--diff-filter=R", a, b)
        return [(p[1], p[2]) for p in (line.split("\t") for line in out.splitlines()) if len(p) == 3]

    def _renamed(self, path: str) -> str | None:
        """Where a path the patch names lives on this branch: renamed on the branch
        since the fork point, or renamed upstream after the branch forked."""
        if self._renames is None:
            self._renames = {}
            if self.mb:
                self._renames.update(self._rename_pairs(self.mb, self.target.commit))
                if self.ctx.base:
                    self._renames.update((new, old) for old, new in self._rename_pairs(self.mb, self.ctx.base))
        return self._renames.get(path)

    def _retargeted(self, wi: WorkIndex, files: list[FileDiff]) -> tuple[str, list[str]] | None:
        """The patch with paths renamed on this branch rewritten to their new names."""
        moved, parts = [], []
        for f in files:
            new = None
            if f.old_path and f.old_path == f.new_path and not wi.has_path(f.old_path):
                new = self._renamed(f.old_path)
            if new:
                moved.append(f"{f.old_path} -> {new}")
                parts.append(f.renamed_to(new))
            else:
                parts.append(f.text)
        return ("".join(parts), moved) if moved else None

    # -- conflicts --------------------------------------------------------
    def _conflicts(self, wi: WorkIndex, files: list[FileDiff]) -> tuple[list[Conflict], list[tuple[FileDiff, list[Hunk]]]]:
        conflicts, rejected = [], []
        for f in files:
            if f.old_path is None:
                if wi.has_path(f.new_path or ""):
                    conflicts.append(Conflict(file=f.path, hunks=len(f.hunks), reason="file already exists on this branch",
                                              rejected=[h.text for h in f.hunks]))
                continue
            if not wi.has_path(f.old_path):
                renamed = self._renamed(f.old_path)
                reason = "file does not exist on this branch" + (f" (renamed to {renamed})" if renamed else "")
                conflicts.append(Conflict(file=f.old_path, hunks=len(f.hunks), reason=reason,
                                          rejected=[h.text for h in f.hunks]))
                rejected.append((f, f.hunks))
                continue
            bad = [h for h in f.hunks if not wi.apply(f.with_hunks([h]), check=True).ok]
            if not bad and not wi.apply(f.text, check=True).ok:
                out = wi.apply(f.text, check=True)
                conflicts.append(Conflict(file=f.path, hunks=0, reason=out.first_error))
                continue
            if bad:
                conflicts.append(Conflict(file=f.path, hunks=len(bad), rejected=[h.text for h in bad],
                                          reason=f"{len(bad)} of {len(f.hunks)} hunks do not apply"))
                rejected.append((f, bad))
        return conflicts, rejected

    # -- the loop ---------------------------------------------------------
    def run(self) -> ApplyResult:
        t0 = time.monotonic()
        all_paths = sorted({p for patch in self.series.patches for p in patch.files()})
        self.branch_hist.scan(all_paths)
        if self.upstream_hist:
            self.upstream_hist.scan(all_paths)
        idx_path = self.ctx.scratch / f"{slug(self.target.name)}.index"
        wi = WorkIndex(self.git, idx_path, self.git.tree_of(self.target.commit))
        results: list[PatchResult] = []
        failed: dict[int, list[FileDiff]] = {}
        sites: list[ConflictSite] = []
        head = self.target.commit
        try:
            for patch in self.series.patches:
                files = parse_diff(patch.diff)
                res = PatchResult(index=patch.index, subject=patch.subject, msgid=patch.msgid, status="conflict")
                pid = patch_id_of_diff(self.git, patch.diff)
                ups = self._upstream_commit(patch, pid)
                self._remember(patch.index, pid, ups)
                # Presence first: a patch the branch has is never "skipped", whatever failed before it.
                present = self._present(pid, ups)
                deps = [] if present else [i for i, fds in failed.items() if builds_on(files, fds)]
                if present:
                    res.status, res.present_as, res.present_by = "already-present", present[0], present[1]
                elif deps and wi.apply(patch.diff, "-R", check=True).ok:
                    self._reverse_applies(res)
                elif deps:
                    res.status, res.depends_on = "skipped", deps
                    res.detail = "builds on lines written by patch " + ", ".join(map(str, deps))
                else:
                    self._try_apply(wi, patch, files, res, sites)
                if res.status in ("conflict", "skipped"):
                    failed[patch.index] = files
                elif res.status != "already-present":
                    head = self.git.out("commit-tree", wi.tree, "-p", head, "-m",
                                        f"{patch.subject}\n\n{patch.message}".strip(), env=_commit_env(patch))
                    res.commit = head
                results.append(res)
        finally:
            wi.close()
        prereqs = self._prerequisites(sites, results) if sites and self.ctx.hints and self.ctx.base and self.mb \
            else []
        patched = None
        if head != self.target.commit:
            patched = head
            self.git.run("update-ref", f"{self.ctx.ref_prefix}/patched/{slug(self.target.name)}", head)
        return ApplyResult(
            verdict=verdict([r.status for r in results]), branch_commit=self.target.commit,
            base=self.ctx.base, patched_commit=patched, patches=results, prerequisites=prereqs,
            duration_s=round(time.monotonic() - t0, 3))

    def _remember(self, index: int, pid: str | None, ups: str | None) -> None:
        if ups:
            self.members.by_sha[ups] = index
            self._upstream_of[index] = ups
        if pid:
            self.members.by_pid[pid] = index

    # -- prerequisites ------------------------------------------------------
    def _search_base(self, index: int) -> str:
        """What the patch was written on: its upstream parent when the base has it (so the
        series' later patches and what merged after it are out of the search), else the base."""
        ups, base = self._upstream_of.get(index), self.ctx.base or ""
        if ups and is_ancestor(self.git, ups, base) and self.git.rev_parse(f"{ups}^"):
            return f"{ups}^"
        return base

    def _prerequisites(self, sites: list[ConflictSite], results: list[PatchResult]) -> list[Prerequisite]:
        """Each conflicting patch's own prerequisites; the union (by commit) for the branch."""
        finder = PrerequisiteFinder(self.git, self.ctx.scratch, self.target.commit, self.branch_hist,
                                    self.members, self.ctx.prerequisite_budget_s)
        by_index = {r.index: r for r in results}
        union: dict[str, Prerequisite] = {}
        for site in sites:
            res = by_index[site.patch.index]
            site.search_base = self._search_base(site.patch.index)
            found = finder.find(site)
            res.prerequisites = found.prerequisites
            needed = [i for i in found.in_series
                      if i < res.index and by_index[i].status in ("conflict", "skipped")]
            if needed:
                res.depends_on = needed
                res.detail = "needs " + ", ".join(f"patch #{i}" for i in needed) + " of this series"
            for q in found.prerequisites:
                u = union.get(q.commit)
                if u is None:
                    union[q.commit] = q.model_copy(deep=True)
                else:
                    u.for_patches = sorted({*u.for_patches, *q.for_patches})
                    if q.verified and not u.verified:
                        u.verified, u.rank, u.why = True, 0, ""
                    u.needs = sorted({*u.needs, *q.needs})
        return sorted(union.values(), key=lambda p: (p.rank, p.size))

    @staticmethod
    def _reverse_applies(res: PatchResult) -> None:
        res.status, res.present_by = "already-present", "reverse-apply"
        res.detail = "the patch reverse-applies: its change is already in the tree"

    def _try_apply(self, wi: WorkIndex, patch: Patch, files: list[FileDiff], res: PatchResult,
                   sites: list[ConflictSite]) -> None:
        tree_before = wi.tree
        out = wi.apply(patch.diff)
        if out.ok:
            # What git am takes without -3 is applied; hunks that moved are only reported.
            res.status = "applied"
            if out.offsets:
                res.method, res.detail = "offset", "applied at offsets: " + "; ".join(out.offsets)
            return
        if wi.apply(patch.diff, "-R", check=True).ok:
            self._reverse_applies(res)
            return
        if wi.apply(patch.diff, "--3way").ok:
            res.status, res.method, res.detail = "applied-3way", "3way", "applied with a 3-way merge"
            return
        moved = self._retargeted(wi, files)
        if moved:
            diff, renames = moved
            if wi.apply(diff).ok or wi.apply(diff, "--3way").ok:
                res.status, res.method = "applied-3way", "rename"
                res.detail = "applied to renamed file(s): " + ", ".join(renames)
                return
        if wi.apply(patch.diff, "-C1").ok:
            res.status, res.method = "applied-3way", "fuzz"
            res.detail = "applied only with reduced context (fuzz): review the result"
            return
        res.status = "conflict"
        res.conflicts, rejected = self._conflicts(wi, files)
        sites.append(ConflictSite(patch=patch, tree_before=tree_before, rejected=rejected))


def apply_series(ctx: ApplyContext, series: Series, target: BranchTarget) -> ApplyResult:
    return BranchApplier(ctx, series, target).run()
