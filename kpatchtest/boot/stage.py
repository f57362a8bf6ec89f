"""The boot stage: every built kernel, booted once on the lab's hosts.

The local lab is a QEMU VM made to look like a lab box (SSH on a loopback port,
console file, QMP power cycle), so it goes through the same Booter as hardware.
"""

from __future__ import annotations

import contextlib
import getpass
import os
from pathlib import Path
from typing import Protocol

import yaml
from pydantic import ValidationError

from kpatchtest.apply.engine import slug
from kpatchtest.errors import InputError, KpatchtestError
from kpatchtest.lab.local.lab import local_lab
from kpatchtest.lab.ssh.boot import Booter, KernelToBoot
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.hostlock import Quarantine, local_host_lock, remote_host_lock
from kpatchtest.lab.ssh.inventory import LABS_DIR, HostSpec, LabSpec
from kpatchtest.progress import Progress
from kpatchtest.results import BootResult, BranchResult, BuildResult, RunResult
from kpatchtest.spec import LabRef, Spec


def load_lab(ref: LabRef, base_dir: Path) -> LabSpec:
    """A named inventory (configs/labs/NAME.yaml) or a path to one."""
    p = Path(ref.name).expanduser()
    path = p if p.suffix in (".yaml", ".yml") else LABS_DIR / f"{ref.name}.yaml"
    if not path.is_absolute() and not path.exists():
        path = base_dir / path
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"lab {ref.name!r}: no inventory at {path}",
                         hint=f"use lab: {{name: local}} or add {LABS_DIR}/{ref.name}.yaml") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: malformed YAML: {e}") from None
    try:
        lab = LabSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    hosts = lab.select(ref.tags)
    if not hosts:
        raise InputError(f"lab {lab.name}: no host has all tags {ref.tags}")
    return LabSpec(name=lab.name, hosts=hosts)


def _kernel(build: BuildResult, run_dir: Path, label: str, extra: str) -> KernelToBoot:
    mods = build.artifacts.get("modules")
    return KernelToBoot(build=label, bzimage=run_dir / build.artifacts["bzImage"], kernelrelease=build.kernelrelease or "",
                        modules=run_dir / mods if mods else None, extra_cmdline=extra)


def _first_baseline(result: RunResult, run_dir: Path) -> Path | None:
    for b in result.branches:
        if b.build and b.build.baseline.status == "pass" and "bzImage" in b.build.baseline.artifacts:
            return run_dir / b.build.baseline.artifacts["bzImage"]
    return None


def _bootable(b: BranchResult) -> list[tuple[str, BuildResult]]:
    if not b.build:
        return []
    return [(label, r) for label, r in (("baseline", b.build.baseline), ("patched", b.build.patched))
            if r.status == "pass" and "bzImage" in r.artifacts]


class AfterBoot(Protocol):
    """What runs on a booted kernel under test before the host goes back (the workloads)."""

    def run(self, host: HostSpec, branch: BranchResult, boot: BootResult) -> None: ...

    def not_run(self, host: HostSpec, branch: BranchResult, boot: BootResult, reason: str) -> None: ...


def run(spec: Spec, base_dir: Path, opts, result: RunResult, progress: Progress, *,
        rounds: int = 1, after_boot: AfterBoot | None = None, nested: bool = False) -> None:
    """Boot every build `rounds` times, baseline and patched alternating per branch
    (B1 P1 B2 P2 ...); `after_boot` runs on each booted kernel (the workloads).
    `nested`: the local lab's image carries QEMU and SeaBIOS for nested guests."""
    ref = spec.lab
    assert ref is not None
    run_dir = Path(opts.out)
    state = Path(opts.cache_dir) / "lab-state"
    # The local lab is a fresh VM each run: its failures say nothing about the next run.
    quarantine = Quarantine((run_dir / "lab" if ref.name == "local" else state) / "quarantine.json")
    todo = [(b, label, r, n) for b in result.branches for n in range(1, rounds + 1) for label, r in _bootable(b)]
    with progress.stage("boot", len(todo)):
        if not todo:
            progress.log("nothing built to boot")
            return
        with contextlib.ExitStack() as stack:
            if ref.name == "local":
                known_good = Path(ref.kernel) if ref.kernel else _first_baseline(result, run_dir)
                assert known_good is not None
                hosts = [stack.enter_context(local_lab(known_good, Path(opts.cache_dir), run_dir / "lab",
                                                       memory_mb=ref.memory_mb, cpus=ref.cpus, nested=nested,
                                                       log=progress.log))]
            else:
                hosts = load_lab(ref, base_dir).hosts
            owner = f"{getpass.getuser()}@{os.uname().nodename} pid {os.getpid()} run {result.name}"
            for host in hosts:
                if quarantine.is_quarantined(host.name):
                    progress.log(f"{host.name}: quarantined after repeated boot failures, skipped "
                                 f"(clear with: kpatchtest lab clear {host.name})")
                    for b, label, _, n in todo:
                        b.boot.append(BootResult(build=label, status="skipped", host=host.name, round=n,
                                                 reason="host quarantined"))
                    continue
                _boot_on(host, todo, run_dir, spec, quarantine, state, owner, progress, after_boot)


def _after_boot(host: HostSpec, b: BranchResult, res: BootResult, after_boot: AfterBoot, owner: str,
                progress: Progress) -> None:
    """The workloads, under the host's lock again (the reboot ended the channel that held it)."""
    try:
        with HostConnection(host, log=progress.log) as conn:
            conn.open()
            with remote_host_lock(conn, host.timeouts.lock_wait_s, owner):
                after_boot.run(host, b, res)
    except KpatchtestError as e:
        progress.log(f"{host.name}: workloads not run on {b.name} {res.build}: {e}")
        after_boot.not_run(host, b, res, str(e))


def _boot_on(host: HostSpec, todo, run_dir: Path, spec: Spec, quarantine: Quarantine, state: Path, owner: str,
             progress: Progress, after_boot: AfterBoot | None) -> None:
    booter = Booter(host, run_dir, log=progress.log)
    progress.log(HostConnection(host).route())     # once per host; every reconnect goes to run.log
    try:
        with local_host_lock(state, host.name, host.timeouts.lock_wait_s):
            for b, label, build, n in todo:
                rel = f"boot/{slug(b.name)}/{label}{f'-r{n}' if n > 1 else ''}/{slug(host.name)}"
                try:
                    conn = HostConnection(host, log=progress.log)
                    conn.open()
                    with remote_host_lock(conn, host.timeouts.lock_wait_s, owner):
                        res = booter.boot(_kernel(build, run_dir, label, spec.lab.cmdline if spec.lab else ""), rel)
                    conn.close()
                except KpatchtestError as e:
                    res = BootResult(build=label, status="boot-failed", host=host.name, method=host.boot,
                                     reason=str(e), expected_release=build.kernelrelease)
                res.round = n
                b.boot.append(res)
                if res.status == "booted" and after_boot is not None:
                    _after_boot(host, b, res, after_boot, owner, progress)
                if res.status == "booted" or res.recovered is False:
                    try:
                        if not booter.return_to_known_good():
                            progress.log(f"{host.name}: did not come back on its known-good kernel")
                    except KpatchtestError as e:
                        progress.log(f"{host.name}: returning to the known-good kernel failed: {e}")
                if quarantine.record(host.name, res.status == "booted", host.quarantine_after):
                    progress.log(f"{host.name}: {host.quarantine_after} boot failures in a row: quarantined")
                progress.step(f"{b.name} {label}" + (f" round {n}" if n > 1 else ""), f"{res.status} on {host.name} in {res.duration_s:.0f} s"
                              + (f" ({res.reason})" if res.reason else "")
                              + (f", {len(res.splats)} splat(s)" if res.splats else ""))
    except KpatchtestError as e:      # host busy past the wait
        for b, label, build, n in todo:
            b.boot.append(BootResult(build=label, status="skipped", host=host.name, round=n, reason=str(e)))
