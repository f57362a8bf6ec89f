"""A small git repository with the history shapes stable maintainers meet.

Upstream line and a stable branch that diverged, backports carrying
"commit <sha> upstream", a file renamed upstream, a file deleted on the
stable branch, changes that need 3-way, a change already present under
another sha, and two upstream commits that a conflicting hunk needs together.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kpatchtest.patchset import Patch, Series

ENV = {
    "GIT_AUTHOR_NAME": "Dev", "GIT_AUTHOR_EMAIL": "dev@example.org",
    "GIT_COMMITTER_NAME": "Dev", "GIT_COMMITTER_EMAIL": "dev@example.org",
    "LC_ALL": "C", "HOME": "/nonexistent",
}


def c_file(name: str, n: int = 60) -> list[str]:
    """A plausible C file: numbered functions, so hunks have distinct context."""
    lines = [f"// SPDX-License-Identifier: GPL-2.0", f"/* {name} */", "#include <linux/kvm_host.h>", ""]
    i = 0
    while len(lines) < n:
        lines += [f"static int {name.split('/')[-1].split('.')[0]}_fn{i}(struct kvm *kvm)", "{",
                  f"\treturn kvm->arch.v{i};", "}", ""]
        i += 1
    return lines


@dataclass
class Repo:
    path: Path
    shas: dict[str, str] = field(default_factory=dict)

    def git(self, *args: str, input: str | None = None, date: int | None = None) -> str:
        env = dict(ENV)
        if date is not None:
            env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"{1700000000 + date * 60} +0000"
        return subprocess.run(["git", "-C", str(self.path), *args], input=input, check=True,
                              capture_output=True, text=True, env=env).stdout.strip()

    def read(self, path: str) -> list[str]:
        return (self.path / path).read_text().split("\n")[:-1]

    def write(self, path: str, lines: list[str]) -> None:
        p = self.path / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(lines) + "\n")

    def edit(self, path: str, lineno: int, new: str | None = None, insert: list[str] | None = None) -> None:
        """Replace 1-based line `lineno` with `new`, or insert lines before it."""
        lines = self.read(path)
        if insert is not None:
            lines[lineno - 1:lineno - 1] = insert
        else:
            lines[lineno - 1] = new  # type: ignore[assignment]
        self.write(path, lines)

    def commit(self, key: str, msg: str, n: int) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", msg, date=n)
        self.shas[key] = self.git("rev-parse", "HEAD")
        return self.shas[key]

    def patch_of(self, sha: str, index: int, upstream: bool = True) -> Patch:
        subject = self.git("log", "-1", "--format=%s", sha)
        body = self.git("log", "-1", "--format=%b", sha)
        diff = self.git("diff-tree", "-p", "--full-index", "--no-commit-id", sha) + "\n"
        return Patch(index=index, subject=subject, author="Dev <dev@example.org>",
                     date="Tue, 14 Nov 2023 22:13:20 +0000", message=body, diff=diff,
                     msgid=f"{index}-{sha[:8]}@example.org", upstream_commit=sha if upstream else None)

    def series(self, keys: list[str], upstream: bool = True, base: str | None = None) -> Series:
        patches = tuple(self.patch_of(self.shas[k], i + 1, upstream) for i, k in enumerate(keys))
        return Series(title="test series", sources=("test",), patches=patches, base_commit=base)


MMU = "arch/x86/kvm/mmu/tdp_mmu.c"
X86 = "arch/x86/kvm/x86.c"
SMM = "arch/x86/kvm/smm.c"
OLD = "arch/x86/kvm/mmu/paging_tmpl.h"
NEW = "arch/x86/kvm/mmu/paging.h"
GONE = "arch/x86/kvm/mmu/mmu_audit.c"


def build(path: Path) -> Repo:
    """Build the history; returns the repo with named shas.

    master: v1.0 - A, B (mmu lines 22, 24) - R (rename OLD->NEW) - U1, U2 - REV - P_* (series
            candidates, one per situation; the test picks which ones form its series)
    linux-1.0.y from v1.0: BP_U1 (backport of U1, "commit <sha> upstream", adjusted) - INS (3
            lines at the top of x86.c) - DEL (GONE) - CONF (mmu line 42 changed differently)
            - CP_pid (cherry-pick -x of P_pid) - BP_ref (adjusted backport of P_ref, "[ Upstream
            commit ]") - SQ (REV's change squashed with another, no citation)
    """
    path.mkdir(parents=True)
    r = Repo(path)
    r.git("init", "-q", "-b", "master")
    for f in (MMU, X86, SMM, OLD, GONE):
        r.write(f, c_file(f, 80))
    r.commit("v1.0", "Linux 1.0", 1)
    r.git("tag", "v1.0")
    r.git("branch", "linux-1.0.y")

    # Upstream development after the fork.
    r.edit(MMU, 22, "\treturn kvm->arch.v3 + 1; /* A */")
    r.commit("A", "KVM: x86/mmu: adjust fn3", 2)
    r.edit(MMU, 24, "/* B */")
    r.commit("B", "KVM: x86/mmu: adjust fn4", 3)
    r.git("mv", OLD, NEW)
    r.commit("R", "KVM: x86/mmu: rename paging_tmpl.h", 4)
    r.edit(X86, 62, "\treturn kvm->arch.v11 * 2; /* U1 */")
    r.commit("U1", "KVM: x86: fix fn11", 5)
    r.edit(SMM, 7, "\treturn kvm->arch.v0 ? 1 : 0; /* context change for 3-way */")
    r.commit("U2", "KVM: x86: smm tweak", 6)
    r.edit(X86, 47, "\treturn kvm->arch.v8 - 1; /* REV */")
    r.edit(X86, 72, "\treturn kvm->arch.v13 - 1; /* REV2 */")
    r.commit("REV", "KVM: x86: fn8 and fn13 change (stable has it squashed)", 8)

    # The series under test, written on top of upstream.
    r.edit(MMU, 62, "\treturn kvm->arch.v11 | 0x1; /* clean */")
    r.commit("P_clean", "KVM: x86/mmu: clean change", 10)
    r.edit(X86, 77, "\treturn kvm->arch.v14 | 0x1; /* offset */")
    r.commit("P_offset", "KVM: x86: change needing an offset", 11)
    r.edit(SMM, 9, "\treturn 0; /* 3-way */")
    r.commit("P_3way", "KVM: x86: smm change needing 3-way", 12)
    r.edit(NEW, 12, "\treturn kvm->arch.v1 + 7; /* renamed */")
    r.commit("P_rename", "KVM: x86/mmu: change to renamed header", 13)
    r.edit(MMU, 42, "\treturn kvm->arch.v7 << 1; /* conflict */")
    r.commit("P_conflict", "KVM: x86/mmu: change that conflicts", 14)
    r.edit(MMU, 42, "\treturn kvm->arch.v7 << 2; /* builds on conflict */")
    r.commit("P_dep", "KVM: x86/mmu: change building on the conflicting one", 15)
    lines = r.read(MMU)
    lines[21:24] = ["\treturn kvm->arch.v3 + 2; /* needs A and B */"]
    r.write(MMU, lines)
    r.commit("P_needs_ab", "KVM: x86/mmu: change whose context came from A and B", 16)
    r.edit(X86, 63, "} /* next to U1, which stable has as a backport */")
    r.commit("P_near_u1", "KVM: x86: change next to a backported fix", 16)
    r.edit(GONE, 12, "\treturn 0; /* gone */")
    r.commit("P_gone", "KVM: x86/mmu: change to a file stable deleted", 17)
    r.edit(MMU, 67, "\treturn kvm->arch.v12 | 0x4; /* already present, pid */")
    r.commit("P_pid", "KVM: x86/mmu: change stable cherry-picked", 18)
    r.edit(MMU, 72, "\treturn kvm->arch.v13 | 0x8; /* backported with upstream ref */")
    r.commit("P_ref", "KVM: x86/mmu: change stable backported", 19)

    # The stable branch.
    r.git("checkout", "-q", "linux-1.0.y")
    r.edit(X86, 62, "\treturn kvm->arch.v11 * 2; /* U1 backport */")
    r.commit("BP_U1", f"KVM: x86: fix fn11\n\ncommit {r.shas['U1']} upstream.\n\nAdjusted comment.", 20)
    r.edit(X86, 1, insert=["/* stable: 3 extra lines */", "/* that shift */", "/* everything */"])
    r.commit("INS", "KVM: x86: stable-only header comment", 21)
    r.git("rm", "-q", GONE)
    r.commit("DEL", "KVM: x86/mmu: remove the audit code (stable)", 22)
    r.edit(MMU, 42, "\treturn kvm->arch.v7 >> 1; /* stable differs */")
    r.commit("CONF", "KVM: x86/mmu: stable-only fn7 change", 23)
    r.git("cherry-pick", "-x", r.shas["P_pid"])
    r.shas["CP_pid"] = r.git("rev-parse", "HEAD")
    # Stable backport of P_ref whose diff differs (extra comment line) but cites upstream.
    r.edit(MMU, 72, "\treturn kvm->arch.v13 | 0x8; /* backported with upstream ref */")
    r.edit(MMU, 70, insert=["/* backport note */"])
    r.commit("BP_ref", f"KVM: x86/mmu: change stable backported\n\n[ Upstream commit {r.shas['P_ref']} ]", 25)
    # REV's change squashed with something else, no citation: only reverse-apply can tell.
    r.edit(X86, 50, "\treturn kvm->arch.v8 - 1; /* REV */")
    r.edit(X86, 75, "\treturn kvm->arch.v13 - 1; /* REV2 */")
    r.edit(X86, 20, "\treturn kvm->arch.v2; /* unrelated */")
    r.commit("SQ", "KVM: x86: assorted stable fixes", 26)
    r.git("checkout", "-q", "master")
    return r
