"""report.html: the same matrix as summary.md, self-contained, with rejected hunks and workload tables."""

from __future__ import annotations

from html import escape

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
from kpatchtest.report.workload_cells import BranchWorkloads, branch_workloads, counts_text, workload_rows
from kpatchtest.results import BranchResult, RunResult

_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
.applied,.clean,.already-applied,.already-present{background:#dfd}.applied-3way,.three-way{background:#ffd}
.conflict,.skipped,.partial,.ERROR{background:#fdd}pre{background:#f6f6f6;padding:6px;overflow:auto}
ul.bad{margin:4px 0;padding-left:1.2em}"""
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
            bad = line.bad(x)
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


def render(result: RunResult) -> str:
    s = result.series
    title = escape(s.title if s else result.name)
    h = [f"<!doctype html><meta charset=utf-8><title>kpatchtest: {title}</title><style>{_CSS}</style>",
         f"<h1>{title}</h1>"]
    if s:
        h.append(f"<p>{len(s.patches)} patch(es) from {escape(', '.join(s.sources))}"
                 + (f"; base-commit <code>{escape(s.base_commit)}</code>" if s.base_commit else "") + "</p>")
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
    if result.gates:
        h.append("<p>Gates:</p><ul>" + "".join(
            f'<li class="{"applied" if g.passed else "conflict"}">{escape(g.name)}'
            + (f" on {escape(g.branch)}" if g.branch else "")
            + f": {'passed' if g.passed else 'FAILED'}, expected {escape(g.expected)}, got {escape(g.actual)}</li>"
            for g in result.gates) + "</ul>")
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
    h.append(f"<p><small>kpatchtest {escape(result.tool_version)}, schema {result.schema_version}</small></p>")
    return "\n".join(h) + "\n"
