"""Progress: a live display on a terminal, plain timestamped lines anywhere else (Jenkins)."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator, TextIO


def _is_ci() -> bool:
    return any(os.environ.get(v) for v in ("CI", "JENKINS_URL", "BUILD_NUMBER"))


class Progress:
    """One interface for both modes; stages call `stage()`, `step()` and `log()`."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = (self.stream.isatty() and not _is_ci()) if live is None else live
        self._rich = None
        self._task = None
        self._stage = ""

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(f"[dim]{self._stage}[/dim] {msg}")
            return
        ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{ts} [{self._stage or 'kpatchtest'}] {msg}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str, total: int) -> Iterator["Progress"]:
        self._stage = name
        t0 = time.monotonic()
        if self.live and not self.quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[item]}"), TimeElapsedColumn(),
                                      console=Console(file=self.stream), transient=False)
            self._rich.start()
            self._task = self._rich.add_task(name, total=total, item="")
        else:
            self.log(f"start ({total} step{'s' if total != 1 else ''})")
        ok = False
        try:
            yield self
            ok = True
        finally:
            if self._rich is not None:
                self._rich.stop()
                self._rich = None
            if ok:     # on failure the error line says it all
                self.log(f"done in {time.monotonic() - t0:.1f} s")
            self._stage = ""

    def step(self, item: str, msg: str = "") -> None:
        """One unit of the current stage finished."""
        if self._rich is not None and self._task is not None:
            self._rich.update(self._task, advance=1, item=item)
            if msg:
                self._rich.console.print(f"  {item}: {msg}")
        else:
            self.log(f"{item}: {msg}" if msg else item)
