"""Replay an apply verdict the plain way a maintainer would: `git am -3` in a scratch worktree.

Every "verified" prerequisite set a test sees is checked here, independently of the
engine's private-index trials: worktree at the branch, the series' earlier patches that
applied, the set (format-patch, in the reported order), then the patch; all with am -3.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from kpatchtest.patchset import Series
from kpatchtest.results import ApplyResult
from tests.kernelhist import ENV


def _git(cwd: Path, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(cwd), *args], input=input, capture_output=True, text=True,
                          env=ENV, check=check)


def am3(repo: Path, branch: str, series: Series, result: ApplyResult, index: int, commits: list[str]) -> bool:
    """Does `git am -3` of `commits` and then patch #index succeed on the branch with the
    series' earlier applied patches? (Those must go in: they did in the engine.)"""
    wt = repo.parent / f"replay-{uuid.uuid4().hex[:8]}"
    _git(repo, "worktree", "add", "-q", "--detach", str(wt), branch)
    try:
        earlier = {p.index for p in result.patches if p.index < index and p.status in ("applied", "applied-3way")}
        for p in series.patches:
            if p.index in earlier:
                _git(wt, "am", "-3", "-q", input=p.as_mbox())
        for sha in commits:
            mail = _git(repo, "format-patch", "-1", "--stdout", sha).stdout
            if _git(wt, "am", "-3", "-q", input=mail, check=False).returncode:
                return False
        patch = next(p for p in series.patches if p.index == index)
        return _git(wt, "am", "-3", "-q", input=patch.as_mbox(), check=False).returncode == 0
    finally:
        _git(wt, "am", "--abort", check=False)
        _git(repo, "worktree", "remove", "--force", str(wt))


def check_claims(repo: Path, branch: str, series: Series, result: ApplyResult) -> None:
    """Every conflict really fails under am -3; every verified set really makes its patch
    apply; a patch with only unverified candidates does not apply after all of them."""
    for p in result.patches:
        if p.status != "conflict":
            continue
        assert not am3(repo, branch, series, result, p.index, []), f"patch {p.index} applies with am -3"
        verified = [q.commit for q in p.prerequisites if q.verified]
        if verified:
            assert am3(repo, branch, series, result, p.index, verified), f"patch {p.index}: {verified} not sufficient"
        elif p.prerequisites:
            listed = [q.commit for q in p.prerequisites]
            assert not am3(repo, branch, series, result, p.index, listed), \
                f"patch {p.index}: the unverified set {listed} does make it apply"
