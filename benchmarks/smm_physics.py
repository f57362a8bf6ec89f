#!/usr/bin/env python3
"""SMM-heavy boot physics on real kernels: TDP MMU roots with and without root preservation.

    .venv/bin/python benchmarks/smm_physics.py --kernel 5.10=BZIMAGE --kernel 6.1=BZIMAGE
    .venv/bin/python benchmarks/smm_physics.py --results RUN/results.json
    .venv/bin/python benchmarks/smm_physics.py            # find, or build, the two kernels

What it measures. Each kernel boots as the KVM host (L1) in the local QEMU lab (TCG,
`-cpu qemu64,+svm,+npt`, nested lab image, kernel command line + `kvm.tdp_mmu=1`).
Inside it, the SMM-heavy boot (kpatchtest.workloads.smm) starts an L2 SeaBIOS guest on
`q35,smm=on` whose boot sector does `--reads` BIOS int 13h reads from an AHCI disk
(about four SMM transitions each); with a spread (`--spreads`, MB) > 0 it also copies 64 KiB per read
into a window of that many MB above 1 MiB, so each SMM episode is followed by fresh
memory touches (a bootloader loading a kernel). The probe table of
kpatchtest.workloads.probes (tracefs kprobes/tracepoints, chosen by what exists on the
running kernel) counts SMM transitions, TDP MMU root lookups, roots created and freed,
root references dropped (6.x), and TDP MMU page-table pages allocated and freed; KVM's
own per-VM debugfs counter pf_fixed shows the page faults the guest's memory took. A metric
that only a probe on a hot kernel function can count on that kernel (6.x roots freed:
_raw_spin_lock called from kvm_tdp_mmu_put_root) gets `--repeat` extra runs with the hot
probes on, and only that metric is taken from them: a hot probe slows the run and makes
the other kprobes miss hits (the output sums the misses). `--no-hot-probes`: no such runs.

Expected physics: a kernel without TDP MMU root preservation (5.10) frees the root when
the vCPU leaves a role (SMM <-> non-SMM) and creates a new one on the way back, so root
allocations and frees grow with the SMM transitions; a kernel with it (6.1.50+) keeps
both roots and allocates a handful.

Kernels. `--kernel [LABEL=]BZIMAGE` (repeatable), else `--results RESULTS_JSON` (every
branch's passing baseline build), else the run directory `--run-dir` (default
CACHE/smm-physics/run) if it holds a results.json; else `--build` (the default when
nothing is found) imports the kernel source tarballs (`--tarball LABEL=PATH`, default:
Debian bullseye's linux-source-5.10 5.10.223, fetched with a private apt directory
under CACHE/apt-bullseye without touching the system's apt config, and
/usr/src/linux-source-6.1.tar.xz) and builds tinyconfig + x86_64-base, kvm, lab-qemu,
kvm-trace with `kpatchtest run --stages fetch,apply,build` (15 min for 5.10 and 28 min
for 6.1, cold, on 2 shared cores; a rebuild with the same tree and config reuses them).

Timing. Each (reads, spread) runs `--repeat` probed boots (counts and time) and
`--timing-repeat` boots without probes (time only: kprobes on hot MMU paths slow the
faults they count), after one unmeasured warm-up boot per kernel. Times are measured on
the L1 host around QEMU (/proc/uptime, 10 ms steps): QEMU start, SeaBIOS, the reads.

Output: one markdown table (medians; a min-max range when repetitions differ; "n/a" for
a metric no probe could count on that kernel), the probes that took on each kernel, and
the ratios first/second kernel (kernels sorted by release, oldest first) of root
allocations, roots freed and wall time (and the wall-time difference). No asserts: it
reports what the kernels did.

Under TCG the lab kernel gets `tsc_early_khz=` (the host's TSC rate): when its TSC
calibration fails (common on a loaded host) tsc_khz is 0 and KVM never enters a guest.

The Linux guest (`--guest linux` or `both`; kpatchtest.workloads.linux_guest): GRUB on
SeaBIOS loads a real bzImage (`--guest-kernel`, default the newest kernel measured: the
same L2 kernel on every host kernel) and a tiny initramfs through int 13h on AHCI, the
kernel decompresses and runs init, which exits QEMU. Per kernel: the phases (firmware,
bootloader, decompress, kernel, init; from the console, timestamped on L1), SMM
transitions and roots over the whole boot, the guest time with a 95% CI (t interval of
the mean over the repetitions, probed and plain runs apart), and the ratio first/second
kernel of the plain guest time with the compare stage's CI (kpatchtest.compare.stats:
hierarchical bootstrap, each repetition its own round; needs 3 repetitions or more).

Measured here (2 shared cores, TCG, 1 L1 CPU; 200 reads): 5.10.223 806 SMM transitions,
811 root lookups, 811 roots created and freed, 3866 TDP pages; 6.1.192 806, 811, 7 and 7,
46 pages; wall time without probes about 1.5x longer on 5.10.
Linux guest (2026-12-02, 3 plain + 3 probed boots per kernel, loaded machine): both
kernels 714 SMM transitions; root allocations 760 on 5.10.223 (one per root lookup) vs 7
on 6.1.192, TDP pages 4276 vs 64; bootloader phase 4.96 s vs 2.35 s, ratio 2.11x
[1.62, 3.03]; the whole guest 25.5 s vs 25.8 s, ratio 0.99x [0.79, 1.24]: under TCG the
decompress and kernel phases (~75% of the boot, no SMM) and the load's noise hide the
bootloader's doubling.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.compare.stats import compare as compare_stats  # noqa: E402
from kpatchtest.kernelrepo import default_cache_dir  # noqa: E402
from kpatchtest.lab.local.lab import local_lab  # noqa: E402
from kpatchtest.lab.local.qemu import detect_accel  # noqa: E402
from kpatchtest.lab.ssh.connection import HostConnection  # noqa: E402
from kpatchtest.spec import SmmBootSpec  # noqa: E402
from kpatchtest.workloads import linux_guest as LG  # noqa: E402
from kpatchtest.workloads.probes import PROBES  # noqa: E402
from kpatchtest.workloads.smm import (  # noqa: E402
    SmmBootRun,
    guest_memory_mb,
    run_probed,
    upload_image,
    write_image,
)
from kpatchtest.workloads.smm_boot import boot_run  # noqa: E402

CMDLINE = "kvm.tdp_mmu=1"
# Metrics with a candidate on a hot kernel function (see kpatchtest.workloads.probes).
HOT_METRICS = tuple(m.metric for m in PROBES if any(c.hot for c in m.candidates))
METRICS = ("smm_transitions", "root_lookups", "root_allocs", "roots_freed", "root_puts",
           "tdp_pages_allocated", "tdp_pages_freed")
DEFAULT_61 = Path("/usr/src/linux-source-6.1.tar.xz")
BULLSEYE_VERSION = "5.10.223-1"
FRAGMENTS = ["x86_64-base.config", "kvm.config", "lab-qemu.config", "kvm-trace.config"]


# --- finding or building the kernels ---------------------------------------------------

@dataclass
class Kernel:
    label: str
    bzimage: Path


def _label_path(s: str) -> tuple[str | None, Path]:
    if "=" in s:
        label, path = s.split("=", 1)
        return label, Path(path)
    return None, Path(s)


def kernels_from_results(results: Path) -> list[Kernel]:
    d = json.loads(results.read_text())
    run_dir = results.parent
    out = []
    for b in d.get("branches", []):
        base = (b.get("build") or {}).get("baseline") or {}
        art = (base.get("artifacts") or {}).get("bzImage")
        if base.get("status") == "pass" and art:
            if base.get("config_missing"):
                print(f"note: {b.get('name')}: config symbols that did not take: {base['config_missing']}",
                      file=sys.stderr)
            out.append(Kernel(b.get("name") or base.get("kernelrelease") or art, run_dir / art))
    return out


def fetch_bullseye_source(cache: Path, version: str = BULLSEYE_VERSION) -> Path:
    """linux-source-5.10 from Debian bullseye through a private apt directory (the
    system's apt sources, lists and cache are not touched); returns the tarball."""
    a = cache / "apt-bullseye"
    tarball = a / "x" / "usr" / "src" / "linux-source-5.10.tar.xz"
    if tarball.exists():
        return tarball
    for d in ("lists/partial", "cache/archives/partial", "parts", "dl", "x"):
        (a / d).mkdir(parents=True, exist_ok=True)
    key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    (a / "sources.list").write_text(
        f"deb {key} http://deb.debian.org/debian bullseye main\n"
        f"deb {key} http://deb.debian.org/debian-security bullseye-security main\n")
    (a / "apt.conf").write_text("\n".join([
        f'Dir::Etc::SourceList "{a}/sources.list";', f'Dir::Etc::SourceParts "{a}/parts";',
        f'Dir::State::Lists "{a}/lists";', f'Dir::Cache "{a}/cache";',
        'Dir::State::status "/dev/null";', 'APT::Architecture "amd64";']) + "\n")
    env = dict(os.environ, APT_CONFIG=str(a / "apt.conf"))
    subprocess.run(["apt-get", "-q", "update"], env=env, check=True, cwd=a / "dl")
    subprocess.run(["apt-get", "-q", "download", f"linux-source-5.10={version}"], env=env, check=True,
                   cwd=a / "dl")
    deb = next((a / "dl").glob("linux-source-5.10_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(a / "x")], check=True)
    return tarball


def build_kernels(tarballs: dict[str, Path], run_dir: Path, cache: Path) -> Path:
    """kpatchtest's own pipeline (fetch, apply, build) over the tarballs; returns results.json.

    The series is the offline demo mbox (the baselines are what this script boots; the
    patched builds come along and are ignored)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    branches = "".join(f"    - name: {label}\n      tarball: {path}\n" for label, path in tarballs.items())
    spec = run_dir.parent / "smm-physics.yaml"
    spec.write_text(
        "name: smm-physics\n"
        f"series:\n  - mbox: {ROOT / 'series/demo/kvm-mmu-demo.mbox'}\n"
        f"kernel:\n  upstream: {next(iter(tarballs))}\n  branches:\n{branches}"
        f"configs:\n  base: tinyconfig\n  fragments: [{', '.join(FRAGMENTS)}]\n"
        "  required: [KVM, KVM_AMD, KEXEC]\n"
        "build:\n  when: any\n")
    exe = ROOT / ".venv" / "bin" / "kpatchtest"
    argv = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "kpatchtest"]),
            "run", str(spec), "--stages", "fetch,apply,build", "--out", str(run_dir),
            "--cache-dir", str(cache), "--no-hints", "--offline"]
    t = time.monotonic()
    subprocess.run(argv, check=False)
    print(f"build: {time.monotonic() - t:.0f} s", file=sys.stderr)
    return run_dir / "results.json"


def find_kernels(args: argparse.Namespace) -> list[Kernel]:
    if args.kernel:
        out = []
        for s in args.kernel:
            label, p = _label_path(s)
            out.append(Kernel(label or p.parent.name, p))
        return out
    results = args.results or (args.run_dir / "results.json")
    if results.exists() and not args.build:
        found = kernels_from_results(results)
        if found:
            return found
    tarballs: dict[str, Path] = {}
    for s in args.tarball or []:
        label, p = _label_path(s)
        tarballs[label or p.name] = p
    if not tarballs:
        tarballs = {"debian-5.10": fetch_bullseye_source(args.cache_dir), "debian-6.1": DEFAULT_61}
    return kernels_from_results(build_kernels(tarballs, args.run_dir, args.cache_dir))


# --- measuring ---------------------------------------------------------------------------

@dataclass
class Cell:
    counts: dict[str, list[int | None]] = field(default_factory=lambda: {m: [] for m in METRICS})
    pf_fixed: list[int] = field(default_factory=list)        # KVM's debugfs counter, probed and plain runs
    probed_s: list[float] = field(default_factory=list)
    plain_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class LinuxCell:
    """The Linux guest on one host kernel: per-repetition values, probed and plain runs apart."""

    counts: dict[str, list[int | None]] = field(default_factory=lambda: {m: [] for m in METRICS})
    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in LG.PHASES})
    probed_s: list[float] = field(default_factory=list)
    plain_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class KernelRun:
    kernel: Kernel
    release: str = "?"
    tdp_mmu: str = "?"
    cpus: str = "?"
    tsc: str = ""
    boot_s: float = 0.0
    probes: dict[str, str] = field(default_factory=dict)     # metric -> probe that took ("" none)
    notes: dict[str, list[str]] = field(default_factory=dict)  # metric -> distinct notes over the runs
    missed: dict[str, list[int]] = field(default_factory=dict)  # metric -> [missed, hits + missed], summed
    cells: dict[tuple[int, int], Cell] = field(default_factory=dict)
    linux: LinuxCell | None = None
    error: str = ""


def host_tsc_khz() -> int | None:
    """The TSC rate a TCG (or KVM) guest sees: the host's ("cpu MHz" in /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000) or None
    except (OSError, ValueError):
        pass
    return None


def lab_cmdline() -> str:
    """kvm.tdp_mmu=1, and under TCG tsc_early_khz=: a lab kernel whose TSC calibration
    fails (common under TCG on a loaded host: no HPET or ACPI PM timer in the lab config)
    has tsc_khz 0, and its KVM then never enters a guest (KVM_RUN loops on
    KVM_REQ_CLOCK_UPDATE): every nested boot would hang until its timeout."""
    khz = host_tsc_khz() if detect_accel() == "tcg" else None
    return CMDLINE + (f" tsc_early_khz={khz}" if khz else "")


_MISSED = re.compile(r"(?:; )?(\d+) missed hits(?: of (\d+))?$")


def _seconds(r) -> float:
    return r.guest_s if r.guest_s is not None else r.wall_s


def measure_linux(conn: HostConnection, args: argparse.Namespace, image: Path, kr: KernelRun) -> None:
    """`--repeat` probed and `--timing-repeat` plain boots of the Linux guest (interleaved)."""
    remote = upload_image(conn, image, f"/tmp/{image.name}")
    run = boot_run(SmmBootSpec(guest="linux", timeout_s=args.timeout), remote)
    cell = kr.linux = LinuxCell()
    for i in range(max(args.repeat, args.timing_repeat)):
        for mode, n in (("probed", args.repeat), ("plain", args.timing_repeat)):
            if i >= n:
                continue
            if mode == "probed":
                pb = run_probed(conn, run)
                r, readings = pb.boot, pb.probes
            else:
                r, readings = run.run(conn), {}
            ph = LG.phases(r.serial.t0, r.serial.t1, r.serial.lines) if r.serial else None
            durations = ph.durations() if ph else {}
            print(f"  linux {mode} #{i + 1}: {r.status} in {_seconds(r):.2f} s"
                  + "".join(f" {p}={v}" for p, v in durations.items() if v is not None)
                  + "".join(f" {m}={rd.value}" for m, rd in readings.items() if m in METRICS), file=sys.stderr)
            if r.status != "pass":
                cell.failures.append(f"linux {mode} #{i + 1}: {r.status}: {r.detail}"
                                     + (f"; reached {ph.reached}" if ph else ""))
                continue
            (cell.probed_s if mode == "probed" else cell.plain_s).append(_seconds(r))
            if mode == "plain":     # phases without the probes' overhead
                for p, v in durations.items():
                    if v is not None:
                        cell.phases[p].append(v)
            for m in METRICS:
                if readings:
                    cell.counts[m].append(readings[m].value if m in readings else None)


def measure(k: Kernel, args: argparse.Namespace, images: dict[int, Path], work: Path,
            linux_image: Path | None = None) -> KernelRun:
    kr = KernelRun(k)
    t = time.monotonic()
    try:
        with local_lab(k.bzimage, args.cache_dir, work / f"lab-{k.label}", nested=True,
                       memory_mb=args.lab_memory, extra_cmdline=lab_cmdline(),
                       log=lambda m: print(f"  {m}", file=sys.stderr)) as host:
            kr.boot_s = time.monotonic() - t
            conn = HostConnection(host, log=lambda m: None)
            conn.open()
            try:
                kr.release = conn.run(["uname", "-r"]).stdout.strip()
                tp = conn.run(["cat", "/sys/module/kvm/parameters/tdp_mmu"], check=False)
                kr.tdp_mmu = tp.stdout.strip() if tp.exit_code == 0 else "(no param)"
                kr.cpus = conn.run(["nproc"], check=False).stdout.strip() or "?"
                kr.tsc = " ".join(conn.run(["sh", "-c", "dmesg | grep -m1 -E 'tsc: (Detected|Refined|Marking TSC unstable due to could)'"],
                                           check=False).stdout.split()[1:])
                print(f"{k.label}: {kr.release}, tdp_mmu={kr.tdp_mmu}, {kr.cpus} CPU(s), {kr.tsc}, "
                      f"up in {kr.boot_s:.0f} s", file=sys.stderr)
                remote = {s: upload_image(conn, p, f"/tmp/{p.name}") for s, p in images.items()}

                def boot(spread: int, mode: str, i: int):
                    """One nested boot: mode plain (no probes), probed, or hot (probed with
                    the hot probes too)."""
                    run = SmmBootRun(remote[spread], timeout_s=args.timeout, memory_mb=guest_memory_mb(spread))
                    if mode == "plain":
                        r, readings = run.run(conn), None
                    else:
                        pb = run_probed(conn, run, hot=mode == "hot")
                        r, readings = pb.boot, pb.probes
                    tag = f"{mode} #{i + 1}" if i >= 0 else "warm-up"
                    print(f"  reads={args.reads} spread={spread} {tag}: {r.status} in {_seconds(r):.2f} s"
                          + "".join(f" {m}={rd.value}" for m, rd in (readings or {}).items() if m in METRICS),
                          file=sys.stderr)
                    return r, readings

                def record(cell: Cell, metrics, readings) -> None:
                    for m in metrics:
                        rd = readings.get(m)
                        cell.counts[m].append(rd.value if rd else None)
                        if not rd:
                            continue
                        kr.probes.setdefault(m, rd.probe or "")
                        note = rd.note
                        mm = _MISSED.search(note)
                        if mm:      # varies per run: summed, not listed
                            tot = kr.missed.setdefault(m, [0, 0])
                            tot[0] += int(mm[1])
                            tot[1] += int(mm[2] or 0)
                            note = note[:mm.start()]
                        notes = kr.notes.setdefault(m, [])
                        if note and note not in notes:
                            notes.append(note)

                if images:
                    boot(args.spreads[0], "plain", -1)      # warm-up: page cache, first-VM costs
                for spread in (args.spreads if images else []):
                    cell = kr.cells.setdefault((args.reads, spread), Cell())
                    for i in range(max(args.repeat, args.timing_repeat)):
                        for mode, n in (("probed", args.repeat), ("plain", args.timing_repeat)):
                            if i >= n:
                                continue
                            r, readings = boot(spread, mode, i)
                            if r.status != "pass":
                                cell.failures.append(f"{mode} #{i + 1}: {r.status}: {r.detail}")
                                continue
                            (cell.probed_s if mode == "probed" else cell.plain_s).append(_seconds(r))
                            if "pf_fixed" in r.kvm_stats:
                                cell.pf_fixed.append(r.kvm_stats["pf_fixed"])
                            if readings:
                                record(cell, METRICS, readings)
                    # metrics only a hot probe can count on this kernel: extra runs for them
                    # alone, so the hot probe's missed hits do not touch the other counts
                    missing = [m for m in HOT_METRICS if not any(v is not None for v in cell.counts[m])]
                    if args.hot_probes and missing:
                        for m in missing:
                            cell.counts[m] = []
                            kr.probes.pop(m, None)
                            kr.notes.pop(m, None)
                        for i in range(args.repeat):
                            r, readings = boot(spread, "hot", i)
                            if r.status != "pass":
                                cell.failures.append(f"hot #{i + 1}: {r.status}: {r.detail}")
                            elif readings:
                                record(cell, missing, readings)
                if linux_image is not None:
                    measure_linux(conn, args, linux_image, kr)
            finally:
                conn.close()
    except Exception as e:      # report, do not assert: the other kernel may still measure
        kr.error = f"{type(e).__name__}: {e}"
        print(f"{k.label}: {kr.error}", file=sys.stderr)
    return kr


# --- the table ---------------------------------------------------------------------------

def _fmt(vals: list[int | None]) -> str:
    known = [v for v in vals if v is not None]
    if not vals or not known:
        return "n/a"
    med = statistics.median(known)
    s = f"{med:g}"
    if min(known) != max(known):
        s += f" ({min(known)}-{max(known)})"
    if len(known) < len(vals):
        s += "*"
    return s


def _med(vals: list) -> float | None:
    known = [v for v in vals if v is not None]
    return statistics.median(known) if known else None


def _version_key(kr: KernelRun) -> tuple:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", kr.release)
    return tuple(int(x or 0) for x in m.groups()) if m else (999,)


def _kernel_version(k: Kernel) -> tuple:
    """The version in a kernel's label or path (debian-6.1, 6.1.192-kpt...), before it boots."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", f"{k.label} {k.bzimage}")
    return tuple(int(x or 0) for x in m.groups()) if m else (0,)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "inf" if a else "n/a"
    return f"{a / b:.2f}x"


def _diff(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a - b:+.2f} s"


def table(runs: list[KernelRun], args: argparse.Namespace) -> str:
    head = ["kernel", "tdp_mmu", "reads", "spread MB", "SMM transitions", "root lookups", "root allocs",
            "roots freed", "root puts", "TDP pages alloc / freed", "KVM pf_fixed", "wall s probed", "wall s plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kr in runs:
        if kr.error and not kr.cells:
            lines.append(f"| {kr.release or kr.kernel.label} | {kr.tdp_mmu} | | | error: {kr.error} |" + " |" * 8)
            continue
        for (reads, spread), c in sorted(kr.cells.items()):
            n = c.counts
            lines.append("| " + " | ".join([
                kr.release, kr.tdp_mmu, str(reads), str(spread), _fmt(n["smm_transitions"]),
                _fmt(n["root_lookups"]), _fmt(n["root_allocs"]), _fmt(n["roots_freed"]), _fmt(n["root_puts"]),
                f"{_fmt(n['tdp_pages_allocated'])} / {_fmt(n['tdp_pages_freed'])}",
                _fmt(c.pf_fixed), _fmt_s(c.probed_s), _fmt_s(c.plain_s)]) + " |")
    out = ["\n".join(lines)]
    done = [kr for kr in runs if kr.cells]
    if len(done) >= 2:
        a, b = done[0], done[1]
        out.append(f"\nRatios {a.release} / {b.release} (medians):\n")
        rl = ["| reads | spread MB | root allocs | roots freed | wall s probed | wall s plain | wall s plain, difference |",
              "|---|---|---|---|---|---|---|"]
        for key in sorted(set(a.cells) & set(b.cells)):
            ca, cb = a.cells[key], b.cells[key]
            rl.append(f"| {key[0]} | {key[1]} | "
                      f"{_ratio(_med(ca.counts['root_allocs']), _med(cb.counts['root_allocs']))} | "
                      f"{_ratio(_med(ca.counts['roots_freed']), _med(cb.counts['roots_freed']))} | "
                      f"{_ratio(_med(ca.probed_s), _med(cb.probed_s))} | {_ratio(_med(ca.plain_s), _med(cb.plain_s))} | "
                      f"{_diff(_med(ca.plain_s), _med(cb.plain_s))} |")
        out.append("\n".join(rl))
    out.append("\nProbes that took:\n")
    for kr in runs:
        out.append(f"- {kr.release} ({kr.kernel.bzimage}; lab up in {kr.boot_s:.0f} s, "
                   f"{kr.cpus} CPU(s), {kr.tsc or 'tsc: ?'}):")
        for m in METRICS:
            if m in kr.probes:
                note = f" — {' / '.join(kr.notes[m])}" if kr.notes.get(m) else ""
                if m in kr.missed:
                    miss, total = kr.missed[m]
                    note += (f" [missed {miss} of {total} kprobe hits over the probed runs]" if total
                             else f" [missed {miss} kprobe hits over the probed runs]")
                out.append(f"  - {m}: {kr.probes[m] or 'none'}{note}")
        for key, c in sorted(kr.cells.items()):
            for f in c.failures:
                out.append(f"  - reads={key[0]} spread={key[1]} {f}")
        if kr.error:
            out.append(f"  - error: {kr.error}")
    out.append("\nCounts: median over the probed runs, (min-max) when they differ, * when some runs "
               "had no reading, n/a when no probe could count it on that kernel. KVM pf_fixed: "
               "KVM's per-VM debugfs counter, all runs. Wall s: the nested QEMU run timed on the L1 "
               "host (QEMU start, SeaBIOS, the reads), median (min-max); probed runs carry the "
               "kprobe overhead, plain runs have no probes.")
    return "\n".join(out)


def _ci(vals: list[float]) -> str:
    """Mean and 95% t interval over the repetitions (n/a below 2)."""
    import numpy as np
    from scipy import stats as sps
    if not vals:
        return "n/a"
    m = float(np.mean(vals))
    if len(vals) < 2:
        return f"{m:.2f} (n=1)"
    h = float(sps.t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))
    return f"{m:.2f} [{m - h:.2f}, {m + h:.2f}] (n={len(vals)})"


def linux_table(runs: list[KernelRun]) -> str:
    """The Linux guest: one row per host kernel, then the ratio of the first two."""
    done = [kr for kr in runs if kr.linux is not None]
    if not done:
        return ""
    head = (["kernel", "tdp_mmu"] + [f"{p} s" for p in LG.PHASES]
            + ["SMM transitions", "root lookups", "root allocs", "roots freed", "TDP pages alloc",
               "guest s plain, mean [95% CI]", "guest s probed, mean [95% CI]"])
    lines = ["\nLinux guest (GRUB -> bzImage -> init), phases from plain runs (median (min-max)):\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kr in done:
        c = kr.linux
        lines.append("| " + " | ".join(
            [kr.release, kr.tdp_mmu] + [_fmt_s(c.phases[p]) for p in LG.PHASES]
            + [_fmt(c.counts[m]) for m in ("smm_transitions", "root_lookups", "root_allocs", "roots_freed",
                                             "tdp_pages_allocated")]
            + [_ci(c.plain_s), _ci(c.probed_s)]) + " |")
    if len(done) >= 2:
        a, b = done[0], done[1]
        lines.append(f"\nRatios {a.release} / {b.release} (plain runs, ratio of medians, 95% CI from "
                     f"kpatchtest.compare.stats, each repetition a round):")
        lines.append(f"- guest time: {_ratio_ci(a.linux.plain_s, b.linux.plain_s)}")
        for ph in LG.PHASES:
            lines.append(f"- {ph} phase: {_ratio_ci(a.linux.phases[ph], b.linux.phases[ph])}")
        lines.append(f"- root allocs: {_ratio(_med(a.linux.counts['root_allocs']), _med(b.linux.counts['root_allocs']))}")
    for kr in done:
        for f in kr.linux.failures:
            lines.append(f"- {kr.release}: {f}")
    return "\n".join(lines)


def _ratio_ci(first: list[float], second: list[float]) -> str:
    """first/second as the compare stage states it: ratio of medians [95% CI]."""
    n = min(len(first), len(second))
    est = compare_stats([[v] for v in second[:n]], [[v] for v in first[:n]],
                        direction="lower", time=True, threshold=0.05, resamples=10000, seed=1, paired=False)
    ci = (f"[{est.ci_low:.2f}, {est.ci_high:.2f}]" if est.ci_low is not None and est.ci_high is not None
          else f"no interval ({est.why})")
    return (f"{est.ratio:.2f}x {ci}" if est.ratio is not None else "n/a") + f" (n={n})"


def _fmt_s(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else f"{vals[0]:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", metavar="[LABEL=]BZIMAGE", help="a lab kernel to measure (repeatable)")
    ap.add_argument("--results", type=Path, help="results.json of a kpatchtest run: its baseline builds")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--run-dir", type=Path, help="where --build builds (default CACHE/smm-physics/run)")
    ap.add_argument("--build", action="store_true", help="build the kernels even if a results.json exists")
    ap.add_argument("--tarball", action="append", metavar="LABEL=PATH", help="source tarballs for --build")
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--spreads", default="0,32", help="comma-separated spread_mb values (default 0,32)")
    ap.add_argument("--repeat", type=int, default=3, help="probed boots per (kernel, spread)")
    ap.add_argument("--timing-repeat", type=int, default=3, help="boots without probes per (kernel, spread)")
    ap.add_argument("--timeout", type=float, default=180.0, help="limit per nested boot, s")
    ap.add_argument("--lab-memory", type=int, default=1024, help="MB of the lab VM (L1)")
    ap.add_argument("--guest", choices=("bootsector", "linux", "both"), default="bootsector",
                    help="the L2 guest: the boot sector (--reads, --spreads), the Linux guest, or both")
    ap.add_argument("--guest-kernel", type=Path, help="the Linux guest's bzImage (default: the newest kernel measured)")
    ap.add_argument("--no-hot-probes", dest="hot_probes", action="store_false",
                    help="skip probes on hot kernel functions (6.x roots freed: _raw_spin_lock "
                         "called from kvm_tdp_mmu_put_root)")
    args = ap.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)    # banner errors while the VM boots
    args.spreads = [int(x) for x in args.spreads.split(",") if x.strip()]
    args.run_dir = args.run_dir or args.cache_dir / "smm-physics" / "run"

    kernels = find_kernels(args)
    if not kernels:
        print("no kernels to measure", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="kpt-smm-physics-"))
    print(f"work dir (images, lab console logs): {work}", file=sys.stderr)
    images = ({s: write_image(work / f"smm-r{args.reads}-s{s}.img", args.reads, spread_mb=s) for s in args.spreads}
              if args.guest != "linux" else {})
    linux_image = None
    if args.guest != "bootsector":
        guest_kernel = args.guest_kernel or max(kernels, key=_kernel_version).bzimage
        linux_image = LG.cached_image(guest_kernel, work).path
        print(f"linux guest: {guest_kernel} -> {linux_image} ({linux_image.stat().st_size} bytes)", file=sys.stderr)
    runs = []
    for k in kernels:
        print(f"== {k.label}: {k.bzimage}", file=sys.stderr)
        runs.append(measure(k, args, images, work, linux_image))
    runs.sort(key=_version_key)
    if images:
        print(table(runs, args))
    print(linux_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
