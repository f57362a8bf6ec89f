"""Split a git diff into files and hunks.

The apply stage needs hunk-level granularity: which hunks were rejected, which
lines a conflicting hunk needed (for prerequisite hints), and whether a later
patch builds on lines an earlier one wrote (for `skipped`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# ASCII digits, and not so many that int() refuses them (past 4300 digits): a header with
# more is no hunk header, as git apply calls it corrupt.
_HUNK_RE = re.compile(r"^@@ -([0-9]{1,18})(?:,([0-9]{1,18}))? \+([0-9]{1,18})(?:,([0-9]{1,18}))? @@")


@dataclass
class Hunk:
    header: str
    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join([self.header, *self.lines])

    def old_range(self) -> tuple[int, int]:
        """Inclusive pre-image line range (context + removed lines)."""
        return self.old_start, self.old_start + max(self.old_len, 1) - 1

    def new_range(self) -> tuple[int, int]:
        return self.new_start, self.new_start + max(self.new_len, 1) - 1

    def changed_new_range(self) -> tuple[int, int]:
        """Post-image lines this hunk wrote (or the deletion point)."""
        n = self.new_start
        lo = hi = None
        for line in self.lines:
            tag = line[:1]
            if tag == "+":
                lo = n if lo is None else lo
                hi = n
                n += 1
            elif tag == " ":
                n += 1
            elif tag == "-" and lo is None:
                lo = hi = max(n - 1, 1)
        if lo is None:
            return self.new_range()
        return min(lo, hi), max(lo, hi)     # apart only in a hunk that adds at line 0


@dataclass
class FileDiff:
    header: list[str]               # "diff --git", index, mode, ---/+++ lines
    old_path: str | None            # None for a new file
    new_path: str | None            # None for a deleted file
    hunks: list[Hunk] = field(default_factory=list)
    binary: bool = False

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""

    @property
    def text(self) -> str:
        return "".join(self.header) + "".join(h.text for h in self.hunks)

    def with_hunks(self, hunks: list[Hunk]) -> str:
        """This file's diff restricted to some hunks (a patch git apply accepts)."""
        return "".join(self.header) + "".join(h.text for h in hunks)

    def renamed_to(self, path: str) -> str:
        """This file's diff with both sides pointed at another path (a renamed file)."""
        out = []
        for line in self.header:
            if line.startswith("diff --git "):
                line = f"diff --git a/{path} b/{path}\n"
            elif line.startswith("--- a/"):
                line = f"--- a/{path}\n"
            elif line.startswith("+++ b/"):
                line = f"+++ b/{path}\n"
            elif line.startswith(("rename from", "rename to", "similarity index", "copy from", "copy to")):
                continue
            out.append(line)
        return "".join(out) + "".join(h.text for h in self.hunks)


def _len(group: str | None) -> int:
    return int(group) if group is not None else 1


def _strip_prefix(p: str) -> str | None:
    p = p.strip().split("\t")[0]
    if p == "/dev/null":
        return None
    if p.startswith('"') and p.endswith('"'):
        p = p[1:-1]
    return p[2:] if p[:2] in ("a/", "b/") else p


def parse_diff(diff: str) -> list[FileDiff]:
    files: list[FileDiff] = []
    cur: FileDiff | None = None
    hunk: Hunk | None = None
    old_left = new_left = 0
    for line in diff.splitlines(keepends=True):
        if not line.endswith("\n"):
            line += "\n"
        if line.startswith("diff --git "):
            parts = line[len("diff --git "):].rstrip("\n").split(" b/", 1)
            old = _strip_prefix(parts[0])
            new = parts[1] if len(parts) == 2 else old
            cur = FileDiff(header=[line], old_path=old, new_path=new)
            files.append(cur)
            hunk = None
            continue
        if cur is None:
            continue
        m = _HUNK_RE.match(line)
        if m:
            hunk = Hunk(header=line, old_start=int(m[1]), old_len=_len(m[2]),
                        new_start=int(m[3]), new_len=_len(m[4]))
            cur.hunks.append(hunk)
            old_left, new_left = hunk.old_len, hunk.new_len
            continue
        if hunk is not None:
            # A hunk ends when its line counts are used up; this keeps a mail's
            # "-- " signature out of the last hunk.
            if line[:1] == "\\":
                hunk.lines.append(line)
                continue
            if old_left > 0 or new_left > 0:
                tag = line[:1]
                if line == "\n":
                    line, tag = " \n", " "   # mailers strip the space of empty context lines
                if tag in " -":
                    old_left -= 1
                if tag in " +":
                    new_left -= 1
                if tag in " +-":
                    hunk.lines.append(line)
                    continue
            hunk = None
            continue
        if cur.hunks:
            continue    # trailing text after a file's last hunk (mail signature)
        # file header lines before the first hunk
        if line.startswith("--- "):
            cur.old_path = _strip_prefix(line[4:])
        elif line.startswith("+++ "):
            cur.new_path = _strip_prefix(line[4:])
        elif line.startswith("new file mode"):
            cur.old_path = None
        elif line.startswith("deleted file mode"):
            cur.new_path = None
        elif line.startswith("rename from "):
            cur.old_path = line[len("rename from "):].strip()
        elif line.startswith("rename to "):
            cur.new_path = line[len("rename to "):].strip()
        elif line.startswith(("Binary files", "GIT binary patch")):
            cur.binary = True
        cur.header.append(line)
    return files


def diff_size(diff: str) -> int:
    """Lines added plus removed."""
    return sum(1 for f in parse_diff(diff) for h in f.hunks for l in h.lines if l[:1] in "+-")
