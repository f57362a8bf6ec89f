"""Reports: pure functions of a RunResult, so `kpatchtest report` re-renders any old run."""

from __future__ import annotations

from pathlib import Path

from kpatchtest.results import RunResult, save


def write_all(result: RunResult, out: Path) -> list[Path]:
    from kpatchtest.report import html, junit, summary

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "junit.xml", out / "summary.md", out / "report.html"]
    save(result, paths[0])
    junit.write(result, paths[1])
    summary.write(result, paths[2])
    html.write(result, paths[3])
    return paths
