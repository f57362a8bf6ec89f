"""report.html: the same matrix as summary.md, self-contained, with rejected hunks."""

from __future__ import annotations

from html import escape
from pathlib import Path

from kpatchtest.report.cells import (boot_notes, boot_rows, branch_verdict, build_notes, build_rows, cell, kernel_ref,
                                     patch_cell, patch_rows)
from kpatchtest.results import RunResult

_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
.applied,.clean,.already-applied,.already-present{background:#dfd}.applied-3way,.three-way{background:#ffd}
.conflict,.skipped,.partial,.ERROR{background:#fdd}pre{background:#f6f6f6;padding:6px;overflow:auto}"""


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
    for label, cells in build_rows(result) + boot_rows(result):
        h.append(f"<tr><th></th><th>{escape(label)}</th>" + "".join(
            f'<td class="{"conflict" if c.startswith("FAIL") or "NEW" in c or "FAILED" in c or "SPLAT" in c else "applied"}">{escape(c)}</td>'
            for c in cells) + "</tr>")
    h.append("</table>")
    for b in result.branches:
        if b.error:
            h.append(f"<h2>{escape(b.name)}</h2><p class=ERROR>{escape(b.error)}</p>")
        notes = build_notes(b) + boot_notes(b)
        if notes:
            h.append(f"<h2>{escape(b.name)}: builds and boots</h2><pre>{escape(chr(10).join(notes))}</pre>")
        if not b.apply:
            continue
        details = []
        for q in b.apply.prerequisites:
            details.append(f"<li>{escape(kernel_ref(q.commit, q.subject))} [{q.size} lines] "
                           f"{'verified' if q.verified else 'unverified'}</li>")
        hunks = [f"<h3>patch {p.index}: {escape(c.file)} ({c.hunks} hunks) {escape(c.reason)}</h3>"
                 f"<pre>{escape(''.join(c.rejected))}</pre>" for p in b.apply.patches for c in p.conflicts]
        if details or hunks:
            h.append(f"<h2>{escape(b.name)}</h2>")
            if details:
                h.append("<p>Prerequisites:</p><ul>" + "".join(details) + "</ul>")
            h += hunks
    h.append(f"<p><small>kpatchtest {escape(result.tool_version)}, schema {result.schema_version}</small></p>")
    return "\n".join(h) + "\n"


def write(result: RunResult, path: Path) -> None:
    path.write_text(render(result))
