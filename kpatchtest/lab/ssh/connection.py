"""The one way kpatchtest talks to a lab host: SSH through fabric and paramiko.

Fabric's defaults are unsafe for a lab runner, so this module overrides them:

- Host keys: fabric's Connection never reads known_hosts and installs paramiko's
  AutoAddPolicy. Here the host's known_hosts file (or ~/.ssh/known_hosts) is loaded
  read-only and unknown keys are refused (HostKeyRejected); a key that differs from
  the one on file is refused too. `insecure_host_keys: true` is the only way out; it
  loads nothing, accepts any key and logs a warning with the key's fingerprint.
- No SSH config files (~/.ssh/config, /etc/ssh/ssh_config) or fabric config files
  are read: the HostSpec is the whole truth. (fabric also truncates connect_timeout
  to an int, so the timeout goes through connect_kwargs instead.)
- Timeouts everywhere: TCP connect, banner, auth and channel open use
  timeouts.connect_s (paramiko's channel_timeout defaults to an hour); every command
  ends after timeouts.command_s (or `timeout=`) with HostUnreachable; SFTP reads and
  writes time out too; a keepalive is sent every KEEPALIVE_S seconds.
- fabric provides the connection, the jump host (gateway) and SFTP; commands run on
  a plain paramiko channel (see _exec for why not fabric's run).
- Commands are argument lists joined with shlex.join: nothing from a spec, branch
  or patch is ever spliced into shell text. The remote login shell must be a POSIX
  shell (it is for root on any Linux box). Environment variables are passed as
  `env NAME=VALUE ...` arguments (fabric's own `env=` inlines values unquoted).
- Never log key material or passwords: logs name the key *file*.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import fabric
import paramiko

from kpatchtest.errors import EXIT_INPUT, KpatchtestError
from kpatchtest.lab.ssh.inventory import HostSpec

KEEPALIVE_S = 5
BOOT_ID = "/proc/sys/kernel/random/boot_id"

_logger = logging.getLogger(__name__)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Errors that mean "the SSH connection (or the host behind it) is gone".
_NET_ERRORS = (paramiko.SSHException, OSError, EOFError)


def _default_log(line: str) -> None:
    _logger.info("%s", line)


DRAIN_AFTER_EXIT_S = 0.5


class LabError(KpatchtestError):
    """A lab host cannot be used as asked.

    Exit code 2 when it escapes to the command line: the lab (inventory, network,
    known_hosts) needs the user's attention. It is neither a test verdict (1) nor a
    kpatchtest bug (3). The boot stage catches it per host and records the host as
    boot-failed or skipped.
    """

    exit_code = EXIT_INPUT


class HostUnreachable(LabError):
    """No SSH connection, or no answer from the host in time."""


class HostKeyRejected(LabError):
    """The host offered a key that is not in known_hosts, or a different one."""


class RemoteCommandFailed(LabError):
    """A remote command exited non-zero (run with check=True)."""

    def __init__(self, message: str, result: "RunResult", *, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.result = result


@dataclass(frozen=True)
class RunResult:
    command: str
    exit_code: int   # -1: the command was killed by a signal (no exit status)
    stdout: str
    stderr: str


def parse_jump(jump: str, default_user: str) -> tuple[str, str, int]:
    """'user@host:port', 'host', 'host:port', '[v6addr]:port' -> (user, host, port)."""
    user, _, hostport = jump.rpartition("@")
    m = re.fullmatch(r"\[(?P<h6>[^\]]+)\](?::(?P<p6>\d+))?|(?P<h>[^:]+)(?::(?P<p>\d+))?|(?P<bare6>.*:.*)",
                     hostport)
    if not m or not hostport:
        raise LabError(f"jump host {jump!r} is not user@host:port")
    host = m["h6"] or m["h"] or m["bare6"]
    port = m["p6"] or m["p"]
    return user or default_user, host, int(port) if port else 22


def _known_hosts_name(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, describe: Callable[[str, int], str], known_hosts: Path, exists: bool):
        self._describe = describe
        self._known_hosts = known_hosts
        self._exists = exists

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        address, port = _split_known_name(hostname)
        where = "" if self._exists else " (the file does not exist)"
        raise HostKeyRejected(
            f"{self._describe(address, port)}: host key {key.get_name()} {key.fingerprint} "
            f"is not in known_hosts {self._known_hosts}{where}",
            hint=_key_hint(address, port, self._known_hosts),
        )


class _AcceptAndWarn(paramiko.MissingHostKeyPolicy):
    def __init__(self, describe: Callable[[str, int], str], log: Callable[[str], None]):
        self._describe = describe
        self._log = log

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        address, port = _split_known_name(hostname)
        self._log(f"WARNING: {self._describe(address, port)}: insecure_host_keys is set, "
                  f"accepting host key {key.get_name()} {key.fingerprint} unchecked")


def _split_known_name(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[(.*)\]:(\d+)", name)
    return (m[1], int(m[2])) if m else (name, 22)


def _key_hint(address: str, port: int, known_hosts: Path) -> str:
    scan = shlex.join(["ssh-keyscan", "-p", str(port), address])
    return (f"verify the key (`{scan} | ssh-keygen -lf -` against the host's console) and add it "
            f"with `{scan} >> {shlex.quote(str(known_hosts))}`; or set insecure_host_keys: true "
            f"for this host")


class HostConnection:
    """An SSH connection to one HostSpec. Opens lazily; reopen after close() is fine."""

    def __init__(self, host: HostSpec, log: Callable[[str], None] = _default_log) -> None:
        self.host = host
        self._log = log
        self._conn: fabric.Connection | None = None
        self._gateway: fabric.Connection | None = None
        self._announced = False

    # -- naming -----------------------------------------------------------------

    def _route_parts(self) -> tuple[str, str, str]:
        """(jump hop, the keys offered, the host keys trusted), for the route line and errors."""
        h = self.host
        hop = ""
        if h.jump:
            juser, jaddr, jport = parse_jump(h.jump, h.user)
            hop = f" via {juser}@[{jaddr}]:{jport}"
        keys = f"key file {h.key}" if h.key else "keys from the SSH agent / ~/.ssh"
        trust = "any host key (insecure_host_keys)" if h.insecure_host_keys else f"known_hosts {self.known_hosts}"
        return hop, keys, trust

    def route(self) -> str:
        """How this host is reached and trusted, in one line."""
        h = self.host
        hop, keys, trust = self._route_parts()
        return f"ssh {h.user}@[{h.address}]:{h.port}{hop} ({h.name}): {keys}, {trust}"

    def _describe(self, address: str, port: int) -> str:
        h = self.host
        if (address, port) == (h.address, h.port):
            return f"host {h.name} [{address}]:{port}"
        return f"host {h.name}: jump host [{address}]:{port}"

    @property
    def where(self) -> str:
        return self._describe(self.host.address, self.host.port)

    @property
    def known_hosts(self) -> Path:
        return Path(os.path.expanduser(self.host.known_hosts or "~/.ssh/known_hosts"))

    # -- connecting -------------------------------------------------------------

    def _connection(self, user: str, address: str, port: int, connect_s: float,
                    gateway: fabric.Connection | None) -> fabric.Connection:
        kwargs: dict[str, object] = {
            "timeout": connect_s, "banner_timeout": connect_s, "auth_timeout": connect_s,
            "channel_timeout": connect_s, "allow_agent": True,
            "look_for_keys": self.host.key is None,
        }
        if self.host.key:
            kwargs["key_filename"] = [os.path.expanduser(self.host.key)]
        config = fabric.Config(ssh_config=paramiko.SSHConfig(), lazy=True)
        conn = fabric.Connection(address, user=user, port=port, config=config,
                                 connect_kwargs=kwargs, gateway=gateway or False)
        client = conn.client
        if self.host.insecure_host_keys:
            client.set_missing_host_key_policy(_AcceptAndWarn(self._describe, self._log))
        else:
            path = self.known_hosts
            if path.is_file():
                # load_system_host_keys: read-only (load_host_keys would write back).
                client.load_system_host_keys(str(path))
            client.set_missing_host_key_policy(_RejectUnknown(self._describe, path, path.is_file()))
        return conn

    def open(self, connect_s: float | None = None) -> None:
        """Connect and authenticate (no-op when connected)."""
        if self._conn is not None and self._conn.is_connected:
            return
        self.close()
        h = self.host
        t = h.timeouts.connect_s if connect_s is None else connect_s
        if h.key and not os.path.isfile(os.path.expanduser(h.key)):
            raise LabError(f"host {h.name}: key file {h.key} does not exist",
                           hint="fix `key:` in the lab inventory")
        gateway = None
        if h.jump:
            juser, jaddr, jport = parse_jump(h.jump, h.user)
            gateway = self._gateway = self._connection(juser, jaddr, jport, t, None)
        hop, keys, _ = self._route_parts()
        if not self._announced:   # once, not at every reconnect of wait_until_up
            _logger.info("%s", self.route())   # run.log; the boot stage says it once per host
            self._announced = True
        conn = self._conn = self._connection(h.user, h.address, h.port, t, gateway)
        try:
            conn.open()
        except HostKeyRejected:
            self.close()
            raise
        except paramiko.BadHostKeyException as e:
            self.close()
            address, port = _split_known_name(e.hostname)
            raise HostKeyRejected(
                f"{self._describe(address, port)}: host key CHANGED: offered {e.key.get_name()} "
                f"{e.key.fingerprint}, known_hosts {self.known_hosts} has "
                f"{e.expected_key.get_name()} {e.expected_key.fingerprint}",
                hint="if the host was reinstalled, verify the new key and replace the line "
                     f"(`ssh-keygen -R {shlex.quote(_known_hosts_name(address, port))} -f "
                     f"{shlex.quote(str(self.known_hosts))}`); otherwise someone may be "
                     "intercepting the connection") from None
        except paramiko.AuthenticationException as e:
            self.close()
            raise HostUnreachable(f"{self.where}: authentication as {h.user} failed ({e})",
                                  hint=f"check the key ({keys}) and the host's authorized_keys") from None
        except (*_NET_ERRORS, ValueError) as e:
            self.close()
            raise HostUnreachable(f"{self.where}: cannot connect{hop}: {_reason(e)}",
                                  hint=f"check the address, that sshd runs, and the network "
                                       f"(connect timeout {t:g} s)") from None
        for c in (conn, gateway):
            if c is not None and c.transport is not None:
                c.transport.set_keepalive(KEEPALIVE_S)

    def _ensure_open(self) -> fabric.Connection:
        self.open()
        assert self._conn is not None
        return self._conn

    def close(self) -> None:
        for c in (self._conn, self._gateway):
            if c is None:
                continue
            try:
                c.close()
            finally:
                c.client.close()   # fabric skips this if open() failed half-way
        self._conn = self._gateway = None

    def __enter__(self) -> "HostConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ---------------------------------------------------------------

    def run(self, argv: Sequence[str | os.PathLike[str]], *, timeout: float | None = None,
            check: bool = True, env: dict[str, str] | None = None) -> RunResult:
        """Run argv on the host, every argument quoted. HostUnreachable after timeout."""
        args = [os.fspath(a) for a in argv]
        if not args:
            raise ValueError("empty command")
        if env:
            bad = [k for k in env if not _ENV_NAME.match(k)]
            if bad:
                raise ValueError(f"bad environment variable names: {bad}")
            args = ["env", *(f"{k}={v}" for k, v in env.items()), *args]
        return self._exec(shlex.join(args), timeout, check)

    def run_script(self, script: str, *args: str, timeout: float | None = None,
                   check: bool = True, env: dict[str, str] | None = None) -> RunResult:
        """Run a fixed script kpatchtest wrote; values reach it only as "$1" "$2" ..."""
        return self.run(["sh", "-c", script, "sh", *args], timeout=timeout, check=check, env=env)

    def _exec(self, command: str, timeout: float | None, check: bool) -> RunResult:
        """Run one command on its own channel, stdin closed, reading stdout and stderr.

        Not fabric's conn.run: invoke's timeout is a Timer thread that closes the
        channel, and it races the runner (a timed-out command can come back as exit -1
        instead of CommandTimedOut, and the timer may still be closing the channel
        when we drop the transport). Here one loop owns the channel and the deadline.
        The exit status is final as soon as it arrives, so a background child that
        keeps the output pipe open does not hold us up.
        """
        conn = self._ensure_open()
        limit = self.host.timeouts.command_s if timeout is None else timeout
        end = time.monotonic() + limit
        out, err = bytearray(), bytearray()
        try:
            assert conn.transport is not None
            chan = conn.transport.open_session(timeout=min(limit, self.host.timeouts.connect_s))
            try:
                chan.exec_command(command)
                chan.shutdown_write()
                nap = 0.001
                drain_until = None
                while True:
                    busy = False
                    while chan.recv_ready():
                        out += chan.recv(65536)
                        busy = True
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                        busy = True
                    if chan.exit_status_ready() and not (chan.recv_ready() or chan.recv_stderr_ready()):
                        # Output still in flight may arrive after the exit status: read on
                        # until EOF, or a short quiet spell (a background child may hold
                        # the pipe open and EOF never come).
                        if chan.eof_received:
                            break
                        now = time.monotonic()
                        if drain_until is None or busy:
                            drain_until = now + DRAIN_AFTER_EXIT_S
                        elif now >= drain_until:
                            break
                    if time.monotonic() >= end:
                        raise socket.timeout()
                    nap = 0.001 if busy else min(nap * 2, 0.05)
                    time.sleep(nap)
                status = chan.recv_exit_status()
            finally:
                chan.close()
        except socket.timeout:
            self.close()   # a hung host: do not reuse the transport
            raise HostUnreachable(
                f"{self.where}: no answer within {limit:g} s from `{_short(command)}`",
                hint="the host may be hung or the command stuck (it keeps running there); "
                     "raise timeouts in the lab inventory if it is just slow") from None
        except _NET_ERRORS as e:
            self.close()
            raise HostUnreachable(f"{self.where}: connection lost during `{_short(command)}`: "
                                  f"{_reason(e)}") from None
        if status == -1 and not conn.is_connected:
            self.close()
            raise HostUnreachable(f"{self.where}: connection lost during `{_short(command)}`")
        result = RunResult(command, status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        if check and status != 0:
            last = (result.stderr.strip().splitlines() or ["no stderr"])[-1]
            raise RemoteCommandFailed(f"{self.where}: `{_short(command)}` exited {status}: {last}", result)
        return result

    def exec_channel(self, argv: Sequence[str], timeout: float | None = None) -> paramiko.Channel:
        """Start argv on a raw channel and return it (for long-lived holders such as the host lock)."""
        conn = self._ensure_open()
        try:
            assert conn.transport is not None
            chan = conn.transport.open_session(timeout=timeout or self.host.timeouts.connect_s)
            chan.exec_command(shlex.join(argv))
        except _NET_ERRORS as e:
            self.close()
            raise HostUnreachable(f"{self.where}: cannot start `{_short(shlex.join(argv))}`: "
                                  f"{_reason(e)}") from None
        return chan

    def start_detached(self, argv: Sequence[str], delay_s: float = 1.0) -> None:
        """Start argv in its own session after delay_s and return at once.

        For reboot / kexec -e: the command outlives this SSH session, and the
        session ends before sshd dies, so nothing hangs.
        """
        inner = shlex.join(["setsid", "sh", "-c", 'sleep "$1"; shift; exec "$@"', "sh",
                            f"{delay_s:g}", *argv])
        self._exec(f"{inner} </dev/null >/dev/null 2>&1 &", self.host.timeouts.connect_s, True)

    # -- files ------------------------------------------------------------------

    def _sftp(self) -> paramiko.SFTPClient:
        conn = self._ensure_open()
        try:
            sftp = conn.sftp()
        except _NET_ERRORS as e:
            self.close()
            raise HostUnreachable(f"{self.where}: cannot start SFTP: {_reason(e)}") from None
        sftp.get_channel().settimeout(self.host.timeouts.command_s)
        return sftp

    def put(self, local: Path, remote: str) -> None:
        """Upload a file over SFTP (keeps the local permission bits)."""
        sftp = self._sftp()
        try:
            sftp.put(str(local), remote)
            sftp.chmod(remote, local.stat().st_mode & 0o7777)
        except (socket.timeout, EOFError, paramiko.SSHException) as e:
            self.close()
            raise HostUnreachable(f"{self.where}: upload of {local} to {remote} failed: {_reason(e)}") from None

    def get_text(self, remote: str) -> str:
        """Read a remote file (FileNotFoundError if it is missing)."""
        sftp = self._sftp()
        try:
            with sftp.open(remote, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (socket.timeout, EOFError, paramiko.SSHException) as e:
            self.close()
            raise HostUnreachable(f"{self.where}: reading {remote} failed: {_reason(e)}") from None

    # -- reboots ----------------------------------------------------------------

    def boot_id(self) -> str:
        return self.run(["cat", BOOT_ID], timeout=self.host.timeouts.connect_s).stdout.strip()

    def wait_until_up(self, deadline_s: float, poll_s: float = 2.0) -> None:
        """Reconnect with short timeouts until a command answers, for up to deadline_s seconds."""
        end = time.monotonic() + deadline_s
        last = "no attempt"
        while True:
            self.close()
            left = end - time.monotonic()
            short = max(1.0, min(self.host.timeouts.connect_s, 5.0, left))
            try:
                self.open(connect_s=short)
                self._exec(shlex.join(["cat", BOOT_ID]), short, True)
                return
            except (HostUnreachable, RemoteCommandFailed) as e:   # a rejected key is final
                last = e.message
            if time.monotonic() + poll_s >= end:
                self.close()
                raise HostUnreachable(f"{self.where}: not answering SSH within {deadline_s:g} s "
                                      f"(last: {last})")
            time.sleep(poll_s)


def _short(command: str, limit: int = 120) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, socket.timeout):
        text = "timed out"
    return text.splitlines()[0] if text else type(e).__name__
