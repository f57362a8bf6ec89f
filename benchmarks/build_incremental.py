#!/usr/bin/env python3
"""Build stage: cold baseline build vs patched rebuild vs repeat run, on Debian 6.1.

    .venv/bin/python benchmarks/build_incremental.py [--fragments kvm.config,...] [--keep DIR]

Cold: empty cache (no ccache, no O= dir). Patched: a one-line change in
arch/x86/kvm/mmu/tdp_mmu.c built after its baseline in the same place. Repeat:
the patched build again (content-addressed reuse: no make). Targets: patched
<= 15% of cold, repeat < 2 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.build.builder import Builder, BuildPlace, ConfigRecipe  # noqa: E402
from kpatchtest.build.toolchain import Toolchain  # noqa: E402
from kpatchtest.kernelrepo import KernelCache  # noqa: E402
from kpatchtest.spec import CONFIGS_DIR  # noqa: E402
from kpatchtest.tarball import import_tarball  # noqa: E402

TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
TDP = "arch/x86/kvm/mmu/tdp_mmu.c"


def one_line_change(git, parent: str, scratch: Path) -> str:
    text = git.out("show", f"{parent}:{TDP}") + "\n"
    text = text.replace("void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n",
                        "void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n\tbarrier();\n", 1)
    blob = git.out("hash-object", "-w", "--stdin", input=text)
    g = git.with_index(scratch / "bench.index")
    g.run("read-tree", parent)
    g.run("update-index", "--cacheinfo", f"100644,{blob},{TDP}")
    return git.out("commit-tree", g.out("write-tree"), "-p", parent, "-m", "bench: one-line change")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fragments", default="kvm.config")
    ap.add_argument("--keep", type=Path, help="cache dir to use (default: a fresh temporary one)")
    args = ap.parse_args()
    if not TARBALL.exists():
        print(f"missing {TARBALL}: apt-get install linux-source-6.1", file=sys.stderr)
        return 2
    cache = args.keep or Path(tempfile.mkdtemp(prefix="kpt-build-bench-"))
    git = KernelCache(cache, None).open()
    base = import_tarball(git, TARBALL).commit
    patched = one_line_change(git, base, cache)
    recipe = ConfigRecipe.from_spec("tinyconfig", [str(CONFIGS_DIR / f) for f in args.fragments.split(",")], [])
    builder = Builder(git=git, cache_dir=cache, recipe=recipe, toolchain=Toolchain.detect(),
                      log=lambda m: print("  " + m, flush=True))
    place = BuildPlace.for_branch(cache, "bench", "debian-6.1")
    run_dir = cache / "run"

    def timed(commit: str, label: str):
        t = time.monotonic()
        res, _ = builder.build(place, commit, label, run_dir, label)
        return time.monotonic() - t, res

    cold_s, cold = timed(base, "baseline")
    patch_s, pat = timed(patched, "patched")
    rep_s, rep = timed(patched, "repeat")
    print(f"fragments: {args.fragments}; cache: {cache}")
    print(f"cold baseline : {cold_s:7.1f} s  {cold.objects_compiled} objects  ({cold.status})")
    print(f"patched       : {patch_s:7.1f} s  {pat.objects_compiled} objects  ({pat.status})")
    print(f"repeat        : {rep_s:7.2f} s  reused={rep.reused}")
    print(f"patched/cold  : {patch_s / cold_s:.1%} (target <= 15%)")
    print(f"repeat        : {rep_s:.2f} s (target < 2 s); cold/repeat {cold_s / rep_s:.0f}x")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(cache)])
    return 0 if cold.status == pat.status == "pass" and rep.reused else 1


if __name__ == "__main__":
    sys.exit(main())
