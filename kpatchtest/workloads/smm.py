"""The SMM-heavy boot: one nested guest run (QEMU + SeaBIOS + bootsector.py's image).

On a lab host the kernel under test is the KVM host; the workload starts an L2 guest
with `-accel kvm -machine q35,smm=on`, whose firmware enters and leaves SMM about four
times per BIOS disk read. Pieces:

- `nested_qemu_argv()`: the QEMU command line;
- `interpret_exit()`: QEMU's exit status -> (workload status, detail);
- `SmmBootRun`: run it through a `Runner` (a lab HostConnection, or tests' `LocalRunner` for
  this machine) inside a tiny POSIX-sh wrapper (`RUN_SCRIPT`) that bounds it with
  `timeout -s KILL`, times it with /proc/uptime, and samples KVM's per-VM debugfs
  counters while the guest lives (they vanish with the VM).

`timeout -s KILL N` is used, not `--signal=KILL`: busybox timeout (the lab initramfs)
only knows the short option. Both coreutils and busybox then end with status 137 when
the limit hits (coreutils may give 124 for other signals).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, Sequence

from kpatchtest.workloads.bootsector import EXIT_MOVE_ERROR, EXIT_NO_EDD, EXIT_OK, EXIT_READ_ERROR, make_boot_image

if TYPE_CHECKING:
    from kpatchtest.workloads.probes import ProbeReading

QEMU = "qemu-system-x86_64"
DEBUG_EXIT_DEVICE = "isa-debug-exit,iobase=0xf4,iosize=0x04"

Status = Literal["pass", "fail", "error", "timeout"]
DiskIf = Literal["ahci", "ide"]

# Exit statuses that mean "killed by the time limit".
TIMEOUT_EXITS = {124: "timeout(1) sent its signal (exit 124)",
                 137: "killed by SIGKILL (timeout -s KILL; exit 137)",
                 -9: "killed by SIGKILL",
                 -1: "killed by a signal (no exit status)"}


def guest_memory_mb(spread_mb: int = 0) -> int:
    """Guest RAM for an image with this spread: the window, 1 MiB below it, SeaBIOS's
    tables at the top of RAM, with room to spare. At least 64 MiB."""
    return max(64, 1 + spread_mb + 31)


def nested_qemu_argv(image_path: str, accel: str = "kvm", disk_if: DiskIf = "ahci",
                     timeout_s: float | None = None, *, memory_mb: int = 64,
                     qemu: str = QEMU, cpu: str | None = None,
                     debugcon_path: str | None = None, serial_path: str | None = None,
                     extra: Sequence[str] = ()) -> list[str]:
    """QEMU argv for one SMM-heavy boot of `image_path`.

    disk_if "ahci": `-machine q35,smm=on`, the disk on q35's built-in AHCI controller
    (bus ide.0). SeaBIOS drives AHCI from 32-bit code entered through SMM: about four
    SMM transitions per int 13h read. This is the workload.
    disk_if "ide": `-machine pc,smm=on`, the disk on PIIX IDE (bus ide.0). SeaBIOS's
    ATA driver runs in 16-bit mode: the same reads without the SMM storm, a control.

    -nodefaults: no NIC option ROM to fall back to, no VGA; -display none and no serial
    or monitor: nothing reads stdin. -no-reboot: a reset or triple fault ends QEMU
    (exit 0) instead of looping. With `timeout_s` the argv starts with
    `timeout -s KILL <s>` (busybox or coreutils on the host).
    `debugcon_path`: SeaBIOS's debug log (port 0x402) to that file.
    `serial_path`: the guest's COM1 to that file (RUN_SCRIPT makes it a FIFO it timestamps).
    """
    if disk_if == "ahci":
        machine = "q35,smm=on"
    elif disk_if == "ide":
        machine = "pc,smm=on"
    else:
        raise ValueError(f"disk_if must be 'ahci' or 'ide', not {disk_if!r}")
    for what, path in (("-drive", image_path), ("-serial", serial_path), ("debugcon", debugcon_path)):
        if path and "," in path:
            raise ValueError(f"QEMU {what} cannot take a file name with a comma: {path!r}")
    serial = f"file:{serial_path}" if serial_path else "none"
    argv = [qemu, "-accel", accel, "-machine", machine, "-m", str(memory_mb),
            "-nodefaults", "-display", "none", "-serial", serial, "-monitor", "none",
            "-no-reboot",
            "-device", DEBUG_EXIT_DEVICE,
            "-drive", f"file={image_path},format=raw,if=none,id=d0",
            "-device", "ide-hd,drive=d0,bus=ide.0"]
    if cpu:
        argv += ["-cpu", cpu]
    if debugcon_path:
        argv += ["-chardev", f"file,id=kptdbg,path={debugcon_path}",
                 "-device", "isa-debugcon,iobase=0x402,chardev=kptdbg"]
    argv += list(extra)
    if timeout_s is not None:
        argv = ["timeout", "-s", "KILL", _secs(timeout_s)] + argv
    return argv


def _secs(t: float) -> str:
    if t <= 0:
        raise ValueError(f"timeout must be positive, not {t}")
    return str(int(t)) if float(t).is_integer() else f"{t:.3f}"


def interpret_exit(code: int | None) -> tuple[Status, str]:
    """QEMU's exit status (through `timeout -s KILL`) -> (status, detail).

    None (no status at all) counts as a timeout: the run was cut off."""
    if code is None:
        return "timeout", "no exit status: the run was cut off"
    if code in TIMEOUT_EXITS:
        return "timeout", TIMEOUT_EXITS[code]
    if code == EXIT_OK:
        return "pass", f"guest wrote success to isa-debug-exit (exit {code})"
    if code == EXIT_READ_ERROR:
        return "fail", f"guest: a BIOS int 13h read failed (exit {code})"
    if code == EXIT_MOVE_ERROR:
        return "fail", f"guest: a BIOS int 15h block move failed (exit {code})"
    if code == EXIT_NO_EDD:
        return "fail", f"guest: BIOS has no int 13h extensions (exit {code})"
    if code == 0:
        return "error", "QEMU exited 0 without the guest writing isa-debug-exit (reset or triple fault under -no-reboot)"
    if code == 1:
        return "error", "QEMU failed (exit 1): bad arguments, KVM or SMM unavailable, or missing firmware"
    if code in (126, 127):
        return "error", f"command not executable or not found (exit {code})"
    if code & 1:
        return "error", f"guest wrote unknown status {code >> 1:#x} to isa-debug-exit (exit {code})"
    if code > 128:
        return "error", f"killed by signal {code - 128} (exit {code})"
    return "error", f"QEMU exited {code}"


# --- running it --------------------------------------------------------------------

class _Result(Protocol):
    exit_code: int
    stdout: str
    stderr: str


class Runner(Protocol):
    """What SmmBootRun needs of a host: kpatchtest.lab.ssh.HostConnection fits."""

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            check: bool = True) -> _Result: ...


# The remote part, run as `sh -c RUN_SCRIPT sh LIMIT STATSDIR SERIAL ARGV...`. It prints
#   kpt-kvmstat VMDIR NAME VALUE   (last complete sample of /sys/kernel/debug/kvm/PID-FD/*
#                                  taken while the VM existed)
#   kpt-serial UPTIME LINE         (with SERIAL: each line QEMU wrote to the FIFO SERIAL,
#                                  stamped when it arrived; a shell builtin reads uptime)
#   kpt-smm-boot rc=RC t0=UPTIME t1=UPTIME
# and always exits 0 (the status is in rc=, so an ssh session killed with its child
# cannot be mistaken for a result). The script holds the FIFO open read-write on fd 3
# (no open blocks, and the reader sees EOF only when the script lets go after QEMU).
RUN_SCRIPT = r"""
limit=$1; kvmdbg=$2; serial=$3; shift 3
tmp=${TMPDIR:-/tmp}/kpt-kvmstat.$$
rm -f "$tmp" "$tmp.last" "$tmp.serial"
if [ -n "$serial" ]; then
    rm -f "$serial"
    mkfifo "$serial" || serial=
fi
if [ -n "$serial" ]; then
    exec 3<>"$serial"
    (
        exec 3>&-
        while IFS= read -r line || [ -n "$line" ]; do
            read -r up _ < /proc/uptime
            printf 'kpt-serial %s %s\n' "$up" "$line"
            line=
        done
    ) < "$serial" > "$tmp.serial" &
    reader=$!
fi
t0=$(cut -d' ' -f1 /proc/uptime)
timeout -s KILL "$limit" "$@" 3>&- &
pid=$!
if [ -n "$kvmdbg" ] && [ -d "$kvmdbg" ]; then
    while kill -0 "$pid" 2>/dev/null; do
        ok=0
        : > "$tmp"
        for d in "$kvmdbg"/[0-9]*-[0-9]*; do
            [ -d "$d" ] || continue
            ok=1
            for f in "$d"/*; do
                [ -f "$f" ] || continue
                # a file that cannot be read is skipped (6.1: mmu_rmaps_stat fails for a
                # VM without rmaps, i.e. on the TDP MMU); a VM that went away mid-sample
                # is caught by the directory check below
                if read -r v < "$f" 2>/dev/null; then
                    echo "kpt-kvmstat ${d##*/} ${f##*/} $v" >> "$tmp"
                fi
            done
            [ -d "$d" ] || ok=0
        done
        [ "$ok" = 1 ] && mv -f "$tmp" "$tmp.last"
        sleep 0.1 2>/dev/null || sleep 1
    done
fi
wait "$pid"
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
[ -f "$tmp.last" ] && cat "$tmp.last"
if [ -n "$serial" ]; then
    exec 3>&-
    wait "$reader"
    cat "$tmp.serial"
    rm -f "$serial"
fi
rm -f "$tmp" "$tmp.last" "$tmp.serial"
echo "kpt-smm-boot rc=$rc t0=$t0 t1=$t1"
exit 0
"""

KVM_DEBUGFS = "/sys/kernel/debug/kvm"
_BOOT_LINE = re.compile(r"^kpt-smm-boot rc=(-?\d+) t0=([\d.]+) t1=([\d.]+)\s*$", re.M)
_STAT_LINE = re.compile(r"^kpt-kvmstat (\S+) (\S+) (-?\d+)\s*$", re.M)
_SERIAL_LINE = re.compile(r"^kpt-serial ([\d.]+) (.*)$", re.M)


@dataclass
class SmmBootResult:
    exit_code: int | None        # QEMU's (through timeout); None: the wrapper gave no answer
    status: Status
    detail: str
    wall_s: float                # measured by the caller around the whole command
    guest_s: float | None        # measured on the host (/proc/uptime, 10 ms steps)
    kvm_stats: dict[str, int] = field(default_factory=dict)  # summed over the run's VMs
    stdout: str = ""
    stderr: str = ""
    serial: SerialLog | None = None   # with SmmBootRun.serial_path: the timestamped console


@dataclass(frozen=True)
class SerialLog:
    """The guest's console as RUN_SCRIPT saw it: host uptimes of QEMU's start and end,
    and (uptime, line) per line, stamped on arrival."""

    t0: float
    t1: float
    lines: list[tuple[float, str]]


def parse_serial(stdout: str) -> SerialLog | None:
    """RUN_SCRIPT's kpt-serial lines and its t0/t1; None without the result line."""
    m = None
    for m in _BOOT_LINE.finditer(stdout):
        pass
    if m is None:
        return None
    t1 = float(m[3])
    # a last line without a newline is read at EOF, after t1: it arrived by QEMU's exit
    lines = [(min(float(s[1]), t1), s[2].rstrip("\r")) for s in _SERIAL_LINE.finditer(stdout)]
    return SerialLog(float(m[2]), t1, lines)


def parse_run_output(stdout: str) -> tuple[int | None, float | None, dict[str, int]]:
    """RUN_SCRIPT's stdout -> (exit code, seconds on the host, KVM debugfs counters)."""
    m = None
    for m in _BOOT_LINE.finditer(stdout):
        pass
    code = int(m[1]) if m else None
    secs = round(float(m[3]) - float(m[2]), 2) if m else None
    stats: dict[str, int] = {}
    for s in _STAT_LINE.finditer(stdout):
        stats[s[2]] = stats.get(s[2], 0) + int(s[3])
    return code, secs, stats


@dataclass
class SmmBootRun:
    """One SMM-heavy boot of an image that is already on the host (see upload_image).

    `timeout_s` bounds QEMU (timeout -s KILL); the command as a whole gets
    `timeout_s + slack_s` before the runner gives up on it."""

    image_path: str
    timeout_s: float = 60.0
    accel: str = "kvm"
    disk_if: DiskIf = "ahci"
    memory_mb: int = 64
    qemu: str = QEMU
    cpu: str | None = None
    debugcon_path: str | None = None
    kvm_debugfs: str | None = KVM_DEBUGFS   # None: do not sample KVM counters
    slack_s: float = 30.0
    serial_path: str | None = None          # a FIFO on the host for the guest's console
    extra: tuple[str, ...] = ()             # more QEMU arguments

    def qemu_argv(self) -> list[str]:
        return nested_qemu_argv(self.image_path, self.accel, self.disk_if, memory_mb=self.memory_mb,
                                qemu=self.qemu, cpu=self.cpu, debugcon_path=self.debugcon_path,
                                serial_path=self.serial_path, extra=self.extra)

    def argv(self) -> list[str]:
        """The whole command: sh -c RUN_SCRIPT with the limit, debugfs dir, serial FIFO and QEMU argv."""
        return ["sh", "-c", RUN_SCRIPT, "sh", _secs(self.timeout_s), self.kvm_debugfs or "",
                self.serial_path or "", *self.qemu_argv()]

    def run(self, runner: Runner) -> SmmBootResult:
        start = time.monotonic()
        r = runner.run(self.argv(), timeout=self.timeout_s + self.slack_s, check=False)
        wall = round(time.monotonic() - start, 3)
        code, guest_s, stats = parse_run_output(r.stdout)
        if code is None:
            status, detail = "error", f"the run wrapper gave no result (exit {r.exit_code}): {r.stderr.strip()[-300:]}"
        else:
            status, detail = interpret_exit(code)
            if status == "error" and r.stderr.strip():
                detail += ": " + r.stderr.strip().splitlines()[-1][:300]
        return SmmBootResult(code, status, detail, wall, guest_s, stats, r.stdout, r.stderr,
                             parse_serial(r.stdout) if self.serial_path else None)


@dataclass
class ProbedBoot:
    boot: SmmBootResult
    probes: dict[str, "ProbeReading"]      # metric -> reading (value None = unavailable)
    probe_log: str                          # setup + collect output, for the record's log


def run_probed(runner: Runner, run: SmmBootRun, *, buffer_kb: int | None = None,
               script_timeout_s: float = 60.0, hot: bool = False) -> ProbedBoot:
    """setup_script -> the boot -> collect_script, all as root on the host.

    The collect step runs even when the boot failed or timed out, so the probes are
    always removed again. `hot`: also the probes on hot kernel functions (probes.py;
    6.x roots freed), which slow the run and make other probes miss some hits."""
    from kpatchtest.workloads import probes as P

    setup = P.setup_script(buffer_kb or P.DEFAULT_BUFFER_KB, hot=hot)
    s = runner.run(["sh", "-c", setup], timeout=script_timeout_s, check=False)
    try:
        boot = run.run(runner)
    finally:
        c = runner.run(["sh", "-c", P.collect_script()], timeout=script_timeout_s, check=False)
    readings = P.read_probes(s.stdout, c.stdout)
    log = "".join(["# setup\n", s.stdout, s.stderr, "# collect\n", c.stdout, c.stderr])
    return ProbedBoot(boot, readings, log)


def write_image(path: str | os.PathLike[str], reads: int, sectors_per_read: int = 8,
                spread_mb: int = 0, **kw: int) -> Path:
    """Write make_boot_image(...) to a local file."""
    p = Path(path)
    p.write_bytes(make_boot_image(reads, sectors_per_read, spread_mb, **kw))
    return p


def upload_image(conn, local: Path, remote: str) -> str:
    """Put a local image on the lab host (HostConnection.put); returns the remote path."""
    conn.put(local, remote)
    return remote
