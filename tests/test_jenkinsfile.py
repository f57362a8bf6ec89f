"""The Jenkinsfile, without a Jenkins controller: Debian's groovy runs it on a small stand-in
for the pipeline engine (tests/jenkinsfile_stub.groovy: it must compile and run as Jenkins
would run it), npm-groovy-lint checks it with its Jenkinsfile rules, and every `sh` step
runs, in Jenkins' order, against the demo data; the merged record must be a single run's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUB = Path(__file__).parent / "jenkinsfile_stub.groovy"
JENKINSFILE = ROOT / "Jenkinsfile"
LAB_STAGES = ("boot", "workloads", "compare")


def _java_home() -> str | None:
    """groovy's launcher wants JAVA_HOME; Debian's default-java link is missing when another
    JRE satisfied the package's dependency."""
    if os.environ.get("JAVA_HOME") or Path("/usr/lib/jvm/default-java/bin/java").exists():
        return os.environ.get("JAVA_HOME")
    java = shutil.which("java")
    return str(Path(java).resolve().parents[1]) if java else None


def run_pipeline(tmp: Path, params: dict[str, str], *, execute: str | None = None, source: Path = ROOT,
                 env: dict[str, str] | None = None) -> list[dict]:
    """Run the Jenkinsfile on the stub with these build parameters; the trace of its steps."""
    if not shutil.which("groovy"):
        pytest.skip("groovy not installed (apt-get install groovy; it is in the Makefile's APT_PACKAGES)")
    tmp.mkdir(parents=True, exist_ok=True)
    trace = tmp / "trace.jsonl"
    full = {k: v for k, v in os.environ.items() if k not in ("SPEC", "BRANCHES", "STAGES", "OFFLINE")}
    full.update(params, **(env or {}))
    if _java_home():
        full["JAVA_HOME"] = _java_home()
    args = ["groovy", str(STUB), str(JENKINSFILE), str(source), str(tmp), str(trace)] + ([execute] if execute else [])
    p = subprocess.run(args, env=full, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads(line) for line in trace.read_text().splitlines()]


def steps(trace: list[dict], kind: str) -> list[dict]:
    return [e for e in trace if e["step"] == kind]


def kpatchtest_steps(trace: list[dict]) -> list[dict]:
    return [e for e in trace if e["step"] == "sh" and "kpatchtest" in e["script"]]


def test_the_plan_one_cell_per_branch_boots_under_the_labs_lock(tmp_path):
    """Default parameters: branches and stages from the spec (only `kpatchtest validate` runs)."""
    trace = run_pipeline(tmp_path, {}, execute="kpatchtest validate")
    head = trace[0]
    assert head["agent"] == "label:kpatchtest-build"
    assert head["params"] == {"SPEC": "series/demo.yaml", "BRANCHES": "", "STAGES": "", "OFFLINE": False}
    assert {json.dumps(o) for o in head["options"]} >= {'"timestamps"', json.dumps({"timeout": {"time": 8, "unit": "HOURS"}})}
    assert any("buildDiscarder" in o for o in head["options"] if isinstance(o, dict))
    branches = subprocess.run([sys.executable, "-m", "kpatchtest", "validate", "--list-branches", "series/demo.yaml"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [e["name"] for e in steps(trace, "parallel-branch")] == branches == ["debian-6.1", "debian-6.12"]
    # each cell on a build agent of its own: fetch, apply, build unlocked, then the lab stages locked
    for i, branch in enumerate(branches):
        cell = [e for e in trace if e.get("stage") == branch and e["step"] != "parallel-branch"]
        assert cell[0]["step"] == "node" and cell[0]["label"] == "label:kpatchtest-build"
        runs = [e for e in cell if e["step"] == "sh" and "kpatchtest run" in e["script"]]
        assert [r["env"]["KPT_STAGES"] for r in runs] == ["fetch,apply,build", "fetch,apply,build,boot,workloads,compare"]
        assert all(r["env"]["KPT_BRANCH"] == branch for r in runs)
        kinds = [e["step"] for e in cell]
        lock, unlock = kinds.index("lock"), kinds.index("unlock")
        assert cell.index(runs[0]) < lock < cell.index(runs[1]) < unlock < kinds.index("stash")
        assert cell[lock]["resource"] == f"kpatchtest-lab-local-agent{i + 1}"      # the local lab: the agent
        assert [e["name"] for e in cell if e["step"] == "stash"] == [f"run-{i}"]
    merge = kpatchtest_steps(trace)[-1]
    assert merge["stage"] == "Merge" and "report --merge out/*/results.json --out out/all" in merge["script"]
    assert [e["name"] for e in steps(trace, "unstash")] == ["run-0", "run-1"]
    assert steps(trace, "junit")[0]["keepProperties"] is True
    assert steps(trace, "publishHTML")[0]["reportFiles"] == "report.html"
    # parameters reach the shell as quoted variables, never as Groovy-interpolated text
    for e in kpatchtest_steps(trace):
        assert "series/demo.yaml" not in e["script"] and "debian-6" not in e["script"], e["script"]
        for var in re.findall(r"\$\{?(\w+)", e["script"]):
            assert f'"${var}' in e["script"] or var == "OFFLINE", (var, e["script"])


def test_branches_parameter_picks_the_cells(tmp_path):
    trace = run_pipeline(tmp_path, {"BRANCHES": "debian-6.12", "STAGES": "fetch,apply"}, execute="kpatchtest validate")
    assert [e["name"] for e in steps(trace, "parallel-branch")] == ["debian-6.12"]
    assert not steps(trace, "lock")                         # no lab stage asked for
    assert [r["env"]["KPT_STAGES"] for r in kpatchtest_steps(trace) if "kpatchtest run" in r["script"]] == ["fetch,apply"]


def test_input_errors_fail_the_build_and_still_merge(tmp_path):
    """An unknown branch: `kpatchtest run` exits 2 -> FAILURE, no boots; the merge still runs."""
    trace = run_pipeline(tmp_path, {"BRANCHES": "no-such-branch", "STAGES": "fetch,apply"}, execute="kpatchtest")
    runs = kpatchtest_steps(trace)
    assert [(r["label"], r["rc"]) for r in runs] == [("spec --lab-name", 0), ("run no-such-branch", 2), ("merge", 2)]
    assert [e["buildResult"] for e in steps(trace, "catchError")] == ["FAILURE", "FAILURE"]
    assert trace[-1]["result"] == "FAILURE"


def _normalised(path: Path, tmp: Path, git) -> dict:
    """A record without what differs between two runs of the same inputs: times, durations,
    the run id, the workspace's path, and the commits the apply made (their committer date):
    those are replaced by their trees, which must be the same."""
    text = re.sub(re.escape(str(tmp)) + r"/ws\d+", "<ws>", path.read_text())
    data = json.loads(re.sub(re.escape(str(tmp)) + r"/single", "<ws>", text))

    def walk(x):
        if isinstance(x, dict):
            return {k: (git.run("rev-parse", f"{v}^{{tree}}").stdout.strip() if k in ("commit", "patched_commit") and v
                        else walk(v))
                    for k, v in x.items() if k not in ("started", "finished", "duration_s", "run_id")}
        return [walk(v) for v in x] if isinstance(x, list) else x
    return walk(data)


@pytest.mark.slow
def test_every_sh_step_runs_and_merges_to_the_single_runs_record(debian_trees, kpt_cache, tmp_path):
    git, _ = debian_trees
    env = {"KPATCHTEST_CACHE": str(kpt_cache)}
    trace = run_pipeline(tmp_path, {"STAGES": "fetch,apply", "OFFLINE": "true"}, env=env)
    assert trace[-1]["result"] == "SUCCESS", [e for e in trace if e["step"] in ("error", "catchError")]
    assert [(e["label"], e["rc"]) for e in kpatchtest_steps(trace)] == [
        ("spec --list-branches", 0), ("spec --lab-name", 0),      # STAGES given: no --list-stages
        ("run debian-6.1", 0), ("run debian-6.12", 0), ("merge", 0)]
    top = Path(trace[1]["workspace"])
    merged = top / "out" / "all"
    assert (merged / "junit.xml").is_file() and (merged / "report.html").is_file()
    assert steps(trace, "junit")[0]["found"] is True
    assert {"report.html", "report.css"} <= set(steps(trace, "publishHTML")[0]["files"])
    single = tmp_path / "single"            # a checkout as the stub's: series/ a link into this repository
    single.mkdir()
    (single / "series").symlink_to(ROOT / "series")
    p = subprocess.run([str(ROOT / ".venv" / "bin" / "kpatchtest"), "run", "series/demo.yaml", "--stages", "fetch,apply",
                        "--offline", "--out", "out", "-q"], cwd=single, env={**os.environ, **env},
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _normalised(merged / "results.json", tmp_path, git) == _normalised(single / "out" / "results.json", tmp_path, git)


@pytest.mark.slow
def test_a_failed_gate_makes_the_build_unstable(debian_trees, kpt_cache, tmp_path):
    """A spec whose apply gate debian-6.1 misses (partial, not clean): exit 1 in the cell and
    in the merge -> UNSTABLE, and the reports are still published."""
    source = tmp_path / "repo"
    source.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("series", "out"):
            (source / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "series", source / "series", symlinks=True)
    spec = (source / "series" / "demo.yaml").read_text()
    (source / "series" / "strict.yaml").write_text(spec.replace("name: demo", "name: strict").replace(
        "  apply:\n    debian-6.12: clean", "  apply: clean"))
    trace = run_pipeline(tmp_path / "ci", {"SPEC": "series/strict.yaml", "BRANCHES": "debian-6.1", "STAGES": "fetch,apply",
                                           "OFFLINE": "true"}, source=source, env={"KPATCHTEST_CACHE": str(kpt_cache)})
    assert [(e["label"], e["rc"]) for e in kpatchtest_steps(trace)][-2:] == [("run debian-6.1", 1), ("merge", 1)]
    assert [e["buildResult"] for e in steps(trace, "catchError")] == ["UNSTABLE", "UNSTABLE"]
    assert trace[-1]["result"] == "UNSTABLE"
    assert steps(trace, "junit")[0]["found"] is True


@pytest.mark.slow
def test_npm_groovy_lint_finds_nothing_with_its_jenkinsfile_rules(tmp_path):
    """npm-groovy-lint (npm) runs CodeNarc on the system's Java: no download, no network."""
    lint = shutil.which("npm-groovy-lint")
    if not lint:
        pytest.skip("npm-groovy-lint not installed (npm install -g npm-groovy-lint)")
    shutil.copy(JENKINSFILE, tmp_path / "Jenkinsfile")     # it writes nothing, but runs where the file is
    # --noserver: no CodeNarc server (a 2 GB Java process) left running after the test
    p = subprocess.run([lint, "--noserver", "--config", "recommended-jenkinsfile", "--output", "json",
                        "--failon", "warning", "Jenkinsfile"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    report = json.loads(p.stdout[p.stdout.index("{"):])
    found = [(e["line"], e["rule"], e["msg"]) for f in report["files"].values() for e in f["errors"]
             if e["severity"] in ("error", "warning")]
    assert report["summary"]["totalFilesLinted"] == 1
    assert p.returncode == 0 and not found, found
