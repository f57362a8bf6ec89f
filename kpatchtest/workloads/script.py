"""The SMM boot workload as one shell script, for labs that run a whole job on the device
(LAVA) instead of driving the host command by command over SSH.

No workload logic lives here. `record_smm_boot` runs `smm_boot.run_smm_boot` against a
recording connection (every command succeeds, every boot passes) to learn the commands
the SSH lab would run and in which order; `render_script` writes them as one POSIX-sh
script that runs them on the device and prints each command's output framed
(`kpt-o N LINE`, `kpt-e N LINE`, `kpt-end N rc=RC t0=UPTIME t1=UPTIME`). Back on this
machine, `replay_smm_boot` parses that output out of the device's log and runs
`run_smm_boot` again against a replaying connection that answers each command with what
the device printed: the record comes out of the same code as the SSH lab's, so it has the
same metrics, units, notes, logs and statuses.

The commands never depend on earlier answers except through run_smm_boot's own control
flow (a timed-out repetition ends the series): the device runs every repetition, and the
replay stops where run_smm_boot stops.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kpatchtest.lab.ssh.connection import HostUnreachable, RemoteCommandFailed, RunResult
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.spec import SmmBootSpec
from kpatchtest.workloads.record import WorkloadRecord
from kpatchtest.workloads.smm import RUN_SCRIPT
from kpatchtest.workloads.smm_boot import run_smm_boot

DEVICE_HOST = HostSpec(name="device", address="device")   # what DmesgWatch asks of a connection
_DRY_BOOT = "kpt-smm-boot rc=33 t0=0.00 t1=0.00\n"       # a passing boot, for the recording pass


@dataclass(frozen=True)
class Op:
    """One step of the workload on the device: a command, or a file put in place."""

    argv: tuple[str, ...] = ()
    put: tuple[Path, str] | None = None     # (local file, path on the device)

    @property
    def is_boot(self) -> bool:
        """The nested QEMU run itself (smm.SmmBootRun.argv: sh -c RUN_SCRIPT ...)."""
        return self.argv[:3] == ("sh", "-c", RUN_SCRIPT)


class _Recorder:
    """A connection that says yes to everything and remembers what it was asked."""

    host = DEVICE_HOST

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True, **_) -> RunResult:
        op = Op(argv=tuple(str(a) for a in argv))
        self.ops.append(op)
        return RunResult(" ".join(op.argv), 0, _DRY_BOOT if op.is_boot else "", "")

    def put(self, local: Path, remote: str) -> None:
        self.ops.append(Op(put=(Path(local), remote)))


def record_smm_boot(spec: SmmBootSpec, image: Path, repetitions: int, scratch: Path) -> list[Op]:
    """The steps run_smm_boot takes on a host where everything passes (its logs go to `scratch`)."""
    rec = _Recorder()
    run_smm_boot(rec, spec, image, repetitions, scratch, scratch)  # type: ignore[arg-type]
    return rec.ops


_SCRIPT_HEAD = r"""#!/bin/sh
# kpatchtest: the SMM boot workload, rendered by kpatchtest.workloads.script (do not edit)
K=${TMPDIR:-/tmp}/kpt-script.$$
mkdir -p "$K"
kpt_up() { read -r up _ < /proc/uptime; echo "$up"; }
kpt_frame() {   # N RC T0 T1: the command's output, framed
    sed "s/^/kpt-o $1 /" "$K/o"
    sed "s/^/kpt-e $1 /" "$K/e"
    echo "kpt-end $1 rc=$2 t0=$3 t1=$4"
}
kpt_run() {     # N ARGV...
    n=$1; shift
    t0=$(kpt_up)
    "$@" >"$K/o" 2>"$K/e"
    rc=$?
    kpt_frame "$n" "$rc" "$t0" "$(kpt_up)"
}
kpt_put() {     # N SRC DEST
    t0=$(kpt_up)
    { mkdir -p "$(dirname "$3")" && cp "$2" "$3"; } >"$K/o" 2>"$K/e"
    kpt_frame "$1" "$?" "$t0" "$(kpt_up)"
}
kpt_boot() {    # N NAME: after a boot command, hand its result to kpt_report (if defined)
    set -- "$2" $(sed -n 's/^kpt-smm-boot rc=\(-\{0,1\}[0-9]*\) t0=\([0-9.]*\) t1=\([0-9.]*\).*/\1 \2 \3/p' "$K/o")
    if command -v kpt_report >/dev/null 2>&1; then
        if [ -n "${2:-}" ]; then
            kpt_report "$1" "$2" "$(echo "$4 $3" | awk '{printf "%.2f", $1 - $2}')" \
                "$(echo "$t0 $(kpt_up)" | awk '{printf "%.2f", $2 - $1}')"
        else
            kpt_report "$1" none "" ""
        fi
    fi
}
"""


def render_script(ops: list[Op], device_path: Callable[[Path], str], report: str = "") -> str:
    """The steps as one POSIX-sh script. `device_path`: where each put's local file already
    is on the device (the lab delivers it); `report`: shell text defining
    `kpt_report NAME RC GUEST_S WALL_S`, called after each boot (NAME smm-boot.N; RC the
    guest's QEMU exit status, or `none` when the run wrapper gave no result)."""
    lines = [_SCRIPT_HEAD]
    if report:
        lines.append(report.rstrip() + "\n")
    boots = 0
    for n, op in enumerate(ops, 1):
        if op.put is not None:
            local, remote = op.put
            lines.append(f"kpt_put {n} {shlex.quote(device_path(local))} {shlex.quote(remote)}")
            continue
        lines.append(f"kpt_run {n} {shlex.join(op.argv)}")
        if op.is_boot:
            boots += 1
            lines.append(f"kpt_boot {n} smm-boot.{boots}")
    lines += ['rm -rf "$K"', "exit 0", ""]
    return "\n".join(lines)


@dataclass
class OpResult:
    rc: int
    t0: float
    t1: float
    stdout: str = ""
    stderr: str = ""


_FRAMED = re.compile(r"^kpt-(o|e) (\d+) ?(.*)$")
_END = re.compile(r"^kpt-end (\d+) rc=(-?\d+) t0=([\d.]+) t1=([\d.]+)\s*$")


def parse_output(lines: Sequence[str]) -> dict[int, OpResult]:
    """The framed output of a rendered script, from the device's log lines (other lines,
    e.g. kernel messages on a serial console, are ignored)."""
    out: dict[int, list[str]] = {}
    err: dict[int, list[str]] = {}
    done: dict[int, OpResult] = {}
    for raw in lines:
        line = raw.rstrip("\r\n")
        if m := _END.match(line):
            n = int(m[1])
            done[n] = OpResult(int(m[2]), float(m[3]), float(m[4]),
                               "".join(x + "\n" for x in out.pop(n, [])), "".join(x + "\n" for x in err.pop(n, [])))
        elif m := _FRAMED.match(line):
            (out if m[1] == "o" else err).setdefault(int(m[2]), []).append(m[3])
    return done


@dataclass
class _Replayer:
    """A connection that answers each step with what the device printed for it."""

    ops: list[Op]
    results: dict[int, OpResult]
    host: HostSpec = field(default_factory=lambda: DEVICE_HOST)
    boot_times: list[float] = field(default_factory=list)   # device-timed, per boot served
    _next: int = 0

    def _take(self, want: Op) -> OpResult:
        n = self._next + 1
        if n > len(self.ops) or self.ops[n - 1] != want:
            raise HostUnreachable(f"device log: step {n} is not the one the script ran "
                                  f"({' '.join(want.argv)[:60] or want.put})")
        self._next = n
        if n not in self.results:
            raise HostUnreachable(f"device log: no output for step {n} (the job ended before it)")
        return self.results[n]

    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True, **_) -> RunResult:
        op = Op(argv=tuple(str(a) for a in argv))
        r = self._take(op)
        if op.is_boot:
            self.boot_times.append(round(r.t1 - r.t0, 3))
        res = RunResult(" ".join(op.argv), r.rc, r.stdout, r.stderr)
        if check and r.rc != 0:
            raise RemoteCommandFailed(f"{op.argv[0]} exited {r.rc} on the device: {r.stderr.strip()[-200:]}", res)
        return res

    def put(self, local: Path, remote: str) -> None:
        r = self._take(Op(put=(Path(local), remote)))
        if r.rc != 0:
            raise HostUnreachable(f"putting {remote} in place on the device failed: {r.stderr.strip()[-200:]}")


WALL_NOTE = "the nested QEMU command on the device, timed there (/proc/uptime)"


def replay_smm_boot(spec: SmmBootSpec, image: Path, repetitions: int, ops: list[Op], results: dict[int, OpResult],
                    out: Path, run_dir: Path, log: Callable[[str], None] = lambda m: None
                    ) -> tuple[WorkloadRecord, dict[str, str]]:
    """run_smm_boot on what the device printed: the record and the probes used.

    wall_time is the device's own timing of each nested QEMU command (there is no SSH
    round trip to include); everything else is what run_smm_boot makes of the output."""
    rep = _Replayer(ops, results)
    record, used = run_smm_boot(rep, spec, image, repetitions, out, run_dir, log=log)  # type: ignore[arg-type]
    times = iter(rep.boot_times)
    for m in record.metrics:
        if m.name == "wall_time":
            m.values = [next(times, None) if v is not None else None for v in m.values]
            m.note = WALL_NOTE
            record.duration_s = round(sum(v for v in m.values if v is not None), 3)
    return record, used


def device_path_in(directory: str) -> Callable[[Path], str]:
    """device_path for files a lab puts in `directory` on the device under their own names."""
    return lambda local: posixpath.join(directory, local.name)
