"""Prerequisites: which missing upstream commits one conflicting patch needs first.

Candidates are the commits between the branch and the tree the patch was written on
that changed its rejected lines (`git log -L`); stable backports of them count as
present, and the series' own patches never count (a dependency inside the series is
"needs patch #N"). A candidate that does not apply on the branch brings in its own
predecessors (the commits that changed the lines *it* needs), so chains are found.

A set is verified only by doing what a maintainer would: on the tree the patch was
tried on, apply each commit in upstream order the way `git am -3` does (plain, else a
3-way merge with full-index blobs), then the patch the same way. Singles are tried
first, then the whole candidate space (or, when the patch does not go in after all of
it, its longest prefix the patch does go in after) pared greedily, newest first,
then every commit touching the rejected files. The chain (X needs Y) is measured on the verified
set: X does not go in without Y. Everything runs under a per-patch time budget;
whatever no trial confirmed is reported unverified, with why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from kpatchtest.apply.history import RangeIndex, patch_ids
from kpatchtest.apply.workindex import WorkIndex
from kpatchtest.diffparse import FileDiff, Hunk, parse_diff
from kpatchtest.gitutil import Git
from kpatchtest.patchset import Patch
from kpatchtest.results import Prerequisite

MAX_SPACE = 100     # commits one trial may apply (a file's whole history since the fork can be more)
MAX_LISTED = 12     # unverified candidates worth a reviewer's eyes


@dataclass
class ConflictSite:
    """A patch that did not apply, the tree it was tried on, and its rejected hunks."""

    patch: Patch
    tree_before: str
    rejected: list[tuple[FileDiff, list[Hunk]]]
    search_base: str = ""       # the upstream tree it was written on: its parent, else the series' base


@dataclass
class SeriesMembers:
    """The series' own patches by upstream sha and by patch-id: never prerequisites."""

    by_sha: dict[str, int] = field(default_factory=dict)
    by_pid: dict[str, int] = field(default_factory=dict)

    def index_of(self, sha: str, pid: str | None) -> int | None:
        for known, index in self.by_sha.items():
            if known.startswith(sha) or sha.startswith(known):
                return index
        return self.by_pid.get(pid) if pid else None


@dataclass
class Finding:
    prerequisites: list[Prerequisite]   # the verified set first (upstream order), then the others
    in_series: list[int]                # series patches whose commits the rejected lines came from
    trials: int = 0
    seconds: float = 0.0


@dataclass
class _Commit:
    sha: str
    subject: str
    size: int
    files: list[str]
    date: int


class _OutOfTime(Exception):
    pass


class PrerequisiteFinder:
    """One per branch; `find` per conflicting patch."""

    def __init__(self, git: Git, scratch: Path, branch_commit: str, branch_hist: RangeIndex,
                 members: SeriesMembers, budget_s: float = 30.0):
        self.git = git
        self.branch_commit = branch_commit
        self.branch_hist = branch_hist
        self.members = members
        self.budget_s = budget_s
        self.index_path = scratch / f"prereq-{branch_commit[:16]}.index"   # one per branch: branches apply in parallel
        self._diffs: dict[str, str] = {}
        self._info: dict[str, _Commit] = {}
        self._pids: dict[str, str | None] = {}
        self._prefix: dict[tuple[str, ...], str | None] = {}   # per site: applied prefix -> tree
        self._deadline = 0.0
        self.trials = 0

    # -- history questions ------------------------------------------------
    def _lines_history(self, rev: str, path: str, hunk: Hunk) -> list[str]:
        """Commits in rev ^branch that changed the lines a hunk needs."""
        lo, hi = hunk.old_range()
        p = self.git.run("log", "--no-merges", "-s", "--format=%H", f"-L{lo},{hi}:{path}",
                         rev, f"^{self.branch_commit}", check=False)
        if p.returncode != 0:   # path gone at rev, or range past its end: fall back to the file
            p = self.git.run("log", "--no-merges", "--format=%H", "-n", str(MAX_LISTED),
                             rev, f"^{self.branch_commit}", "--", path, check=False)
        return p.stdout.split()

    def _file_history(self, rev: str, paths: list[str]) -> list[str]:
        return self.git.out("log", "--no-merges", "--format=%H", rev, f"^{self.branch_commit}",
                            "--", *paths).split()

    def _pid(self, sha: str) -> str | None:
        if sha not in self._pids:
            self._pids.update({c: pid for pid, c in patch_ids(
                self.git, self.git.run("show", "-p", "--format=commit %H", sha).stdout)})
            self._pids.setdefault(sha, None)
        return self._pids[sha]

    def _describe(self, sha: str) -> _Commit:
        if sha not in self._info:
            lines = self.git.out("show", "--numstat", "--format=%H%x00%ct%x00%s", sha).splitlines()
            full, date, subject = lines[0].split("\x00", 2)
            size, files = 0, []
            for line in lines[1:]:
                parts = line.split("\t")
                if len(parts) == 3:
                    size += sum(int(x) for x in parts[:2] if x.isdigit())
                    files.append(parts[2])
            self._info[sha] = self._info[full] = _Commit(full, subject, size, files, int(date))
        return self._info[sha]

    def _diff(self, sha: str) -> str:
        """The commit as format-patch would mail it: renames detected, full blob ids for -3."""
        if sha not in self._diffs:
            self._diffs[sha] = self.git.out("diff-tree", "-p", "-M", "--full-index", "--binary",
                                            "--no-commit-id", sha) + "\n"
        return self._diffs[sha]

    def _admit(self, shas: list[str], known: set[str], in_series: list[int]) -> list[_Commit]:
        """The commits of `shas` not in `known`, missing from the branch and not the series' own."""
        fresh = [self._describe(s) for s in dict.fromkeys(shas)]
        fresh = [c for c in fresh if c.sha not in known]
        self.branch_hist.scan(sorted({f for c in fresh for f in c.files}))
        out = []
        for c in fresh:
            pid = self._pid(c.sha)
            own = self.members.index_of(c.sha, pid)
            if own is not None:
                if own not in in_series:
                    in_series.append(own)
                continue
            if self.branch_hist.by_upstream(c.sha) or self.branch_hist.by_patch_id(pid):
                continue    # backported (also the "Stable-dep-of:" dependencies AUTOSEL takes)
            out.append(c)
        return out

    def _predecessors(self, wi: WorkIndex, c: _Commit) -> list[str]:
        """Commits before `c` that changed the lines of its hunks rejected on wi's tree."""
        self._tick()
        shas: list[str] = []
        for fd in parse_diff(self._diff(c.sha)):
            if not fd.old_path:
                continue
            if not wi.has_path(fd.old_path):
                bad = fd.hunks
            else:
                bad = [h for h in fd.hunks if not wi.apply(fd.with_hunks([h]), check=True).ok]
            for h in bad:
                shas += self._lines_history(f"{c.sha}^", fd.old_path, h)
        return shas

    # -- trials -----------------------------------------------------------
    def _tick(self) -> None:
        if time.monotonic() > self._deadline:
            raise _OutOfTime

    def _am3(self, wi: WorkIndex, diff: str) -> bool:
        """One patch the way git am -3 takes it: as is, else a 3-way merge."""
        return wi.apply(diff).ok or wi.apply(diff, "--3way").ok

    def _trial(self, wi: WorkIndex, site: ConflictSite, seq: list[_Commit]) -> tuple[bool, _Commit | None]:
        """Apply seq then the patch on the site's tree: (the patch went in, the commit that did not)."""
        self._tick()
        self.trials += 1
        shas = tuple(c.sha for c in seq)
        start = next((n for n in range(len(shas), 0, -1) if shas[:n] in self._prefix), 0)
        tree = self._prefix[shas[:start]] if start else site.tree_before
        if tree is None:        # only a prefix ending in the commit that failed maps to None
            return False, seq[start - 1]
        wi.reset(tree)
        for i in range(start, len(seq)):
            ok = self._am3(wi, self._diff(seq[i].sha))
            self._prefix[shas[:i + 1]] = wi.tree if ok else None
            if not ok:
                return False, seq[i]
        return self._am3(wi, site.patch.diff), None

    def _pare(self, wi: WorkIndex, site: ConflictSite, seq: list[_Commit]) -> list[_Commit]:
        """Drop every commit the patch still applies without, newest first: the trees of the
        older prefixes are kept, so each trial applies only the few commits kept after the
        one dropped (oldest first would re-apply the whole rest every time). Each step
        keeps a sufficient set, so a budget that runs out here still leaves a verified one."""
        chosen = list(seq)
        try:
            for c in reversed(seq):
                trial = [x for x in chosen if x is not c]
                if self._trial(wi, site, trial)[0]:
                    chosen = trial
        except _OutOfTime:
            pass
        return chosen

    def _chain(self, wi: WorkIndex, site: ConflictSite, chosen: list[_Commit]) -> dict[str, list[str]]:
        """X needs Y: X goes in after the set's earlier commits, but not without Y. What
        the budget leaves untried is left out."""
        needs: dict[str, list[str]] = {}
        try:
            for i, c in enumerate(chosen):
                if i == 0 or self._trial(wi, site, [c])[1] is not c:
                    continue
                needs[c.sha] = [d.sha for d in chosen[:i]
                                if self._trial(wi, site, [x for x in chosen[:i + 1] if x is not d])[1] is c]
        except _OutOfTime:
            pass
        return needs

    def _grow(self, wi: WorkIndex, site: ConflictSite, space: dict[str, _Commit],
              in_series: list[int]) -> tuple[list[_Commit] | None, str]:
        """Try the whole space in upstream order; a commit that does not apply brings in its
        predecessors, or leaves the space when none explain it. (the sufficient set, or why not)"""
        dropped: list[str] = []     # never re-admitted: a commit nothing explains stays out
        while space:
            if len(space) > MAX_SPACE:
                return None, f"{len(space)} candidate commits, more than the {MAX_SPACE} a trial applies"
            seq = sorted(space.values(), key=lambda c: (c.date, c.sha))
            ok, stuck = self._trial(wi, site, seq)
            if ok:
                return self._pare(wi, site, seq), ""
            if stuck is None:
                prefix = self._applying_prefix(wi, site, seq)
                if prefix:
                    return self._pare(wi, site, prefix), ""
                break
            wi.reset(self._prefix_tree(site, seq, stuck))
            new = self._admit(self._predecessors(wi, stuck), set(space) | set(dropped), in_series)
            if new:
                space.update((c.sha, c) for c in new)
            else:
                dropped.append(stuck.sha)
                del space[stuck.sha]
        why = f"with {len(space)} candidate commit(s) applied in order, git am -3 of the patch still fails"
        if dropped:
            why += "; left out as not applying on the branch: " + ", ".join(d[:12] for d in dropped)
        return None, why

    def _applying_prefix(self, wi: WorkIndex, site: ConflictSite, seq: list[_Commit]) -> list[_Commit] | None:
        """Every commit went in but the patch did not: later ones may rewrite its lines (it
        was written before them). The longest prefix it applies after; each prefix's tree
        is already there, so this costs one patch apply per prefix."""
        for n in range(len(seq) - 1, 0, -1):
            self._tick()
            wi.reset(self._prefix_tree(site, seq, seq[n]))
            if self._am3(wi, site.patch.diff):
                return seq[:n]
        return None

    def _prefix_tree(self, site: ConflictSite, seq: list[_Commit], upto: _Commit) -> str:
        n = seq.index(upto)
        return self._prefix[tuple(c.sha for c in seq[:n])] if n else site.tree_before

    # -- the search ---------------------------------------------------------
    def find(self, site: ConflictSite) -> Finding:
        t0 = time.monotonic()
        self._deadline = t0 + self.budget_s
        self._prefix = {}
        self.trials = 0
        in_series: list[int] = []
        direct_shas: list[str] = []
        for fd, hunks in site.rejected:
            if fd.old_path:
                for h in hunks:
                    direct_shas += self._lines_history(site.search_base, fd.old_path, h)
        direct = {c.sha: c for c in self._admit(direct_shas, set(), in_series)}
        needs: dict[str, list[str]] = {}
        chosen: list[_Commit] | None = None
        why = "no commit between the branch and the base changed the rejected lines"
        wi = WorkIndex(self.git, self.index_path, site.tree_before)
        try:
            for c in sorted(direct.values(), key=lambda c: c.size):
                if self._trial(wi, site, [c])[0]:
                    chosen = [c]
                    break
            if chosen is None and direct:
                chosen, why = self._grow(wi, site, dict(direct), in_series)
            if chosen is None:
                # Every commit touching the rejected files since the fork, in order.
                paths = sorted({fd.old_path for fd, _ in site.rejected if fd.old_path})
                history = self._admit(self._file_history(site.search_base, paths) if paths else [], set(), in_series)
                space = {c.sha: c for c in history}
                if space and set(space) != set(direct):
                    chosen, why = self._grow(wi, site, space, in_series)
            if chosen:
                needs = self._chain(wi, site, chosen)
        except _OutOfTime:
            chosen, why = None, f"the search ran out of its {self.budget_s:g} s budget after {self.trials} trials"
        finally:
            wi.close()
        in_series.sort()
        if in_series:
            why += "; the rejected lines come from patch(es) " + ", ".join(f"#{i}" for i in in_series) + \
                   " of this series"
        return Finding(self._report(site, chosen, direct, needs, why), in_series, self.trials,
                       round(time.monotonic() - t0, 3))

    def _report(self, site: ConflictSite, chosen: list[_Commit] | None, direct: dict[str, _Commit],
                needs: dict[str, list[str]], why: str) -> list[Prerequisite]:
        def entry(c: _Commit, verified: bool, why: str) -> Prerequisite:
            return Prerequisite(commit=c.sha, subject=c.subject, size=c.size, files=c.files, verified=verified,
                                why=why, for_patches=[site.patch.index], rank=0 if verified else 1,
                                needs=needs.get(c.sha, []))
        in_set = {c.sha for c in chosen or []}
        others = [c for c in sorted(direct.values(), key=lambda c: (c.date, c.sha)) if c.sha not in in_set]
        other_why = "not needed once the verified set is applied" if chosen else why
        return [entry(c, True, "") for c in chosen or []] + [entry(c, False, other_why) for c in others[:MAX_LISTED]]
