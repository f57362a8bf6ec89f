"""The SSH lab backend: hosts from an inventory, booted and driven over SSH.

Per BootJob: the host's local lock (no two runs on this machine) and its remote
lock (no two machines), deploy and boot the kernel, run the workloads under the
lock again (the reboot ended the channel that held it), then send the host back
to its known-good kernel: a test kernel is never left as the host's default.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from kpatchtest.errors import InputError, KpatchtestError
from kpatchtest.lab.backend import BootJob, BootRecord, Lab, LabSetup
from kpatchtest.lab.ssh.boot import Booter
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.hostlock import Quarantine, local_host_lock, remote_host_lock
from kpatchtest.lab.ssh.inventory import LABS_DIR, HostSpec, LabSpec
from kpatchtest.results import BootResult, WorkloadRun
from kpatchtest.rundir import CacheDir
from kpatchtest.spec import LabRef


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


class SshLab(Lab):
    kind = "ssh"

    def __init__(self, hosts: list[HostSpec], setup: LabSetup, state: Path | None = None):
        """`state`: where host locks and the quarantine live; by default the cache's lab-state,
        shared by every run on this machine, as the hosts are."""
        self._hosts = hosts
        self.setup = setup
        self.state = state or CacheDir(setup.cache_dir).lab_state
        self.quarantine = Quarantine(self.state / "quarantine.json")
        self.owner = f"{getpass.getuser()}@{os.uname().nodename} pid {os.getpid()} run {setup.run_name}"
        self._routed: set[str] = set()

    def hosts(self) -> list[HostSpec]:
        return self._hosts

    def run(self, job: BootJob) -> BootRecord:
        host, log = job.host, self.setup.log
        if self.quarantine.is_quarantined(host.name):
            return BootRecord(boot=BootResult(build=job.build, status="skipped", host=host.name, round=job.round,
                                              rerun=job.rerun, reason="host quarantined"))
        if host.name not in self._routed:       # once per host; every reconnect goes to run.log
            self._routed.add(host.name)
            log(HostConnection(host).route())
        try:
            with local_host_lock(self.state, host.name, host.timeouts.lock_wait_s):
                return self._boot(job)
        except KpatchtestError as e:      # host busy past the wait
            return BootRecord(boot=BootResult(build=job.build, status="skipped", host=host.name, round=job.round,
                                              rerun=job.rerun, reason=str(e)))

    def _boot(self, job: BootJob) -> BootRecord:
        host, log = job.host, self.setup.log
        booter = Booter(host, self.setup.run_dir, log=log)
        try:
            conn = HostConnection(host, log=log)
            conn.open()
            with remote_host_lock(conn, host.timeouts.lock_wait_s, self.owner):
                res = booter.boot(job.kernel, job.boot_dir)
            conn.close()
        except KpatchtestError as e:
            res = BootResult(build=job.build, status="boot-failed", host=host.name, method=host.boot,
                             reason=str(e), expected_release=job.kernel.kernelrelease)
        res.round, res.rerun = job.round, job.rerun
        workloads = None
        if res.status == "booted" and job.workloads is not None:
            workloads = self._workloads(job, res)
        if res.status == "booted" or res.recovered is False:
            try:
                if not booter.return_to_known_good():
                    log(f"{host.name}: did not come back on its known-good kernel")
            except KpatchtestError as e:
                log(f"{host.name}: returning to the known-good kernel failed: {e}")
        if self.quarantine.record(host.name, res.status == "booted", host.quarantine_after):
            log(f"{host.name}: {host.quarantine_after} boot failures in a row: quarantined")
        return BootRecord(boot=res, workloads=workloads)

    def _workloads(self, job: BootJob, res: BootResult) -> WorkloadRun:
        """The workloads, under the host's lock again (the reboot ended the channel that held it)."""
        assert job.workloads is not None
        try:
            with HostConnection(job.host, log=self.setup.log) as conn:
                conn.open()
                with remote_host_lock(conn, job.host.timeouts.lock_wait_s, self.owner):
                    return job.workloads.run(job.host, job.branch, res, job.workloads_dir, only=job.only)
        except KpatchtestError as e:
            self.setup.log(f"{job.host.name}: workloads not run on {job.branch} {res.build}: {e}")
            return job.workloads.not_run(job.host, res, str(e))
