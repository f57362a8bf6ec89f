"""junit.xml for Jenkins: a testsuite per branch (a testcase per patch, build and boot), one
per workload run (a testcase per record), one of gates and one of compare (a testcase per
test and per metric comparison: a regression, a new splat or a metric that broke its gate
fails, with the numbers).

Valid against the junit-10.xsd of Jenkins' xUnit plugin (tests/data/junit-10.xsd): no
`disabled` attribute (junit-xml writes one), and properties only on testsuites, since the
schema has none on testcases. So a workload run is a suite of its own whose properties
are the run's metrics, one per repetition; the JUnit plugin keeps them with
`keepProperties: true`.

Classnames are "<stage>.<branch>" with the branch's dots as "_": the plugin splits a
classname at its last dot into package and class, and "apply.debian-6.1" would read as
package "apply.debian-6", class "1". "_" rather than a look-alike such as U+2024: what a
reader copies out of Jenkins must not look like a branch name it isn't.
Workload system-out has the end of the record's first log, read from the run directory
when the writer is given one, else only the log paths.
"""

from __future__ import annotations

import re
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path

from junit_xml import TestCase, TestSuite, to_xml_report_string

from kpatchtest.compare.model import BranchComparison, MetricComparison
from kpatchtest.report.cells import patch_prerequisites, prerequisite_notes
from kpatchtest.report.compare_cells import (
    gate_broken_by,
    metric_gates,
    metric_label,
    metric_numbers,
    tc_label,
    tc_numbers,
)
from kpatchtest.report.workload_cells import log_tail, max_round, record_label, run_label
from kpatchtest.results import BootResult, BranchResult, BuildResult, PatchResult, RunResult, WorkloadRun
from kpatchtest.workloads.record import WorkloadRecord

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(text: str) -> str:
    """junit-xml drops control characters silently; make them visible instead."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def classname(stage: str, branch: str) -> str:
    """'apply.debian-6_1': the plugin's package is the stage, its class the branch."""
    return f"{stage}.{branch.replace('.', '_')}"


def _patch_case(b: BranchResult, p: PatchResult) -> TestCase:
    tc = TestCase(name=_clean(f"{p.index:02d} {p.subject}"), classname=classname("apply", b.name),
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
    tc = TestCase(name=name, classname=classname("build", branch), elapsed_sec=r.duration_s, stdout=_clean("\n".join(props)))
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
        tc = TestCase(name="no new compiler warnings", classname=classname("build", b.name))
        if b.build.patched.warnings_new:
            tc.add_failure_info(message=f"{len(b.build.patched.warnings_new)} new warning(s)",
                                output=_clean("\n".join(b.build.patched.warnings_new)))
        cases.append(tc)
    return cases


def _boot_case(branch: str, r: BootResult, rounds: bool = False) -> TestCase:
    lines = [f"host={r.host}", f"method={r.method}", f"kernelrelease={r.kernelrelease}",
             f"expected={r.expected_release}", f"boot_id={r.boot_id}"] + ([f"round={r.round}"] if rounds else [])
    tc = TestCase(name=f"boot {r.build} on {r.host}" + (f" round {r.round}" if rounds else ""),
                  classname=classname("boot", branch), elapsed_sec=r.duration_s,
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


def _metric_properties(run: WorkloadRun) -> dict[str, str]:
    """<record>.<metric>.<unit>.<repetition> = value (n/a: not measured, never 0), and why or how."""
    props: dict[str, str] = {}
    for rec in run.records:
        for m in rec.metrics:
            key = f"{record_label(rec)}.{m.name}"
            props.update({f"{key}.{m.unit}.{i}": _number(v) for i, v in enumerate(m.values or [None], 1)})
            if not m.available:
                props[f"{key}.available"] = "false"
            if m.note:
                props[f"{key}.note"] = m.note
            if run.probes.get(m.name, m.note) != m.note:
                props[f"{key}.probe"] = run.probes[m.name]
    return {_clean(k): _clean(v) for k, v in props.items()}


def _workload_case(branch: str, run: WorkloadRun, rec: WorkloadRecord, rounds: bool,
                   run_dir: Path | None) -> TestCase:
    lines = [f"build={run.build}", f"host={run.host}", f"round={run.round}", f"kernelrelease={run.kernelrelease}",
             f"repetitions={run.repetitions}", f"status={rec.status}"]
    lines += [f"rerun={run.rerun}"] if run.rerun else []
    lines += [f"detail: {rec.detail}"] if rec.detail else []
    lines += [f"log: {p}" for p in rec.logs]
    if rec.logs:
        tail = log_tail(run_dir, rec.logs[0])
        if tail is not None:
            lines += [f"--- end of {rec.logs[0]} ---", tail.rstrip("\n")]
    tc = TestCase(name=_clean(f"{record_label(rec)} {run_label(run, rounds)}"),
                  classname=classname("workloads", branch), elapsed_sec=rec.duration_s, stdout=_clean("\n".join(lines)))
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
    return tc


def _workload_suites(b: BranchResult, run_dir: Path | None) -> list[TestSuite]:
    """A suite per workload run: its records as testcases, its metrics as the suite's properties."""
    rounds = max_round(b) > 1
    suites = []
    for run in b.workloads:
        cases = []
        if run.error:
            tc = TestCase(name=_clean(f"workloads {run_label(run, rounds)}"), classname=classname("workloads", b.name),
                          stdout=_clean(f"build={run.build}\nhost={run.host}\nround={run.round}\n"
                                        f"kernelrelease={run.kernelrelease}"))
            tc.add_error_info(message=_clean(run.error), output=_clean(run.error))
            cases.append(tc)
        cases += [_workload_case(b.name, run, rec, rounds, run_dir) for rec in run.records]
        props = {"branch": b.name, "build": run.build, "host": _clean(run.host), "round": str(run.round),
                 "rerun": str(run.rerun), "kernelrelease": run.kernelrelease or "", "repetitions": str(run.repetitions)}
        suites.append(TestSuite(name=_clean(f"{b.name} workloads {run_label(run, True)}"), test_cases=cases,
                                package="kpatchtest", properties={**props, **_metric_properties(run)}))
    return suites


# -- compare -----------------------------------------------------------------------------

def _comparison_cases(result: RunResult, b: BranchResult, c: BranchComparison) -> list[TestCase]:
    """A regression, a new splat, or a metric whose gate broke fails; the rest pass with
    their numbers in system-out (flaky tests among them, with their counts)."""
    cls = classname("compare", b.name)
    cases = []
    for t in c.tests:
        text = f"{t.verdict}: {tc_numbers(t)}" + (f"\n{t.detail}" if t.detail else "")
        tc = TestCase(name=_clean(f"test {tc_label(t)}"), classname=cls, stdout=_clean(text))
        if t.verdict == "regression":
            tc.add_failure_info(message=_clean(f"regression: {tc_numbers(t)}"), output=_clean(text),
                                failure_type="regression")
        cases.append(tc)
    for s in c.splats_new:
        tc = TestCase(name=_clean(f"new splat {s.kind} on {s.host} round {s.round}" + (f" rerun {s.rerun}" if s.rerun else "")),
                      classname=cls)
        tc.add_failure_info(message=_clean(f"{s.kind} on the patched kernel only ({s.where})"),
                            output=_clean("\n".join(s.first_lines)), failure_type="regression")
        cases.append(tc)
    broken: dict[int, str] = {}
    for name, g in metric_gates(result, b).items():
        for m in gate_broken_by(c, name, g):
            broken[id(m)] = f"gate {g.name} failed: expected {g.expected}, got {g.actual}"
    for m in c.metrics:
        text = _metric_text(m)
        tc = TestCase(name=_clean(f"metric {metric_label(m)}"), classname=cls, stdout=_clean(text))
        if id(m) in broken:
            tc.add_failure_info(message=_clean(f"{broken[id(m)]}: {m.verdict}, {metric_numbers(m)}"),
                                output=_clean(text), failure_type="gate")
        cases.append(tc)
    return cases


def _metric_text(m: MetricComparison) -> str:
    lines = [f"verdict={m.verdict}", f"numbers: {metric_numbers(m)}", f"unit={m.unit}", f"direction={m.direction}",
             f"baseline_median={_number(m.baseline_median)}", f"patched_median={_number(m.patched_median)}",
             f"ratio={_number(m.ratio)}", f"ci95=[{_number(m.ci_low)}, {_number(m.ci_high)}]",
             f"p_value={_number(m.p_value)}", f"rounds={m.rounds}", f"repetitions={m.repetitions}",
             f"baseline_n={m.baseline_n}", f"patched_n={m.patched_n}", f"threshold={m.threshold:g}",
             f"method={m.method}", f"seed={m.seed}"]
    return "\n".join(lines + ([f"why: {m.why}"] if m.why else []))


def _comparison_properties(b: BranchResult, c: BranchComparison) -> dict[str, str]:
    """Per metric, the numbers a Jenkins plot or a script picks up: <branch>:<workload>.<metric>@<host>.<field>."""
    props = {f"{b.name}:method": c.method, f"{b.name}:seed": str(c.seed), f"{b.name}:bootstrap": str(c.bootstrap),
             f"{b.name}:threshold": f"{c.threshold:g}", f"{b.name}:reruns": str(c.reruns), f"{b.name}:order": c.order}
    for m in c.metrics:
        key = f"{b.name}:{m.workload}.{m.name}@{m.host}"
        props.update({f"{key}.verdict": m.verdict, f"{key}.ratio": _number(m.ratio), f"{key}.ci_low": _number(m.ci_low),
                      f"{key}.ci_high": _number(m.ci_high), f"{key}.p_value": _number(m.p_value),
                      f"{key}.baseline_median": _number(m.baseline_median),
                      f"{key}.patched_median": _number(m.patched_median)})
    return {_clean(k): _clean(v) for k, v in props.items()}


def render_suites(result: RunResult, run_dir: Path | None = None) -> list[TestSuite]:
    suites = []
    workload_suites = []
    for b in result.branches:
        cases = []
        if b.error:
            tc = TestCase(name="resolve branch", classname=classname("apply", b.name))
            tc.add_error_info(message=_clean(b.error), output=_clean(b.error))
            cases.append(tc)
        if b.apply:
            cases += [_patch_case(b, p) for p in b.apply.patches]
        cases += _build_cases(b)
        boot_rounds = any(r.round > 1 for r in b.boot)
        cases += [_boot_case(b.name, r, boot_rounds) for r in b.boot]
        suites.append(TestSuite(name=b.name, test_cases=cases, package="kpatchtest",
                                properties={"branch": b.name, "verdict": b.apply.verdict if b.apply else "error",
                                            "commit": b.commit or ""}))
        workload_suites += _workload_suites(b, run_dir)
    suites += workload_suites
    if result.gates:
        cases = []
        for g in result.gates:
            tc = TestCase(name=f"{g.name} {g.branch or ''}".strip(), classname="gates")
            if not g.passed:
                tc.add_failure_info(message=f"expected {g.expected}, got {g.actual}", output=f"gate {g.name}")
            cases.append(tc)
        suites.append(TestSuite(name="gates", test_cases=cases, package="kpatchtest"))
    compared = [b for b in result.branches if b.compare]
    if compared:
        props: dict[str, str] = {}
        cases = []
        for b in compared:
            cases += _comparison_cases(result, b, b.compare)
            props.update(_comparison_properties(b, b.compare))
        suites.append(TestSuite(name="compare", test_cases=cases, package="kpatchtest", properties=props))
    return suites


def render(result: RunResult, run_dir: Path | None = None) -> str:
    suites = render_suites(result, run_dir)
    root = ET.fromstring(to_xml_report_string(suites, prettyprint=False, encoding="utf-8").encode("utf-8"))
    for element in [root, *root.iter("testsuite")]:
        element.attrib.pop("disabled", None)        # not in junit-10.xsd
    return xml.dom.minidom.parseString(ET.tostring(root, encoding="utf-8")).toprettyxml(encoding="utf-8").decode()
