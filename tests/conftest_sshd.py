"""A real OpenSSH sshd on 127.0.0.1 for lab tests.

Fixtures:
- `sshd_keys` (session): client key, the server's host key, and a second, unrelated
  host key (for "key changed" tests), all made with ssh-keygen.
- `sshd` (function): a running `/usr/sbin/sshd -D -e -f CONFIG` on a free loopback
  port as a foreground child. `.host_spec(**overrides)` gives a HostSpec whose
  known_hosts file holds the right key; `.stop()`, `.start()` (same port, same keys),
  `.port`, `.dir`, `.log` (sshd's stderr).

Use from a test module with `from tests.conftest_sshd import sshd, sshd_keys`
(or list "tests.conftest_sshd" in tests/conftest.py's pytest_plugins).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from kpatchtest.lab.ssh.inventory import HostSpec, Timeouts

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshdKeys:
    dir: Path
    client_key: Path        # private key the tests log in with
    host_key: Path          # the server's real host key
    other_host_key: Path    # an unrelated key (for "changed key" tests)

    def pub(self, key: Path) -> str:
        """'TYPE BASE64' of a key's public half (no comment)."""
        return " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])


def _keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    def __init__(self, keys: SshdKeys, dir: Path) -> None:
        self.keys = keys
        self.dir = dir
        self.port = free_port()
        self.log = dir / "sshd.log"
        self.config = dir / "sshd_config"
        auth = dir / "authorized_keys"
        auth.write_text(keys.pub(keys.client_key) + "\n")
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {keys.host_key}
PidFile none
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {auth}
AllowTcpForwarding yes
Subsystem sftp internal-sftp
MaxStartups 100
LogLevel VERBOSE
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def known_hosts_line(self, key: Path | None = None) -> str:
        return f"[127.0.0.1]:{self.port} {self.keys.pub(key or self.keys.host_key)}\n"

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()   # the listener only; live sessions keep their own processes
            self.proc.wait(10)
        self.proc = None

    def host_spec(self, **overrides: Any) -> HostSpec:
        kh = self.dir / "known_hosts"
        if not kh.exists():
            kh.write_text(self.known_hosts_line())
        fields: dict[str, Any] = dict(
            name="testbox", address="127.0.0.1", port=self.port, user="root",
            key=str(self.keys.client_key), known_hosts=str(kh),
            timeouts=Timeouts(connect_s=5, boot_s=30, command_s=30, lock_wait_s=10))
        fields.update(overrides)
        return HostSpec(**fields)


@pytest.fixture(scope="session")
def sshd_keys(tmp_path_factory: pytest.TempPathFactory) -> SshdKeys:
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.skip("OpenSSH server not installed")
    d = tmp_path_factory.mktemp("sshd-keys")
    return SshdKeys(d, _keygen(d / "client"), _keygen(d / "host"), _keygen(d / "other"))


@pytest.fixture
def sshd(sshd_keys: SshdKeys, tmp_path: Path) -> Iterator[Sshd]:
    d = tmp_path / "sshd"
    d.mkdir()
    server = Sshd(sshd_keys, d)
    server.start()
    try:
        yield server
    finally:
        server.stop()
