"""Reports: pure functions of a RunResult, so `kpatchtest report` re-renders any old run."""

from __future__ import annotations

from pathlib import Path

from kpatchtest.results import RunResult
from kpatchtest.util import write_atomic

# What write_all renders beside results.json (a run's first save removes a previous run's).
REPORT_FILES = ("junit.xml", "summary.md", "report.html", "report.css")


def write_all(result: RunResult, out: Path, run_dir: Path | None = None, *,
              extra: dict[str, bytes] | None = None, with_results: bool = True) -> list[Path]:
    """Render every report, then write each atomically; results.json last, so a reader
    that finds it finds the reports (and `extra` files, e.g. series.mbox) that match it.

    run_dir: the directory the result's log paths are relative to (default: out, where
    `kpatchtest run` writes everything); junit.xml quotes the end of workload logs from it.
    with_results: False when re-rendering a results.json in place (`kpatchtest report`
    needs no write access to the file it reads)."""
    from kpatchtest.report import html, junit, summary

    files: dict[str, str | bytes] = dict(extra or {})
    files["junit.xml"] = junit.render(result, run_dir if run_dir is not None else out)
    files["summary.md"] = summary.render(result)
    files["report.html"] = html.render(result)
    files[html.CSS_NAME] = html.CSS            # report.html's styles: Jenkins' CSP blocks inline ones
    if with_results:
        files["results.json"] = result.model_dump_json(indent=2) + "\n"
    for name, data in files.items():
        write_atomic(out / name, data)
    return [out / name for name in sorted(files, key=lambda n: n != "results.json")]
