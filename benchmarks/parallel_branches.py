"""Two-branch apply+build, serial (--jobs 1, make -jN each) vs parallel (--jobs 2, make -j(N/2) each).

The demo's two Debian trees (6.1, 6.12), its config recipe, and a one-patch series with a
fresh token each time (a comment in arch/x86/kvm/x86.c), so every run really rebuilds
the patched kernels incrementally while the baselines come from the build cache: the
case a stable maintainer meets when a series is re-spun. Needs the demo's baselines built
(`make demo` or the tests) in the default cache.

    .venv/bin/python benchmarks/parallel_branches.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PATCH = """From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Bench <bench@example.org>
Date: Tue, 1 Dec 2026 00:00:00 +0000
Subject: [PATCH] KVM: x86: comment {token}

---
 arch/x86/kvm/x86.c | 1 +
 1 file changed, 1 insertion(+)

diff --git a/arch/x86/kvm/x86.c b/arch/x86/kvm/x86.c
--- a/arch/x86/kvm/x86.c
+++ b/arch/x86/kvm/x86.c
@@ -1,3 +1,4 @@
+/* kpatchtest benchmark {token} */
{context}
--
2.39.5
"""


def _spec(work: Path, context: str) -> Path:
    doc = yaml.safe_load((ROOT / "series" / "demo.yaml").read_text())
    token = secrets.token_hex(4)
    mbox = work / f"bench-{token}.mbox"
    mbox.write_text(PATCH.format(token=token, context=context))
    doc.update(name="bench-parallel", series=[{"mbox": str(mbox)}], gates={})
    doc.pop("lab", None)
    doc.pop("workloads", None)
    spec = work / f"bench-{token}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return spec


def _x86_head() -> str:
    """The first three lines of x86.c, the same in both trees (the SPDX line and the comment opener)."""
    import tarfile
    with tarfile.open("/usr/src/linux-source-6.1.tar.xz") as t:
        member = next(m for m in t if m.name.endswith("arch/x86/kvm/x86.c"))
        lines = t.extractfile(member).read().decode().splitlines()[:3]
    return "\n".join(" " + line for line in lines)


def _run(spec: Path, out: Path, jobs: int) -> tuple[float, dict]:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "kpatchtest", "run", str(spec), "--stages", "fetch,apply,build",
                        "--out", str(out), "--offline", "--no-hints", "--jobs", str(jobs)],
                       capture_output=True, text=True, env={**os.environ, "CI": "1"})
    wall = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return wall, {b["name"]: b["build"]["patched"]["objects_compiled"] for b in res["branches"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    context = _x86_head()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for i in range(args.repeat):
            for jobs in (1, 2):
                wall, objs = _run(_spec(work, context), work / f"out-{i}-{jobs}", jobs)
                rows.append((jobs, wall, objs))
                print(f"round {i + 1}: --jobs {jobs}: {wall:6.1f} s  patched objects {objs}", flush=True)
    serial = sorted(w for j, w, _ in rows if j == 1)
    parallel = sorted(w for j, w, _ in rows if j == 2)
    ms, mp = serial[len(serial) // 2], parallel[len(parallel) // 2]
    print(f"\nCPUs {os.cpu_count()}; median wall: serial {ms:.1f} s, parallel {mp:.1f} s, "
          f"parallel/serial {mp / ms:.2f}")


if __name__ == "__main__":
    main()
