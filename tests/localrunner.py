"""A Runner on this machine: what the SMM boot's tests use where a lab host runs commands."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class LocalResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str


class LocalRunner:
    """Runs argv on this machine (tests)."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            check: bool = True) -> LocalResult:
        # bytes, decoded here: text=True would turn a guest console's bare \r into a line break
        p = subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        out, err = (b.decode("utf-8", errors="replace") for b in (p.stdout, p.stderr))
        r = LocalResult(shlex.join(argv), p.returncode, out, err)
        if check and p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, argv, out, err)
        return r
