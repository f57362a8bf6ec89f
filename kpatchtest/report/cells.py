"""Short per-patch and per-branch labels shared by the summary and HTML reports.

Workload lines (aggregation over rounds, medians, status counts) are in workload_cells."""

from __future__ import annotations

from kpatchtest.results import BootResult, BranchResult, BuildResult, PatchResult, Prerequisite, RunResult


def _needs(p: PatchResult) -> str:
    return "needs " + ",".join(f"#{i}" for i in p.depends_on)


def patch_cell(p: PatchResult) -> str:
    if p.status == "applied":
        return "applied (offsets)" if p.method == "offset" else "applied"
    if p.status == "applied-3way":
        # "offset" only in results before schema 5, which counted offsets as 3-way
        return {"offset": "offset", "3way": "3-way", "fuzz": "FUZZ", "rename": "renamed"}.get(p.method or "", "3-way")
    if p.status == "already-present":
        return f"present {p.present_as[:12]}" if p.present_as else "present"
    if p.status == "skipped":
        return f"skipped ({_needs(p)})"
    files = ", ".join(f"{c.file.rsplit('/', 1)[-1]}:{c.hunks}" for c in p.conflicts)
    return f"CONFLICT {files}".strip() + (f" ({_needs(p)})" if p.depends_on else "")


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


def patch_prerequisites(b: BranchResult, p: PatchResult) -> list[Prerequisite]:
    """A patch's own prerequisites; results before schema 5 only have the branch's list."""
    if p.prerequisites or not b.apply:
        return p.prerequisites
    return [q for q in b.apply.prerequisites if p.index in q.for_patches]


def prerequisite_notes(prereqs: list[Prerequisite]) -> list[str]:
    """What a conflicting patch needs first: the verified set with its size and chain,
    then the candidates no trial confirmed, with why. Plain lines for every report."""
    verified = [q for q in prereqs if q.verified]
    others = [q for q in prereqs if not q.verified]
    out = []
    if verified:
        lines = sum(q.size for q in verified)
        out.append(f"needs first (verified: git am -3 of these in this order, then the patch, applies; "
                   f"{len(verified)} commit(s), {lines} lines):")
        out += [f"  {kernel_ref(q.commit, q.subject)} [{q.size} lines]"
                + (", needs " + ", ".join(n[:12] for n in q.needs) if q.needs else "") for q in verified]
    if others:
        why = others[0].why if all(q.why == others[0].why for q in others) else ""
        out.append("also changed the rejected lines (unverified" + (f": {why}" if why else "") + "):")
        out += [f"  {kernel_ref(q.commit, q.subject)} [{q.size} lines]" + (f": {q.why}" if q.why and not why else "")
                for q in others]
    return out


def build_cell(r: BuildResult | None, patched: bool = False) -> str:
    if r is None:
        return "-"
    if r.status == "skipped":
        return "skipped"
    if r.status == "fail":
        return "FAIL"
    parts = ["reused" if r.reused else f"{r.objects_compiled} obj, {r.duration_s:.0f} s"]
    if patched and r.warnings_new:
        parts.append(f"{len(r.warnings_new)} NEW WARNING(S)")
    if r.config_errors:
        parts.append("CONFIG ERROR")
    elif r.config_missing:
        parts.append(f"{len(r.config_missing)} config missing")
    return "pass (" + ", ".join(parts) + ")"


def build_rows(result: RunResult) -> list[tuple[str, list[str]]]:
    """('build baseline', cells), ('build patched', cells) when any branch was built."""
    if not any(b.build for b in result.branches):
        return []
    return [("build baseline", [build_cell(b.build.baseline if b.build else None) for b in result.branches]),
            ("build patched", [build_cell(b.build.patched if b.build else None, True) for b in result.branches])]


def build_notes(b: BranchResult) -> list[str]:
    """Plain lines a reviewer needs about a branch's builds."""
    if not b.build:
        return []
    out = []
    for label, r in (("baseline", b.build.baseline), ("patched", b.build.patched)):
        if r.status == "skipped" and r.reason:
            out.append(f"build {label}: skipped, {r.reason}")
        if r.status == "fail":
            out.append(f"build {label} FAILED: {r.reason}")
            out += ["    " + line for line in (r.error_excerpt or "").splitlines()[:12]]
        out += [f"build {label}: config error: {m}" for m in r.config_errors]
        if label == "baseline":
            out += [f"config: {m}" for m in r.config_missing]
        if r.kernelrelease:
            out.append(f"build {label}: {r.kernelrelease}" + (f", ccache hits {r.cache_hit_rate:.0%}"
                                                               if r.cache_hit_rate is not None else ""))
    out += [f"new warning: {w}" for w in b.build.patched.warnings_new]
    if b.build.first_bad_patch:
        out.append(f"first patch that breaks the build: #{b.build.first_bad_patch}")
    return out


def boot_cell(results: list[BootResult]) -> str:
    if not results:
        return "-"
    parts = []
    for r in results:
        if r.status == "booted":
            parts.append(f"booted {r.duration_s:.0f} s" + (f", {len(r.splats)} SPLAT(S)" if r.splats else ""))
        elif r.status == "skipped":
            parts.append("skipped")
        else:
            parts.append("BOOT FAILED")
    return "; ".join(parts)


def boot_rows(result: RunResult) -> list[tuple[str, list[str]]]:
    if not any(b.boot for b in result.branches):
        return []
    return [(f"boot {label}", [boot_cell([r for r in b.boot if r.build == label]) for b in result.branches])
            for label in ("baseline", "patched")]


def boot_notes(b: BranchResult) -> list[str]:
    out = []
    rounds = any(r.round > 1 for r in b.boot)
    for r in b.boot:
        head = f"boot {r.build} on {r.host}" + (f" round {r.round}" if rounds else "") + f": {r.status}"
        if r.status == "booted":
            out.append(f"{head} ({r.kernelrelease}, {r.method}, {r.duration_s:.0f} s to SSH)")
        else:
            out.append(f"{head}: {r.reason}" + (" (host recovered on its known-good kernel)" if r.recovered else ""))
            out += ["    " + line for line in (r.console_excerpt or "").splitlines()[-15:]]
        for s in r.splats:
            out.append(f"  {s.kind} in {s.source}:")
            out += ["    " + line for line in s.first_lines[:8]]
    return out
