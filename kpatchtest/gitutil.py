"""Thin adapter around the git command line, on GitPython's command layer.

Every call names its repository explicitly (``git -C``) and may carry a private
index file, so the user's checkout, index and branches are never touched.
GitPython (``git.Git.execute``) runs the command: stdin from a file, a kill after a
timeout that takes git's helpers (``git-remote-https``) along, the environment.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# A machine without git gets our one-line GitError at the first call, not an ImportError
# from GitPython's check at import time.
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
import git as gitpython  # noqa: E402
from git.exc import GitCommandNotFound  # noqa: E402

from kpatchtest import rawtext  # noqa: E402
from kpatchtest.errors import GitError  # noqa: E402
from kpatchtest.urls import GIT_PROTOCOL_ENV  # noqa: E402

# Reproducible, identity-free commits for imports and synthetic trees.
_IDENT = {
    "GIT_AUTHOR_NAME": "kpatchtest", "GIT_AUTHOR_EMAIL": "kpatchtest@localhost",
    "GIT_COMMITTER_NAME": "kpatchtest", "GIT_COMMITTER_EMAIL": "kpatchtest@localhost",
}
# What the caller's environment may say about a repository: never ours to follow.
_CALLER_REPO_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")
_COMMAND = gitpython.Git()      # no working dir: paths are relative to ours, as with subprocess


class GitTimeout(GitError):
    """A git command gave no answer within its timeout and was killed (with its children)."""


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
        """The whole environment git runs with (tarball.py hands it to fast-import too)."""
        env = dict(os.environ)
        env.update(_IDENT)
        for name in _CALLER_REPO_ENV:
            env.pop(name, None)             # never the caller's repository or index
        if self.index_file:
            env["GIT_INDEX_FILE"] = str(self.index_file)
        env["LC_ALL"] = "C"
        env.update(GIT_PROTOCOL_ENV)        # no transport outside the allow-list, not even by a redirect
        env["GIT_TERMINAL_PROMPT"] = "0"    # a URL that wants a login fails instead of waiting forever
        if extra:
            env.update(extra)
        return env

    def run(self, *args: str, input: str | bytes | None = None, check: bool = True,
            env: dict[str, str] | None = None, text: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run git; with text=True, str input and stdout keep every byte (see rawtext:
        a patch's latin-1 byte reaches git and comes back unchanged), stderr is display
        text. Bytes in and out as they are, no newline translation; stderr without its
        final newline (GitPython strips it). stdin is empty unless `input` is given.

        GitTimeout after `timeout` seconds (None: no limit), whatever `check` says:
        a killed command has no answer to look at."""
        cmd = ["git", "-C", str(self.repo), *args]
        want = self._env(env)
        # GitPython starts from os.environ and can only add to it: `env -u` drops what
        # we took out (a GIT_DIR exported by a hook that runs us, say).
        unset = [arg for name in os.environ if name not in want for arg in ("-u", name)]
        argv = [*(["env", *unset] if unset else []), _COMMAND.GIT_PYTHON_GIT_EXECUTABLE or "git", *cmd[1:]]
        stdin = None
        if input is not None:       # GitPython takes stdin as a file: a pipe could fill up
            stdin = tempfile.TemporaryFile()
            stdin.write(rawtext.encode(input) if isinstance(input, str) else input)
            stdin.seek(0)
        started = time.monotonic()
        try:
            status, out, err = _COMMAND.execute(
                argv, istream=stdin, env=want, with_extended_output=True, with_exceptions=False,
                stdout_as_string=False, strip_newline_in_stdout=False, kill_after_timeout=timeout)
        except GitCommandNotFound:
            raise GitError(f"cannot run `{shlex.join(cmd)}`: git is not installed or not on PATH",
                           hint="install git") from None
        finally:
            if stdin is not None:
                stdin.close()
        if timeout is not None and status == -signal.SIGKILL and time.monotonic() - started >= timeout:
            raise GitTimeout(f"`{shlex.join(cmd)}` gave no answer within {timeout:g} s and was killed")
        p = subprocess.CompletedProcess(cmd, status, out, err)
        if text:
            p.stdout = rawtext.decode(out)
            p.stderr = rawtext.display(err)
        else:
            p.stderr = rawtext.encode(err)
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
