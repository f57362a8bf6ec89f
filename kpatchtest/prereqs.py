"""Prerequisite hints: which missing upstream commits a conflicting patch needs.

For each rejected hunk, `git log -L` over base..branch names the commits that
changed those lines and are not on the branch; stable backports of them count
as present. The smallest set that really lets the patch apply is found by
trying: singles first, then the whole set pared down greedily. Hints that no
trial confirms are listed as unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kpatchtest.diffparse import FileDiff, Hunk
from kpatchtest.gitutil import Git
from kpatchtest.history import RangeIndex, patch_ids
from kpatchtest.patchset import Patch
from kpatchtest.results import Prerequisite
from kpatchtest.workindex import WorkIndex

MAX_CANDIDATES = 12     # bounds the trial search (2n+1 trials of up to n applies)


@dataclass
class ConflictSite:
    """A patch that did not apply, the tree it was tried on, and its rejected hunks."""

    patch: Patch
    tree_before: str
    rejected: list[tuple[FileDiff, list[Hunk]]]


@dataclass
class _Commit:
    sha: str
    subject: str
    size: int
    files: list[str]


class PrerequisiteFinder:
    def __init__(self, git: Git, scratch: Path, base: str, branch_commit: str, branch_hist: RangeIndex):
        self.git = git
        self.base = base
        self.branch_commit = branch_commit
        self.branch_hist = branch_hist
        self.index_path = scratch / "prereq.index"
        self._diffs: dict[str, str] = {}

    # -- candidates -------------------------------------------------------
    def _lines_history(self, path: str, hunk: Hunk) -> list[str]:
        lo, hi = hunk.old_range()
        p = self.git.run("log", "--no-merges", "-s", "--format=%H", f"-L{lo},{hi}:{path}",
                         self.base, f"^{self.branch_commit}", check=False)
        if p.returncode != 0:   # path gone at base, or range past its end: fall back to the file
            p = self.git.run("log", "--no-merges", "--format=%H", "-n", str(MAX_CANDIDATES),
                             self.base, f"^{self.branch_commit}", "--", path, check=False)
        return p.stdout.split()

    def _missing(self, shas: list[str]) -> list[str]:
        """Drop commits the branch already has as a stable backport."""
        if not shas:
            return []
        logp = self.git.run("log", "--no-walk=unsorted", "-p", "--format=commit %H", *shas).stdout
        pid_of = {c: pid for pid, c in patch_ids(self.git, logp)}
        return [c for c in shas
                if not self.branch_hist.by_upstream(c) and not self.branch_hist.by_patch_id(pid_of.get(c))]

    def _describe(self, sha: str) -> _Commit:
        out = self.git.out("show", "--numstat", "--format=%s", sha)
        lines = out.splitlines()
        size, files = 0, []
        for line in lines[1:]:
            parts = line.split("\t")
            if len(parts) == 3:
                size += sum(int(x) for x in parts[:2] if x.isdigit())
                files.append(parts[2])
        return _Commit(sha, lines[0] if lines else "", size, files)

    def _diff(self, sha: str) -> str:
        if sha not in self._diffs:
            self._diffs[sha] = self.git.out("diff-tree", "-p", "--full-index", "--binary",
                                            "--no-commit-id", sha) + "\n"
        return self._diffs[sha]

    # -- verification -----------------------------------------------------
    def _sufficient(self, wi: WorkIndex, site: ConflictSite, subset: list[_Commit]) -> bool:
        wi.reset(site.tree_before)
        for c in subset:
            d = self._diff(c.sha)
            if not wi.apply(d).ok and not wi.apply(d, "--3way").ok:
                return False
        return wi.apply(site.patch.diff, check=True).ok

    def _smallest_sufficient(self, wi: WorkIndex, site: ConflictSite, cands: list[_Commit]) -> list[_Commit]:
        for c in sorted(cands, key=lambda c: c.size):
            if self._sufficient(wi, site, [c]):
                return [c]
        if len(cands) < 2 or not self._sufficient(wi, site, cands):
            return []
        chosen = list(cands)
        for c in sorted(cands, key=lambda c: -c.size):
            trial = [x for x in chosen if x is not c]
            if self._sufficient(wi, site, trial):
                chosen = trial
        return chosen

    def find(self, sites: list[ConflictSite]) -> list[Prerequisite]:
        found: dict[str, Prerequisite] = {}
        wi: WorkIndex | None = None
        try:
            for site in sites:
                shas: list[str] = []
                for fd, hunks in site.rejected:
                    if not fd.old_path:
                        continue
                    for h in hunks:
                        for sha in self._lines_history(fd.old_path, h):
                            if sha not in shas:
                                shas.append(sha)
                shas = self._missing(shas)[:MAX_CANDIDATES]
                if not shas:
                    continue
                # oldest first, the order they would be backported in
                dated = self.git.out("log", "--no-walk=unsorted", "--format=%ct %H", *shas).split("\n")
                ordered = [line.split()[1] for line in sorted(dated, key=lambda l: int(l.split()[0]))]
                cands = [self._describe(s) for s in ordered]
                wi = wi or WorkIndex(self.git, self.index_path, site.tree_before)
                chosen = {c.sha for c in self._smallest_sufficient(wi, site, cands)}
                for c in cands:
                    p = found.get(c.sha) or Prerequisite(commit=c.sha, subject=c.subject, size=c.size,
                                                         files=c.files, verified=False, rank=1)
                    if c.sha in chosen:
                        p.verified, p.rank = True, 0
                    if site.patch.index not in p.for_patches:
                        p.for_patches.append(site.patch.index)
                    found[c.sha] = p
        finally:
            if wi:
                wi.close()
        return sorted(found.values(), key=lambda p: (p.rank, p.size))
