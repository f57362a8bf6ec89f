"""One run per lab host at a time, and quarantine of hosts that keep failing.

Two locks guard a host: a local one (two runs on this machine) and one on the host
itself (runs from different machines, e.g. Jenkins agents). Both are flock(2) locks
held by a live process, so a crashed owner never leaves a stale lock behind.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from kpatchtest.lab.ssh.connection import HostConnection, HostUnreachable, LabError
from kpatchtest.locks import LockBusy, exclusive
from kpatchtest.util import sha256_text, utcnow, write_atomic

REMOTE_LOCK = "/run/kpatchtest.lock"   # /run is a tmpfs: a reboot frees everything

# Runs under `flock -n LOCK sh -c HOLDER sh OWNERFILE OWNER` on the host: records the
# owner, says "locked", then holds the lock until its stdin (our channel) closes.
_HOLDER = 'printf "%s\\n" "$2" >"$1" 2>/dev/null; echo locked; cat >/dev/null; rm -f "$1"'


class HostBusy(LabError):
    """Another run holds the host for longer than we may wait."""


def _safe_name(host: str) -> str:
    safe = re.sub(r"^\.|[^A-Za-z0-9._-]", "_", host)
    if safe != host:
        safe = f"{safe}-{sha256_text(host)[:8]}"
    return safe


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def local_host_lock(state_dir: Path, host: str, wait_s: float, *, run: str = "",
                    poll_s: float = 0.2) -> Iterator[None]:
    """Hold state_dir/locks/<host>.lock (flock) for the duration; HostBusy after wait_s.

    The kernel drops a flock when its owner exits, so there is nothing to recover.
    The file's content (pid, run, time) only serves the HostBusy message; it is
    overwritten by each new holder, so a dead owner's leftover info is harmless.
    """
    path = state_dir / "locks" / f"{_safe_name(host)}.lock"
    with ExitStack() as stack:
        try:
            f = stack.enter_context(exclusive(path, wait_s=wait_s, poll_s=poll_s))
        except LockBusy as e:
            raise HostBusy(_local_busy_message(host, path, e.waited)) from None
        info = {"pid": os.getpid(), "run": run, "host": socket.gethostname(), "since": utcnow()}
        f.truncate(0)
        f.write(json.dumps(info) + "\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def _local_busy_message(host: str, path: Path, waited: float) -> str:
    try:
        info: dict[str, Any] = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid")
    if not isinstance(pid, int):
        owner = f"an unknown process (lock file {path})"
    elif _pid_alive(pid):
        owner = f"pid {pid}" + (f" (run {info['run']})" if info.get("run") else "")
    else:
        owner = (f"pid {pid}, which has exited; a child that inherited the lock still holds "
                 f"it (`fuser {path}`)")
    return f"host {host} is in use by {owner} since {info.get('since', '?')}; waited {waited:.0f} s"


@contextmanager
def remote_host_lock(conn: HostConnection, wait_s: float, owner: str, *,
                     path: str = REMOTE_LOCK, poll_s: float = 1.0) -> Iterator[None]:
    """Hold a flock on the host itself for the duration; HostBusy after wait_s.

    How: a channel runs `flock -n PATH sh -c '... echo locked; cat >/dev/null'`. The
    remote `cat` holds the lock for as long as our channel's stdin is open: leaving the
    block sends EOF, cat exits, flock releases. If this process dies or the connection
    drops, sshd closes the pipe and the lock goes the same way, so a stale lock needs
    no recovery. (A silently vanished network is noticed by the host's sshd only via
    its ClientAliveInterval / TCP keepalive.) PATH.owner says who holds it, for the
    HostBusy message. Nothing survives a reboot (/run is a tmpfs): the boot code takes
    the lock again once the host is back. Uses only `flock -n FILE CMD ARGS`, which
    both util-linux and busybox provide; waiting is a poll from here.
    """
    owner_file = path + ".owner"
    argv = ["flock", "-n", path, "sh", "-c", _HOLDER, "sh", owner_file, f"{owner} since {utcnow()}"]
    connect_s = conn.host.timeouts.connect_s
    start = time.monotonic()
    while True:
        chan = conn.exec_channel(argv)
        chan.settimeout(connect_s)
        try:
            out = b""
            while not out.endswith(b"\n"):
                data = chan.recv(64)
                if not data:
                    break
                out += data
            if out == b"locked\n":
                break
            status = chan.recv_exit_status()
            err = chan.recv_stderr(4096).decode(errors="replace").strip()
        except OSError as e:   # socket.timeout included
            chan.close()
            raise HostUnreachable(f"{conn.where}: no answer taking the lock {path}: {e or 'timed out'}") from None
        chan.close()
        if status != 1 or err:
            raise LabError(f"{conn.where}: cannot take the lock {path}: exit {status}: {err or out!r}",
                           hint="the host needs flock (util-linux or busybox) and a writable /run")
        waited = time.monotonic() - start
        if waited >= wait_s:
            holder = conn.run(["cat", owner_file], check=False, timeout=connect_s).stdout.strip()
            raise HostBusy(f"host {conn.host.name} is in use by {holder or 'an unknown owner'}; "
                           f"waited {waited:.0f} s")
        time.sleep(min(poll_s, max(0.01, wait_s - waited)))
    try:
        yield
    finally:
        try:
            chan.shutdown_write()   # EOF to cat: the lock is released when it exits
            chan.settimeout(connect_s)
            while chan.recv(4096):
                pass
        except OSError:
            pass
        finally:
            chan.close()


class Quarantine:
    """Boot failures in a row per host, in a JSON state file written atomically.

    {"hosts": {"<host>": {"failures": 2, "quarantined": false, "since": null, "last": "..."}}}
    Read-modify-write is serialised by a flock on <state_file>.lock, so parallel runs
    on other hosts do not lose each other's updates.
    """

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise LabError(f"quarantine state {self.state_file} is not JSON: {e}",
                           hint="fix or delete the file (that clears every quarantine)") from None
        hosts = data.get("hosts", {}) if isinstance(data, dict) else {}
        return hosts if isinstance(hosts, dict) else {}

    def _save(self, hosts: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.state_file, json.dumps({"version": 1, "hosts": hosts}, indent=2, sort_keys=True) + "\n")

    @contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        with exclusive(Path(f"{self.state_file}.lock")):
            hosts = self._load()
            yield hosts
            self._save(hosts)

    def record(self, host: str, ok: bool, limit: int) -> bool:
        """Count a boot result; True when the host is now quarantined (limit failures in a row)."""
        with self._locked() as hosts:
            entry = hosts.setdefault(host, {"failures": 0, "quarantined": False, "since": None})
            entry["last"] = utcnow()
            if ok:
                entry.update(failures=0, quarantined=False, since=None)
            else:
                entry["failures"] = int(entry.get("failures", 0)) + 1
                if entry["failures"] >= limit and not entry.get("quarantined"):
                    entry.update(quarantined=True, since=utcnow())
            return bool(entry["quarantined"])

    def is_quarantined(self, host: str) -> bool:
        return bool(self._load().get(host, {}).get("quarantined"))

    def failures(self, host: str) -> int:
        return int(self._load().get(host, {}).get("failures", 0))

    def clear(self, host: str | None = None) -> None:
        """Forget one host's failures, or every host's."""
        with self._locked() as hosts:
            if host is None:
                hosts.clear()
            else:
                hosts.pop(host, None)
