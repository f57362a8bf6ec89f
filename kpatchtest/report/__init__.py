"""Reports: pure functions of a RunResult, so `kpatchtest report` re-renders any old run."""

from __future__ import annotations

from pathlib import Path

from kpatchtest.results import RunResult, save


def write_all(result: RunResult, out: Path, run_dir: Path | None = None) -> list[Path]:
    """run_dir: the directory the result's log paths are relative to (default: out, where
    `kpatchtest run` writes everything); junit.xml quotes the end of workload logs from it."""
    from kpatchtest.report import html, junit, summary

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "junit.xml", out / "summary.md", out / "report.html"]
    save(result, paths[0])
    junit.write(result, paths[1], run_dir if run_dir is not None else out)
    summary.write(result, paths[2])
    html.write(result, paths[3])
    return paths
