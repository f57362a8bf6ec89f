"""summary.md: a reply to the series' cover letter. The reply headers b4 would write, then
"What changed" (regressions and significant metric changes, from the compare stage), then
the patches x branches matrix, prerequisite hints, builds, boots and workloads.

Plain ASCII, columns padded, so it reads the same in a mail client as rendered.
"""

from __future__ import annotations

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
from kpatchtest.report.compare_cells import reply_headers, what_changed
from kpatchtest.report.workload_cells import workload_notes, workload_rows
from kpatchtest.results import RunResult


_ASCII = str.maketrans({"\u00b1": "+-", "\u00d7": "x", "\u2013": "-", "\u2014": "-", "\u2212": "-",
                        "\u2264": "<=", "\u2265": ">=", "\u2192": "->", "\u2018": "'", "\u2019": "'",
                        "\u201c": '"', "\u201d": '"'})


def _ascii(line: str) -> str:
    """Workload names and details come from logs, method texts from the compare stage:
    keep the mail plain ASCII (the usual symbols spelled out, anything else '?')."""
    return line.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def render(result: RunResult) -> str:
    s = result.series
    title = s.title if s else result.name
    headers = reply_headers(s)
    out = [_ascii(line) for line in headers] + [""] if headers else []
    changed = what_changed(result)
    out += [_ascii(line) for line in changed] + [""] if changed else []
    out += [f"kpatchtest: {title}" + (f" (v{s.version})" if s and s.version else ""), ""]
    if s:
        out.append(f"Series: {len(s.patches)} patch(es) from {', '.join(s.sources)}")
        if s.title_note:
            out.append(f"Note: {s.title_note}")
        if s.base_commit:
            out.append(f"base-commit: {s.base_commit}")
        if s.link:
            out.append(f"Link: {s.link}")
        out.append("")
    branches = result.branches
    rows = []
    for index, subject in patch_rows(result):
        short = subject if len(subject) <= 60 else subject[:57] + "..."
        rows.append([str(index), short] + [patch_cell(c) if (c := cell(b, index)) else "-" for b in branches])
    rows.append(["", "verdict"] + [branch_verdict(b) for b in branches])
    rows += [["", label] + cells for label, cells in build_rows(result) + boot_rows(result) + workload_rows(result)]
    out += _table(["#", "patch"] + [b.name for b in branches], rows)
    for b in branches:
        notes = []
        if b.error:
            notes.append(f"  error: {b.error}")
        if b.apply:
            for p in b.apply.patches:
                if p.detail and (p.method or p.status == "conflict"):
                    notes.append(f"  patch {p.index}: {p.detail}")
                for c in p.conflicts:
                    notes.append(f"  patch {p.index}: {c.file}: {c.hunks} hunk(s) rejected"
                                 + (f" ({c.reason})" if c.reason else ""))
                if p.status == "conflict":
                    notes += [f"    {line}" if line.startswith(" ") else f"  patch {p.index}: {line}"
                              for line in prerequisite_notes(patch_prerequisites(b, p))]
        notes += ["  " + line for line in build_notes(b) + boot_notes(b)]
        notes += ["  " + _ascii(line) for line in workload_notes(b)]
        if notes:
            out += ["", f"{b.name}:"] + notes
    failed = result.gates_failed()
    if result.gates:
        out += ["", "Gates: " + ("all passed" if not failed else
                                 "; ".join(f"{g.name} on {g.branch}: expected {g.expected}, got {g.actual}"
                                           for g in failed))]
    out += ["", f"-- kpatchtest {result.tool_version}, schema {result.schema_version}"]
    return "\n".join(out) + "\n"
