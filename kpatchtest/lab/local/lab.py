"""The local lab as a lab host: a QEMU VM on the known-good kernel, described by the same
HostSpec as a hardware box (SSH on a loopback port, console command, QMP power cycle)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

from kpatchtest.errors import InputError
from kpatchtest.lab.backend import LabSetup
from kpatchtest.lab.local.image import LabImage, build_image
from kpatchtest.lab.local.qemu import DEFAULT_CMDLINE, LocalVM, VMConfig
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.inventory import HostSpec, PowerCommands, Timeouts
from kpatchtest.lab.ssh.lab import SshLab
from kpatchtest.spec import LabRef

LOCAL_TIMEOUTS = Timeouts(connect_s=5, boot_s=180, command_s=300, lock_wait_s=600)


def local_host(vm: LocalVM, image: LabImage, known_hosts: Path, name: str = "local-0",
               timeouts: Timeouts = LOCAL_TIMEOUTS) -> HostSpec:
    """The VM as a lab host; its host key is the image's, pinned in a known_hosts file."""
    known_hosts.write_text(image.known_hosts_line(vm.ssh_port) + "\n")
    return HostSpec(name=name, address="127.0.0.1", port=vm.ssh_port, key=str(image.client_key),
                    known_hosts=str(known_hosts), boot="kexec", initrd=str(image.initramfs),
                    console=vm.console_command(),
                    power=PowerCommands(cycle=vm.power_cycle_command(), off=vm.power_off_command()),
                    timeouts=timeouts, tags=["local", "amd", "svm"])


def reap_stale_vm(work: Path) -> bool:
    """Kill the QEMU a killed run left behind in `work` (its pidfile names it, its command
    line names `work`): the run directory is locked by this run, so that VM is no one's."""
    try:
        pid = int((work / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    if not any(str(work).encode() in arg for arg in cmdline):
        return False                 # the pid was reused by something else
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def local_lab(known_good: Path, cache_dir: Path, work: Path, *, memory_mb: int = 1024, cpus: int = 2,
              nested: bool = False, extra_cmdline: str = "",
              log: Callable[[str], None] = lambda m: None) -> Iterator[HostSpec]:
    """Start the local QEMU lab on the known-good kernel; yield it as a lab host; stop it.

    `extra_cmdline` is appended to the known-good kernel's command line (e.g.
    "kvm.tdp_mmu=1"); kernels kexec'd later inherit it through /proc/cmdline."""
    image = build_image(cache_dir, nested=nested)
    work.mkdir(parents=True, exist_ok=True)
    if reap_stale_vm(work):
        log(f"local lab: stopped the VM a killed run left in {work}")
    vm = LocalVM(work, VMConfig(kernel=known_good, initrd=image.initramfs, memory_mb=memory_mb, cpus=cpus,
                                cmdline=f"{DEFAULT_CMDLINE} {extra_cmdline}".strip()))
    vm.start()
    try:
        host = local_host(vm, image, work / "known_hosts")
        log(f"local lab: QEMU ({vm.accel}) on {known_good.name}, SSH on 127.0.0.1:{vm.ssh_port}")
        HostConnection(host, log=log).wait_until_up(host.timeouts.boot_s)
        yield host
    finally:
        vm.stop()


class LocalLab(SshLab):
    """The SSH lab with one host: a fresh QEMU VM per run, started on entry, stopped on exit.

    Its lock and quarantine live in the run directory: each run's VM is its own host (two
    runs' local labs must not wait for each other), and its failures say nothing about
    the next run's."""

    kind = "local"

    def __init__(self, ref: LabRef, setup: LabSetup):
        super().__init__([], setup, state=setup.run_dir / "lab")
        self.ref = ref
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "LocalLab":
        known_good = Path(self.ref.kernel) if self.ref.kernel else self.setup.known_good
        if known_good is None:
            raise InputError("lab local: no kernel to start the VM on (nothing built and no lab.kernel)",
                             hint="build a baseline first, or set lab: {name: local, kernel: PATH}")
        with contextlib.ExitStack() as stack:
            host = stack.enter_context(local_lab(known_good, self.setup.cache_dir, self.setup.run_dir / "lab",
                                                 memory_mb=self.ref.memory_mb, cpus=self.ref.cpus,
                                                 nested=self.setup.nested, log=self.setup.log))
            self._stack = stack.pop_all()
        self._hosts = [host]
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
