"""Workload results reduced for the reports, shared by summary.md, report.html and junit.xml.

One WorkloadLine per workload per branch: the records of every round and host of a build
pooled into one Side (status counts, failing tests, metric values), baseline and patched
next to each other. A workload is a record group ("kvm-unit-tests": one record per test)
or, for records without a group, the record's name (the SMM-heavy boot).

Metrics: the median over every repetition of every round and host; a value that is None
was not measured and is left out, never counted as 0. No value at all reads "n/a" with
the reason the record or the run's probe table gives.

When the branch has a comparison (BranchResult.compare, schema 6), metric lines and the
regression/flaky tags come from it, not from pooling here: the compare stage's medians,
ratio, CI and verdict per host. Results without one (older results.json) keep the pooled
view. The compare stage's rerun boots are in its counts, not in the pooled sides.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kpatchtest.compare.model import BranchComparison
from kpatchtest.results import BranchResult, RunResult, WorkloadRun
from kpatchtest.workloads.record import WorkloadRecord

BUILDS = ("baseline", "patched")
STATUSES = ("pass", "fail", "error", "timeout", "skip")   # the order counts are listed in
BAD = ("fail", "error", "timeout")
MAX_NAMES = 8               # failing test names listed per status in the summary
LOG_TAIL_BYTES = 4096       # junit.xml: the end of a record's first log


def median(values: list[float | None]) -> float | None:
    """Median of the measured values; None when nothing was measured (never 0)."""
    got = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(got) if got else None


def fmt_value(v: float) -> str:
    """806, 806.5, 12.35, 1235 (no exponent for counts, 4 significant digits below 1000)."""
    if v == int(v) or abs(v) >= 1000:
        return str(int(round(v)))
    return f"{v:.4g}"


def counts_text(counts: Counter, loud: bool = False) -> str:
    """'12 pass, 1 fail, 2 skip' in STATUSES order; loud: the bad ones in capitals."""
    parts = [f"{counts[s]} {s.upper() if loud and s in BAD else s}" for s in STATUSES if counts[s]]
    return ", ".join(parts) or "no records"


def oneline(text: str, width: int = 160) -> str:
    """A detail as one line: first non-empty line, cut to width."""
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= width else line[:width - 3] + "..."


def max_round(b: BranchResult) -> int:
    return max([r.round for r in b.workloads] + [r.round for r in b.boot] + [1])


def run_label(run: WorkloadRun, rounds: bool) -> str:
    """'patched on lab1' or, when the branch booted builds more than once, 'patched on lab1 round 2'
    ('... round 2 rerun 1' for the compare stage's reruns of that round)."""
    return f"{run.build} on {run.host}" + (f" round {run.round}" if rounds or run.rerun else "") + (
        f" rerun {run.rerun}" if run.rerun else "")


def record_label(rec: WorkloadRecord) -> str:
    """'kvm-unit-tests/smptest'; a record that is its own workload: its name."""
    return f"{rec.group}/{rec.name}" if rec.group and rec.group != rec.name else rec.name


@dataclass
class MetricAgg:
    """One metric of one record name on one build, over every run."""

    name: str
    unit: str
    values: list[float | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)      # why values are missing
    probes: list[str] = field(default_factory=list)     # the probes that measured it

    @property
    def median(self) -> float | None:
        return median(self.values)

    @property
    def measured(self) -> int:
        return sum(1 for v in self.values if v is not None and math.isfinite(v))

    def text(self, unit: bool = True) -> str:
        """'806 events', '806 events (2 of 3 values)', 'n/a (unavailable: <why>)'."""
        m = self.median
        if m is None:
            return "n/a (unavailable: " + ("; ".join(self.notes) or "no value measured") + ")"
        out = fmt_value(m) + (f" {self.unit}" if unit and self.unit else "")
        if self.measured < len(self.values):
            out += f" ({self.measured} of {len(self.values)} values)"
        return out


@dataclass
class BadEntry:
    """A record name that failed, errored or timed out on a build, in one or more runs."""

    name: str
    status: str
    runs: int           # runs it had this status in
    of: int             # runs it appeared in on this build
    detail: str
    new: bool = False   # it never went wrong on baseline (patched only)
    verdict: str = ""   # the compare stage's (regression, flaky, ...), when the branch has one

    def tag(self) -> str:
        first = [self.verdict] if self.verdict in ("regression", "flaky") else ["new"] if self.new else []
        bits = first + ([f"{self.runs} of {self.of} runs"] if self.runs < self.of else [])
        return f" ({', '.join(bits)})" if bits else ""


@dataclass
class Side:
    """One workload on one build, pooled over rounds and hosts."""

    counts: Counter = field(default_factory=Counter)
    statuses: dict[str, list[str]] = field(default_factory=dict)       # record name -> status per run
    details: dict[tuple[str, str], str] = field(default_factory=dict)   # (name, status) -> first detail
    metrics: dict[tuple[str, str], MetricAgg] = field(default_factory=dict)  # (record, metric)

    def add(self, run: WorkloadRun, rec: WorkloadRecord) -> None:
        self.counts[rec.status] += 1
        self.statuses.setdefault(rec.name, []).append(rec.status)
        if rec.detail:
            self.details.setdefault((rec.name, rec.status), oneline(rec.detail))
        for m in rec.metrics:
            agg = self.metrics.setdefault((rec.name, m.name), MetricAgg(m.name, m.unit))
            agg.values += m.values or [None]
            why = m.note or run.probes.get(m.name, "")
            if why and (not m.available or any(v is None for v in m.values)) and why not in agg.notes:
                agg.notes.append(why)
            probe = run.probes.get(m.name)
            if probe and m.available and probe not in agg.probes:
                agg.probes.append(probe)

    def bad(self, baseline: "Side | None" = None, verdicts: dict[str, str] | None = None) -> list[BadEntry]:
        """verdicts: record name -> the compare stage's verdict; it replaces the pooled 'new'."""
        out = []
        for status in BAD:
            for name, seen in self.statuses.items():
                if status in seen:
                    base = baseline.statuses.get(name) if baseline else None
                    new = base is not None and not any(s in BAD for s in base)
                    if verdicts is not None:
                        new = False
                    out.append(BadEntry(name, status, seen.count(status), len(seen),
                                        self.details.get((name, status), ""), new,
                                        (verdicts or {}).get(name, "")))
        return out


@dataclass
class WorkloadLine:
    key: str                                    # the group, or the record name
    names: list[str] = field(default_factory=list)      # record names, first seen first
    sides: dict[str, Side] = field(default_factory=dict)
    metric_keys: list[tuple[str, str]] = field(default_factory=list)

    @property
    def single(self) -> bool:
        """The workload is one record (the SMM boot): its failures are told by detail, not name."""
        return self.names == [self.key]

    def metric_label(self, key: tuple[str, str]) -> str:
        return key[1] if self.single else f"{key[0]} {key[1]}"

    def bad(self, build: str, verdicts: dict[str, str] | None = None) -> list[BadEntry]:
        side = self.sides.get(build)
        if not side:
            return []
        return side.bad(self.sides.get("baseline") if build == "patched" else None,
                        verdicts if build == "patched" else None)


@dataclass
class BranchWorkloads:
    builds: list[str]                   # builds that ran workloads, in BUILDS order
    lines: list[WorkloadLine]
    errors: list[str]                   # 'patched on lab1: not run: <why the workloads did not run>'
    rounds: int
    hosts: list[str]
    repetitions: list[int]
    compare: BranchComparison | None = None
    reruns: int = 0                     # rerun boots (compare), not pooled

    def header(self) -> str:
        which = " -> ".join(self.builds) if len(self.builds) > 1 else f"{self.builds[0]} only"
        reps = "-".join(str(r) for r in sorted({min(self.repetitions), max(self.repetitions)}))
        where = f"{self.rounds} round{'s' if self.rounds > 1 else ''} on {', '.join(self.hosts)}"
        reps += " repetitions" if max(self.repetitions) > 1 else " repetition"
        how = "metrics: the compare stage's medians and ratios" if self.compare else "metrics are medians"
        more = f", {self.reruns} rerun boot(s)" if self.reruns else ""
        return f"workloads, {which} ({where}, {reps} each{more}; {how})"

    def verdicts(self) -> dict[str, str] | None:
        """Record name -> its compare verdict (a regression on any host wins, then flaky)."""
        if self.compare is None:
            return None
        rank = {"regression": 0, "flaky": 1}
        out: dict[str, str] = {}
        for t in self.compare.tests:
            old = out.get(t.name)
            if old is None or rank.get(t.verdict, 9) < rank.get(old, 9):
                out[t.name] = t.verdict
        return out


def branch_workloads(b: BranchResult) -> BranchWorkloads | None:
    if not b.workloads:
        return None
    rounds = max_round(b) > 1
    lines: dict[str, WorkloadLine] = {}
    errors = []
    for run in sorted(b.workloads, key=lambda r: BUILDS.index(r.build)):   # stable: rounds stay in order
        if run.rerun:
            continue
        if run.error:
            why = oneline(run.error)
            errors.append(f"{run_label(run, rounds)}: " + ("" if "not run" in why else "not run: ") + why)
        for rec in run.records:
            key = rec.group or rec.name
            line = lines.setdefault(key, WorkloadLine(key))
            if rec.name not in line.names:
                line.names.append(rec.name)
            line.sides.setdefault(run.build, Side()).add(run, rec)
            for m in rec.metrics:
                if (rec.name, m.name) not in line.metric_keys:
                    line.metric_keys.append((rec.name, m.name))
    return BranchWorkloads(builds=[x for x in BUILDS if any(r.build == x for r in b.workloads)],
                           lines=list(lines.values()), errors=errors, rounds=max_round(b),
                           hosts=sorted({r.host for r in b.workloads}),
                           repetitions=[r.repetitions for r in b.workloads], compare=b.compare,
                           reruns=sum(1 for r in b.workloads if r.rerun))


def side_by_side(texts: list[str]) -> str:
    return " -> ".join(texts)


def metric_text(bw: BranchWorkloads, line: WorkloadLine, key: tuple[str, str]) -> str:
    """'806 -> 806 events', 'n/a (unavailable: x) -> 3 roots', 'n/a -> n/a (unavailable: x)';
    with a comparison: '811 -> 3 roots, ratio 0.004 [0.003, 0.004]: less' per host."""
    if bw.compare is not None:
        compared = [m for m in bw.compare.metrics if (m.workload, m.name) == key]
        if compared:
            return "; ".join(_compared_text(m, len(bw.hosts) > 1) for m in compared)
    aggs = [line.sides[x].metrics.get(key) if x in line.sides else None for x in bw.builds]
    present = [a for a in aggs if a is not None]
    if len(bw.builds) == 1:
        return present[0].text()
    if all(a is not None and a.median is not None and a.measured == len(a.values) for a in aggs) \
            and len({a.unit for a in present}) == 1:
        return side_by_side([fmt_value(a.median) for a in aggs]) + (f" {present[0].unit}" if present[0].unit else "")
    if all(a is not None and a.median is None for a in aggs) and len({a.text() for a in aggs}) == 1:
        return side_by_side(["n/a"] * len(aggs)) + aggs[0].text()[3:]
    return side_by_side([a.text() if a else "-" for a in aggs])


def _compared_text(m, with_host: bool) -> str:
    from kpatchtest.report.compare_cells import ratio_text     # compare_cells builds on this module
    where = f"{m.host}: " if with_host else ""
    if m.verdict == "n/a" or m.baseline_median is None or m.patched_median is None:
        return f"{where}n/a ({m.why or 'not measured on both kernels'})"
    unit = f" {m.unit}" if m.unit else ""
    return f"{where}{fmt_value(m.baseline_median)} -> {fmt_value(m.patched_median)}{unit}, {ratio_text(m)}: {m.verdict}"


def status_text(bw: BranchWorkloads, line: WorkloadLine, loud: bool = False) -> str:
    return side_by_side([counts_text(line.sides[x].counts, loud) if x in line.sides else "-" for x in bw.builds])


def bad_text(line: WorkloadLine, build: str, verdicts: dict[str, str] | None = None) -> str:
    """'fail: emulator, smptest (new); timeout: vmx (1 of 2 runs)'; the SMM boot: its detail."""
    by_status: dict[str, list[BadEntry]] = {}
    for e in line.bad(build, verdicts):
        by_status.setdefault(e.status, []).append(e)
    parts = []
    for status, entries in by_status.items():
        if line.single:
            e = entries[0]
            parts.append(f"{status}{e.tag()}: {e.detail or 'no detail'}")
        else:
            names = [f"{e.name}{e.tag()}" for e in entries[:MAX_NAMES]]
            more = f", +{len(entries) - MAX_NAMES} more" if len(entries) > MAX_NAMES else ""
            parts.append(f"{status}: {', '.join(names)}{more}")
    return "; ".join(parts)


def workload_notes(b: BranchResult) -> list[str]:
    """The plain lines of summary.md for a branch's workloads."""
    bw = branch_workloads(b)
    if bw is None:
        return []
    out = [bw.header() + ":"]
    out += [f"  {e}" for e in bw.errors]
    for line in bw.lines:
        out.append(f"  {line.key}: {status_text(bw, line)}")
        for build in bw.builds:
            text = bad_text(line, build, bw.verdicts())
            if text:
                out.append(f"    {build} {text}")
        out += [f"    {line.metric_label(k)}: {metric_text(bw, line, k)}" for k in line.metric_keys]
    return out


def workload_cell(runs: list[WorkloadRun]) -> str:
    """The matrix cell of one build: every record of every run counted."""
    if not runs:
        return "-"
    counts = Counter(rec.status for r in runs for rec in r.records)
    errors = sum(1 for r in runs if r.error)
    text = counts_text(counts, loud=True) if counts else ""
    if errors:
        text += (", " if text else "") + f"{errors} run{'s' if errors > 1 else ''} NOT RUN"
    return text or "no records"


def workload_rows(result: RunResult) -> list[tuple[str, list[str]]]:
    if not any(b.workloads for b in result.branches):
        return []
    return [(f"workloads {label}", [workload_cell([r for r in b.workloads if r.build == label])
                                    for b in result.branches])
            for label in BUILDS]


# -- logs (junit.xml) --------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def log_tail(run_dir: Path | None, rel: str, cap: int = LOG_TAIL_BYTES) -> str | None:
    """The last `cap` bytes of a log named relative to the run directory, colour codes
    removed; None when there is no run directory, the path leaves it, or it is unreadable."""
    p = PurePosixPath(rel)
    if run_dir is None or p.is_absolute() or ".." in p.parts or not rel:
        return None
    try:
        with open(Path(run_dir) / p, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - cap))
            data = f.read(cap)
    except OSError:
        return None
    text = _ANSI.sub("", data.decode("utf-8", errors="replace"))
    if size > cap:
        text = f"[... last {cap} of {size} bytes]\n" + text.split("\n", 1)[-1]
    return text
