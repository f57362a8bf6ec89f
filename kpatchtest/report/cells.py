"""Short per-patch and per-branch labels shared by the summary and HTML reports."""

from __future__ import annotations

from kpatchtest.results import BranchResult, PatchResult, RunResult


def patch_cell(p: PatchResult) -> str:
    if p.status == "applied":
        return "applied"
    if p.status == "applied-3way":
        return {"offset": "offset", "3way": "3-way", "fuzz": "FUZZ", "rename": "renamed"}.get(p.method or "", "3-way")
    if p.status == "already-present":
        return f"present {p.present_as[:12]}" if p.present_as else "present"
    if p.status == "skipped":
        return "skipped (needs " + ",".join(f"#{i}" for i in p.depends_on) + ")"
    files = ", ".join(f"{c.file.rsplit('/', 1)[-1]}:{c.hunks}" for c in p.conflicts)
    return f"CONFLICT {files}".strip()


def branch_verdict(b: BranchResult) -> str:
    if b.error:
        return "ERROR"
    return b.apply.verdict if b.apply else "not run"


def patch_rows(result: RunResult) -> list[tuple[int, str]]:
    """(index, subject) of every patch, from the series or, failing that, the branches."""
    if result.series and result.series.patches:
        return [(p.index, p.subject) for p in result.series.patches]
    for b in result.branches:
        if b.apply:
            return [(p.index, p.subject) for p in b.apply.patches]
    return []


def cell(b: BranchResult, index: int) -> PatchResult | None:
    if not b.apply:
        return None
    return next((p for p in b.apply.patches if p.index == index), None)


def kernel_ref(sha: str, subject: str) -> str:
    """The kernel's way of citing a commit: 12 hex digits and the subject."""
    return f'{sha[:12]} ("{subject}")'
