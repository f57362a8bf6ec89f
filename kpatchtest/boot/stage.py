"""The boot stage: every built kernel booted `rounds` times on every lab host, with the
spec's workloads run on each boot; one unit per BootJob.

Baseline and patched boot in pairs per branch, half the pairs baseline first, shuffled by
a seeded RNG (`workloads.order: random`, the default; `alternate`: B1 P1 B2 P2 ...), so
drift in the lab hits both sides alike. The compare stage may ask for confirmation boots
(reruns) of both kernels. Jobs on one host run in order; hosts run concurrently. The stage
does not know which lab it talks to: a Lab backend (lab/backend.py) runs each job.
"""

from __future__ import annotations

import json
from pathlib import Path

from kpatchtest import __version__
from kpatchtest.compare.stage import RerunNeed, round_orders
from kpatchtest.lab.backend import BootJob, BootRecord, LabSetup, open_lab
from kpatchtest.lab.ssh.boot import KernelToBoot
from kpatchtest.results import BranchResult, BuildResult
from kpatchtest.rundir import RunDir, input_key
from kpatchtest.stage import Stage


def _kernel(build: BuildResult, run_dir: Path, label: str, extra: str) -> KernelToBoot:
    mods = build.artifacts.get("modules")
    return KernelToBoot(build=label, bzimage=run_dir / build.artifacts["bzImage"], kernelrelease=build.kernelrelease or "",
                        modules=run_dir / mods if mods else None, extra_cmdline=extra)


def _bootable(b: BranchResult) -> list[tuple[str, BuildResult]]:
    if not b.build:
        return []
    return [(label, r) for label, r in (("baseline", b.build.baseline), ("patched", b.build.patched))
            if r.status == "pass" and "bzImage" in r.artifacts]


def first_baseline(branches: list[BranchResult], run_dir: Path) -> Path | None:
    """The local lab's known-good kernel by default: the first baseline that built."""
    for b in branches:
        if b.build and b.build.baseline.status == "pass" and "bzImage" in b.build.baseline.artifacts:
            return run_dir / b.build.baseline.artifacts["bzImage"]
    return None


class BootStage(Stage[BootJob, BootRecord]):
    name = "boot"
    record_type = BootRecord
    parallel = True         # across hosts; one host's jobs run in order (resource())

    def __init__(self, ctx, reruns: "dict[str, list[RerunNeed]] | None" = None):
        """reruns: the compare stage's confirmation boots per branch, instead of the rounds."""
        super().__init__(ctx)
        self.reruns = reruns

    def prepare(self) -> None:
        ctx = self.ctx
        spec, opts = ctx.spec, ctx.opts
        self.workloads = ctx.shared.get("workloads")        # prepared by the workloads stage, if it runs
        ws = spec.workloads if self.workloads is not None else None
        self.rounds = ws.rounds if ws else 1
        self.orders = round_orders(ws) if ws else [("baseline", "patched")]
        setup = LabSetup(run_dir=opts.out, cache_dir=opts.cache_dir, run_name=ctx.result.name,
                         cmdline=spec.lab.cmdline, nested=self.workloads is not None,
                         known_good=first_baseline(ctx.result.branches, opts.out), log=ctx.progress.log)
        self._todo = [(b, label, r) for b in ctx.result.branches for label, r in _bootable(b)]
        self.lab = None
        if self._todo:
            self.lab = open_lab(spec.lab, ctx.loaded.base_dir, setup).__enter__()
        else:
            ctx.progress.log("nothing built to boot")

    def finish(self) -> None:
        if self.lab is not None:
            self.lab.__exit__(None, None, None)
            self.lab = None

    def units(self) -> list[BootJob]:
        if self.lab is None:
            return []
        jobs = []
        extra = self.ctx.spec.lab.cmdline
        by_branch: dict[str, dict[str, BuildResult]] = {}
        for b, label, r in self._todo:
            by_branch.setdefault(b.name, {})[label] = r
        def job(name: str, label: str, host, n: int, rerun: int = 0, only: tuple[str, ...] = ()) -> BootJob:
            return BootJob(branch=name, build=label, round=n, host=host, rerun=rerun, only=only,
                           kernel=_kernel(by_branch[name][label], self.ctx.opts.out, label, extra),
                           boot_dir=RunDir.boot(name, label, n, host.name),
                           workloads_dir=RunDir.workloads(name, label, n, host.name), workloads=self.workloads)

        for host in self.lab.hosts():
            for name, builds in by_branch.items():
                if self.reruns is not None:
                    # a rerun is one more boot of each kernel, numbered after the rounds
                    for need in (n for n in self.reruns.get(name, []) if n.host == host.name):
                        for k in range(need.first_rerun, need.first_rerun + need.times):
                            jobs += [job(name, label, host, self.rounds + k, k, need.tests)
                                     for label in ("baseline", "patched") if label in builds]
                    continue
                for n, pair in enumerate(self.orders, start=1):
                    jobs += [job(name, label, host, n) for label in pair if label in builds]
        return jobs

    @staticmethod
    def resource(job: BootJob) -> str:
        return job.host.name

    def label(self, job: BootJob) -> str:
        if job.rerun:
            return f"{job.branch} {job.build} rerun {job.rerun} ({', '.join(job.only)})"
        return f"{job.branch} {job.build}" + (f" round {job.round}" if self.rounds > 1 else "")

    def slot(self, job: BootJob) -> int:
        """0: the job boots first in its round's pair, 1: second (reruns: baseline first)."""
        pair = self.orders[job.round - 1] if not job.rerun and job.round <= len(self.orders) else ("baseline", "patched")
        return pair.index(job.build)

    def key(self, job: BootJob) -> str:
        """The kernel's bytes (by its content-addressed artifact), the host, the round and its
        slot in the pair, and every setting of the lab and of what runs on the boot: change
        any and the boot runs again. Not the design of the whole run (rounds, order, seed):
        more rounds keep the boots already made whose slot stays the same."""
        spec = self.ctx.spec
        return input_key(__version__, job.branch, job.build, job.round, self.slot(job), job.rerun, *job.only,
                         # the host as a lab box: not how this run reaches it (the local lab's
                         # port, console and power commands are new with every VM)
                         job.host.model_dump_json(include={"name", "address", "user", "boot", "boot_command",
                                                           "cmdline", "initrd", "tags"}),
                         Path(job.kernel.bzimage).resolve(), job.kernel.kernelrelease, job.kernel.extra_cmdline,
                         spec.lab.model_dump_json(),
                         json.dumps(spec.workloads.model_dump(mode="json", exclude={"rounds", "order", "seed"}),
                                    sort_keys=True)
                         if self.workloads is not None and spec.workloads is not None else "")

    def run(self, job: BootJob) -> BootRecord:
        assert self.lab is not None
        return self.lab.run(job)

    def record(self, job: BootJob, record: BootRecord) -> None:
        b = self.ctx.result.branch(job.branch)
        b.boot.append(record.boot)
        if record.workloads is not None:
            b.workloads.append(record.workloads)

    def describe(self, job: BootJob, record: BootRecord) -> str:
        res = record.boot
        return (f"{res.status} on {res.host} in {res.duration_s:.0f} s" + (f" ({res.reason})" if res.reason else "")
                + (f", {len(res.splats)} splat(s)" if res.splats else ""))
