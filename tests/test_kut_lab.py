"""kvm-unit-tests inside the real local lab VM (QEMU TCG, -cpu qemu64,+svm,+npt): the nested
lab image (bash, coreutils timeout, qemu-system-x86_64), deploy_kut over the VM's dropbear,
run_kut with the VM's own dmesg, nested KVM on the lab kernel.

- the stand-in (tests/kut_standin) always runs (slow: it needs the lab kernel);
- the real suite runs when KPATCHTEST_KUT_SOURCE names a kvm-unit-tests checkout, a bare
  repository or a git URL (KPATCHTEST_KUT_REF: a ref in it), see test_real_kvm_unit_tests.

Run with -s to see timings.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.workloads.kut import build_kut, deploy_kut, kut_source, run_kut
from tests.conftest_lab import need_image_tools

pytestmark = pytest.mark.slow

STANDIN = Path(__file__).parent / "kut_standin"


@pytest.fixture(scope="module")
def kut_lab(lab_kernel, kpt_cache, tmp_path_factory):
    """A connection to a nested-image lab VM on the lab kernel; the VM stops with the module."""
    from kpatchtest.lab.local.lab import local_lab
    need_image_tools()
    work = tmp_path_factory.mktemp("kut-lab")
    t0 = time.monotonic()
    with local_lab(lab_kernel, kpt_cache, work, nested=True) as host:
        print(f"nested lab VM up in {time.monotonic() - t0:.1f} s (image build included)")
        with HostConnection(host) as conn:
            yield conn


def by_name(records):
    return {r.name: r for r in records}


def test_standin_in_the_lab_vm(kut_lab, tmp_path: Path):
    conn = kut_lab
    # what the stand-in's scripts need, as the real ones do
    r = conn.run_script('bash --version | head -1; /usr/bin/timeout --version | head -1; '
                        'bash -c "cat <(echo procsub) | tee /dev/stderr"; test -c /dev/kvm && echo kvm',
                        check=False)
    assert r.exit_code == 0, r.stderr
    assert "GNU bash" in r.stdout and "coreutils" in r.stdout and "procsub" in r.stdout and "kvm" in r.stdout

    remote = "/root/kut-standin"
    t0 = time.monotonic()
    deploy_kut(conn, STANDIN, remote)
    logs = tmp_path / "run" / "logs"
    records = run_kut(conn, remote, ["vmexit_cr0_wp", "access", "hypercall", "debug"], [],
                      {"ACCEL": "kvm", "KUT_STANDIN_SCENARIO": "cycles=2468"}, 120, logs)
    print(f"stand-in in the lab VM: deploy + 4 tests in {time.monotonic() - t0:.1f} s")
    r = by_name(records)
    assert {n: x.status for n, x in r.items()} == {"vmexit_cr0_wp": "pass", "access": "pass",
                                                   "hypercall": "fail", "debug": "timeout"}
    (m,) = r["vmexit_cr0_wp"].metrics
    assert (m.name, m.values, m.available) == ("cycles", [2468.0], True)
    assert r["access"].detail == "1 tests"
    assert r["hypercall"].detail.startswith("4 tests, 2 unexpected failures; Hypercall via VMMCALL")
    assert r["debug"].detail == "timeout; duration=2s"         # coreutils timeout --foreground
    log = (logs / "vmexit_cr0_wp.log").read_bytes().decode()
    # x86/run found the image's QEMU and ran it under KVM
    assert log.startswith("timeout -k 1s --foreground 90s /usr/bin/qemu-system-x86_64 ")
    assert "-machine accel=kvm -kernel x86/vmexit.flat -smp 2 -append toggle_cr0_wp" in log
    assert "toggle_cr0_wp 2468\r\n" in log
    assert not any("dmesg unavailable" in x.detail for x in records)

    # a kernel warning that reaches the VM's real kernel log fails the run's records
    (rec,) = run_kut(conn, remote, ["smap"], [], {"ACCEL": "kvm", "KUT_STANDIN_SCENARIO": "splat=smap",
                                                  "KUT_STANDIN_DMESG": "/dev/kmsg"}, 60, tmp_path / "splat")
    assert rec.status == "fail"
    assert rec.detail.startswith("kernel warning in dmesg during the run: WARNING: CPU: 1 PID: 2291 at "
                                 "arch/x86/kvm/mmu/tdp_mmu.c:1163")

    # the whole run's limit stops the hung test and everything under run_tests.sh
    # (coreutils timeout signals its process group; busybox's would leave the test running)
    t0 = time.monotonic()
    (rec,) = run_kut(conn, remote, ["access"], [], {"ACCEL": "kvm", "KUT_STANDIN_SCENARIO": "access=hang"},
                     6, tmp_path / "hang")
    assert (rec.status, rec.detail) == ("timeout", "run_tests.sh stopped after 6 s while the test was running")
    assert time.monotonic() - t0 < 6 + 10 + 15
    left = conn.run_script("ps -o pid,args | grep -e 'sleep 100000' -e run_tests -e 'x86/run' | grep -v grep",
                           check=False)
    assert left.stdout.strip() == "", left.stdout


# -- opt-in: the real suite ----------------------------------------------------------------

REAL_TESTS = ["vmexit_cpuid", "vmexit_cr0_wp", "smap", "access"]


@pytest.mark.skipif(not os.environ.get("KPATCHTEST_KUT_SOURCE"),
                    reason="set KPATCHTEST_KUT_SOURCE to a kvm-unit-tests checkout or git URL")
def test_real_kvm_unit_tests(kut_lab, kpt_cache, tmp_path: Path):
    """Build the real suite on this machine, deploy it into the lab VM and run vmexit_cpuid,
    vmexit_cr0_wp, smap and access there, nested: the lab kernel is the KVM host (nested
    SVM under TCG), ACCEL=kvm (KPATCHTEST_KUT_ACCEL=tcg runs the L2 guests under TCG).

    Everything is slow two levels down: the per-test TIMEOUT is KPATCHTEST_KUT_TIMEOUT
    seconds (default 600; access does not finish in 900 s here). Every test must end with a verdict,
    access may end as a timeout; the vmexit tests must pass with a cycle count.
    Builds go to KPATCHTEST_KUT_CACHE (default: the session cache's kvm-unit-tests/).
    """
    conn = kut_lab
    cache = Path(os.environ.get("KPATCHTEST_KUT_CACHE") or kpt_cache / "kvm-unit-tests")
    t0 = time.monotonic()
    source = kut_source(os.environ["KPATCHTEST_KUT_SOURCE"], os.environ.get("KPATCHTEST_KUT_REF") or None, cache)
    built = build_kut(source, cache)
    t_build = time.monotonic() - t0
    assert (built / "x86" / "vmexit.flat").is_file() and (built / "x86" / "access_test.flat").is_file()
    head = (built / "build-head").read_text().strip() if (built / "build-head").is_file() else "?"

    accel = os.environ.get("KPATCHTEST_KUT_ACCEL", "kvm")
    per_test = int(os.environ.get("KPATCHTEST_KUT_TIMEOUT", "600"))
    remote = "/root/kvm-unit-tests"
    t0 = time.monotonic()
    deploy_kut(conn, built, remote)
    t_deploy = time.monotonic() - t0
    t0 = time.monotonic()
    records = run_kut(conn, remote, REAL_TESTS, [], {"ACCEL": accel, "TIMEOUT": f"{per_test}s"},
                      len(REAL_TESTS) * (per_test + 60), tmp_path / "logs", log=print)
    t_run = time.monotonic() - t0

    print(f"\nkvm-unit-tests {head} ({built.name}), ACCEL={accel}, TIMEOUT={per_test}s: "
          f"source+build {t_build:.0f} s, deploy {t_deploy:.0f} s, run {t_run:.0f} s")
    for x in records:
        cycles = ", ".join(f"{m.name}={m.values[0]:.0f}" for m in x.metrics if m.values and m.values[0] is not None)
        print(f"  {x.name:15} {x.status:8} {x.duration_s:6.0f} s  {cycles}  {x.detail}")

    r = by_name(records)
    assert set(r) == set(REAL_TESTS)
    for name in ("vmexit_cpuid", "vmexit_cr0_wp"):
        assert r[name].status == "pass", f"{name}: {r[name].detail}"
        (m,) = r[name].metrics
        assert m.name == "cycles" and m.available and m.values[0] and m.values[0] > 0
    assert r["smap"].status in ("pass", "skip"), r["smap"].detail
    assert r["access"].status in ("pass", "fail", "timeout"), r["access"].detail
    assert r["access"].logs[0] == "logs/access.log"
    if r["access"].status == "timeout":
        assert r["access"].detail == f"timeout; duration={per_test}s"
    assert not any(x.detail.startswith("kernel ") for x in records), "a kernel splat during the run"
