"""A finished LAVA job -> the BootRecord the local and SSH labs give for a BootJob.

What comes from where:
- the boot: the lab image's marker line on the console (`kpatchtest-lab: sshd up,
  boot_id ID, kernel RELEASE`), the same line the local lab waits for; no marker and a
  failed job: boot-failed with LAVA's own error (type and message of the `lava` suite's
  `job` case), e.g. "LAVA Infrastructure error: ...". A LAVA failure is never a workload
  verdict;
- the workloads: the device's framed output, replayed through the SSH lab's own code
  (workloads/script.py), so the records have its metrics, units and statuses; the
  job's own test cases (lava-test-case, suite 0_kpatchtest) are checked against them;
- splats: the console, as the SSH lab scans its console capture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kpatchtest.lab.local.image import MARKER
from kpatchtest.lab.splats import scan
from kpatchtest.results import BootResult, SplatInfo
from kpatchtest.workloads.record import WorkloadRecord

CONSOLE_TAIL_LINES = 40
_MARKER = re.compile(re.escape(MARKER) + r", boot_id (\S+), kernel (\S+)")
TEST_SUITE_SUFFIX = "_kpatchtest"   # LAVA names an inline definition's suite N_name


@dataclass
class LavaCase:
    suite: str
    name: str
    result: str                     # pass | fail | skip | unknown
    measurement: float | None = None
    unit: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_results(text: str) -> list[LavaCase]:
    """results.get_testjob_results_yaml -> the test cases."""
    cases = []
    for r in yaml.safe_load(text) or []:
        m = r.get("measurement")
        try:
            value = float(m) if m not in (None, "", "None") else None
        except (TypeError, ValueError):
            value = None
        cases.append(LavaCase(str(r.get("suite", "")), str(r.get("name", "")), str(r.get("result", "")),
                              value, str(r.get("unit") or ""), r.get("metadata") or {}))
    return cases


def job_error(cases: list[LavaCase]) -> str | None:
    """LAVA's reason for a failed job (the `lava` suite's `job` case), or None if it passed."""
    for c in cases:
        if c.suite == "lava" and c.name == "job" and c.result != "pass":
            kind = c.metadata.get("error_type") or "unknown"
            msg = str(c.metadata.get("error_msg") or "no message").strip().splitlines()[0][:300]
            return f"LAVA {kind} error: {msg}"
    return None


def test_cases(cases: list[LavaCase]) -> dict[str, LavaCase]:
    """The job's own lava-test-case results, by name."""
    return {c.name: c for c in cases if c.suite.endswith(TEST_SUITE_SUFFIX)}


def target_lines(log: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(timestamp, line) of what the device printed, from LAVA's log entries."""
    out = []
    for e in log:
        if e.get("lvl") == "target":
            for line in str(e.get("msg", "")).splitlines() or [""]:
                out.append((str(e.get("dt", "")), line))
    return out


def _seconds(a: str, b: str) -> float:
    try:
        return round((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds(), 2)
    except ValueError:
        return 0.0


@dataclass
class LavaBoot:
    """What the job says about the boot; `console` is every line the device printed."""

    result: BootResult
    console: list[str]
    error: str | None               # the job's error, if it failed (before or after the boot)


def boot_result(*, build: str, host: str, expected_release: str, log: list[dict[str, Any]], cases: list[LavaCase],
                health: str, console_rel: str) -> LavaBoot:
    """The BootResult of a LAVA job (see the module docstring)."""
    lines = target_lines(log)
    console = [x for _, x in lines]
    res = BootResult(build=build, status="boot-failed", host=host, method="lava", expected_release=expected_release,
                     console_log=console_rel)
    error = job_error(cases)
    if error is None and health not in ("Complete", ""):
        error = f"LAVA job {health.lower()}"
    marker = next(((dt, m) for dt, x in lines if (m := _MARKER.search(x))), None)
    res.splats = [SplatInfo(kind=s.kind, first_lines=s.first_lines, source="console") for s in scan("\n".join(console))]
    if marker is None:
        res.reason = error or "the lab image never said it was up on the console"
        res.console_excerpt = "\n".join(console[-CONSOLE_TAIL_LINES:]) or None
        return LavaBoot(res, console, error)
    dt, m = marker
    res.boot_id, res.kernelrelease = m[1], m[2]
    res.duration_s = _seconds(lines[0][0], dt)      # QEMU's first console line to the marker
    if res.kernelrelease == expected_release:
        res.status = "booted"
    else:
        res.reason = f"the device came up on {res.kernelrelease}, not {expected_release}"
    return LavaBoot(res, console, error)


def check_against_lava(record: WorkloadRecord, cases: dict[str, LavaCase], repetitions_run: int) -> None:
    """The replayed statuses and LAVA's own test cases must agree; say so in the record if not."""
    disagree = []
    for i in range(1, repetitions_run + 1):
        c = cases.get(f"smm-boot.{i}")
        if c is None:
            continue
        if (c.result == "pass") != (record.status == "pass" or _rep_passed(record, i)):
            disagree.append(f"smm-boot.{i} is {c.result} in LAVA")
    if disagree:
        record.detail = "; ".join(filter(None, [record.detail, "LAVA results disagree: " + ", ".join(disagree)]))


def _rep_passed(record: WorkloadRecord, i: int) -> bool:
    return f"repetition {i}:" not in record.detail


def write_log(path: Path, log: list[dict[str, Any]]) -> None:
    """LAVA's log entries as text lines (`DT LEVEL MESSAGE`), appended as they stream in."""
    with open(path, "a") as f:
        for e in log:
            msg = e.get("msg", "")
            text = msg if isinstance(msg, str) else yaml.safe_dump(msg, default_flow_style=True, width=10_000).strip()
            f.write(f"{e.get('dt', '')} {e.get('lvl', '')} {text}\n")
