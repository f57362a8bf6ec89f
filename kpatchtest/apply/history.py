"""Index of a commit range: by patch-id, by the upstream sha a backport cites, by Link.

The apply stage asks "is this change already on the branch under another sha?"
and the prerequisite search asks "was this upstream commit backported?". Both
scan only commits touching the files in question, so a stable branch with
20k commits since its release costs a handful of commits per question.
"""

from __future__ import annotations

import re

from kpatchtest.gitutil import Git

# "commit <sha> upstream." (Greg's scripts), "[ Upstream commit <sha> ]" (Sasha's, also on
# the dependencies AUTOSEL brings in with a "Stable-dep-of: <fix>" trailer), and
# cherry-pick -x. "Stable-dep-of:" itself names the fix the backport was taken *for*, not
# the commit it is: it is deliberately not an upstream reference.
_UPSTREAM_RES = (
    re.compile(r"^\s*commit ([0-9a-f]{12,40}) upstream", re.M | re.I),
    re.compile(r"^\s*\[\s*upstream commit ([0-9a-f]{12,40})\b[^\]\n]*\]", re.M | re.I),
    re.compile(r"cherry picked from commit ([0-9a-f]{12,40})", re.I),
)
_LINK_RE = re.compile(r"^Link: \S*?/([^/\s]+@[^/\s]+?)/?\s*$", re.M)


def patch_ids(git: Git, log_patch_text: str) -> list[tuple[str, str]]:
    """(patch-id, commit) pairs for `git log -p --format='commit %H'` style text."""
    if not log_patch_text.strip():
        return []
    p = git.run("patch-id", "--stable", input=log_patch_text)
    return [tuple(line.split()[:2]) for line in p.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def patch_id_of_diff(git: Git, diff: str) -> str | None:
    ids = patch_ids(git, "commit " + "0" * 40 + "\n\n" + diff)
    return ids[0][0] if ids else None


def upstream_refs(message: str) -> list[str]:
    return [m for rx in _UPSTREAM_RES for m in rx.findall(message)]


class RangeIndex:
    """Commits reachable from `include` but not from `exclude`, touching given paths."""

    def __init__(self, git: Git, include: str, exclude: str | None):
        self.git = git
        self.include = include
        self.exclude = exclude
        self._by_pid: dict[str, str] = {}
        self._by_upstream: dict[str, str] = {}
        self._by_msgid: dict[str, str] = {}
        self._subjects: dict[str, str] = {}
        self._scanned: set[str] = set()

    @property
    def rev_range(self) -> list[str]:
        return [self.include] + ([f"^{self.exclude}"] if self.exclude else [])

    def scan(self, paths: list[str]) -> None:
        todo = sorted(set(paths) - self._scanned)
        if not todo or self.exclude is None:
            # Without a common base the "range" is all history down to a root
            # commit (a tarball import): nothing useful to index.
            self._scanned.update(todo)
            return
        logp = self.git.run("log", "--no-merges", "-p", "--full-diff", "--format=commit %H",
                            *self.rev_range, "--", *todo).stdout
        for pid, commit in patch_ids(self.git, logp):
            self._by_pid.setdefault(pid, commit)
        msgs = self.git.run("log", "--no-merges", "--format=%H%x00%s%x00%B%x01",
                            *self.rev_range, "--", *todo).stdout
        for rec in msgs.split("\x01"):
            parts = rec.strip("\n").split("\x00")
            if len(parts) < 3:
                continue
            sha, subject, body = parts[0].strip(), parts[1], parts[2]
            self._subjects[sha] = subject
            for up in upstream_refs(body):
                self._by_upstream.setdefault(up, sha)
            for mid in _LINK_RE.findall(body):
                self._by_msgid.setdefault(mid, sha)
        self._scanned.update(todo)

    def by_patch_id(self, pid: str | None) -> str | None:
        return self._by_pid.get(pid) if pid else None

    def by_upstream(self, sha: str | None) -> str | None:
        if not sha:
            return None
        for up, local in self._by_upstream.items():
            if sha.startswith(up) or up.startswith(sha):
                return local
        return None

    def by_msgid(self, msgid: str | None) -> str | None:
        return self._by_msgid.get(msgid.strip("<>")) if msgid else None

    def contains(self, sha: str) -> bool:
        """Is `sha` itself reachable from include?"""
        return self.git.ok("merge-base", "--is-ancestor", sha, self.include)


def merge_base(git: Git, a: str, b: str) -> str | None:
    p = git.run("merge-base", a, b, check=False)
    return p.stdout.strip() or None if p.returncode == 0 else None


def is_ancestor(git: Git, a: str, b: str) -> bool:
    return git.ok("merge-base", "--is-ancestor", a, b)


def oldest_fork_point(git: Git, upstream: str, commits: list[str]) -> str | None:
    """The merge-base of `upstream` with the oldest of `commits`: one bound for one scan
    of upstream that covers every branch (a branch made from a tag after the series merged
    has its fork point past the series; an older branch's fork point is not).

    Commits with no history in common with upstream (tarball imports) do not count."""
    forks = [mb for c in dict.fromkeys(commits) if (mb := merge_base(git, upstream, c))]
    if not forks:
        return None
    oldest = forks[0]
    for mb in forks[1:]:
        if mb != oldest and not is_ancestor(git, oldest, mb):
            oldest = mb if is_ancestor(git, mb, oldest) else (merge_base(git, oldest, mb) or oldest)
    return oldest


