"""The local lab: a QEMU VM that behaves like a lab box.

- boots a known-good kernel (``-kernel/-initrd/-append``) with the lab image as its
  whole userspace; sshd inside answers on a forwarded loopback port;
- serial console appended to ``workdir/console.log`` (kept across resets and restarts);
  :meth:`LocalVM.console_command` is a shell command that prints it from now on;
- QMP on ``workdir/qmp.sock``; :meth:`LocalVM.power_cycle_command` is a shell command
  (``python -m kpatchtest.lab.local.qmp SOCK system_reset``) that resets the VM into the
  known-good kernel, whatever the guest kexec'd into: the local lab's power cycle;
- guest reboots and kexec stay inside the VM (no ``-no-reboot``);
- the initrd is also a read-only virtio disk, so a kexec inside the VM reads it from
  there rather than over SSH (:func:`kpatchtest.lab.ssh.boot.initrd_disk_serial`).

One vCPU only, whatever ``cpus`` says: the lab kernel config has neither ACPI nor
MPPARSE, so the guest finds no second CPU (enabling them is a config change, i.e. a
cold rebuild of every cached kernel).

Acceleration: real KVM only where the host has hardware virtualisation and KVM can run
a q35 machine with SMM; otherwise TCG with ``-cpu qemu64,+svm,+npt``, so the lab
kernel runs kvm_amd with nested paging (the TDP MMU). The /dev/kvm of the CI machines
is paravirtual (no vmx/svm flags, refuses ``smm=on``, hangs a Linux bzImage), so it is
never picked. Override with ``KPATCHTEST_LAB_ACCEL=tcg|kvm``.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from kpatchtest.lab.local.qmp import QMP, QMPConnectError, QMPError, qmp_command
from kpatchtest.lab.ssh.boot import initrd_disk_serial

__all__ = ["VMConfig", "LocalVM", "VMError", "detect_accel", "free_port", "host_tsc_khz", "tcg_cmdline", "QEMU",
           "TCG_CPU", "DEFAULT_CMDLINE"]

QEMU = "qemu-system-x86_64"
TCG_CPU = "qemu64,+svm,+npt"
# panic=-1: a kernel that panics reboots at once, and QEMU's reboot loads the known-good
# -kernel again (as a lab box with a watchdog would come back on its default kernel).
DEFAULT_CMDLINE = "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 panic=-1"
ACCEL_ENV = "KPATCHTEST_LAB_ACCEL"
_SUN_PATH_MAX = 100     # sockaddr_un.sun_path is 108 bytes; keep a margin


_RUNNING: "weakref.WeakSet[LocalVM]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """QEMU runs in its own session (a Ctrl-C at the terminal does not reach it): stop the
    VMs this process started when it exits normally or by an exception."""
    for vm in list(_RUNNING):
        try:
            vm.stop(timeout=3)
        except Exception:
            pass


class VMError(RuntimeError):
    """QEMU did not start or stopped unexpectedly."""


@dataclass
class VMConfig:
    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE
    memory_mb: int = 1024
    cpus: int = 2
    accel: str = "auto"             # auto | tcg | kvm
    machine: str = "q35"
    nic: str = "virtio-net-pci"     # lab-qemu.config has VIRTIO_NET and E1000/E1000E
    # The initrd also as a read-only virtio disk (lab-qemu.config has VIRTIO_BLK), named by
    # its content (boot.initrd_disk_serial): a kexec takes the initrd from there instead of
    # an upload over user networking (20 MB for the nested image: seconds under TCG).
    initrd_disk: bool = True
    extra_args: list[str] = field(default_factory=list)


def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz ("cpu MHz" of /proc/cpuinfo), which is what a TCG guest's
    TSC counts at (QEMU reads the host's TSC); None when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                khz = int(float(line.split(":", 1)[1]) * 1000)
                return khz if khz > 0 else None
    except (OSError, ValueError):
        pass
    return None


def tcg_cmdline(cmdline: str) -> str:
    """The kernel command line for a TCG lab VM: with tsc_early_khz= unless it has one.

    Under TCG (more so on a loaded host) the kernel's TSC calibration against the PIT
    often fails ("tsc: Unable to calibrate against PIT", "No reference (HPET/PMTIMER)
    available": the lab config has neither HPET nor ACPI), leaving tsc_khz at 0. KVM then
    never enters a guest: KVM_RUN spins on KVM_REQ_CLOCK_UPDATE (kvm_guest_time_update
    gives up while the TSC rate is 0), so every nested guest (kvm-unit-tests, the SMM
    boot) hangs without printing a byte. Kernels kexec'd later inherit the parameter
    through /proc/cmdline (5.10, 6.1 and 6.12 know it; an older kernel ignores it)."""
    if "tsc_early_khz=" in cmdline:
        return cmdline
    khz = host_tsc_khz()
    return f"{cmdline} tsc_early_khz={khz}".strip() if khz else cmdline


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kvm_probe(qemu: str = QEMU) -> bool:
    """KVM can create a q35 machine with SMM (the paravirtual /dev/kvm here cannot).

    Cheap: the machine is created stopped (-S) and quit over QMP on stdin at once."""
    try:
        p = subprocess.run([qemu, "-accel", "kvm", "-machine", "q35,smm=on", "-cpu", "host", "-nodefaults",
                            "-display", "none", "-S", "-qmp", "stdio"],
                           input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


@functools.lru_cache(maxsize=None)
def _detect_accel_cached() -> str:
    dev = Path("/dev/kvm")
    if not dev.exists() or not os.access(dev, os.R_OK | os.W_OK):
        return "tcg"
    if not _cpu_flags() & {"vmx", "svm"}:
        return "tcg"            # a paravirtual /dev/kvm without hardware virtualisation
    return "kvm" if _kvm_probe() else "tcg"


def detect_accel() -> str:
    """"kvm" where real hardware virtualisation is usable, else "tcg"; env override."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("tcg", "kvm"):
        return forced
    if forced and forced != "auto":
        raise ValueError(f"{ACCEL_ENV}={forced!r}: expected tcg, kvm or auto")
    return _detect_accel_cached()


class LocalVM:
    """One lab VM; `start` returns once QEMU runs (QMP answers), not once SSH does."""

    def __init__(self, workdir: Path, config: VMConfig, ssh_port: int | None = None):
        self.workdir = Path(workdir)
        self.config = config
        self._fixed_port = ssh_port
        self._ssh_port = ssh_port
        self.accel: str | None = None
        self._proc: subprocess.Popen | None = None
        self._qmp_dir: Path | None = None
        self._stopped = False
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- paths and properties ---------------------------------------------------------
    @property
    def ssh_port(self) -> int:
        if self._ssh_port is None:
            raise VMError("the VM has no SSH port before start()")
        return self._ssh_port

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.workdir / "qemu.log"

    @property
    def qmp_socket(self) -> Path:
        path = self.workdir / "qmp.sock"
        if len(str(path)) <= _SUN_PATH_MAX:
            return path
        if self._qmp_dir is None:        # a long workdir: the socket goes to a short private dir
            self._qmp_dir = Path(tempfile.mkdtemp(prefix="kpt-qmp-"))
        return self._qmp_dir / "qmp.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- the command line ---------------------------------------------------------------
    def qemu_argv(self) -> list[str]:
        c = self.config
        accel = self.accel or detect_accel()
        cpu = ["-accel", "tcg", "-cpu", TCG_CPU] if accel == "tcg" else ["-accel", "kvm", "-cpu", "host"]
        return [
            shutil.which(QEMU) or QEMU,
            "-name", f"kpatchtest-lab-{self.ssh_port}",
            "-machine", c.machine, *cpu, "-smp", str(c.cpus), "-m", str(c.memory_mb),
            # no default devices, no display: the serial console is the only console
            "-nodefaults", "-display", "none", "-vga", "none",
            "-kernel", str(c.kernel), "-initrd", str(c.initrd),
            "-append", tcg_cmdline(c.cmdline) if accel == "tcg" else c.cmdline,
            "-chardev", f"file,id=console,path={self.console_log},append=on", "-serial", "chardev:console",
            "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", f"{c.nic},netdev=net0,romfile=",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-pidfile", str(self.workdir / "qemu.pid"),
            *(self._initrd_disk_args() if c.initrd_disk else []),
            *c.extra_args,
        ]

    def _initrd_disk_args(self) -> list[str]:
        path = str(self.config.initrd).replace(",", ",,")      # QEMU's option syntax doubles commas
        return ["-drive", f"file={path},if=none,id=initrd,format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive=initrd,serial={initrd_disk_serial(self.config.initrd)}"]

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        if self.running():
            raise VMError(f"VM in {self.workdir} already running (pid {self.pid})")
        if not shutil.which(QEMU):
            raise VMError(f"{QEMU} not installed (apt-get install qemu-system-x86)")
        for f in (self.config.kernel, self.config.initrd):
            if not Path(f).is_file():
                raise VMError(f"{f}: no such file")
        self.accel = self.config.accel if self.config.accel in ("tcg", "kvm") else detect_accel()
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if not self._fixed_port:
                self._ssh_port = free_port()
            try:
                self._launch(timeout)
                return
            except VMError as e:
                msg = str(e).lower()
                if attempt + 1 < attempts and ("hostfwd" in msg or "host forwarding" in msg):
                    continue            # someone took the port between free_port() and QEMU's bind
                raise

    def _launch(self, timeout: float) -> None:
        sock = self.qmp_socket
        sock.unlink(missing_ok=True)
        argv = self.qemu_argv()
        (self.workdir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        with open(self.qemu_log, "ab") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.workdir, start_new_session=True)
        self._stopped = False
        _RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise VMError(f"QEMU exited with {self._proc.returncode}: {self._log_tail()}")
            if sock.exists():
                try:
                    st = qmp_command(sock, "query-status", timeout=5)
                    if st.get("status") in ("running", "prelaunch"):
                        return
                except (QMPConnectError, QMPError, EOFError, OSError):
                    pass
            time.sleep(0.05)
        self._kill()
        raise VMError(f"QEMU did not answer on {sock} within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.qemu_log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def qmp(self, command: str, arguments: dict | None = None, timeout: float = 10.0):
        return qmp_command(self.qmp_socket, command, arguments, timeout=timeout)

    def reset(self) -> None:
        """Hard reset (the power cycle), from Python."""
        self.qmp("system_reset")

    def stop(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL. Idempotent."""
        if self._proc is None or self._stopped:
            self._cleanup()
            return
        if self._proc.poll() is None:
            try:
                with QMP(self.qmp_socket, timeout=3) as q:
                    q.execute("quit")
            except (OSError, QMPError, EOFError, ValueError):
                pass
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._stopped = True
        _RUNNING.discard(self)
        self._cleanup()

    def _kill(self) -> None:
        assert self._proc is not None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self._proc.poll() is not None:
                return
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                return
            try:
                self._proc.wait(5)
                return
            except subprocess.TimeoutExpired:
                continue

    def _cleanup(self) -> None:
        if self._qmp_dir is not None:
            shutil.rmtree(self._qmp_dir, ignore_errors=True)
            self._qmp_dir = None

    def __enter__(self) -> "LocalVM":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lab-box style shell commands ------------------------------------------------------
    def _qmp_shell(self, command: str) -> str:
        return shlex.join([sys.executable, "-m", "kpatchtest.lab.local.qmp", str(self.qmp_socket), command])

    def power_cycle_command(self) -> str:
        """A shell command that hard-resets the VM into its known-good kernel."""
        return self._qmp_shell("system_reset")

    def power_off_command(self) -> str:
        """A shell command that ends the VM (QMP quit); start() powers it on again."""
        return self._qmp_shell("quit")

    def console_command(self) -> str:
        """A shell command that prints the serial console from now on, until killed."""
        return shlex.join(["tail", "-c", "0", "-F", str(self.console_log)])

    # -- console helpers ---------------------------------------------------------------
    def console_size(self) -> int:
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def console_text(self, since: int = 0) -> str:
        try:
            with open(self.console_log, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, n: int = 3000) -> str:
        return self.console_text(max(0, self.console_size() - n))

    def wait_console(self, pattern: str, since: int = 0, timeout: float = 120.0) -> re.Match:
        """Wait until `pattern` (a regex) appears in the console after byte offset `since`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.console_text(since))
            if m:
                return m
            if not self.running():
                raise VMError(f"QEMU exited while waiting for {pattern!r}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise VMError(f"{pattern!r} not on the console within {timeout:.0f} s:\n{self.console_tail()}")
            time.sleep(0.2)
