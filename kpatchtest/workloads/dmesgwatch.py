"""New kernel splats while a workload ran: dmesg before, dmesg after, scan the difference."""

from __future__ import annotations

from pathlib import Path

from kpatchtest.errors import KpatchtestError
from kpatchtest.lab import splats
from kpatchtest.lab.ssh.connection import HostConnection


def dmesg_delta(before: str, after: str) -> str:
    """The part of `after` that is new since `before` (copes with a wrapped ring buffer)."""
    if after.startswith(before):
        return after[len(before):]
    old = before.splitlines()
    new = after.splitlines()
    if old:
        last = old[-1]
        for i in range(len(new) - 1, -1, -1):
            if new[i] == last:
                return "\n".join(new[i + 1:]) + "\n"
    seen = set(old)
    return "".join(line + "\n" for line in new if line not in seen)


class DmesgWatch:
    """Reads dmesg when made; check() reads it again and names the first new splat."""

    def __init__(self, conn: HostConnection, argv: tuple[str, ...] = ("dmesg",)):
        self.conn = conn
        self.argv = argv
        self.before, self.note = self._read()

    def _read(self) -> tuple[str | None, str]:
        try:
            r = self.conn.run(list(self.argv), check=False, timeout=self.conn.host.timeouts.command_s)
        except KpatchtestError as e:
            return None, f"dmesg unavailable: {e.message}"
        if r.exit_code != 0:
            return None, "dmesg unavailable: " + (r.stderr.strip().splitlines() or [f"exit {r.exit_code}"])[-1]
        return r.stdout, ""

    def check(self, save_to: Path) -> str | None:
        """One line naming the new splat(s), with the new dmesg text saved; None if none."""
        if self.before is None:
            return None
        after, self.note = self._read()
        if after is None:
            return None
        delta = dmesg_delta(self.before, after)
        found = splats.scan(delta)
        if not found:
            return None
        save_to.write_text(delta)
        first = found[0]
        return (f"kernel {first.kind} in dmesg during the run: {first.first_lines[0]}"
                + (f" (+{len(found) - 1} more splats)" if len(found) > 1 else ""))
