"""Lab inventories: configs/labs/<name>.yaml, referenced from a spec's `lab:`.

Every way of touching a host is a field here: SSH (address, user, port, key,
known_hosts, jump host), the boot method, a console command (anything that
prints the serial console), power commands (any shell command: ipmitool, a PDU
script, redfish, or QMP for the local lab), timeouts, and tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from kpatchtest.util import StrictModel

BootMethod = Literal["kexec", "grub-reboot", "command"]


class PowerCommands(StrictModel):
    on: str | None = None
    off: str | None = None
    cycle: str | None = None        # e.g. "ipmitool -H bmc1 -U admin -E chassis power cycle"


class Timeouts(StrictModel):
    connect_s: float = 10.0         # TCP connect + SSH banner
    boot_s: float = 300.0           # reboot to SSH answering on the new kernel
    command_s: float = 600.0        # one remote command
    lock_wait_s: float = 600.0      # waiting for a host another run holds


class HostSpec(StrictModel):
    name: str = Field(min_length=1)
    address: str
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    key: str | None = None          # private key file; default: the SSH agent / ~/.ssh
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    insecure_host_keys: bool = False  # the only way to accept unknown host keys (logged)
    jump: str | None = None         # jump host, "user@host:port"
    boot: BootMethod = "kexec"
    boot_command: str | None = None  # boot: command; {kernel} {initrd} {cmdline} {release} are filled in, quoted
    cmdline: str | None = None      # kernel command line; default: the host's /proc/cmdline
    initrd: str | None = None       # local initrd to deploy with the kernel (kexec)
    console: str | None = None      # prints the serial console while it runs, e.g. "ipmitool ... sol activate"
    power: PowerCommands = Field(default_factory=PowerCommands)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    tags: list[str] = Field(default_factory=list)   # e.g. [amd, svm]
    quarantine_after: int = Field(default=3, ge=1)  # boot failures in a row before the host is skipped

    @model_validator(mode="after")
    def _command_needs_template(self) -> "HostSpec":
        if self.boot == "command" and not self.boot_command:
            raise ValueError("boot: command needs boot_command")
        return self


class LabSpec(StrictModel):
    name: str
    hosts: list[HostSpec] = Field(min_length=1)

    def select(self, tags: list[str]) -> list[HostSpec]:
        return [h for h in self.hosts if set(tags) <= set(h.tags)]


LABS_DIR = Path(__file__).resolve().parents[2] / "data" / "configs" / "labs"
