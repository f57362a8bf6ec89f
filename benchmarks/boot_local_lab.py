#!/usr/bin/env python3
"""Local lab: seconds per boot cycle with the initrd uploaded over SSH (before) and read
from the VM's read-only virtio disk (after), and a full reboot for reference.

    .venv/bin/python benchmarks/boot_local_lab.py [--artifact DIR | --kernel BZIMAGE --release RELEASE]
                                                  [--repeat 3] [--plain]

The kernel must be a lab kernel (tinyconfig + x86_64-base + kvm + lab-qemu), e.g. an
artifact of `kpatchtest run series/demo.yaml` (`--artifact` takes a build cache
directory holding bzImage and meta.json; the default is the newest one). The VM runs
the nested lab image (QEMU inside, ~20 MB: the one workloads run on) unless --plain.

A boot cycle is what the workloads stage pays per round and kernel: deploy (kernel,
modules, initrd) + kexec + SSH back on a new boot_id, then the power cycle back to the
known-good kernel. Prints each part's median per mode and the cycle's before/after.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.errors import KpatchtestError  # noqa: E402
from kpatchtest.kernelrepo import default_cache_dir  # noqa: E402
from kpatchtest.lab.local.image import build_image  # noqa: E402
from kpatchtest.lab.local.lab import LOCAL_TIMEOUTS, local_host  # noqa: E402
from kpatchtest.lab.local.qemu import LocalVM, VMConfig  # noqa: E402
from kpatchtest.lab.ssh.boot import Booter, KernelToBoot  # noqa: E402
from kpatchtest.lab.ssh.connection import HostConnection  # noqa: E402


def latest_artifact(cache_dir: Path) -> Path:
    """The newest kernel build in the cache (a directory with bzImage and meta.json)."""
    metas = sorted((cache_dir / "artifacts").glob("*/meta.json"), key=lambda p: p.stat().st_mtime)
    if not metas:
        sys.exit(f"no kernel artifacts under {cache_dir}/artifacts: run `kpatchtest run series/demo.yaml` "
                 f"or name a kernel")
    return metas[-1].parent


def _kernel(args: argparse.Namespace) -> tuple[Path, str]:
    if args.kernel:
        if not args.release:
            sys.exit("--kernel needs --release (the kernel's uname -r)")
        return args.kernel, args.release
    art = args.artifact or latest_artifact(args.cache_dir)
    meta = json.loads((art / "meta.json").read_text())
    return art / "bzImage", meta["kernelrelease"]


def _median(xs: list[float]) -> str:
    return f"{statistics.median(xs):5.1f} s ({', '.join(f'{x:.1f}' for x in xs)})"


def _reboot_to_ssh(host) -> float:
    conn = HostConnection(host)
    conn.open()
    old = conn.boot_id()
    t = time.monotonic()
    conn.start_detached(["reboot", "-f"], delay_s=0.2)     # firmware + kernel + userspace
    conn.close()
    while True:
        c = HostConnection(host)
        try:
            c.wait_until_up(120, poll_s=0.5)
            if c.boot_id() != old:
                return time.monotonic() - t
        except KpatchtestError:
            pass        # went down between the answer and the question
        finally:
            c.close()


def measure(mode: str, bz: Path, release: str, cache_dir: Path, work: Path, repeat: int, nested: bool,
            reboot: bool) -> dict[str, list[float]]:
    """Boot cycles on a fresh VM, the initrd uploaded (mode "upload") or on a disk ("disk")."""
    image = build_image(cache_dir, nested=nested)
    vm = LocalVM(work / mode, VMConfig(kernel=bz, initrd=image.initramfs, initrd_disk=mode == "disk"))
    times: dict[str, list[float]] = {"deploy": [], "kexec to SSH": [], "power cycle back": [], "cycle": []}
    if reboot:
        times["full reboot"] = []
    vm.start()
    try:
        host = local_host(vm, image, vm.workdir / "known_hosts", timeouts=LOCAL_TIMEOUTS)
        HostConnection(host).wait_until_up(host.timeouts.boot_s)
        booter = Booter(host, vm.workdir)
        for i in range(repeat):
            t = time.monotonic()
            res = booter.boot(KernelToBoot(build="patched", bzimage=bz, kernelrelease=release), f"b{i}")
            booted = time.monotonic()
            if res.status != "booted":
                raise SystemExit(f"{mode}: boot failed: {res.reason}")
            if not booter.return_to_known_good():
                raise SystemExit(f"{mode}: the power cycle did not bring the known-good kernel back")
            back = time.monotonic()
            times["deploy"].append(booted - t - res.duration_s)
            times["kexec to SSH"].append(res.duration_s)
            times["power cycle back"].append(back - booted)
            times["cycle"].append(back - t)
            if reboot:
                times["full reboot"].append(_reboot_to_ssh(host))
    finally:
        vm.stop()
    print(f"{mode:6}: image {image.size / 1e6:.1f} MB, {repeat} cycles")
    for part, xs in times.items():
        print(f"  {part:17}: {_median(xs)}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="a build cache directory with bzImage and meta.json")
    ap.add_argument("--kernel", type=Path)
    ap.add_argument("--release", help="the kernel's release (uname -r), with --kernel")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help="the plain lab image (no QEMU inside, ~3 MB)")
    args = ap.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)   # its SSH polls of a VM still booting
    bz, release = _kernel(args)
    print(f"kernel {release} ({bz})")
    work = Path(tempfile.mkdtemp(prefix="kpt-boot-bench-"))
    before = measure("upload", bz, release, args.cache_dir, work, args.repeat, not args.plain, reboot=True)
    after = measure("disk", bz, release, args.cache_dir, work, args.repeat, not args.plain, reboot=False)
    b, a = statistics.median(before["cycle"]), statistics.median(after["cycle"])
    d_b, d_a = statistics.median(before["deploy"]), statistics.median(after["deploy"])
    print(f"boot cycle (deploy + kexec + SSH back + power cycle back): before {b:.1f} s, after {a:.1f} s "
          f"({b - a:+.1f} s, {a / b:.2f}x)")
    print(f"deploy: before {d_b:.1f} s, after {d_a:.1f} s; "
          f"deploy + kexec + SSH back: before {d_b + statistics.median(before['kexec to SSH']):.1f} s, "
          f"after {d_a + statistics.median(after['kexec to SSH']):.1f} s; "
          f"full reboot to SSH: {statistics.median(before['full reboot']):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
