"""report.html: the same matrix as summary.md, with plots (feasibility heatmap, metric
distributions, a forest plot of ratios), rejected hunks, workload tables and links to the
series on lore and to every log.

One file plus report.css beside it (write_all writes both): it must read under Jenkins'
Content-Security-Policy (`sandbox; default-src 'none'; img-src 'self'; style-src 'self'`),
so no <style>, no style= and no script; plots are inline SVG with presentation
attributes (plots.py), colours of tables come from classes in report.css.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from kpatchtest.report.cells import (
    boot_notes,
    boot_rows,
    branch_verdict,
    build_notes,
    build_rows,
    cell,
    patch_cell,
    patch_prerequisites,
    patch_rows,
    prerequisite_notes,
)
from kpatchtest.report import plots
from kpatchtest.report.compare_cells import (
    SIGNIFICANT,
    cover_msgid,
    lore_url,
    metric_gates,
    p_text,
    ratio_definition,
    ratio_text,
    what_changed,
)
from kpatchtest.report.workload_cells import (
    BranchWorkloads,
    branch_workloads,
    counts_text,
    fmt_value,
    record_label,
    workload_rows,
)
from kpatchtest.results import BranchResult, RunResult

CSS_NAME = "report.css"
CSS = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
.applied,.clean,.already-applied,.already-present,.v-faster,.v-less{background:#dfd}
.applied-3way,.three-way{background:#ffd}
.conflict,.skipped,.partial,.ERROR,.v-slower,.v-more,.gate-failed{background:#fdd}
pre{background:#f6f6f6;padding:6px;overflow:auto}ul.bad{margin:4px 0;padding-left:1.2em}
figure{margin:1em 0}.plots{display:flex;flex-wrap:wrap;gap:0 1.5em}.plots figure{max-width:24em}figure svg{max-width:100%;height:auto}figcaption{font-size:90%;color:#444}
td.num{text-align:right;font-variant-numeric:tabular-nums}
"""
_BAD_WORDS = ("FAIL", "NEW", "SPLAT", "ERROR", "TIMEOUT", "NOT RUN")


def _workloads(b: BranchResult, bw: BranchWorkloads) -> list[str]:
    """A branch's workloads: a row per workload (status counts, what went wrong), a row per metric."""
    h = [f"<h2>{escape(b.name)}: workloads</h2><p>{escape(bw.header())}</p>"]
    h += [f"<p class=ERROR>{escape(e)}</p>" for e in bw.errors]
    if not bw.lines:
        return h
    h.append("<table><tr><th>workload</th><th></th>" + "".join(f"<th>{escape(x)}</th>" for x in bw.builds) + "</tr>")
    for line in bw.lines:
        row = f"<tr><th>{escape(line.key)}</th><td>result</td>"
        for x in bw.builds:
            side = line.sides.get(x)
            if side is None:
                row += "<td>-</td>"
                continue
            bad = line.bad(x, bw.verdicts())
            items = "".join(f"<li>{escape(e.name)}: {escape(e.status)}{escape(e.tag())}"
                            + (f" - {escape(e.detail)}" if e.detail else "") + "</li>" for e in bad)
            row += (f'<td class="{"conflict" if bad else "applied"}">{escape(counts_text(side.counts))}'
                    + (f'<ul class="bad">{items}</ul>' if items else "") + "</td>")
        h.append(row + "</tr>")
        for key in line.metric_keys:
            row = f"<tr><td></td><td>{escape(line.metric_label(key))}</td>"
            for x in bw.builds:
                agg = line.sides[x].metrics.get(key) if x in line.sides else None
                if agg is None:
                    row += "<td>-</td>"
                    continue
                title = f"{agg.measured} of {len(agg.values)} values" + (
                    f"; probe: {', '.join(agg.probes)}" if agg.probes else "")
                row += (f'<td class="{"applied" if agg.median is not None else "skipped"}" title="{escape(title)}">'
                        f"{escape(agg.text())}</td>")
            h.append(row + "</tr>")
    h.append("</table>")
    return h


def _href(path: str) -> str:
    return escape(quote(path, safe="/-._~"))


def _lore(result: RunResult) -> list[str]:
    """The series on lore: the cover letter (when its msgid is known) and every patch."""
    s = result.series
    if s is None:
        return []
    links = []
    cover = cover_msgid(s)
    if cover:
        links.append(f'<a href="{escape(lore_url(cover))}">cover letter</a>')
    elif s.link:
        links.append(f'<a href="{escape(s.link)}">{escape(s.link)}</a>')
    links += [f'<a href="{escape(lore_url(p.msgid))}">patch {p.index}</a>' for p in s.patches if p.msgid]
    return [f"<p>On lore: {', '.join(links)}</p>"] if links else []


def _heatmap(result: RunResult) -> list[str]:
    patches = patch_rows(result)
    branches = [b for b in result.branches if b.apply]
    if not patches or not branches:
        return []
    status = [[(c.status if (c := cell(b, i)) else None) for b in branches] for i, _ in patches]
    labels = [[(patch_cell(c) if (c := cell(b, i)) else "-") for b in branches] for i, _ in patches]
    svg = plots.heatmap(patches, [b.name for b in branches], status, labels)
    return [(f"<figure>{svg}<figcaption>Backport feasibility: patch x branch, coloured by how the patch "
             "applied.</figcaption></figure>")]


def _metric_values(b: BranchResult, workload: str, metric: str) -> dict[str, dict[str, list[float]]]:
    """host -> build -> every measured repetition of every round (reruns left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    for run in b.workloads:
        if run.rerun:
            continue
        for rec in run.records:
            if rec.name != workload:
                continue
            for m in rec.metrics:
                if m.name == metric:
                    out.setdefault(run.host, {}).setdefault(run.build, []).extend(
                        v for v in m.values if v is not None)
    return out


def _metric_keys(result: RunResult) -> list[tuple[str, str, str]]:
    """(workload, metric, unit) in first-seen order: the compared ones first, then any other measured."""
    keys: list[tuple[str, str, str]] = []
    for b in result.branches:
        for m in b.compare.metrics if b.compare else []:
            if (m.workload, m.name, m.unit) not in keys:
                keys.append((m.workload, m.name, m.unit))
    for b in result.branches:
        for run in b.workloads:
            for rec in run.records:
                for m in rec.metrics:
                    if m.available and (rec.name, m.name, m.unit) not in keys:
                        keys.append((rec.name, m.name, m.unit))
    return keys


def _distributions(result: RunResult) -> list[str]:
    h = []
    for n, (workload, metric, unit) in enumerate(_metric_keys(result)):
        groups = []
        for b in result.branches:
            by_host = _metric_values(b, workload, metric)
            for host, sides in by_host.items():
                if any(sides.values()):
                    groups.append((b.name if len(by_host) == 1 else f"{b.name} {host}", sides))
        if groups:
            svg = plots.strip(f"{workload}: {metric}", unit, groups, f"strip{n}")
            h.append(f"<figure>{svg}<figcaption>{escape(workload)} {escape(metric)} ({escape(unit)}): every "
                     "repetition of every round a point (blue: baseline, orange: patched), bar: the median.</figcaption></figure>")
    return ["<h2>Metric distributions</h2>", '<div class="plots">', *h, "</div>"] if h else []


def _value(v: float | None, unit: str) -> str:
    return "n/a" if v is None else escape(fmt_value(v) + (f" {unit}" if unit else ""))


def _comparisons(result: RunResult) -> list[str]:
    """The forest plot of every ratio with its CI, then a table per branch."""
    compared = [b for b in result.branches if b.compare]
    if not compared:
        return []
    h = ["<h2>What changed</h2>", f"<pre>{escape(chr(10).join(what_changed(result)))}</pre>"]
    rows = [(f"{b.name}: {m.workload} {m.name} @{m.host}", m) for b in compared for m in b.compare.metrics
            if m.ratio is not None]
    if rows:
        threshold = compared[0].compare.threshold
        h.append(f"<figure>{plots.forest(rows, threshold)}<figcaption>{escape(ratio_definition(result).capitalize())}, "
                 f"with its 95% bootstrap CI; shaded: within +-{threshold * 100:g}%, no verdict there.</figcaption></figure>")
    for b in compared:
        gates = metric_gates(result, b)
        h.append(f"<h3>{escape(b.name)}: metrics</h3><table><tr><th>workload</th><th>metric</th><th>host</th>"
                 "<th>baseline</th><th>patched</th><th>ratio [95% CI]</th><th>p</th><th>rounds x reps</th>"
                 "<th>verdict</th></tr>")
        for m in b.compare.metrics:
            gate = gates.get(m.name)
            verdict = escape(m.verdict) + (f"; gate FAILED: {escape(gate.actual)}" if gate else "") + (
                f" ({escape(m.why)})" if m.why else "")
            cls = "gate-failed" if gate else f"v-{m.verdict}" if m.verdict in SIGNIFICANT else ""
            h.append(f"<tr><td>{escape(m.workload)}</td><td>{escape(m.name)}</td><td>{escape(m.host)}</td>"
                     f'<td class="num">{_value(m.baseline_median, m.unit)}</td><td class="num">{_value(m.patched_median, m.unit)}</td>'
                     f'<td class="num">{escape(ratio_text(m).removeprefix("ratio "))}</td>'
                     f'<td class="num">{escape(p_text(m.p_value).removeprefix("p "))}</td>'
                     f'<td class="num">{m.rounds} x {m.repetitions}</td><td class="{cls}">{verdict}</td></tr>')
        h.append("</table>")
        bad = [t for t in b.compare.tests if t.verdict not in ("unchanged-pass",)]
        if bad:
            h.append("<table><tr><th>test</th><th>host</th><th>verdict</th><th>baseline pass/fail</th>"
                     "<th>patched pass/fail</th><th>reruns B / P</th><th>detail</th></tr>")
            for t in bad:
                name = f"{t.group}/{t.name}" if t.group and t.group != t.name else t.name
                cls = "conflict" if t.verdict == "regression" else ""
                h.append(f'<tr><td>{escape(name)}</td><td>{escape(t.host)}</td><td class="{cls}">{escape(t.verdict)}</td>'
                         f"<td>{t.baseline.passed}/{t.baseline.failed}</td><td>{t.patched.passed}/{t.patched.failed}</td>"
                         f"<td>{t.rerun_baseline.passed}/{t.rerun_baseline.failed} / "
                         f"{t.rerun_patched.passed}/{t.rerun_patched.failed}</td><td>{escape(t.detail)}</td></tr>")
            h.append("</table>")
        for sp in b.compare.splats_new:
            h.append(f'<p class="conflict">new splat on patched ({escape(sp.host)} round {sp.round}, {escape(sp.where)}): '
                     f"{escape(sp.kind)}</p><pre>{escape(chr(10).join(sp.first_lines))}</pre>")
    return h


def log_paths(b: BranchResult) -> list[tuple[str, str]]:
    """(what, path relative to the run directory) of every log the branch's records name."""
    out = []
    if b.build:
        for label, r in (("build baseline", b.build.baseline), ("build patched", b.build.patched)):
            out += [(f"{label} {name}", path) for name, path in r.artifacts.items() if "log" in name]
    for r in b.boot:
        where = f"boot {r.build} on {r.host} round {r.round}"
        out += [(f"{where} console", r.console_log)] if r.console_log else []
        out += [(f"{where} dmesg", r.dmesg)] if r.dmesg else []
    for run in b.workloads:
        where = f"{run.build} on {run.host} round {run.round}" + (f" rerun {run.rerun}" if run.rerun else "")
        out += [(f"{record_label(rec)} {where}", path) for rec in run.records for path in rec.logs]
    return out


def _logs(result: RunResult) -> list[str]:
    h = []
    for b in result.branches:
        logs = log_paths(b)
        if logs:
            h.append(f"<h3>{escape(b.name)}</h3><ul>" + "".join(
                f'<li>{escape(what)}: <a href="{_href(path)}">{escape(path)}</a></li>' for what, path in logs) + "</ul>")
    return ["<h2>Logs</h2><p>Paths relative to the run directory (this file's).</p>"] + h if h else []


def render(result: RunResult) -> str:
    s = result.series
    title = escape(s.title if s else result.name)
    h = [(f'<!doctype html><meta charset=utf-8><title>kpatchtest: {title}</title>'
          f'<link rel=stylesheet href="{CSS_NAME}">'), f"<h1>{title}</h1>"]
    if s:
        h.append(f"<p>{len(s.patches)} patch(es) from {escape(', '.join(s.sources))}"
                 + (f"; base-commit <code>{escape(s.base_commit)}</code>" if s.base_commit else "") + "</p>")
        h += _lore(result)
    h.append("<table><tr><th>#</th><th>patch</th>" + "".join(f"<th>{escape(b.name)}</th>" for b in result.branches) + "</tr>")
    for index, subject in patch_rows(result):
        row = f"<tr><td>{index}</td><td>{escape(subject)}</td>"
        for b in result.branches:
            c = cell(b, index)
            row += f'<td class="{c.status}" title="{escape(c.detail)}">{escape(patch_cell(c))}</td>' if c else "<td>-</td>"
        h.append(row + "</tr>")
    h.append("<tr><th></th><th>verdict</th>" + "".join(
        f'<th class="{escape(branch_verdict(b))}">{escape(branch_verdict(b))}</th>' for b in result.branches) + "</tr>")
    for label, cells in build_rows(result) + boot_rows(result) + workload_rows(result):
        h.append(f"<tr><th></th><th>{escape(label)}</th>" + "".join(
            f'<td class="{"conflict" if any(w in c for w in _BAD_WORDS) else "applied"}">{escape(c)}</td>'
            for c in cells) + "</tr>")
    h.append("</table>")
    h += _heatmap(result)
    if result.gates:
        h.append("<p>Gates:</p><ul>" + "".join(
            f'<li class="{"applied" if g.passed else "conflict"}">{escape(g.name)}'
            + (f" on {escape(g.branch)}" if g.branch else "")
            + f": {'passed' if g.passed else 'FAILED'}, expected {escape(g.expected)}, got {escape(g.actual)}</li>"
            for g in result.gates) + "</ul>")
    h += _comparisons(result) + _distributions(result)
    for b in result.branches:
        if b.error:
            h.append(f"<h2>{escape(b.name)}</h2><p class=ERROR>{escape(b.error)}</p>")
        notes = build_notes(b) + boot_notes(b)
        if notes:
            h.append(f"<h2>{escape(b.name)}: builds and boots</h2><pre>{escape(chr(10).join(notes))}</pre>")
        bw = branch_workloads(b)
        if bw is not None:
            h += _workloads(b, bw)
        if not b.apply:
            continue
        details = [f"<li>patch {p.index}: <pre>{escape(chr(10).join(notes))}</pre></li>" for p in b.apply.patches
                   if p.status == "conflict" and (notes := prerequisite_notes(patch_prerequisites(b, p)))]
        hunks = [f"<h3>patch {p.index}: {escape(c.file)} ({c.hunks} hunks) {escape(c.reason)}</h3>"
                 f"<pre>{escape(''.join(c.rejected))}</pre>" for p in b.apply.patches for c in p.conflicts]
        if details or hunks:
            h.append(f"<h2>{escape(b.name)}</h2>")
            if details:
                h.append("<p>Prerequisites:</p><ul>" + "".join(details) + "</ul>")
            h += hunks
    h += _logs(result)
    h.append(f"<p><small>kpatchtest {escape(result.tool_version)}, schema {result.schema_version}</small></p>")
    return "\n".join(h) + "\n"
