"""A tree held in a private index file: git apply without any checkout.

A kernel tree has ~80k files; reading it into an index costs a fraction of a
second, checking it out costs tens of seconds. Everything the apply stage and
the prerequisite search do happens here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kpatchtest.gitutil import Git

_OFFSET_RE = re.compile(r"Hunk #(\d+) succeeded at (\d+) \(offset (-?\d+) lines?\)")


@dataclass
class ApplyOutcome:
    ok: bool
    stderr: str
    offsets: list[str]

    @property
    def first_error(self) -> str:
        for line in self.stderr.splitlines():
            if line.startswith("error:"):
                return line.removeprefix("error: ")
        return self.stderr.strip().splitlines()[-1] if self.stderr.strip() else ""


class WorkIndex:
    """One tree in a private index; `apply` moves it forward only on success."""

    def __init__(self, git: Git, index_path: Path, tree: str):
        self.git = git.with_index(index_path)
        self.index_path = index_path
        self.tree = tree
        self.git.run("read-tree", tree)

    def reset(self, tree: str | None = None) -> None:
        self.tree = tree or self.tree
        self.git.run("read-tree", self.tree)

    def apply(self, diff: str, *flags: str, check: bool = False) -> ApplyOutcome:
        args = ["apply", "--cached", "-v", "--whitespace=nowarn", *flags]
        if check:
            args.append("--check")
        p = self.git.run(*args, "-", input=diff, check=False)
        offsets = [f"hunk {m[0]} at offset {int(m[2]):+d} lines" for m in _OFFSET_RE.findall(p.stderr)]
        out = ApplyOutcome(p.returncode == 0, p.stderr, offsets)
        if not check:
            if out.ok:
                self.tree = self.git.out("write-tree")
            elif "--3way" in flags:
                self.reset()    # a failed 3-way merge can leave conflict stages behind
        return out

    def has_path(self, path: str) -> bool:
        return self.git.ok("cat-file", "-e", f"{self.tree}:{path}")

    def close(self) -> None:
        try:
            os.unlink(self.index_path)
        except FileNotFoundError:
            pass
