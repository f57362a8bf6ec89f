#!/usr/bin/env python3
"""Backport feasibility: kpatchtest's private-index engine vs the naive way.

Naive: per branch `git worktree add` + `git am -3` + `git worktree remove`
(what a maintainer's script does). Fast: kpatchtest.apply.engine on a private index.
Both on Debian's linux-source trees (~80k files), with the demo series.

    .venv/bin/python benchmarks/apply_feasibility.py [--cache DIR] [--repeat N]

Prints seconds per branch and the ratio naive/fast. Target: well under a
second per branch per patch for the fast path.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series  # noqa: E402
from kpatchtest.fetch.sources import MboxSource  # noqa: E402
from kpatchtest.fetch.stage import FetchOptions, fetch_series  # noqa: E402
from kpatchtest.gitutil import Git  # noqa: E402
from kpatchtest.tarball import import_tarball  # noqa: E402

TARBALLS = {"debian-6.1": Path("/usr/src/linux-source-6.1.tar.xz"),
            "debian-6.12": Path("/usr/src/linux-source-6.12.tar.xz")}
MBOX = ROOT / "series/demo/kvm-mmu-demo.mbox"


def naive(git: Git, commit: str, mbox: Path, work: Path) -> float:
    wt = work / "wt"
    t0 = time.monotonic()
    git.run("worktree", "add", "--detach", "-q", str(wt), commit)
    p = subprocess.run(["git", "-C", str(wt), "am", "-3", "-q", str(mbox)], capture_output=True, text=True)
    if p.returncode != 0:
        subprocess.run(["git", "-C", str(wt), "am", "--abort"], capture_output=True)
    git.run("worktree", "remove", "--force", str(wt))
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kpatchtest-bench")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    missing = [str(t) for t in TARBALLS.values() if not t.exists()]
    if missing:
        print(f"missing {', '.join(missing)}: apt-get install linux-source-6.1 linux-source-6.12", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    repo = args.cache / "bench.git"
    if not (repo / "HEAD").exists():
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    git = Git(repo)
    t0 = time.monotonic()
    trees = {name: import_tarball(git, tb, name=name) for name, tb in TARBALLS.items()}
    print(f"import (cached after the first run): {time.monotonic() - t0:.1f} s")
    series = fetch_series([MboxSource(mbox=str(MBOX))], FetchOptions(cache_dir=args.cache, offline=True))
    n = len(series.patches)
    print(f"series: {n} patches; branches: {', '.join(trees)}")
    fast_t, naive_t = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as scratch:
            ctx = ApplyContext(git=git, scratch=Path(scratch), base=None, upstream=None,
                               ref_prefix="refs/kpatchtest/bench")
            t = time.monotonic()
            verdicts = [apply_series(ctx, series, BranchTarget(name, tr.commit)).verdict for name, tr in trees.items()]
            fast_t.append(time.monotonic() - t)
        with tempfile.TemporaryDirectory() as work:
            t = time.monotonic()
            for tr in trees.values():
                naive(git, tr.commit, MBOX, Path(work))
            naive_t.append(time.monotonic() - t)
    fast, slow = statistics.median(fast_t), statistics.median(naive_t)
    per = fast / (len(trees) * n)
    print(f"verdicts: {dict(zip(trees, verdicts))}")
    print(f"fast  (private index): {fast:6.2f} s for {len(trees)} branches = {per:.3f} s per branch per patch")
    print(f"naive (worktree + am): {slow:6.2f} s")
    print(f"ratio naive/fast: {slow / fast:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
