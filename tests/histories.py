"""Histories for the apply verdicts that only real history gets right (issue 9).

Each builder makes a small kernel-shaped repository (tests/kernelhist.Repo): an upstream
master with tags, topic branches merged with merge commits as maintainers pull them,
and stable branches with their own commits and backports in the forms stable uses.
Return value: the Repo with named shas (and branches named as in the docstrings).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kpatchtest.patchset import Series
from tests.kernelhist import MMU, SMM, X86, Repo, c_file

# In c_file(name, 80) function N's `return` is line 7 + 5 * N, its signature line 5 + 5 * N.


def _ret(n: int) -> int:
    return 7 + 5 * n


def _init(path: Path) -> Repo:
    path.mkdir(parents=True)
    r = Repo(path)
    r.git("init", "-q", "-b", "master")
    for f in (MMU, X86, SMM):
        r.write(f, c_file(f, 80))
    r.commit("v1.0", "Linux 1.0", 1)
    r.git("tag", "v1.0")
    return r


def _link_of(index: int) -> str:
    return f"20231114-tdp-roots-v3-{index}@example.org"


def merged_series(path: Path) -> Repo:
    """A three-patch series merged upstream before v1.1, and branches on both sides of it.

    master:  v1.0 - A0 (mmu fn3) - N1 (smm) - Merge 'kvm-mmu' [P1 (fn3 again), P2 (rewrites
             P1's line), P3 (x86 fn8)] - L (fn3 and fn8 once more, after the merge) - v1.1 - N2
    linux-1.0.y    from v1.0: one stable fix in smm.c; lacks A0, so P1 conflicts there
    linux-1.0.y-a0 from v1.0: has A0 as a stable backport ("commit <A0> upstream.")
    linux-1.1.y    from v1.1: has the whole series as ancestors; L makes P1..P3 neither
                   apply nor reverse-apply there
    The merged commits carry `Link:` to the posted patches' msgids (see `posted`).
    """
    r = _init(path)
    r.git("branch", "linux-1.0.y")
    r.git("branch", "linux-1.0.y-a0")
    r.edit(MMU, _ret(3), "\treturn kvm->arch.v3 + 1; /* A0 */")
    r.commit("A0", "KVM: x86/mmu: bump fn3", 2)
    r.edit(SMM, _ret(2), "\treturn kvm->arch.v2 ^ 1; /* N1 */")
    r.commit("N1", "KVM: x86: smm noise", 3)
    r.git("checkout", "-q", "-b", "kvm-mmu")
    r.edit(MMU, _ret(3), "\treturn kvm->arch.v3 + 1 + root; /* P1 */")
    r.commit("P1", f"KVM: x86/mmu: take the root in fn3\n\nLink: https://lore.kernel.org/r/{_link_of(1)}", 4)
    r.edit(MMU, _ret(3), "\treturn kvm->arch.v3 + 2 + root; /* P2 */")
    r.commit("P2", f"KVM: x86/mmu: fn3 takes two\n\nLink: https://lore.kernel.org/r/{_link_of(2)}", 5)
    r.edit(X86, _ret(8), "\treturn kvm->arch.v8 + root; /* P3 */")
    r.commit("P3", f"KVM: x86: fn8 takes the root too\n\nLink: https://lore.kernel.org/r/{_link_of(3)}", 6)
    r.git("checkout", "-q", "master")
    r.git("merge", "-q", "--no-ff", "-m", "Merge branch 'kvm-mmu' into HEAD", "kvm-mmu", date=7)
    r.shas["M"] = r.git("rev-parse", "HEAD")
    r.edit(MMU, _ret(3), "\treturn kvm->arch.v3 + 2 + root * 2; /* L */")
    r.edit(X86, _ret(8), "\treturn kvm->arch.v8 + root * 2; /* L */")
    r.commit("L", "KVM: x86: scale the roots", 8)
    r.edit(SMM, 1, insert=["/* 1.1 */"])
    r.commit("v1.1", "Linux 1.1", 9)
    r.git("tag", "v1.1")
    r.git("branch", "linux-1.1.y")
    r.edit(SMM, _ret(5), "\treturn kvm->arch.v5 | 2; /* N2 */")
    r.commit("N2", "KVM: x86: more smm noise", 10)

    r.git("checkout", "-q", "linux-1.0.y")
    r.edit(SMM, _ret(9), "\treturn kvm->arch.v9 & 1; /* stable fix */")
    r.commit("S1", "KVM: x86: stable-only smm fix", 20)
    r.git("checkout", "-q", "linux-1.0.y-a0")
    r.git("cherry-pick", r.shas["A0"])
    r.git("commit", "-q", "--amend", "-m", f"KVM: x86/mmu: bump fn3\n\ncommit {r.shas['A0']} upstream.", date=21)
    r.shas["BP_A0"] = r.git("rev-parse", "HEAD")
    r.git("checkout", "-q", "linux-1.1.y")
    r.edit(SMM, _ret(9), "\treturn kvm->arch.v9 & 1; /* stable fix */")
    r.commit("S11", "KVM: x86: stable-only smm fix", 22)
    r.git("checkout", "-q", "master")
    return r


def posted(r: Repo) -> Series:
    """The series as it was posted (a lore mbox): no upstream shas, msgids the Links cite."""
    patches = tuple(replace(r.patch_of(r.shas[key], i, upstream=False), msgid=f"<{_link_of(i)}>", message="")
                    for i, key in enumerate(("P1", "P2", "P3"), 1))
    return Series(title="KVM: x86/mmu: roots", sources=("mbox",), patches=patches)


def prereq_chain(path: Path) -> Repo:
    """A patch whose prerequisite is a chain of three upstream commits across files, and
    one that no set helps.

    master: v1.0 - U0 (mmu fn7's signature) - N1 (x86 fn3) - C1 (smm fn11) - C2 (smm fn11
            again, x86 fn9) - C3 (x86 fn9 again, mmu fn7) - N2 (mmu fn1) - D1 (mmu fn13) -
            Q (x86 fn12) - P (mmu fn7 again) - P_bad (mmu fn13 again) - DEP (smm fn4) -
            FIX (smm fn4 again, fn6) - SHIFT (20 lines at the top of the mmu file)
    posted-w: C3 - W (mmu fn7 again, as P did on master), posted and never merged
    P's rejected line was last changed by C3 alone; C3 does not apply without C2 (x86),
    nor C2 without C1 (smm): neither the lines' nor the mmu file's history has them, only
    the transitive search finds [C1, C2, C3]. W's line numbers point 20 lines off on
    master (SHIFT): `git log -L` there finds nothing, the file's history does, and only
    its part before P (which rewrote W's line) lets W in.
    linux-1.0.y from v1.0: U0 backported (adjusted, "[ Upstream commit ]"); a stable-only
    fn13 change that D1 and P_bad conflict with; DEP backported by AUTOSEL with
    "Stable-dep-of: <FIX>" (FIX itself is not on the branch: its backport was dropped).
    """
    r = _init(path)
    r.git("branch", "linux-1.0.y")
    r.edit(MMU, 5 + 5 * 7, "static int mmu_fn7(struct kvm *kvm) /* U0 */")
    r.commit("U0", "KVM: x86/mmu: annotate fn7", 2)
    r.edit(X86, _ret(3), "\treturn kvm->arch.v3 - 3; /* N1 */")
    r.commit("N1", "KVM: x86: noise", 3)
    r.edit(SMM, _ret(11), "\treturn kvm->arch.v11 + 1; /* C1 */")
    r.commit("C1", "KVM: x86: C1 smm fn11", 4)
    r.edit(SMM, _ret(11), "\treturn kvm->arch.v11 + 2; /* C2 */")
    r.edit(X86, _ret(9), "\treturn kvm->arch.v9 + 2; /* C2 */")
    r.commit("C2", "KVM: x86: C2 smm fn11 and x86 fn9", 5)
    r.edit(X86, _ret(9), "\treturn kvm->arch.v9 + 3; /* C3 */")
    r.edit(MMU, _ret(7), "\treturn kvm->arch.v7 + 3; /* C3 */")
    r.commit("C3", "KVM: x86/mmu: C3 x86 fn9 and mmu fn7", 6)
    r.edit(MMU, _ret(1), "\treturn kvm->arch.v1 - 1; /* N2 */")
    r.commit("N2", "KVM: x86/mmu: noise far away", 7)
    r.edit(MMU, _ret(13), "\treturn kvm->arch.v13 + 1; /* D1 */")
    r.commit("D1", "KVM: x86/mmu: D1 fn13", 8)
    r.edit(X86, _ret(12), "\treturn kvm->arch.v12 | 4; /* Q */")
    r.commit("Q", "KVM: x86: Q, applies anywhere", 9)
    r.edit(MMU, _ret(7), "\treturn kvm->arch.v7 + 4; /* P */")
    r.commit("P", "KVM: x86/mmu: P needs the chain", 10)
    r.edit(MMU, _ret(13), "\treturn kvm->arch.v13 + 2; /* P_bad */")
    r.commit("P_bad", "KVM: x86/mmu: P_bad conflicts with stable", 11)
    r.edit(SMM, _ret(4), "\treturn kvm->arch.v4 + 1; /* DEP */")
    r.commit("DEP", "KVM: x86: prepare fn4", 12)
    r.edit(SMM, _ret(4), "\treturn kvm->arch.v4 + 2; /* FIX */")
    r.edit(SMM, _ret(6), "\treturn kvm->arch.v6 + 2; /* FIX */")
    r.commit("FIX", "KVM: x86: fix fn4 and fn6", 13)
    r.edit(MMU, 4, insert=[f"/* SHIFT {i} */" for i in range(20)])
    r.commit("SHIFT", "KVM: x86/mmu: a long comment at the top", 14)
    r.git("checkout", "-q", "-b", "posted-w", r.shas["C3"])
    r.edit(MMU, _ret(7), "\treturn kvm->arch.v7 + 5; /* W */")
    r.commit("W", "KVM: x86/mmu: W rewrites C3's fn7, as P did on master", 15)

    r.git("checkout", "-q", "linux-1.0.y")
    r.edit(MMU, 5 + 5 * 7, "static int mmu_fn7(struct kvm *kvm) /* U0 */")
    r.edit(MMU, 3, insert=["/* backport: context adjusted */"])
    r.commit("BP_U0", f"KVM: x86/mmu: annotate fn7\n\n[ Upstream commit {r.shas['U0']} ]\n\n"
             "Signed-off-by: Sasha Levin <sashal@kernel.org>", 20)
    r.edit(MMU, _ret(13) + 1, "\treturn kvm->arch.v13 >> 1; /* stable differs */")
    r.commit("S_conf", "KVM: x86/mmu: stable-only fn13 change", 21)
    r.edit(SMM, _ret(4), "\treturn kvm->arch.v4 + 1; /* DEP */")
    r.edit(SMM, 1, insert=["/* stable */"])
    r.commit("BP_DEP", f"KVM: x86: prepare fn4\n\n[ Upstream commit {r.shas['DEP']} ]\n\n"
             f"Stable-dep-of: {r.shas['FIX'][:12]} (\"KVM: x86: fix fn4 and fn6\")\n"
             "Signed-off-by: Sasha Levin <sashal@kernel.org>", 22)
    r.git("checkout", "-q", "master")
    return r
