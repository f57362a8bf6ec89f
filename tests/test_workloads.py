"""Workloads on real kernels in the local lab: the SMM-heavy boot as a nested SeaBIOS
guest under the kernel under test (nested SVM under TCG), its probes, a hang, and the
whole pipeline with a workloads section."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kpatchtest.lab.local.lab import local_lab
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.results import SCHEMA_VERSION
from kpatchtest.spec import SmmBootSpec
from kpatchtest.workloads.bootsector import make_boot_image
from kpatchtest.workloads.smm_boot import image_for, run_smm_boot
from tests.conftest_lab import LAB_BASE, LAB_FRAGMENTS, build_lab_kernel, metric
from tests.test_build import harmless_commit, pipeline_spec

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).resolve().parent / "kut_standin"
READS = 40          # CI size: ~160 SMM transitions per boot; a full-size run is benchmarks/smm_physics.py


@pytest.fixture(scope="module")
def patched_commit(debian_trees, kpt_cache, tmp_path_factory):
    git, trees = debian_trees
    commit = harmless_commit(git, trees["6.1"].commit, tmp_path_factory.mktemp("pk"))
    build_lab_kernel(git, commit, kpt_cache)        # the same build test_lab_boot.py made: reused
    return git, commit


def test_pipeline_runs_workloads_on_each_boot(patched_commit, kpt_cache, tmp_path):
    """kpatchtest run with a workloads: section and the SMM boot's probes off (a kernel
    without kprobes reads the same way): the SMM boot passes with wall times, every probe
    metric is unavailable (None, never 0, "n/a" in the reports); kvm-unit-tests (the stand-in, built and deployed by the
    stage) gives a pass with cycles and a failure shared by both builds; every report
    shows the workloads."""
    from kpatchtest.cli import main
    git, commit = patched_commit
    spec = pipeline_spec(tmp_path, git, commit, "workloads-demo", f"""configs:
  base: {LAB_BASE}
  fragments: {list(LAB_FRAGMENTS)}
lab:
  name: local
workloads:
  repetitions: 2
  smm_boot: {{reads: {READS}, timeout_s: 120, probes: false}}
  kvm_unit_tests:
    source: {STANDIN}
    tests: [vmexit_cr0_wp, hypercall]
    env: {{ACCEL: kvm, KUT_STANDIN_SCENARIO: cycles=2468}}
    timeout_s: 300
gates:
  boot: booted
  workloads: no-new-failures
""")
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--cache-dir", str(kpt_cache), "--offline", "-q"])
    res = json.loads((out / "results.json").read_text())
    b = res["branches"][0]
    assert res["schema_version"] == SCHEMA_VERSION and "workloads" in res["stages"]
    assert code == 0, (b["boot"], b["workloads"])
    runs = {w["build"]: w for w in b["workloads"]}
    assert set(runs) == {"baseline", "patched"}
    for w in runs.values():
        assert w["error"] is None and w["kernelrelease"] in {r["kernelrelease"] for r in b["boot"]}
        recs = {r["name"]: r for r in w["records"]}
        assert {n: r["status"] for n, r in recs.items()} == {"vmexit_cr0_wp": "pass", "hypercall": "fail",
                                                             "smm-boot": "pass"}, recs
        assert recs["vmexit_cr0_wp"]["metrics"][0]["values"] == [2468]
        assert all((out / p).exists() for r in recs.values() for p in r["logs"])
        rec = recs["smm-boot"]
        m = {x["name"]: x for x in rec["metrics"]}
        assert len(m["wall_time"]["values"]) == 2 and all(v > 0 for v in m["wall_time"]["values"])
        for name in ("smm_transitions", "root_lookups", "root_allocs"):
            assert m[name]["values"] == [None, None] and m[name]["available"] is False, m[name]
            assert w["probes"][name].startswith("unavailable")
    cases = {c.get("name"): c for c in ET.parse(out / "junit.xml").getroot().iter("testcase")}
    case = cases["smm-boot patched on local-0"]
    assert case.find("failure") is None and case.find("error") is None
    suite = next(s for s in ET.parse(out / "junit.xml").getroot().iter("testsuite")
                 if s.get("name", "").endswith("workloads patched on local-0 round 1"))
    props = {p.get("name"): p.get("value") for p in suite.find("properties").iter("property")}
    assert props["smm-boot.smm_transitions.events.1"] == "n/a" and float(props["smm-boot.wall_time.s.1"]) > 0
    summary = (out / "summary.md").read_text()
    assert "smm-boot: 1 pass -> 1 pass" in summary and "n/a" in summary
    # hypercall fails on both builds: the no-new-failures gate lets it through (exit 0 above)
    assert "kvm-unit-tests: 1 pass, 1 fail -> 1 pass, 1 fail" in summary, summary
    assert cases["kvm-unit-tests/hypercall patched on local-0"].find("failure") is not None


def hanging_image(path: Path) -> Path:
    """A boot sector without the 55 AA signature: SeaBIOS finds nothing to boot and waits."""
    bad = bytearray(make_boot_image(1))
    bad[510:512] = b"\0\0"
    path.write_bytes(bytes(bad))
    return path


def test_host_that_vanishes_mid_workload_gives_an_error_record(lab_kernel, kpt_cache, tmp_path):
    """The lab host dies (QMP quit) while its nested guest runs: one error record that
    says so, quickly, and no exception out of the workload."""
    with local_lab(lab_kernel, kpt_cache, tmp_path / "lab", nested=True) as host:
        image = hanging_image(tmp_path / "hang.img")
        killer = threading.Timer(10, subprocess.run, args=(host.power.off,), kwargs={"shell": True})
        t0 = time.monotonic()
        with HostConnection(host) as conn:
            conn.open()
            killer.start()
            record, _ = run_smm_boot(conn, SmmBootSpec(reads=1, timeout_s=120, probes=False), image, 3,
                                     tmp_path / "out", tmp_path)
        killer.join()
    assert record.status == "error", record
    assert "stopped answering" in record.detail and "1 of 3 repetitions ran" in record.detail
    assert time.monotonic() - t0 < 60


def test_smm_heavy_boot_counts_transitions_and_roots_on_6_1(traced_host, tmp_path):
    """6.1.192 keeps TDP MMU roots across SMM transitions: hundreds of transitions, a
    handful of roots. The probes used are the 6.1 ones, detected on the running kernel."""
    spec = SmmBootSpec(reads=READS, timeout_s=120)
    image = image_for(spec, tmp_path)
    with HostConnection(traced_host) as conn:
        conn.open()
        record, probes = run_smm_boot(conn, spec, image, 2, tmp_path / "out", tmp_path)
    assert record.status == "pass", record.detail
    smm = metric(record, "smm_transitions")
    assert smm.available and len(smm.values) == 2
    assert all(v >= 3 * READS for v in smm.values), smm      # about four per BIOS disk read
    assert probes["smm_transitions"].startswith("tracepoint:kvm:kvm_smm_transition")
    lookups = metric(record, "root_lookups")
    assert probes["root_lookups"].startswith("kprobe:kvm_tdp_mmu_get_vcpu_root_hpa")
    assert all(v >= smm.values[0] / 2 for v in lookups.values), lookups   # a root reload per SMM switch
    allocs = metric(record, "root_allocs")
    # preserved: a handful (7 at 200 reads, from memslot changes), not one per SMM switch as on 5.10
    assert allocs.available and all(1 <= v <= 16 and v < s / 10 for v, s in zip(allocs.values, smm.values)), allocs
    assert all(v is not None and v > 0 for v in metric(record, "guest_time").values)
    assert all((tmp_path / p).exists() for p in record.logs)


def test_nested_guest_that_hangs_ends_as_timeout(traced_host, tmp_path):
    """The repetition is killed at its limit, the run goes on, the probes are removed."""
    spec = SmmBootSpec(reads=1, timeout_s=8)
    image = hanging_image(tmp_path / "hang.img")
    t0 = time.monotonic()
    with HostConnection(traced_host) as conn:
        conn.open()
        record, _ = run_smm_boot(conn, spec, image, 3, tmp_path / "out", tmp_path)
        left = conn.run(["sh", "-c", "ls /sys/kernel/tracing/events/kpt /sys/kernel/debug/tracing/events/kpt 2>/dev/null | wc -l; "
                              "ps | grep -c '[q]emu-system'"], check=False).stdout.split()
    assert record.status == "timeout", record.detail
    assert "1 of 3 repetitions ran" in record.detail
    assert time.monotonic() - t0 < 8 + 90
    assert left[0] == "0" and left[1] == "0", left      # no probe left registered, no QEMU left running


def test_aa_run_gives_no_significant_change_for_any_metric(traced_host, trace_kernel, tmp_path):
    """False positives: the same kernel on both sides (an A/A run: 3 rounds, each one
    power cycle per side, 2 repetitions of the SMM boot per boot) through the compare
    stage's own comparison and default settings. Every metric must come out "no
    significant change" (or n/a: a count that only describes the workload); a verdict here
    would be the statistics calling noise a change. The 10-round version, with the power
    numbers, is benchmarks/compare_power.py."""
    from benchmarks.compare_power import measure_on
    from kpatchtest.compare.stage import compare_branch
    from kpatchtest.results import BranchResult
    from kpatchtest.spec import CompareSpec, Spec
    bz, release = trace_kernel
    runs = measure_on(traced_host, bz, release, 3, 2, SmmBootSpec(reads=READS, timeout_s=120), tmp_path, boot="reset")
    assert sorted((w.round, w.build) for w in runs) == [(r, b) for r in (1, 2, 3) for b in ("baseline", "patched")]
    assert all(rec.status == "pass" for w in runs for rec in w.records), [rec.detail for w in runs for rec in w.records]
    comp = compare_branch(BranchResult(name="aa", workloads=runs), Spec.model_construct(compare=CompareSpec(), workloads=None))
    judged = {m.name: m.verdict for m in comp.metrics}
    assert "wall_time" in judged and "root_allocs" in judged, judged     # measured, not skipped
    assert all(v in ("no significant change", "n/a") for v in judged.values()), judged
    wall = next(m for m in comp.metrics if m.name == "wall_time")
    assert (wall.rounds, wall.repetitions) == (3, 2) and wall.ci_low <= 1 <= wall.ci_high, wall
    assert [t.verdict for t in comp.tests] == ["unchanged-pass"], comp.tests     # the SMM boot passed every time
