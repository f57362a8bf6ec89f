"""Deploy a built kernel to a lab host and boot it once, over SSH; prove what booted.

One path for hardware and the local QEMU lab: upload under the build's unique
kernel release, boot one time only (kexec, a GRUB one-shot, or the host's own
command), poll SSH with short timeouts until a new boot_id answers, check
`uname -r` against the build, collect dmesg and the console, scan both for
splats. No SSH in time means boot-failed: power-cycle, wait for the
known-good kernel, report the console excerpt.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kpatchtest.errors import KpatchtestError
from kpatchtest.lab.splats import scan
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.results import BootResult, SplatInfo

REMOTE_ROOT = "/boot/kpatchtest"     # every test kernel lives under its own release here
CONSOLE_TAIL_LINES = 60
DISK_SERIAL_PREFIX = "kpt"


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def initrd_disk_serial(path: Path) -> str:
    """The serial of a block device that carries `path` on a lab host: "kpt" and the first
    17 hex digits of its sha256 (a virtio-blk serial holds 20 bytes).

    A host that has its initrd on such a disk (the local lab attaches its image read-only
    as a virtio disk) gets it copied from there at deploy time instead of uploaded: under
    TCG, 20 MB over emulated user networking take seconds, a local disk read does not."""
    st = Path(path).stat()
    return DISK_SERIAL_PREFIX + _file_sha256(str(path), st.st_size, st.st_mtime_ns)[:17]


# Copies the disk whose serial is $1 to $3, exactly $2 bytes (a disk is padded to whole
# sectors; the initramfs unpacker would skip the zeros anyway, the size check would not).
_COPY_FROM_DISK = ('for d in /sys/block/*; do [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] || continue; '
                   'head -c "$2" "/dev/${d##*/}" > "$3" && [ "$(wc -c < "$3")" -eq "$2" ] && '
                   'echo "/dev/${d##*/}" && exit 0; rm -f "$3"; done; exit 1')


@dataclass(frozen=True)
class KernelToBoot:
    build: str                  # baseline | patched
    bzimage: Path
    kernelrelease: str
    initrd: Path | None = None
    modules: Path | None = None  # modules tarball (lib/modules/<release>/...)
    extra_cmdline: str = ""


class ConsoleCapture:
    """Runs the host's console command (from the lab inventory) into a file while a boot happens."""

    def __init__(self, command: str | None, path: Path):
        self.path = path
        self.proc: subprocess.Popen | None = None
        self.command = command

    def __enter__(self) -> "ConsoleCapture":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.command:
            self._f = open(self.path, "wb")
            # The console command is the lab owner's own shell line (inventory), not spec input.
            self.proc = subprocess.Popen(self.command, shell=True, stdout=self._f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc:
            time.sleep(0.5)     # let the last lines arrive
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
            self._f.close()

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
        except FileNotFoundError:
            return ""


def _grub_entry(grub_cfg: str, release: str) -> str | None:
    """The GRUB menu path (">"-joined, submenu included) of the entry booting `release`."""
    submenu = None
    for line in grub_cfg.splitlines():
        m = re.match(r"\s*submenu\s+'([^']+)'", line)
        if m:
            submenu = m.group(1)
        m = re.match(r"\s*menuentry\s+'([^']+)'", line)
        if m and release in m.group(1) and "recovery" not in m.group(1):
            return f"{submenu}>{m.group(1)}" if submenu and line.startswith(("\t", " ")) else m.group(1)
    return None


class Booter:
    """Boots kernels on one host; the caller holds the host's locks."""

    def __init__(self, host: HostSpec, run_dir: Path, log: Callable[[str], None] = lambda m: None):
        self.host = host
        self.run_dir = run_dir
        self.log = log

    def _connect(self) -> HostConnection:
        conn = HostConnection(self.host, log=self.log)
        conn.open()
        return conn

    # -- deploy -----------------------------------------------------------------
    def _deploy(self, conn: HostConnection, k: KernelToBoot, rel_dir: str) -> tuple[str, str | None]:
        remote = f"{REMOTE_ROOT}/{k.kernelrelease}"
        before = conn.run(["sh", "-c", "echo '## ls -la /boot'; ls -la /boot 2>&1; echo '## uname -r'; uname -r; "
                           "echo '## /proc/cmdline'; cat /proc/cmdline"], check=False).stdout
        (self.run_dir / rel_dir / "host-before.txt").write_text(before)
        conn.run(["mkdir", "-p", remote])
        conn.put(k.bzimage, f"{remote}/vmlinuz")
        initrd = None
        local_initrd = k.initrd or (Path(self.host.initrd).expanduser() if self.host.initrd else None)
        if local_initrd:    # the build's own, else the host's (e.g. the local lab's userspace)
            initrd = f"{remote}/initrd.img"
            if not self._initrd_from_disk(conn, local_initrd, initrd):
                conn.put(local_initrd, initrd)
        if k.modules:
            conn.put(k.modules, f"{remote}/modules.tar.gz")
            conn.run(["tar", "-xzf", f"{remote}/modules.tar.gz", "-C", "/"])
        return f"{remote}/vmlinuz", initrd

    def _initrd_from_disk(self, conn: HostConnection, local: Path, remote: str) -> bool:
        """Copy the initrd from a disk of the host that carries it (see initrd_disk_serial);
        False when the host has no such disk, and the caller uploads it."""
        p = conn.run_script(_COPY_FROM_DISK, initrd_disk_serial(local), str(local.stat().st_size), remote,
                            check=False)
        if p.exit_code != 0:
            return False
        self.log(f"{self.host.name}: initrd {local.name} copied from {p.stdout.strip()}, not uploaded")
        return True

    # -- boot methods -------------------------------------------------------------
    def _start_boot(self, conn: HostConnection, kernel: str, initrd: str | None, cmdline: str, k: KernelToBoot) -> None:
        method = self.host.boot
        if method == "kexec":
            argv = ["kexec", "-l", kernel, f"--command-line={cmdline}"]
            if initrd:
                argv.append(f"--initrd={initrd}")
            conn.run(argv)
            conn.start_detached(["kexec", "-e"])
        elif method == "grub-reboot":
            # A one-shot entry: the saved default stays the known-good kernel.
            conn.run(["sh", "-c", 'cp "$1" "/boot/vmlinuz-$2" && { [ -z "$3" ] || cp "$3" "/boot/initrd.img-$2"; } '
                      '&& update-grub >/dev/null 2>&1', "sh", kernel, k.kernelrelease, initrd or ""])
            entry = _grub_entry(conn.get_text("/boot/grub/grub.cfg"), k.kernelrelease)
            if not entry:
                raise KpatchtestError(f"host {self.host.name}: no GRUB entry for {k.kernelrelease} after update-grub",
                                      hint="check /etc/grub.d on the host")
            conn.run(["grub-reboot", entry])
            conn.start_detached(["reboot"])
        else:
            template = self.host.boot_command or ""
            command = template.format(kernel=shlex.quote(kernel), initrd=shlex.quote(initrd or ""),
                                      cmdline=shlex.quote(cmdline), release=shlex.quote(k.kernelrelease))
            conn.start_detached(["sh", "-c", command])

    # -- waiting ------------------------------------------------------------------
    def _wait_new_boot(self, old_boot_id: str, deadline: float) -> HostConnection | None:
        while time.monotonic() < deadline:
            # each poll is a new connection: its "ssh user@host ..." line goes to run.log, not the
            # terminal (the first connection of the boot already said it there)
            conn = HostConnection(self.host)
            try:
                conn.wait_until_up(max(1.0, deadline - time.monotonic()))
                if conn.boot_id() != old_boot_id:
                    return conn
            except KpatchtestError:
                pass
            conn.close()
            time.sleep(2)
        return None

    def _power_cycle(self) -> bool:
        cmd = self.host.power.cycle
        if not cmd:
            self.log(f"{self.host.name}: no power cycle command; cannot recover the host")
            return False
        self.log(f"{self.host.name}: power cycling")
        return subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=self.host.timeouts.command_s).returncode == 0

    # -- one boot -----------------------------------------------------------------
    def boot(self, k: KernelToBoot, rel_dir: str) -> BootResult:
        out = self.run_dir / rel_dir
        out.mkdir(parents=True, exist_ok=True)
        res = BootResult(build=k.build, status="boot-failed", host=self.host.name, method=self.host.boot,
                         expected_release=k.kernelrelease)
        conn = self._connect()
        try:
            old = conn.boot_id()
            kernel, initrd = self._deploy(conn, k, rel_dir)
            cmdline = (self.host.cmdline or conn.get_text("/proc/cmdline").strip())
            cmdline = f"{cmdline} {k.extra_cmdline}".strip()
            console = ConsoleCapture(self.host.console, out / "console.log")
            with console:
                t0 = time.monotonic()
                self._start_boot(conn, kernel, initrd, cmdline, k)
                conn.close()
                new = self._wait_new_boot(old, t0 + self.host.timeouts.boot_s)
                res.duration_s = round(time.monotonic() - t0, 2)
                if new is not None:
                    try:
                        self._verify(new, k, res, out, rel_dir)
                    finally:
                        new.close()
            res.console_log = f"{rel_dir}/console.log" if self.host.console else None
            text = console.text()
            res.splats += [SplatInfo(kind=s.kind, first_lines=s.first_lines, source="console") for s in scan(text)]
            if new is None:
                res.reason = f"no SSH on a new boot within {self.host.timeouts.boot_s:.0f} s"
                res.console_excerpt = "\n".join(text.splitlines()[-CONSOLE_TAIL_LINES:]) or None
                res.recovered = self._recover(old)
        finally:
            conn.close()
        return res

    def _verify(self, conn: HostConnection, k: KernelToBoot, res: BootResult, out: Path, rel_dir: str) -> None:
        res.boot_id = conn.boot_id()
        res.kernelrelease = conn.run(["uname", "-r"]).stdout.strip()
        version = conn.get_text("/proc/version")
        dmesg = conn.run(["dmesg"], check=False).stdout
        (out / "dmesg.txt").write_text(dmesg)
        res.dmesg = f"{rel_dir}/dmesg.txt"
        res.splats += [SplatInfo(kind=s.kind, first_lines=s.first_lines, source="dmesg") for s in scan(dmesg)]
        if res.kernelrelease == k.kernelrelease and k.kernelrelease in version:
            res.status = "booted"
        else:
            res.reason = f"host came back on {res.kernelrelease}, not {k.kernelrelease} (fell back to its default?)"

    def return_to_known_good(self) -> bool:
        """Put the host back on its known-good kernel after a test kernel.

        Each test kernel is then booted from the known-good one, never chained from the
        previous test kernel: a buggy kernel cannot spoil the next boot, and kexec from a
        kexec'd kernel is not reliable (seen in the local lab: the second `kexec -l`
        refused with "Invalid memory segment 0x100000 - ...")."""
        conn = self._connect()
        try:
            old = conn.boot_id()
            if not self.host.power.cycle:
                conn.start_detached(["reboot"])     # the saved default is the known-good kernel
        finally:
            conn.close()
        return self._recover(old, power_cycle=bool(self.host.power.cycle))

    def _recover(self, old_boot_id: str, power_cycle: bool = True) -> bool:
        if power_cycle and not self._power_cycle():
            return False
        conn = self._wait_new_boot(old_boot_id, time.monotonic() + self.host.timeouts.boot_s)
        if conn is None:
            return False
        conn.close()
        return True
