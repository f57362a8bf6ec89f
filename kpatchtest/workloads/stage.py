"""The workloads stage: on each booted kernel under test, before the host goes back.

Prepared once per run (kvm-unit-tests built on this machine, the SMM boot image
written); each BootJob of the boot stage then carries them to the lab backend, which
runs them on the booted kernel before the host goes back: one WorkloadRun per build,
host and round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from kpatchtest.boot.stage import first_baseline
from kpatchtest.errors import KpatchtestError
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.results import BootResult, WorkloadRun
from kpatchtest.rundir import CacheDir
from kpatchtest.spec import WorkloadsSpec
from kpatchtest.stage import Stage
from kpatchtest.workloads import kut
from kpatchtest.workloads.record import WorkloadRecord
from kpatchtest.workloads.smm_boot import NAME as SMM_NAME
from kpatchtest.workloads.smm_boot import image_for, run_smm_boot

REMOTE_KUT = "/var/tmp/kpatchtest/kvm-unit-tests"


class Workloads:
    """The spec's workloads, ready to run on any booted kernel."""

    def __init__(self, spec: WorkloadsSpec, run_dir: Path, cache_dir: Path, *, offline: bool = False,
                 jobs: int = 2, log: Callable[[str], None] = lambda m: None):
        self.spec = spec
        self.run_dir = run_dir
        self.cache_dir = cache_dir
        self.offline = offline
        self.jobs = jobs
        self.log = log
        self.kut_tree: Path | None = None
        self.kut_error = ""
        self.smm_image: Path | None = None

    def prepare(self, guest_kernel: Path | None = None) -> None:
        """Build kvm-unit-tests once (cached by source, arch and compiler); write the boot image
        (guest linux: of smm_boot.kernel, else of `guest_kernel`).

        A kvm-unit-tests source that cannot be had is reported on every run's records,
        not raised: the SMM boot and the boots themselves still have something to say."""
        k = self.spec.kvm_unit_tests
        if k is not None:
            try:
                where = CacheDir(self.cache_dir).kvm_unit_tests
                source = kut.kut_source(k.source, k.ref, where, offline=self.offline)
                self.log(f"kvm-unit-tests: building {source}")
                self.kut_tree = kut.build_kut(source, where, jobs=self.jobs)
                self.log(f"kvm-unit-tests: built {self.kut_tree.name}")
            except KpatchtestError as e:
                self.kut_error = str(e)
                self.log(f"kvm-unit-tests: {e}")
        if self.spec.smm_boot is not None:
            self.smm_image = image_for(self.spec.smm_boot, self.run_dir / "workloads", guest_kernel)

    # -- run by the lab backend on each booted kernel (lab/backend.py BootJob.workloads) ----
    def run(self, host: HostSpec, branch: str, boot: BootResult, rel_dir: str,
            only: tuple[str, ...] = ()) -> WorkloadRun:
        """Every workload of the spec on the booted kernel (`only`: just these tests, for the
        compare stage's reruns); one workload's failure to run is its own error record, the
        others still run."""
        wr = self._new_run(host, boot)
        kut_only = [t for t in only if t != SMM_NAME]
        out = self.run_dir / rel_dir
        out.mkdir(parents=True, exist_ok=True)
        say = lambda m: self.log(f"{branch} {boot.build}: {m}")  # noqa: E731
        conn = HostConnection(host, log=self.log)
        try:
            conn.open()
        except KpatchtestError as e:
            wr.error = f"{host.name}: {e}"
            say(f"workloads not run: {e}")
            return wr
        # One workload's failure to run (a deploy that fails, a host that stops answering)
        # is that workload's error record; the others still run and keep their results.
        try:
            if self.spec.kvm_unit_tests is not None and (kut_only or not only):
                try:
                    wr.records += self._kvm_unit_tests(conn, out, say, kut_only)
                except KpatchtestError as e:
                    wr.records.append(self._error_record("kvm-unit-tests", kut.GROUP, e, say))
            if self.spec.smm_boot is not None and self.smm_image is not None and (SMM_NAME in only or not only):
                try:
                    record, wr.probes = run_smm_boot(conn, self.spec.smm_boot, self.smm_image,
                                                     self.spec.repetitions, out / "smm-boot", self.run_dir, log=say)
                    wr.records.append(record)
                except KpatchtestError as e:
                    wr.records.append(self._error_record(SMM_NAME, SMM_NAME, e, say))
        finally:
            conn.close()
        return wr

    @staticmethod
    def _error_record(name: str, group: str, e: KpatchtestError, say: Callable[[str], None]) -> WorkloadRecord:
        say(f"{name}: {e}")
        return WorkloadRecord(name=name, status="error", group=group, detail=str(e))

    def not_run(self, host: HostSpec, boot: BootResult, reason: str) -> WorkloadRun:
        wr = self._new_run(host, boot)
        wr.error = f"{host.name}: not run: {reason}"
        return wr

    def _new_run(self, host: HostSpec, boot: BootResult) -> WorkloadRun:
        return WorkloadRun(build=boot.build, host=host.name, round=boot.round, rerun=boot.rerun,
                           kernelrelease=boot.kernelrelease, repetitions=self.spec.repetitions)

    def _kvm_unit_tests(self, conn: HostConnection, out: Path, say: Callable[[str], None],
                        only: list[str]) -> list[WorkloadRecord]:
        k = self.spec.kvm_unit_tests
        assert k is not None
        if self.kut_tree is None:
            return [WorkloadRecord(name="kvm-unit-tests", status="error", group=kut.GROUP,
                                   detail=f"not built: {self.kut_error}")]
        kut.deploy_kut(conn, self.kut_tree, REMOTE_KUT)
        tests, groups = (only, []) if only else (list(k.tests), list(k.groups))
        return kut.run_kut(conn, REMOTE_KUT, tests, groups, dict(k.env), k.timeout_s,
                           out / "kvm-unit-tests", tap=k.tap, run_dir=self.run_dir, log=say)


class WorkloadsStage(Stage[None, WorkloadRun]):
    """Prepares the workloads once per run; they run inside the boot stage's jobs."""

    name = "workloads"
    record_type = WorkloadRun

    def prepare(self) -> None:
        ctx = self.ctx
        w = Workloads(ctx.spec.workloads, ctx.opts.out, ctx.opts.cache_dir, offline=ctx.opts.offline,
                      jobs=ctx.spec.build.jobs or os.cpu_count() or 2, log=ctx.progress.log)
        w.prepare(guest_kernel=first_baseline(ctx.result.branches, ctx.opts.out))   # the lab's known-good kernel
        ctx.shared["workloads"] = w

    def units(self) -> list[None]:
        return []
