"""Thin adapter around the git command line.

Every call names its repository explicitly (``git -C``) and may carry a private
index file, so the user's checkout, index and branches are never touched.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kpatchtest import rawtext
from kpatchtest.errors import GitError
from kpatchtest.urls import GIT_PROTOCOL_ENV

# Reproducible, identity-free commits for imports and synthetic trees.
_IDENT = {
    "GIT_AUTHOR_NAME": "kpatchtest", "GIT_AUTHOR_EMAIL": "kpatchtest@localhost",
    "GIT_COMMITTER_NAME": "kpatchtest", "GIT_COMMITTER_EMAIL": "kpatchtest@localhost",
}


def _stderr_text(stderr: str | bytes | None, limit: int = 2000) -> str:
    """A failed command's stderr for an error message: whole, but bounded."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    text = text.strip() or "(no stderr)"
    return text if len(text) <= limit else "..." + text[-limit:]


@dataclass(frozen=True)
class Git:
    """A git repository (usually the bare cache repo) plus an optional private index."""

    repo: Path
    index_file: Path | None = None

    def with_index(self, index_file: Path) -> "Git":
        return Git(self.repo, index_file)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(_IDENT)
        env.pop("GIT_DIR", None)
        env.pop("GIT_WORK_TREE", None)
        env.pop("GIT_INDEX_FILE", None)     # never the caller's index
        if self.index_file:
            env["GIT_INDEX_FILE"] = str(self.index_file)
        env["LC_ALL"] = "C"
        env.update(GIT_PROTOCOL_ENV)        # no transport outside the allow-list, not even by a redirect
        env["GIT_TERMINAL_PROMPT"] = "0"    # a URL that wants a login fails instead of waiting forever
        if extra:
            env.update(extra)
        return env

    def run(self, *args: str, input: str | bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run git; with text=True, str input and stdout keep every byte (see rawtext:
        a patch's latin-1 byte reaches git and comes back unchanged), stderr is display
        text. Bytes in and out as they are, no newline translation."""
        cmd = ["git", "-C", str(self.repo), *args]
        if isinstance(input, str):
            input = rawtext.encode(input)
        p = subprocess.run(cmd, input=input, capture_output=True, env=self._env(env))
        if text:
            p.stdout = rawtext.decode(p.stdout)
            p.stderr = p.stderr.decode("utf-8", "replace")
        if check and p.returncode != 0:
            raise GitError(f"`{shlex.join(cmd)}` failed (exit {p.returncode})"
                           + (f" with GIT_INDEX_FILE={self.index_file}" if self.index_file else "")
                           + f": {_stderr_text(p.stderr)}")
        return p

    def out(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout.strip()

    def ok(self, *args: str, **kw) -> bool:
        return self.run(*args, check=False, **kw).returncode == 0

    def rev_parse(self, rev: str) -> str | None:
        p = self.run("rev-parse", "--verify", "--quiet", "--end-of-options", rev + "^{commit}", check=False)
        return p.stdout.strip() or None if p.returncode == 0 else None

    def tree_of(self, rev: str) -> str:
        return self.out("rev-parse", "--verify", "--end-of-options", rev + "^{tree}")
