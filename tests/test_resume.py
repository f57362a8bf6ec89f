"""Resume: every finished unit is kept (out/state/steps) and results.json is rewritten after
each one; a run started again with the same spec and --out redoes only the units in flight
and those whose inputs changed. Killed for real (kill -9), in a boot and in a workload, on
the local lab; the apply stage's reuse and --force on a realistic history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kpatchtest.cli import main
from tests.kernelhist import build

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "series" / "demo.yaml"


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("resume") / "linux")


def _apply_spec(hist, tmp_path: Path, keys=("P_clean",)) -> Path:
    mbox = tmp_path / "series.mbox"
    mbox.write_text("".join(hist.git("format-patch", "-1", "--stdout", hist.shas[k]) for k in keys))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "resume", "series": [{"mbox": str(mbox)}],
                                    "kernel": {"repo": str(hist.path),
                                               "branches": [{"name": "linux-1.0.y"}, {"name": "master"}]}}))
    return spec


def _run(spec: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    argv = ["run", str(spec), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]
    p = subprocess.run([sys.executable, "-m", "kpatchtest", *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CI": "1"})
    return p.returncode, p.stderr


def test_apply_units_are_reused_redone_when_lost_or_forced(hist, tmp_path):
    spec = _apply_spec(hist, tmp_path)
    code, err = _run(spec, tmp_path)
    assert code == 0, err
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = sorted((tmp_path / "out" / "state" / "steps" / "apply").glob("*.json"))
    assert len(steps) == 2                      # one record per branch, keyed by its inputs
    code, err = _run(spec, tmp_path)
    assert code == 0 and err.count("(unchanged inputs, reused)") == 2, err
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [b["apply"] for b in again["branches"]] == [b["apply"] for b in first["branches"]]
    # a torn record (a kill in the middle of a write never leaves one, but a disk might) is redone
    steps[0].write_text('{"branch": ')
    code, err = _run(spec, tmp_path)
    assert code == 0 and err.count("(unchanged inputs, reused)") == 1, err
    code, err = _run(spec, tmp_path, "--force", "apply")
    assert code == 0 and "(unchanged inputs, reused)" not in err, err
    # another series is another input: nothing is reused
    code, err = _run(_apply_spec(hist, tmp_path, keys=("P_3way",)), tmp_path)
    assert code == 0 and "(unchanged inputs, reused)" not in err, err


def test_parallel_branches_give_the_serial_record(hist, tmp_path):
    spec = _apply_spec(hist, tmp_path, keys=("P_3way",))
    assert _run(spec, tmp_path)[0] == 0
    serial = json.loads((tmp_path / "out" / "results.json").read_text())
    code, err = _run(spec, tmp_path, "--jobs", "2", "--force", "apply")
    assert code == 0, err
    parallel = json.loads((tmp_path / "out" / "results.json").read_text())
    strip = lambda r: [(b["name"], b["apply"]["verdict"], [(p["index"], p["status"]) for p in b["apply"]["patches"]])  # noqa: E731
                       for b in r["branches"]]
    assert strip(parallel) == strip(serial)     # same verdicts, branches in the spec's order


def test_bad_jobs_and_force_are_usage_errors(hist, tmp_path, capsys):
    spec = _apply_spec(hist, tmp_path)
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
    assert "--jobs 0: must be at least 1" in capsys.readouterr().err
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--force", "bild"]) == 2
    assert "--force: unknown stage 'bild'" in capsys.readouterr().err
    assert main(["run", str(spec), "--out", str(tmp_path / "o"), "--force", "build"]) == 2
    assert "--force build: its results are reused by content" in capsys.readouterr().err


def _qemu_pids(out: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(out).encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("where", ["boot", "workload"])
def test_killed_run_resumes_where_it_stopped(where, debian_trees, kpt_cache, lab_kernel, tmp_path):
    """kill -9 of kpatchtest while the second boot job is booting, or while its workload
    runs; the run started again reuses the finished job, redoes the one in flight, stops the
    VM the killed run left, and ends with the record a run without the kill gives."""
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    doc["series"] = [{"mbox": str(DEMO_SPEC.parent / doc["series"][0]["mbox"])}]
    doc["kernel"]["branches"] = [doc["kernel"]["branches"][0]]          # debian-6.1: built by the tests already
    doc["kernel"].pop("upstream", None)
    if where == "workload":
        doc["workloads"] = {"repetitions": 1, "smm_boot": {"reads": 50, "timeout_s": 180, "probes": False}}
    else:                           # boots only: the cheaper run, killed while the second kernel boots
        doc.pop("workloads")
    doc["gates"] = {"boot": "booted"}
    spec = tmp_path / "demo-resume.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "kpatchtest", "run", str(spec), "--out", str(out), "--cache-dir", str(kpt_cache),
            "--offline", "--no-hints"]
    env = {**os.environ, "CI": "1"}
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    steps = out / "state" / "steps" / "boot"
    second = out / ("boot" if where == "boot" else "workloads") / "debian-6.1" / "patched-r1"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and p.poll() is None:
        if len(list(steps.glob("*.json"))) == 1 and second.exists():
            break
        time.sleep(0.2)
    assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    if where == "workload":
        time.sleep(1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    log.close()
    partial = json.loads((out / "results.json").read_text())
    assert partial["finished"] is None                                  # a record of the unit that finished
    assert [(b["build"], b["status"]) for b in partial["branches"][0]["boot"]] == [("baseline", "booted")]
    assert _qemu_pids(out), "the killed run's VM should still be running (that is what resume must clean up)"

    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stopped the VM a killed run left" in r.stderr
    assert r.stderr.count("(unchanged inputs, reused)") >= 2, r.stderr   # apply and the first boot
    assert "debian-6.1 baseline: booted" in r.stderr and "(unchanged inputs, reused)" in \
        [line for line in r.stderr.splitlines() if "debian-6.1 baseline: booted" in line][0]
    res = json.loads((out / "results.json").read_text())
    b = res["branches"][0]
    assert res["finished"]
    assert [(x["build"], x["status"], x["round"]) for x in b["boot"]] == [("baseline", "booted", 1),
                                                                         ("patched", "booted", 1)]
    assert [(w["build"], [r["status"] for r in w["records"]]) for w in b["workloads"]] == \
        ([("baseline", ["pass"]), ("patched", ["pass"])] if where == "workload" else [])
    assert not _qemu_pids(out)
