"""The compare stage's records (BranchResult.compare) as text, shared by every report.

Reports never re-compute statistics: they quote the medians, ratio, CI and p-value the
run recorded, so a re-render says exactly what the run said. Also here: the series'
mail identity (lore links, the reply headers b4 would write), which the summary and
the HTML report both need.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlparse

from kpatchtest.compare.model import BranchComparison, Counts, MetricComparison, TestComparison
from kpatchtest.report.workload_cells import fmt_value
from kpatchtest.results import BranchResult, GateResult, RunResult, SeriesInfo

SIGNIFICANT = ("faster", "slower", "less", "more")
ADVERSE = ("slower", "more")        # the way a metric gate (max_slowdown, max_increase) breaks
LORE = "https://lore.kernel.org/r/"


# -- numbers -----------------------------------------------------------------------------

def ratio_definition(result: RunResult) -> str:
    """What a recorded ratio is: paired from schema 8 on, of the pooled medians before."""
    if result.schema_version >= 8:
        return "ratio = median over rounds of each round's patched/baseline ratio of medians"
    return "ratio = patched/baseline of the medians"


def _num(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else fmt_value(v) + (f" {unit}" if unit else "")


def ratio_text(m: MetricComparison) -> str:
    """'ratio 1.107 [1.082, 1.131]' (the 95% CI in brackets); 'ratio n/a' when not computed."""
    if m.ratio is None:
        return "ratio n/a"
    ci = f" [{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None and m.ci_high is not None else ""
    return f"ratio {m.ratio:.3f}{ci}"


def p_text(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def metric_label(m: MetricComparison) -> str:
    return f"{m.workload} {m.name} on {m.host}"


def metric_numbers(m: MetricComparison) -> str:
    """'12.1 -> 13.4 s, ratio 1.107 [1.082, 1.131], p = 0.002, 10 rounds x 5 repetitions'."""
    if m.verdict == "n/a":
        return f"n/a ({m.why or 'not measured on both kernels'})"
    same_unit = f" {m.unit}" if m.unit else ""
    medians = f"{_num(m.baseline_median)} -> {_num(m.patched_median)}{same_unit}"
    return (f"{medians}, {ratio_text(m)}, {p_text(m.p_value)}, "
            f"{m.rounds} round{'s' if m.rounds != 1 else ''} x {m.repetitions} "
            f"repetition{'s' if m.repetitions != 1 else ''}")


def metric_line(m: MetricComparison) -> str:
    """'smm-boot wall_time on lab1: slower, 12.1 -> 13.4 s, ratio ..., 10 rounds x 5 repetitions'."""
    text = f"{metric_label(m)}: {m.verdict}"
    if m.verdict != "n/a":
        text += ", " + metric_numbers(m)
        if m.why:
            text += f" ({m.why})"
    else:
        text += f" ({m.why or 'not measured on both kernels'})"
    return text


# -- tests -------------------------------------------------------------------------------

def tc_label(t: TestComparison) -> str:
    name = f"{t.group}/{t.name}" if t.group and t.group != t.name else t.name
    return f"{name} on {t.host}"


def _counts(c: Counts) -> str:
    parts = [f"{c.passed} pass", f"{c.failed} fail"] + ([f"{c.skipped} skip"] if c.skipped else [])
    return ", ".join(parts)


def tc_numbers(t: TestComparison) -> str:
    """'baseline 3 pass, 0 fail; patched 0 pass, 3 fail; reruns: baseline 2 pass, 0 fail; patched ...'."""
    text = f"baseline {_counts(t.baseline)}; patched {_counts(t.patched)}"
    if t.rerun_baseline.total or t.rerun_patched.total or t.reruns_wanted:
        text += (f"; reruns ({t.reruns_wanted} wanted): baseline {_counts(t.rerun_baseline)}; "
                 f"patched {_counts(t.rerun_patched)}")
    return text


def tc_line(t: TestComparison) -> str:
    return f"{t.verdict.upper() if t.verdict == 'regression' else t.verdict} {tc_label(t)}: " + \
        tc_numbers(t) + (f" ({t.detail})" if t.detail else "")


# -- gates -------------------------------------------------------------------------------

def _gated_metric(g: GateResult) -> str | None:
    """The metric a gate judges: gates.py writes name "metrics", expected "wall_time max_slowdown 5%"
    (docs/results-schema.md says "metric:<name>"; both are read)."""
    if g.name.startswith("metric:"):
        return g.name.split(":", 1)[1]
    if g.name == "metrics" and g.expected:
        return g.expected.split(" ", 1)[0]
    return None


def metric_gates(result: RunResult, b: BranchResult) -> dict[str, GateResult]:
    """metric name -> its failed metric gate on this branch."""
    return {name: g for g in result.gates_failed() if g.branch == b.name and (name := _gated_metric(g))}


def gate_broken_by(c: BranchComparison, gate_metric: str, gate: GateResult | None = None) -> list[MetricComparison]:
    """The comparisons a failed metric gate points at. With the limit the gate recorded
    ("... 5%"): those whose whole CI lies beyond it, or that could not be checked (n/a,
    not enough data), as gates.py judges; else those that moved the adverse way; if none
    of these, every comparison of that metric."""
    named = [m for m in c.metrics if m.name == gate_metric]
    limit = re.search(r"(\d+(?:\.\d+)?)%", gate.expected) if gate else None
    if limit:
        bound = 1 + float(limit.group(1)) / 100
        broken = [m for m in named if m.verdict in ("n/a", "not enough data")
                  or (m.ci_low is not None and m.ci_low > bound)]
        if broken:
            return broken
    return [m for m in named if m.verdict in ADVERSE] or named


# -- the series on the list --------------------------------------------------------------

def lore_url(msgid: str) -> str:
    return LORE + quote(msgid.strip("<>"), safe="@!$&'()*+,;=:~-._")


_LINK_HOSTS = ("lore.kernel.org", "patch.msgid.link", "msgid.link")


def msgid_from_link(link: str | None) -> str | None:
    """The msgid a lore-style link names: https://patch.msgid.link/<id>,
    https://lore.kernel.org/r/<id>, https://lore.kernel.org/<list>/<id>/."""
    if not link:
        return None
    try:
        u = urlparse(link)
    except ValueError:
        return None
    if u.hostname not in _LINK_HOSTS:
        return None
    parts = [unquote(p) for p in u.path.split("/") if p]
    cand = next((p for p in reversed(parts) if "@" in p), None)
    return cand if cand and re.fullmatch(r"[^\s<>]+", cand) else None


def cover_msgid(s: SeriesInfo) -> str | None:
    """The cover letter's msgid. results.json has no field for it: series.link is b4's
    Link, which names the message b4 fetched (the cover when there is one)."""
    return msgid_from_link(s.link)


def reply_headers(s: SeriesInfo | None) -> list[str]:
    """In-Reply-To/References/Subject of a reply to the series' cover letter, as b4 writes
    them; without a known cover msgid, to patch 1 (the thread's root when there is no
    cover). [] when no message of the series has a msgid (e.g. commits: sources)."""
    if s is None:
        return []
    total = len(s.patches)
    version = f"v{s.version} " if s.version and s.version > 1 else ""
    msgid = cover_msgid(s)
    if msgid and total != 1:
        subject = f"[PATCH {version}0/{total}] {s.title}"
    else:
        first = s.patches[0] if s.patches else None
        if first is None or not (first.msgid or msgid):
            return []
        msgid = msgid if total == 1 and msgid else first.msgid
        subject = f"[PATCH {version}1/{total}] {first.subject}" if total > 1 else \
            f"[PATCH{' ' + version.strip() if version else ''}] {first.subject}"
    msgid = msgid.strip("<>")
    return [f"In-Reply-To: <{msgid}>", f"References: <{msgid}>", f"Subject: Re: {subject}"]


# -- "What changed" ----------------------------------------------------------------------

def _rounds_text(c: BranchComparison) -> str:
    judged = [m for m in c.metrics if m.rounds]
    if not judged:
        return ""
    rounds = sorted({m.rounds for m in judged})
    reps = sorted({m.repetitions for m in judged})
    span = lambda xs: str(xs[0]) if len(xs) == 1 else f"{xs[0]}-{xs[-1]}"
    return f"{span(rounds)} rounds x {span(reps)} repetitions"


def branch_changes(result: RunResult, b: BranchResult) -> list[str]:
    """A branch's lines of "What changed": the first says what a maintainer must know
    (regressions, new splats, significant metric changes, or plainly that nothing
    changed); then what keeps it from being the whole story (flaky tests, metrics with
    too little data or not measured)."""
    c = b.compare
    if c is None:
        return [f"{b.name}: not compared" + (f" ({b.error})" if b.error else " (no comparison recorded)")]
    changes = [tc_line(t) for t in c.regressions()]
    changes += [f"NEW SPLAT on patched ({s.host} round {s.round}" + (f" rerun {s.rerun}" if s.rerun else "")
                + f", {s.where}): {s.kind}" + (f": {s.first_lines[0].strip()}" if s.first_lines else "")
                for s in c.splats_new]
    changes += [metric_line(m) for m in c.metrics if m.verdict in SIGNIFICANT]
    changes += [f"gate {g.name} FAILED: expected {g.expected}, got {g.actual}"
                for g in metric_gates(result, b).values()]
    judged = [m for m in c.metrics if m.verdict == "no significant change"]
    thr = f"+-{c.threshold * 100:g}%"
    rest = f"{len(c.tests)} test(s) compared, {len(judged)} metric(s) within {thr}"
    where = _rounds_text(c)
    rest += f"; {where}" if where else ""
    out = [f"{b.name}:"] + [f"  {line}" for line in changes]
    if changes:
        out.append(f"  otherwise no significant change ({rest})")
    elif c.tests or judged:
        out = [f"{b.name}: no significant change ({rest})"]
    else:
        out = [f"{b.name}: nothing compared (no test or metric ran on both kernels)"]
    flaky = [t for t in c.tests if t.verdict == "flaky"]
    out += [f"  flaky, not counted as a regression: {tc_label(t)}: {tc_numbers(t)}" for t in flaky]
    fixed = [tc_label(t) for t in c.tests if t.verdict == "fixed"]
    out += [f"  fixed: {', '.join(fixed)}"] if fixed else []
    few = [m for m in c.metrics if m.verdict == "not enough data"]
    out += [f"  not enough data: {metric_label(m)} ({m.rounds} paired round(s); {m.why or 'needs 3'})" for m in few]
    out += [f"  n/a: {metric_label(m)} ({m.why or 'not measured on both kernels'})"
            for m in c.metrics if m.verdict == "n/a" and m.direction != "none"]
    return out


def what_changed(result: RunResult) -> list[str]:
    """The "What changed" section (plain lines); [] when no branch was compared."""
    if not any(b.compare for b in result.branches):
        return []
    out = ["What changed (patched against baseline; 95% bootstrap CI in brackets, p from a",
           "paired Wilcoxon signed-rank test over rounds;", f"{ratio_definition(result)}):", ""]
    for b in result.branches:
        out += branch_changes(result, b)
    method = next((b.compare.method for b in result.branches if b.compare and b.compare.method), "")
    if method:
        c = next(b.compare for b in result.branches if b.compare)
        out += ["", (f"Method: {method}; seed {c.seed}, {c.bootstrap} resamples, threshold +-{c.threshold * 100:g}%, "
                     f"{c.order} B/P order, {c.reruns} rerun(s) before a regression is called.")]
    return out
