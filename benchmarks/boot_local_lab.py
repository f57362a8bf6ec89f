#!/usr/bin/env python3
"""Local lab: deploy + kexec + SSH back, vs a full reboot (firmware + kernel) to SSH.

    .venv/bin/python benchmarks/boot_local_lab.py --kernel BZIMAGE --release RELEASE [--repeat 3]

The kernel must be a lab kernel (tinyconfig + x86_64-base + kvm + lab-qemu), e.g. an
artifact of `kpatchtest run series/demo.yaml`. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.errors import KpatchtestError  # noqa: E402
from kpatchtest.kernelrepo import default_cache_dir  # noqa: E402
from kpatchtest.lab.local.lab import local_lab  # noqa: E402
from kpatchtest.lab.ssh.boot import Booter, KernelToBoot  # noqa: E402
from kpatchtest.lab.ssh.connection import HostConnection  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", type=Path, required=True)
    ap.add_argument("--release", required=True, help="the kernel's release (uname -r)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kpt-boot-bench-"))
    kexec_s, reboot_s = [], []
    with local_lab(args.kernel, args.cache_dir, work / "lab") as host:
        booter = Booter(host, work)
        for i in range(args.repeat):
            t = time.monotonic()
            res = booter.boot(KernelToBoot(build="patched", bzimage=args.kernel, kernelrelease=args.release), f"b{i}")
            if res.status != "booted":
                print(f"boot failed: {res.reason}", file=sys.stderr)
                return 1
            kexec_s.append(time.monotonic() - t)
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
                        break
                except KpatchtestError:
                    pass        # went down between the answer and the question
                finally:
                    c.close()
            reboot_s.append(time.monotonic() - t)
    k, r = statistics.median(kexec_s), statistics.median(reboot_s)
    print(f"deploy + kexec + SSH back: {k:5.1f} s (median of {len(kexec_s)}: {', '.join(f'{x:.1f}' for x in kexec_s)})")
    print(f"full reboot to SSH       : {r:5.1f} s (median of {len(reboot_s)}: {', '.join(f'{x:.1f}' for x in reboot_s)})")
    print(f"ratio reboot/kexec: {r / k:.2f}x (kexec includes the upload and the 1 s detach delay)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
