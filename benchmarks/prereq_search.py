#!/usr/bin/env python3
"""How long the prerequisite search takes per conflicting patch.

Three histories, each applied twice (prerequisite search on and off; the difference is
the search), every conflicting patch in its own one-patch series:

- tests/histories.prereq_chain: a three-commit chain found transitively (P), a set
  found only from the file's history (W), a patch no set helps (P_bad);
- scaled: the same shapes on one file with a chain of K commits among N unrelated
  commits to that file;
- the demo trees (Debian's 6.1 and 6.12 imports, ~80k files) if a kpatchtest cache
  already holds them: an "upstream" line from 6.1 made of one commit per hunk of the
  6.1 -> 6.12 diff of the files the demo series touches, and the demo series applied to
  6.1 against it. Built in a scratch repository that borrows the cache's objects;
  skipped when no cache has the imports.

    .venv/bin/python benchmarks/prereq_search.py [--budget S] [--cache DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series  # noqa: E402
from kpatchtest.apply.workindex import WorkIndex  # noqa: E402
from kpatchtest.diffparse import parse_diff  # noqa: E402
from kpatchtest.gitutil import Git  # noqa: E402
from kpatchtest.patchset import Patch, Series  # noqa: E402
from kpatchtest.results import ApplyResult  # noqa: E402
from tests import histories  # noqa: E402
from tests.kernelhist import MMU, Repo, c_file  # noqa: E402

IMPORTS = ("refs/kpatchtest/imports/debian-6.1", "refs/kpatchtest/imports/debian-6.12")
DEMO_MBOX = ROOT / "series/demo/kvm-mmu-demo.mbox"


def measure(git: Git, patch: Patch, branch: str, base: str, budget: float, scratch: Path) -> tuple[ApplyResult, float]:
    """(the result with the search, seconds the search took)."""
    series = Series(title=patch.subject, sources=("bench",), patches=(replace(patch, index=1),))
    times, result = {}, None
    for hints in (False, True):
        ctx = ApplyContext(git=git, scratch=scratch, base=base, upstream=base, ref_prefix="refs/kpatchtest/bench",
                           hints=hints, prerequisite_budget_s=budget)
        t = time.monotonic()
        result = apply_series(ctx, series, BranchTarget(branch, git.rev_parse(branch)))
        times[hints] = time.monotonic() - t
    return result, times[True] - times[False]


def row(case: str, res: ApplyResult, seconds: float) -> str:
    p = res.patches[0]
    if p.status != "conflict":
        return f"{case:46} {p.status}"
    verified = [q for q in p.prerequisites if q.verified]
    found = (f"verified {len(verified)} commit(s), {sum(q.size for q in verified)} lines" if verified else
             f"unverified ({(p.prerequisites[0].why if p.prerequisites else 'no candidates')[:60]})")
    return f"{case:46} {seconds:7.2f} s  {found}"


def scaled(path: Path, chain: int, noise: int) -> Repo:
    """One 2000-line file; a chain C1..Ck (C_i writes function 10 + 2i and rewrites what
    C_{i-1} wrote), `noise` commits to other functions in between, a patch P on Ck's
    line, and W posted against Ck whose lines are 20 off on master (SHIFT)."""
    path.mkdir(parents=True)
    r = Repo(path)
    r.git("init", "-q", "-b", "master")
    r.write(MMU, c_file(MMU, 2000))
    r.commit("v1.0", "Linux 1.0", 1)
    r.git("branch", "stable")
    ret = lambda n: 7 + 5 * n   # noqa: E731  (c_file: function n returns on this line)
    date, per = 2, noise // chain
    for i in range(1, chain + 1):
        for fn in (10 + 2 * i, 10 + 2 * (i - 1)) if i > 1 else (12,):
            r.edit(MMU, ret(fn), f"\treturn kvm->arch.v{fn} + {i}; /* C{i} */")
        r.commit(f"C{i}", f"KVM: x86/mmu: C{i}", date)
        for j in range(per):
            fn = 100 + ((i - 1) * per + j) % 250
            r.edit(MMU, ret(fn), f"\treturn kvm->arch.v{fn} ^ {j + 1}; /* noise */")
            r.commit(f"N{i}.{j}", f"KVM: x86/mmu: noise {i}.{j}", date + 1 + j)
        date += per + 1
    last = 10 + 2 * chain
    r.edit(MMU, ret(last), f"\treturn kvm->arch.v{last} * 7; /* P */")
    r.commit("P", "KVM: x86/mmu: P on the last link", date)
    r.edit(MMU, 4, insert=[f"/* shift {i} */" for i in range(20)])
    r.commit("SHIFT", "KVM: x86/mmu: shift", date + 1)
    r.git("checkout", "-q", "-b", "posted-w", r.shas[f"C{chain}"])
    r.edit(MMU, ret(last), f"\treturn kvm->arch.v{last} * 9; /* W */")
    r.commit("W", "KVM: x86/mmu: W posted against the last link", date + 2)
    r.git("checkout", "-q", "stable")
    r.edit(MMU, ret(5), "\treturn kvm->arch.v5 - 1; /* stable */")
    r.commit("S", "KVM: x86/mmu: stable-only", date + 3)
    r.git("checkout", "-q", "master")
    return r


def synthetic(work: Path, budget: float, chain: int, noise: int) -> None:
    r = scaled(work / f"scaled-{chain}-{noise}", chain, noise)
    git = Git(r.path)
    for key in ("P", "W"):
        patch = r.patch_of(r.shas[key], 1, upstream=key == "P")
        res, s = measure(git, patch, "stable", git.rev_parse("master"), budget, work)
        print(row(f"scaled chain={chain} noise={noise}: {key}", res, s))


def find_demo_cache(extra: Path | None) -> Path | None:
    roots = [extra] if extra else []
    roots += [Path(os.environ.get("KPATCHTEST_CACHE", Path.home() / ".cache/kpatchtest"))]
    for root in roots:
        for repo in sorted(glob.glob(str(root / "repos" / "*.git"))):
            if all(Git(Path(repo)).rev_parse(ref) for ref in IMPORTS):
                return Path(repo)
    return None


def demo(work: Path, budget: float, cache: Path | None) -> None:
    repo = find_demo_cache(cache)
    if repo is None:
        print("demo trees: skipped (no kpatchtest cache holds the debian-6.1/6.12 imports; `make demo` makes one)")
        return
    scratch = work / "demo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(scratch)], check=True)
    (scratch / "objects/info/alternates").write_text(str(repo / "objects") + "\n")
    git = Git(scratch)
    old, new = (Git(repo).rev_parse(ref) for ref in IMPORTS)
    git.run("update-ref", "refs/heads/debian-6.1", old)
    patches = split_mbox(DEMO_MBOX.read_text())
    files = sorted({f for p in patches for f in p.files()})
    t = time.monotonic()
    tip, n = hunk_history(git, work / "up.index", old, new, files)
    print(f"demo trees ({repo}): upstream = {n} commits, one per hunk of 6.1 -> 6.12 in "
          f"{', '.join(f.rsplit('/', 1)[-1] for f in files)} ({time.monotonic() - t:.1f} s to build)")
    for p in patches:
        res, s = measure(git, p, "debian-6.1", tip, budget, work)
        print(row(f"demo on debian-6.1: #{p.index} {p.subject[:28]}", res, s))


def split_mbox(text: str) -> list[Patch]:
    """The demo mbox's patches (format-patch output), without b4: subject, body, diff."""
    out = []
    for mail in text.split("\nFrom ")[0:]:
        if "\ndiff --git " not in mail:
            continue
        head, _, body = mail.partition("\n\n")
        subject = next(line for line in head.splitlines() if line.startswith("Subject:"))
        subject = subject.split("]", 1)[-1].strip()
        message, _, rest = body.partition("\n---\n")
        diff = rest[rest.index("diff --git "):].split("\n-- \n")[0] + "\n"
        out.append(Patch(index=len(out) + 1, subject=subject, author="Demo <demo@example.org>",
                         date="Tue, 14 Nov 2023 22:13:20 +0000", message=message, diff=diff))
    return out


def hunk_history(git: Git, index: Path, old: str, new: str, files: list[str]) -> tuple[str, int]:
    """Commits on top of `old`, one per hunk of old -> new in `files`, in file order."""
    wi = WorkIndex(git, index, git.tree_of(old))
    head, n = old, 0
    try:
        for fd in parse_diff(git.out("diff", old, new, "--", *files) + "\n"):
            for i, h in enumerate(fd.hunks):
                if not wi.apply(fd.with_hunks([h])).ok:
                    continue
                n += 1
                head = git.out("commit-tree", wi.tree, "-p", head, "-m",
                               f"{fd.path.rsplit('/', 1)[-1]}: hunk {i + 1} of 6.1 -> 6.12",
                               env={"GIT_AUTHOR_DATE": f"{1700000000 + n * 60} +0000",
                                    "GIT_COMMITTER_DATE": f"{1700000000 + n * 60} +0000"})
    finally:
        wi.close()
    return head, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=30.0, help="apply.prerequisite_budget_s (default 30)")
    ap.add_argument("--cache", type=Path, help="a kpatchtest cache dir holding the demo imports")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        r = histories.prereq_chain(work / "chain")
        git = Git(r.path)
        print(f"{'case':46} {'search':>9}  result (budget {args.budget:g} s per patch)")
        for key in ("P", "W", "P_bad"):
            patch = r.patch_of(r.shas[key], 1, upstream=key != "W")
            res, s = measure(git, patch, "linux-1.0.y", git.rev_parse("master"), args.budget, work)
            print(row(f"tests/histories.prereq_chain: {key}", res, s))
        for chain, noise in ((3, 50), (10, 50), (10, 200)):
            synthetic(work, args.budget, chain, noise)
        demo(work, args.budget, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
