"""junit.xml for Jenkins: a testsuite per branch, a testcase per patch, build, boot and
workload record, one per gate.

Workload testcases carry their metrics as testcase-level <properties> (Jenkins' JUnit
plugin reads them; junit-xml cannot write them, so they are added to its XML after).
Their system-out has the end of the record's first log, read from the run directory
when the writer is given one, else only the log paths.
"""

from __future__ import annotations

import re
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path

from junit_xml import TestCase, TestSuite, to_xml_report_string

from kpatchtest.report.cells import patch_prerequisites, prerequisite_notes
from kpatchtest.report.workload_cells import log_tail, max_round, record_label, run_label
from kpatchtest.results import BootResult, BranchResult, BuildResult, PatchResult, RunResult, WorkloadRun
from kpatchtest.workloads.record import WorkloadRecord

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
        if p.depends_on:
            text += f"\n\n{p.detail}"
        hints = prerequisite_notes(patch_prerequisites(b, p))
        if hints:
            text += "\n\nprerequisites:\n" + "\n".join(hints)
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


def _boot_case(branch: str, r: BootResult, rounds: bool = False) -> TestCase:
    lines = [f"host={r.host}", f"method={r.method}", f"kernelrelease={r.kernelrelease}",
             f"expected={r.expected_release}", f"boot_id={r.boot_id}"] + ([f"round={r.round}"] if rounds else [])
    tc = TestCase(name=f"boot {r.build} on {r.host}" + (f" round {r.round}" if rounds else ""),
                  classname=f"boot.{branch}", elapsed_sec=r.duration_s,
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


def _number(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.15g}"


def _metric_properties(run: WorkloadRun, rec: WorkloadRecord) -> list[tuple[str, str]]:
    """<metric>.<unit>.<repetition> = value (n/a: not measured, never 0), and why or how."""
    props = []
    for m in rec.metrics:
        props += [(f"{m.name}.{m.unit}.{i}", _number(v)) for i, v in enumerate(m.values or [None], 1)]
        if not m.available:
            props.append((f"{m.name}.available", "false"))
        if m.note:
            props.append((f"{m.name}.note", m.note))
        if run.probes.get(m.name, m.note) != m.note:
            props.append((f"{m.name}.probe", run.probes[m.name]))
    return [(_clean(k), _clean(v)) for k, v in props]


def _workload_case(branch: str, run: WorkloadRun, rec: WorkloadRecord, rounds: bool,
                   run_dir: Path | None) -> tuple[TestCase, list[tuple[str, str]]]:
    lines = [f"build={run.build}", f"host={run.host}", f"round={run.round}", f"kernelrelease={run.kernelrelease}",
             f"repetitions={run.repetitions}", f"status={rec.status}"]
    lines += [f"detail: {rec.detail}"] if rec.detail else []
    lines += [f"log: {p}" for p in rec.logs]
    if rec.logs:
        tail = log_tail(run_dir, rec.logs[0])
        if tail is not None:
            lines += [f"--- end of {rec.logs[0]} ---", tail.rstrip("\n")]
    tc = TestCase(name=_clean(f"{record_label(rec)} {run_label(run, rounds)}"), classname=f"workloads.{branch}",
                  elapsed_sec=rec.duration_s, stdout=_clean("\n".join(lines)))
    detail = _clean(rec.detail)
    if rec.status == "fail":
        tc.add_failure_info(message=detail or "failed", output=detail or None)
    elif rec.status == "timeout":
        tc.add_error_info(message="timeout" + (f": {detail}" if detail else ""), output=detail or None,
                          error_type="timeout")
    elif rec.status == "error":
        tc.add_error_info(message=detail or "error", output=detail or None)
    elif rec.status == "skip":
        tc.add_skipped_info(message=detail or "skipped")
    return tc, _metric_properties(run, rec)


def _workload_cases(b: BranchResult, run_dir: Path | None) -> list[tuple[TestCase, list[tuple[str, str]]]]:
    rounds = max_round(b) > 1
    cases = []
    for run in b.workloads:
        if run.error:
            tc = TestCase(name=_clean(f"workloads {run_label(run, rounds)}"), classname=f"workloads.{b.name}",
                          stdout=_clean(f"build={run.build}\nhost={run.host}\nround={run.round}\n"
                                        f"kernelrelease={run.kernelrelease}"))
            tc.add_error_info(message=_clean(run.error), output=_clean(run.error))
            cases.append((tc, []))
        cases += [_workload_case(b.name, run, rec, rounds, run_dir) for rec in run.records]
    return cases


def render_suites(result: RunResult, run_dir: Path | None = None,
                  properties: dict[int, list[tuple[str, str]]] | None = None) -> list[TestSuite]:
    """The suites; `properties` (if given) receives id(TestCase) -> testcase-level properties."""
    suites = []
    props = properties if properties is not None else {}
    for b in result.branches:
        cases = []
        if b.error:
            tc = TestCase(name="resolve branch", classname=f"apply.{b.name}")
            tc.add_error_info(message=_clean(b.error), output=_clean(b.error))
            cases.append(tc)
        if b.apply:
            cases += [_patch_case(b, p) for p in b.apply.patches]
        cases += _build_cases(b)
        boot_rounds = any(r.round > 1 for r in b.boot)
        cases += [_boot_case(b.name, r, boot_rounds) for r in b.boot]
        for tc, p in _workload_cases(b, run_dir):
            cases.append(tc)
            if p:
                props[id(tc)] = p
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


def render(result: RunResult, run_dir: Path | None = None) -> str:
    props: dict[int, list[tuple[str, str]]] = {}
    suites = render_suites(result, run_dir, props)
    root = ET.fromstring(to_xml_report_string(suites, prettyprint=False, encoding="utf-8").encode("utf-8"))
    for suite, element in zip(suites, root.findall("testsuite")):
        for tc, case in zip(suite.test_cases, element.findall("testcase")):
            if id(tc) in props:
                holder = ET.Element("properties")
                for name, value in props[id(tc)]:
                    ET.SubElement(holder, "property", {"name": name, "value": value})
                case.insert(0, holder)
    return xml.dom.minidom.parseString(ET.tostring(root, encoding="utf-8")).toprettyxml(encoding="utf-8").decode()
