"""The README's main job, `kpatchtest run series/demo.yaml`, up to its builds: run as a
user runs it (the installed command, from another directory, relative --out and
--cache-dir), in the session's cache. The builds it makes are the demo's own, so `make
demo` after the tests (as .ci/run does) reuses them all and costs only its boots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_demo_spec_applies_and_builds_as_the_readme_says(debian_trees, kpt_cache, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    spec = os.path.relpath(ROOT / "series" / "demo.yaml", cwd)
    cache = os.path.relpath(kpt_cache, cwd)
    p = subprocess.run([sys.executable, "-m", "kpatchtest", "run", spec, "--stages", "fetch,apply,build",
                        "--out", "out/demo", "--cache-dir", cache, "--offline"],
                       cwd=cwd, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((cwd / "out" / "demo" / "results.json").read_text())
    branches = {b["name"]: b for b in res["branches"]}
    assert {n: b["apply"]["verdict"] for n, b in branches.items()} == {"debian-6.1": "partial",
                                                                       "debian-6.12": "clean"}
    # 6.1: patch 2 conflicts (6.1 still tracks TDP MMU pages on a list); 1 and 3 apply with offsets
    assert [x["status"] for x in branches["debian-6.1"]["apply"]["patches"]] == ["applied", "conflict", "applied"]
    assert [x["status"] for x in branches["debian-6.12"]["apply"]["patches"]] == ["applied"] * 3
    for name, b in branches.items():
        base, patched = b["build"]["baseline"], b["build"]["patched"]
        assert base["status"] == patched["status"] == "pass", (name, base.get("reason"), patched.get("reason"))
        assert base["config_hash"] == patched["config_hash"]         # same config: only the series recompiles
        assert patched["reused"] or patched["objects_compiled"] <= 30, (name, patched["objects_compiled"])
        assert not base["config_errors"] and not patched["config_errors"]
    assert all(g["passed"] for g in res["gates"]), res["gates"]
    assert "\x1b" not in p.stdout       # the progress display never reaches stdout
