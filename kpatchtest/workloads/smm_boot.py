"""The SMM-heavy boot as a workload: N nested boots on the lab host -> one WorkloadRecord.

Each repetition starts the L2 guest (smm.SmmBootRun) with the probes of probes.py
around it, so a record carries, per repetition, the wall time, the SMM transitions,
the TDP MMU root lookups/allocations and KVM's own debugfs counters. A probe that
does not exist on the kernel under test leaves its metric unavailable (None), never 0;
which probe measured what is reported next to the record.

Two guests (spec.guest): `bootsector` (bootsector.py's 512-byte program) and `linux`
(linux_guest.py: GRUB, a bzImage, a tiny initramfs). The linux guest's console is
timestamped on the host, which gives `phase.<name>` metrics per repetition and, for a
guest that hangs or dies, the phase it reached.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kpatchtest.errors import InputError, KpatchtestError
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.spec import SmmBootSpec
from kpatchtest.util import user_path
from kpatchtest.workloads import linux_guest as LG
from kpatchtest.workloads import probes as P
from kpatchtest.workloads.dmesgwatch import DmesgWatch
from kpatchtest.workloads.record import Metric, WorkloadRecord, worst_status
from kpatchtest.workloads.smm import SmmBootResult, SmmBootRun, guest_memory_mb, run_probed, write_image

NAME = "smm-boot"
REMOTE_IMAGE = "/tmp/kpatchtest/smm-boot.img"


def image_for(spec: SmmBootSpec, directory: Path, kernel: Path | None = None) -> Path:
    """The boot image for this spec, written once per run (bootsector: it depends on the
    spec only) or once per guest kernel and message (linux: cached by content hash).

    linux: the guest kernel is `spec.kernel`, else `kernel` (the run's first passing
    baseline build, see stage.Workloads.prepare)."""
    if spec.guest == "linux":
        bz = user_path(spec.kernel) if spec.kernel else kernel
        if bz is None:
            raise InputError("workloads.smm_boot: guest linux has no kernel: no baseline build passed",
                             hint="set workloads.smm_boot.kernel to a bzImage")
        return LG.cached_image(bz, directory, spec.init_message).path
    path = directory / f"smm-boot-{spec.reads}x{spec.sectors_per_read}-{spec.spread_mb}mb.img"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_image(path, spec.reads, spec.sectors_per_read, spec.spread_mb)
    return path


def boot_run(spec: SmmBootSpec, image_path: str = REMOTE_IMAGE) -> SmmBootRun:
    """The nested QEMU run for this spec's guest, its image at `image_path` on the host
    (linux: the console's FIFO beside it)."""
    if spec.guest == "linux":
        return SmmBootRun(image_path=image_path, timeout_s=spec.timeout_s, disk_if=spec.disk,
                          memory_mb=LG.GUEST_MEMORY_MB,
                          serial_path=posixpath.join(posixpath.dirname(image_path), "smm-boot.serial"))
    return SmmBootRun(image_path=image_path, timeout_s=spec.timeout_s, disk_if=spec.disk,
                      memory_mb=guest_memory_mb(spec.spread_mb))


@dataclass
class _Rep:
    boot: SmmBootResult | None
    readings: dict[str, P.ProbeReading]
    error: str = ""

    @property
    def phases(self) -> LG.Phases | None:
        s = self.boot.serial if self.boot else None
        return LG.phases(s.t0, s.t1, s.lines) if s else None


def phase_detail(boot: SmmBootResult) -> str:
    """Where a linux guest that did not pass got to: the phase and its last console line."""
    if boot.serial is None:
        return ""
    ph = LG.phases(boot.serial.t0, boot.serial.t1, boot.serial.lines)
    last = next((LG.clean_line(x) for _, x in reversed(boot.serial.lines) if LG.clean_line(x)), "")
    return f"reached the {ph.reached} phase" + (f" (last console line: {last[:120]!r})" if last else " (no console output)")


def _metrics(reps: list[_Rep], probes_wanted: bool) -> tuple[list[Metric], dict[str, str]]:
    def col(get: Callable[[_Rep], float | None]) -> list[float | None]:
        return [get(r) for r in reps]

    metrics = [Metric(name="wall_time", unit="s", values=col(lambda r: r.boot.wall_s if r.boot else None),
                      note="the nested QEMU command on the lab host, SSH round trip included"),
               Metric(name="guest_time", unit="s", values=col(lambda r: r.boot.guest_s if r.boot else None),
                      note="QEMU start to exit, timed on the lab host (/proc/uptime, 10 ms steps)")]
    used: dict[str, str] = {}
    for m in P.PROBES:
        values = col(lambda r: r.readings[m.metric].value if m.metric in r.readings else None)
        first = next((r.readings[m.metric] for r in reps if m.metric in r.readings), None)
        if not probes_wanted:
            note = "probes off (smm_boot.probes: false)"
        elif first is None:
            note = "no probe reading"
        else:
            note = first.note
        probe = first.probe if first else None
        used[m.metric] = probe or f"unavailable: {note}"
        metrics.append(Metric(name=m.metric, unit=m.unit, values=values,
                              available=any(v is not None for v in values),
                              note=(f"{probe}; {note}" if probe and note else probe or note)))
    if any(r.boot and r.boot.serial for r in reps):
        durations = [r.phases.durations() if r.phases else {} for r in reps]
        for ph in LG.PHASES:
            values = [d.get(ph) for d in durations]
            metrics.append(Metric(name=f"phase.{ph}", unit="s", values=values, available=any(v is not None for v in values),
                                  note=f"{LG.PHASE_NOTES[ph]}; serial console lines stamped on the lab host"))
    stats = sorted({k for r in reps if r.boot for k in r.boot.kvm_stats if k in P.KVM_STATS_OF_INTEREST})
    for name in stats:
        values = col(lambda r: r.boot.kvm_stats.get(name) if r.boot else None)
        metrics.append(Metric(name=f"kvm.{name}", unit="count", values=values, note="KVM debugfs, per VM"))
    if not stats:
        used["kvm_stats"] = "unavailable: no KVM debugfs counters (CONFIG_DEBUG_FS, debugfs mounted?)"
    return metrics, used


def run_smm_boot(conn: HostConnection, spec: SmmBootSpec, image: Path, repetitions: int, out: Path,
                 run_dir: Path, log: Callable[[str], None] = lambda m: None) -> tuple[WorkloadRecord, dict[str, str]]:
    """`repetitions` SMM-heavy boots of `image` on the host; logs under `out`.

    A repetition that times out or errors ends the series (the next would most likely
    do the same and cost another timeout); the record says how many ran."""
    out.mkdir(parents=True, exist_ok=True)
    rel = lambda p: posixpath.relpath(p, run_dir)  # noqa: E731
    conn.run(["mkdir", "-p", posixpath.dirname(REMOTE_IMAGE)])
    conn.put(image, REMOTE_IMAGE)
    run = boot_run(spec)
    watch = DmesgWatch(conn)
    reps: list[_Rep] = []
    logs: list[str] = []
    for i in range(1, repetitions + 1):
        rep_log = out / f"smm-boot-{i}.log"
        try:
            if spec.probes:
                pb = run_probed(conn, run)
                rep, probe_log = _Rep(pb.boot, pb.probes), pb.probe_log
            else:
                rep, probe_log = _Rep(run.run(conn), {}), ""
        except KpatchtestError as e:
            rep, probe_log = _Rep(None, {}, error=f"the lab host stopped answering: {e}"), ""
        reps.append(rep)
        b = rep.boot
        if b and b.status != "pass" and b.serial:
            b.detail += "; " + phase_detail(b)
        rep_log.write_text(f"$ {' '.join(run.qemu_argv())}\n"
                           + (f"status {b.status}: {b.detail}\nexit {b.exit_code} wall {b.wall_s} s guest {b.guest_s} s\n"
                              f"--- stdout ---\n{b.stdout}\n--- stderr ---\n{b.stderr}\n" if b else rep.error + "\n")
                           + (f"--- probes ---\n{probe_log}" if probe_log else ""))
        logs.append(rel(rep_log))
        status = b.status if b else "error"
        log(f"smm-boot {i}/{repetitions}: {status}" + (f" in {b.guest_s} s" if b and b.guest_s is not None else "")
            + "".join(f", {k} {r.value}" for k, r in rep.readings.items()
                      if k in ("smm_transitions", "root_allocs") and r.value is not None)
            + ("".join(f", {k} {v} s" for k, v in rep.phases.durations().items() if v is not None) if rep.phases else ""))
        if status in ("timeout", "error"):
            break
    statuses = [r.boot.status if r.boot else "error" for r in reps]
    status = worst_status(statuses)
    details = [f"repetition {i}: {r.boot.detail if r.boot else r.error}"
               for i, r in enumerate(reps, 1) if (r.boot.status if r.boot else "error") != "pass"]
    if len(reps) < repetitions:
        details.append(f"{len(reps)} of {repetitions} repetitions ran")
    splat = watch.check(out / "dmesg-new.txt")
    if splat:
        logs.append(rel(out / "dmesg-new.txt"))
        details.insert(0, splat)
        if status == "pass":
            status = "fail"
    metrics, used = _metrics(reps, spec.probes)
    record = WorkloadRecord(name=NAME, status=status, metrics=metrics, logs=logs, group=NAME,
                            detail="; ".join(details[:4]),
                            duration_s=round(sum(r.boot.wall_s for r in reps if r.boot), 3))
    return record, used
