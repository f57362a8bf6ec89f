"""The Lab contract: a backend takes a BootJob and gives back its records.

The boot stage never knows which lab it talks to: it asks `open_lab` for one,
hands it BootJobs (a build of a branch, a host, a round, and the workloads to
run on that boot) and records what comes back. The SSH lab (hardware over SSH)
and the local lab (a QEMU VM made to look like a lab box) drive a host command by
command; the LAVA lab (lab/lava/) runs each BootJob as one whole job on a LAVA server
and implements the same `run`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from kpatchtest.lab.ssh.boot import KernelToBoot
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.results import BootResult, WorkloadRun
from kpatchtest.util import StrictModel

if TYPE_CHECKING:
    from kpatchtest.spec import LabRef
    from kpatchtest.workloads.stage import Workloads


@dataclass(frozen=True)
class BootJob:
    """One boot of one build on one host, with the workloads that run on it."""

    branch: str
    build: str                  # baseline | patched
    round: int
    host: HostSpec
    kernel: KernelToBoot
    boot_dir: str               # run-directory paths (RunDir.boot / RunDir.workloads)
    workloads_dir: str
    workloads: "Workloads | None" = None
    rerun: int = 0              # > 0: a confirmation boot for the compare stage
    only: tuple[str, ...] = ()  # with rerun: just these tests (kvm-unit-tests names, "smm-boot")


class BootRecord(StrictModel):
    """What a lab returns for a BootJob: the boot, and the workloads run on it (if any)."""

    boot: BootResult
    workloads: WorkloadRun | None = None


class Lab:
    """A lab backend: entered once per run (bring-up), `run` per BootJob, left at the end."""

    kind: ClassVar[str]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def hosts(self) -> list[HostSpec]:
        raise NotImplementedError

    def run(self, job: BootJob) -> BootRecord:
        raise NotImplementedError


@dataclass
class LabSetup:
    """What any backend may need to start: where things go, and how to say what it does."""

    run_dir: Path
    cache_dir: Path
    run_name: str
    cmdline: str = ""
    nested: bool = False                        # the workloads need nested guests (QEMU, SeaBIOS)
    known_good: Path | None = None              # the local lab boots this kernel first
    log: Callable[[str], None] = lambda m: None


def open_lab(ref: "LabRef", base_dir: Path, setup: LabSetup) -> Lab:
    """The backend a spec's `lab:` names: `local`, `lava` (a LAVA server), else an inventory of SSH hosts."""
    if ref.name == "local":
        from kpatchtest.lab.local.lab import LocalLab
        return LocalLab(ref, setup)
    if ref.name == "lava":
        from kpatchtest.lab.lava.lab import LavaLab
        return LavaLab(ref, setup)
    from kpatchtest.lab.ssh.lab import SshLab, load_lab
    return SshLab(load_lab(ref, base_dir).hosts, setup)
