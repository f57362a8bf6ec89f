"""junit.xml for Jenkins: a testsuite per branch, a testcase per patch, one per gate."""

from __future__ import annotations

import re
from pathlib import Path

from junit_xml import TestCase, TestSuite, to_xml_report_file

from kpatchtest.report.cells import kernel_ref
from kpatchtest.results import BootResult, BranchResult, BuildResult, PatchResult, RunResult

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(text: str) -> str:
    """junit-xml drops control characters silently; make them visible instead."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _patch_case(b: BranchResult, p: PatchResult) -> TestCase:
    tc = TestCase(name=_clean(f"{p.index:02d} {p.subject}"), classname=f"apply.{b.name}",
                  elapsed_sec=0.0, stdout=_clean(p.detail) or None)
    if p.status == "already-present":
        tc.add_skipped_info(message=_clean(f"already present as {p.present_as or '?'} ({p.present_by})"))
    elif p.status == "skipped":
        tc.add_skipped_info(message=f"not attempted: depends on conflicting patch(es) {p.depends_on}")
    elif p.status == "conflict":
        files = ", ".join(f"{c.file} ({c.hunks} hunks)" for c in p.conflicts)
        text = "\n\n".join(f"{c.file}: {c.reason}\n" + "".join(c.rejected) for c in p.conflicts)
        hints = [q for q in b.apply.prerequisites if p.index in q.for_patches] if b.apply else []
        if hints:
            text += "\n\nprerequisite hints:\n" + "\n".join(
                f"  {kernel_ref(q.commit, q.subject)} {'verified' if q.verified else 'unverified'}" for q in hints)
        tc.add_failure_info(message=_clean(f"conflict: {files}"), output=_clean(text))
    return tc


def _build_case(branch: str, name: str, r: BuildResult) -> TestCase:
    props = [f"objects_compiled={r.objects_compiled}", f"reused={r.reused}", f"kernelrelease={r.kernelrelease}",
             f"config_hash={r.config_hash}", f"compiler={r.compiler}"]
    props += [f"config missing: {m}" for m in r.config_missing]
    tc = TestCase(name=name, classname=f"build.{branch}", elapsed_sec=r.duration_s, stdout=_clean("\n".join(props)))
    if r.status == "skipped":
        tc.add_skipped_info(message=_clean(r.reason or "skipped"))
    elif r.status == "fail":
        tc.add_failure_info(message=_clean(r.reason or "build failed"), output=_clean(r.error_excerpt or r.reason))
    elif r.config_errors:
        tc.add_failure_info(message=f"{len(r.config_errors)} required config symbol(s) missing",
                            output=_clean("\n".join(r.config_errors)))
    return tc


def _build_cases(b: BranchResult) -> list[TestCase]:
    if not b.build:
        return []
    cases = [_build_case(b.name, "build baseline", b.build.baseline)]
    cases += [_build_case(b.name, f"build after patch {p.index:02d}",
                          BuildResult(status=p.status, reason=p.reason, objects_compiled=p.objects_compiled))
              for p in b.build.per_patch]
    cases.append(_build_case(b.name, "build patched", b.build.patched))
    if b.build.patched.status == "pass":
        tc = TestCase(name="no new compiler warnings", classname=f"build.{b.name}")
        if b.build.patched.warnings_new:
            tc.add_failure_info(message=f"{len(b.build.patched.warnings_new)} new warning(s)",
                                output=_clean("\n".join(b.build.patched.warnings_new)))
        cases.append(tc)
    return cases


def _boot_case(branch: str, r: BootResult) -> TestCase:
    lines = [f"host={r.host}", f"method={r.method}", f"kernelrelease={r.kernelrelease}",
             f"expected={r.expected_release}", f"boot_id={r.boot_id}"]
    tc = TestCase(name=f"boot {r.build} on {r.host}", classname=f"boot.{branch}", elapsed_sec=r.duration_s,
                  stdout=_clean("\n".join(lines)))
    if r.status == "skipped":
        tc.add_skipped_info(message=_clean(r.reason or "skipped"))
    elif r.status == "boot-failed":
        tc.add_failure_info(message=_clean(r.reason or "boot failed"),
                            output=_clean(r.console_excerpt or r.reason or "no console output"))
    elif r.splats:
        tc.add_failure_info(message=f"{len(r.splats)} kernel splat(s): " + ", ".join(s.kind for s in r.splats),
                            output=_clean("\n\n".join("\n".join(s.first_lines) for s in r.splats)))
    return tc


def render_suites(result: RunResult) -> list[TestSuite]:
    suites = []
    for b in result.branches:
        cases = []
        if b.error:
            tc = TestCase(name="resolve branch", classname=f"apply.{b.name}")
            tc.add_error_info(message=_clean(b.error), output=_clean(b.error))
            cases.append(tc)
        if b.apply:
            cases += [_patch_case(b, p) for p in b.apply.patches]
        cases += _build_cases(b)
        cases += [_boot_case(b.name, r) for r in b.boot]
        suites.append(TestSuite(name=b.name, test_cases=cases, package="kpatchtest",
                                properties={"verdict": b.apply.verdict if b.apply else "error",
                                            "commit": b.commit or ""}))
    if result.gates:
        cases = []
        for g in result.gates:
            tc = TestCase(name=f"{g.name} {g.branch or ''}".strip(), classname="gates")
            if not g.passed:
                tc.add_failure_info(message=f"expected {g.expected}, got {g.actual}", output=f"gate {g.name}")
            cases.append(tc)
        suites.append(TestSuite(name="gates", test_cases=cases, package="kpatchtest"))
    return suites


def write(result: RunResult, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        to_xml_report_file(f, render_suites(result), prettyprint=True, encoding="utf-8")
