"""A tiny QMP (QEMU Machine Protocol) client over a unix socket.

Also a command line, so the local lab's power actions are shell commands like a hardware
lab's ipmitool line::

    python -m kpatchtest.lab.local.qmp /path/qmp.sock system_reset
    python -m kpatchtest.lab.local.qmp /path/qmp.sock quit
    python -m kpatchtest.lab.local.qmp /path/qmp.sock query-status
    python -m kpatchtest.lab.local.qmp /path/qmp.sock human-monitor-command '{"command-line": "info cpus"}'

Prints the command's return value as JSON; exit status 0 on success, 1 when QEMU answered
with an error, 2 when QEMU could not be reached.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

__all__ = ["QMP", "QMPError", "QMPConnectError", "qmp_command"]


class QMPError(Exception):
    """QEMU answered a command with an error."""


class QMPConnectError(OSError):
    """No QEMU on the socket (not started, exited, or not answering)."""


class QMP:
    """One QMP session: connect, negotiate capabilities, execute commands."""

    def __init__(self, path: str | Path, timeout: float = 10.0):
        self.path = str(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = b""
        self.events: list[dict] = []
        self.greeting: dict | None = None

    def __enter__(self) -> "QMP":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
            self.sock = s
            self.greeting = self._read()
            if "QMP" not in self.greeting:
                raise QMPConnectError(f"{self.path}: not a QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
        except (OSError, ValueError) as e:
            s.close()
            self.sock = None
            if isinstance(e, QMPConnectError):
                raise
            raise QMPConnectError(f"QMP {self.path}: {e}") from e

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _read(self) -> dict:
        assert self.sock is not None
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; returns its "return" value, raises QMPError on an "error" answer."""
        if self.sock is None:
            raise QMPConnectError("not connected")
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            try:
                reply = self._read()
            except EOFError:
                if command == "quit":          # QEMU may close before (or instead of) answering
                    return {}
                raise
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QMPError(f"{command}: {err.get('class', 'Error')}: {err.get('desc', err)}")
            return reply.get("return")


def qmp_command(path: str | Path, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 10.0) -> Any:
    """Connect, run one command, disconnect."""
    with QMP(path, timeout) as q:
        return q.execute(command, arguments)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) not in (2, 3) or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2 if argv[:1] not in (["-h"], ["--help"]) else 0
    sock, command = argv[0], argv[1]
    try:
        args = json.loads(argv[2]) if len(argv) == 3 else None
    except ValueError as e:
        print(f"qmp: arguments are not JSON: {e}", file=sys.stderr)
        return 2
    try:
        ret = qmp_command(sock, command, args)
    except QMPError as e:
        print(f"qmp: {e}", file=sys.stderr)
        return 1
    except (OSError, EOFError, ValueError) as e:
        print(f"qmp: cannot reach QEMU at {sock}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(ret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
