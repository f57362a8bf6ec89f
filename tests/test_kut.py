"""kvm-unit-tests: parsers (real output and the stand-in's), runner over a real sshd, build cache.

The "REAL_*" snippets are verbatim output of upstream kvm-unit-tests (master of 2026-06,
b699dc5b) run with QEMU 7.2 TCG on this kind of machine, and one TAP example quoted in
upstream commit 8375379f ("runtime: indicate failure on crash/timeout/abort in TAP").
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.workloads import kut
from kpatchtest.workloads.dmesgwatch import dmesg_delta
from kpatchtest.workloads.kut import (
    KutError,
    build_kut,
    deploy_kut,
    kut_source,
    parse_log,
    parse_plain,
    parse_summary,
    parse_tap,
    parse_vmexit,
    resolve,
    run_kut,
    tap_plan,
    vmexit_metrics,
)
from kpatchtest.workloads.record import Metric, WorkloadRecord

STANDIN = Path(__file__).parent / "kut_standin"
E = "\x1b"

# ./run_tests.sh (plain) with ACCEL=tcg, several runs
REAL_PLAIN = (
    f"{E}[33mSKIP{E}[0m cmpxchg8b (i386 only)\n"
    f"{E}[32mPASS{E}[0m vmexit_cpuid \n"
    f"{E}[32mPASS{E}[0m vmexit_cr0_wp \n"
    f"{E}[32mPASS{E}[0m smap (18 tests)\n"
    f"{E}[31mFAIL{E}[0m emulator \n"
    f"{E}[31mFAIL{E}[0m hypercall (4 tests, 2 unexpected failures)\n"
    f"{E}[31mFAIL{E}[0m msr \n"
    f"{E}[33mSKIP{E}[0m pmu (kvm only, but ACCEL=tcg)\n"
    f"{E}[33mSKIP{E}[0m tsc_adjust (1 tests, 1 skipped)\n"
    f"{E}[31mFAIL{E}[0m access (terminated on SIGSEGV)\n"
    f"{E}[31mFAIL{E}[0m debug (timeout; duration=20s)\n"
    f"{E}[33mSKIP{E}[0m hyperv_synic (qemu-system-x86_64: CPU model 'host' requires KVM or HVF)\n"
)

# ./run_tests.sh -t with ACCEL=tcg TIMEOUT=20s (lines 2-139 of emulator's cut)
REAL_TAP = """\
TAP version 13
ok 1 - emulator: Skipping tests that require forced emulation, use kvm.force_emulation_prefix=1 to enable # skip
ok 2 - emulator: mov reg, r/m (1)
ok 100 - emulator: MOVBE unsupported by CPU # skip
not ok 140 - emulator: mov null, %ss (with ss.rpl != cpl)
not ok 141 - emulator: mov non-null, %ss (with ss.rpl != cpl)
ok 142 - emulator: cmovnel
not ok 146 - emulator: non-canonical rsp-based access, should #SS(0), got #GP(0)
ok 149 - emulator: Wanted CR2 '0xdecafbad', got '0xdecafbad
not ok 150 - emulator: aborted
ok 151 - hypercall: Hypercall via VMCALL: #UD(0)
not ok 152 - hypercall: Hypercall via VMMCALL: #UD(0)
ok 153 - hypercall: VMCALL on edge of canonical address space (Intel)
not ok 154 - hypercall: VMMCALL on edge of canonical address space (AMD)
ok 155 - tsc_adjust: MSR_IA32_TSC_ADJUST feature not enabled # skip
not ok 156 - pcid-enabled: Test on PCID when disabled
ok 157 - pcid-enabled: Test on INVPCID when disabled
1..157
"""

REAL_TAP_2 = """\
TAP version 13
not ok 1 - access: timeout; duration=5s
ok 2 - smap: write to supervisor page
ok 3 - smap: read from user page with AC=1
ok 28 - tsx-ctrl: TSX not available # skip
not ok 29 - svm: terminated on SIGSEGV
1..29
"""

# quoted in upstream commit 8375379f (s390x)
UPSTREAM_COMMIT_TAP = """\
$ ./run_tests.sh -t diag288
TAP version 13
ok 1 - diag288: diag288: privileged: Program interrupt: expected(2) == received(2)
ok 2 - diag288: diag288: specification: uneven: Program interrupt: expected(6) == received(6)
ok 3 - diag288: diag288: specification: unsupported action: Program interrupt: expected(6) == received(6)
ok 4 - diag288: diag288: specification: unsupported function: Program interrupt: expected(6) == received(6)
ok 5 - diag288: diag288: specification: no init: Program interrupt: expected(6) == received(6)
ok 6 - diag288: diag288: specification: min timer: Program interrupt: expected(6) == received(6)
not ok 7 - diag288: timeout; duration=1s
1..7
"""

QEMU_CMD = ("timeout -k 1s --foreground 90s /usr/bin/qemu-system-x86_64 --no-reboot -nodefaults "
            "-global kvm-pit.lost_tick_policy=discard -device pc-testdev -device "
            "isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio -device pci-testdev "
            "-machine accel=tcg -kernel ")

REAL_LOG_VMEXIT_CR0_WP = (
    QEMU_CMD + "x86/vmexit.flat -smp 2 -append toggle_cr0_wp # -initrd /tmp/tmp.a1hqtYhm3S\n"
    "enabling apic\r\nenabling apic\r\nsetup: CPU 1 online\r\nsmp: waiting for 1 APs\r\n"
    "paging enabled\r\ncr0 = 80010011\r\ncr3 = 1045000\r\ncr4 = 20\r\n"
    "pci-testdev at 0x10 membar febff000 iobar c000\r\ntoggle_cr0_wp 38812\r\n\n")

REAL_LOG_HYPERCALL = (
    QEMU_CMD + "x86/hypercall.flat -smp 1 # -initrd /tmp/tmp.EHLxn0E8N7\n"
    "enabling apic\r\nsmp: waiting for 0 APs\r\npaging enabled\r\ncr0 = 80010011\r\n"
    "cr3 = 1042000\r\ncr4 = 20\r\nPASS: Hypercall via VMCALL: #UD(0)\r\n"
    "FAIL: Hypercall via VMMCALL: #UD(0)\r\nKVM hypercall failed, as expected\r\n"
    "PASS: VMCALL on edge of canonical address space (Intel)\r\n"
    "KVM hypercall failed unexpectedly!\r\n"
    "FAIL: VMMCALL on edge of canonical address space (AMD)\r\n"
    "SUMMARY: 4 tests, 2 unexpected failures\r\n\n")

REAL_LOG_TSC_ADJUST = (
    QEMU_CMD + "x86/tsc_adjust.flat -smp 1 -cpu max # -initrd /tmp/tmp.C0xt67Bxo1\n"
    "enabling apic\r\nsmp: waiting for 0 APs\r\n"
    "SKIP: MSR_IA32_TSC_ADJUST feature not enabled\r\nSUMMARY: 1 tests, 1 skipped\r\n\n")

REAL_LOG_PCID = (   # with -t: CRs stripped; QEMU warnings are not errors
    QEMU_CMD + "x86/pcid.flat -smp 1 -cpu qemu64,+pcid,+invpcid # -initrd /tmp/tmp.s2xptjJuKm\n"
    "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.01H:ECX.pcid [bit 17]\n"
    "qemu-system-x86_64: warning: TCG doesn't support requested feature: CPUID.07H:EBX.invpcid [bit 10]\n"
    "enabling apic\nsmp: waiting for 0 APs\nFAIL: Test on PCID when disabled\n"
    "PASS: Test on INVPCID when disabled\nSUMMARY: 2 tests, 1 unexpected failures\n\n")

REAL_LOG_EMULATOR_TAIL = (
    QEMU_CMD + "x86/emulator.flat -smp 1 # -initrd /tmp/tmp.hJl8QZUPi2\n"
    "PASS: Wanted CR2 '0xdecafbad', got '0xdecafbad\n"
    "FAIL: non-canonical rbp-based access, should #SS(0), got #GP(0)\n"
    "PASS: Wanted CR2 '0xdecafbad', got '0xdecafbad\n"
    "Unhandled exception 13 #GP(0) at ip aaaaaaaaaaaaaaaa\n"
    "error_code=0000      rflags=00000006      cs=00000008\n"
    "STACK: @aaaaaaaaaaaaaaaa 4001ad\n\n")

REAL_LOG_MSR = (   # guest reset: no SUMMARY, "FAIL msr "
    QEMU_CMD + "x86/msr.flat -smp 1 -cpu max,vendor=GenuineIntel # -initrd /tmp/tmp.3yOtxEws6p\n"
    "enabling apic\r\nsmp: waiting for 0 APs\r\nPASS: MSR_IA32_SYSENTER_CS\r\n"
    "PASS: MSR_FS_BASE\r\nFAIL: Expected #GP on WRMSR(MSR_FS_BASE, 0xaaaaaaaaaaaaaaaa), got vector 0\r\n"
    "PASS: MSR_GS_BASE\r\n\n")

REAL_LOG_HYPERV_SYNIC = (
    QEMU_CMD + "_NO_FILE_4Uhere_ -smp 2 -cpu host,hv_passthrough "
    "-device hyperv-testdev # -initrd /tmp/tmp.82XlEvWRjb\n"
    "qemu-system-x86_64: CPU model 'host' requires KVM or HVF\n")


# -- parsers on real output ------------------------------------------------------------

def by_name(outcomes):
    return {o.name: o for o in outcomes}


def test_parse_plain_real_output():
    o = by_name(parse_plain(REAL_PLAIN))
    assert [x.name for x in parse_plain(REAL_PLAIN)][:3] == ["cmpxchg8b", "vmexit_cpuid", "vmexit_cr0_wp"]
    assert (o["cmpxchg8b"].status, o["cmpxchg8b"].detail) == ("skip", "i386 only")
    assert (o["vmexit_cr0_wp"].status, o["vmexit_cr0_wp"].detail) == ("pass", "")
    assert (o["smap"].status, o["smap"].counts) == ("pass", {"tests": 18})
    assert o["emulator"].status == "fail" and o["emulator"].detail == ""
    assert o["hypercall"].status == "fail"
    assert o["hypercall"].counts == {"tests": 4, "failures": 2}
    assert (o["tsc_adjust"].status, o["tsc_adjust"].counts) == ("skip", {"tests": 1, "skipped": 1})
    assert o["pmu"].detail == "kvm only, but ACCEL=tcg"
    assert (o["access"].status, o["access"].detail) == ("fail", "QEMU terminated on SIGSEGV")
    assert (o["debug"].status, o["debug"].detail) == ("timeout", "timeout; duration=20s")
    assert o["hyperv_synic"].status == "skip"
    assert o["hyperv_synic"].detail == "qemu-system-x86_64: CPU model 'host' requires KVM or HVF"


def test_parse_plain_ignores_other_lines():
    text = ("TESTNAME=access TIMEOUT=90s MACHINE= ACCEL=tcg ./x86/run x86/access_test.flat -smp 1\n"
            "PASS: not a verdict line\n" + f"{E}[32mPASS{E}[0m access (1 tests)\r\n")
    assert [(o.name, o.status) for o in parse_plain(text)] == [("access", "pass")]


def test_parse_summary():
    assert parse_summary("4 tests, 2 unexpected failures") == {"tests": 4, "failures": 2}
    assert parse_summary("10 tests, 1 unexpected failures, 2 known failures, 3 expected failures, 4 skipped") == {
        "tests": 10, "failures": 1, "known_failures": 2, "expected_failures": 3, "skipped": 4}
    assert parse_summary("timeout; duration=90s") == {}


def test_parse_tap_real_output():
    o = by_name(parse_tap(REAL_TAP))
    assert list(o) == ["emulator", "hypercall", "tsc_adjust", "pcid-enabled"]
    em = o["emulator"]
    assert em.status == "fail"
    assert em.detail.startswith("aborted; mov null, %ss (with ss.rpl != cpl)")
    assert em.counts == {"pass": 3, "fail": 4, "skip": 2, "todo": 0}
    assert o["hypercall"].status == "fail"
    assert "VMMCALL on edge of canonical address space (AMD)" in o["hypercall"].detail
    assert (o["tsc_adjust"].status, o["tsc_adjust"].detail) == ("skip", "MSR_IA32_TSC_ADJUST feature not enabled")
    assert tap_plan(REAL_TAP) == 157

    o = by_name(parse_tap(REAL_TAP_2))
    assert (o["access"].status, o["access"].detail) == ("timeout", "timeout; duration=5s")
    assert o["smap"].status == "pass" and o["smap"].counts["pass"] == 2
    assert o["tsx-ctrl"].status == "skip"
    assert (o["svm"].status, o["svm"].detail) == ("fail", "QEMU terminated on SIGSEGV")


def test_parse_tap_upstream_commit_example():
    (o,) = parse_tap(UPSTREAM_COMMIT_TAP)
    assert (o.name, o.status, o.counts["pass"]) == ("diag288", "timeout", 6)
    assert tap_plan(UPSTREAM_COMMIT_TAP) == 7


def test_parse_tap_generic_forms():
    text = ("TAP version 13\nok 1 - access\nnot ok 2 - vmx (exit 3)\nok 3 - smap # SKIP no SMAP\n"
            "not ok 4 - pku # TODO not yet\n# a comment\n1..4\n")
    o = by_name(parse_tap(text))
    assert o["access"].status == "pass"
    assert o["vmx (exit 3)"].status == "fail"
    assert (o["smap"].status, o["smap"].detail) == ("skip", "no SMAP")
    assert o["pku"].status == "pass" and o["pku"].counts["todo"] == 1
    assert tap_plan("TAP version 13\nok 1 - x: y\n") is None
    assert parse_tap("Bail out! no QEMU")[-1].status == "error"


def test_parse_log_real_logs():
    h = parse_log(REAL_LOG_HYPERCALL)
    assert h.summary == {"tests": 4, "failures": 2}
    assert h.counts["pass"] == 2 and h.counts["fail"] == 2
    assert h.failures == ["Hypercall via VMMCALL: #UD(0)", "VMMCALL on edge of canonical address space (AMD)"]
    assert h.command.startswith("timeout -k 1s") and not h.qemu_errors

    s = parse_log(REAL_LOG_TSC_ADJUST)
    assert s.summary == {"tests": 1, "skipped": 1} and s.skips == ["MSR_IA32_TSC_ADJUST feature not enabled"]

    p = parse_log(REAL_LOG_PCID)
    assert p.qemu_errors == [] and p.summary == {"tests": 2, "failures": 1}

    e = parse_log(REAL_LOG_EMULATOR_TAIL)
    assert e.aborted and e.summary is None and e.counts == {"pass": 2, "fail": 1}

    q = parse_log(REAL_LOG_HYPERV_SYNIC)
    assert q.qemu_errors == ["qemu-system-x86_64: CPU model 'host' requires KVM or HVF"]

    v = parse_log(REAL_LOG_VMEXIT_CR0_WP)
    assert v.vmexit == {"toggle_cr0_wp": 38812} and v.summary is None and v.counts == {}


def test_parse_vmexit_format():
    text = ("cpuid 171\r\nipi 6512\r\n  ipi ipi 4100\r\n  eoi ipi 830\r\nipi_halt (skipped)\r\n"
            "cr0 = 80010011\r\nsmp: waiting for 1 APs\r\npci-mem 1200\r\n")
    assert parse_vmexit(text) == {"cpuid": 171, "ipi": 6512, "ipi:ipi": 4100, "eoi:ipi": 830,
                                  "ipi_halt": None, "pci-mem": 1200}


def test_vmexit_metrics():
    (m,) = vmexit_metrics(parse_log(REAL_LOG_VMEXIT_CR0_WP))
    assert (m.name, m.unit, m.values, m.available) == ("cycles", "cycles", [38812.0], True)
    (m,) = vmexit_metrics(None, note="test timeout")
    assert m.values == [None] and not m.available and m.note == "test timeout"
    ms = vmexit_metrics(parse_log(QEMU_CMD + "x86/vmexit.flat\nipi 6512\n  ipi ipi 4100\n"))
    assert [(x.name, x.values) for x in ms] == [("cycles", [6512.0]), ("ipi_cycles", [4100.0])]


def test_resolve_cross_checks_the_log():
    plain = by_name(parse_plain(REAL_PLAIN))
    r = resolve("msr", plain["msr"], parse_log(REAL_LOG_MSR), tap=False)
    assert r.status == "fail"
    assert "no SUMMARY line" in r.detail and "Expected #GP on WRMSR" in r.detail
    r = resolve("hypercall", plain["hypercall"], parse_log(REAL_LOG_HYPERCALL), tap=False)
    assert r.detail.startswith("4 tests, 2 unexpected failures; Hypercall via VMMCALL")
    # a PASS line that the log contradicts
    fake_pass = parse_plain(f"{E}[32mPASS{E}[0m hypercall (4 tests)\n")[0]
    r = resolve("hypercall", fake_pass, parse_log(REAL_LOG_HYPERCALL), tap=False)
    assert r.status == "fail" and "2 unexpected failures" in r.detail
    # -t: only ok lines, but the guest reset before its SUMMARY
    ok_only = parse_tap("ok 1 - msr: MSR_IA32_SYSENTER_CS\n")[0]
    log = parse_log(REAL_LOG_MSR.replace("FAIL: Expected", "PASS: Expected"))
    assert resolve("msr", ok_only, log, tap=True).status == "fail"
    # -t: tests without TAP lines are judged by their log
    assert resolve("vmexit_cr0_wp", None, parse_log(REAL_LOG_VMEXIT_CR0_WP), tap=True).status == "pass"
    r = resolve("hyperv_synic", None, parse_log(REAL_LOG_HYPERV_SYNIC), tap=True)
    assert (r.status, r.detail) == ("skip", "qemu-system-x86_64: CPU model 'host' requires KVM or HVF")
    assert resolve("pmu", None, None, tap=True).status == "skip"
    assert resolve("pmu", None, None, tap=False).status == "error"


def test_dmesg_delta():
    before = "[1.0] a\n[2.0] b\n"
    assert dmesg_delta(before, before + "[3.0] c\n") == "[3.0] c\n"
    assert dmesg_delta(before, "[2.0] b\n[3.0] c\n") == "[3.0] c\n"          # ring buffer wrapped
    assert dmesg_delta(before, "[9.0] x\n[9.5] y\n") == "[9.0] x\n[9.5] y\n"  # cleared
    assert dmesg_delta("", "[1.0] a\n") == "[1.0] a\n"


def test_record_model_forbids_extra_fields():
    m = Metric(name="cycles", unit="cycles", values=[1.0, None])
    assert m.available and m.note == ""
    r = WorkloadRecord(name="access", status="pass", metrics=[m], group="kvm-unit-tests")
    assert WorkloadRecord.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(Exception):
        WorkloadRecord(name="x", status="pass", bogus=1)
    with pytest.raises(Exception):
        WorkloadRecord(name="x", status="passed")


# -- the stand-in, run directly ----------------------------------------------------------

EXPECTED = {   # test -> (status from the plain output, run_kut's final status)
    "cmpxchg8b": "skip", "vmexit_cpuid": "pass", "vmexit_cr0_wp": "pass", "access": "pass",
    "smap": "pass", "emulator": "fail", "hypercall": "fail", "msr": "fail", "tsc_adjust": "skip",
    "svm": "fail", "debug": "timeout", "hyperv_synic": "skip",
}


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    d = tmp_path / "kut"
    shutil.copytree(STANDIN, d, ignore=shutil.ignore_patterns("logs", "logs.old"))
    return d


def run_standin(d: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("TIMEOUT", "ACCEL", "KUT_STANDIN_SCENARIO")}
    e.update({"ACCEL": "tcg", **env})
    return subprocess.run(["./run_tests.sh", *args], cwd=d, env=e, capture_output=True, text=True, timeout=60)


def test_standin_plain_and_tap(standin: Path):
    p = run_standin(standin)
    assert p.returncode == 0                        # like the real script, whatever happened
    assert {o.name: o.status for o in parse_plain(p.stdout)} == EXPECTED
    assert f"{E}[32mPASS{E}[0m vmexit_cr0_wp \n" in p.stdout
    assert f"{E}[31mFAIL{E}[0m svm (terminated on SIGSEGV)\n" in p.stdout
    assert f"{E}[31mFAIL{E}[0m debug (timeout; duration=2s)\n" in p.stdout
    assert f"{E}[31mFAIL{E}[0m msr \n" in p.stdout
    assert (standin / "logs" / "SUMMARY").read_text() == "BUILD_HEAD=5tand1n0\n"
    log = (standin / "logs" / "vmexit_cr0_wp.log").read_bytes().decode()
    assert log.startswith("timeout -k 1s --foreground 90s /usr/bin/qemu-system-x86_64 --no-reboot")
    assert "-kernel x86/vmexit.flat -smp 2 -append toggle_cr0_wp # -initrd /tmp/tmp." in log
    assert "toggle_cr0_wp 1592\r\n" in log and log.endswith("\r\n\n")
    assert not (standin / "logs" / "cmpxchg8b.log").exists()

    t = run_standin(standin, "-t")
    assert t.returncode == 0 and (standin / "logs.old").is_dir()
    lines = t.stdout.splitlines()
    assert lines[0] == "TAP version 13" and lines[1] == "ok 1 - access: 4-level paging tests"
    assert lines[-1] == f"1..{len(lines) - 2}"
    assert "not ok 28 - emulator: aborted" in lines
    assert "ok 41 - tsc_adjust: MSR_IA32_TSC_ADJUST feature not enabled # skip" in lines
    assert "not ok 46 - svm: terminated on SIGSEGV" in lines
    assert "not ok 49 - debug: timeout; duration=2s" in lines
    assert not any("vmexit" in line or "hyperv_synic" in line for line in lines)
    tap = by_name(parse_tap(t.stdout))
    assert "vmexit_cr0_wp" not in tap and "hyperv_synic" not in tap and "cmpxchg8b" not in tap
    assert tap["msr"].status == "fail" and tap["debug"].status == "timeout"
    assert b"\r" not in (standin / "logs" / "smap.log").read_bytes()


def test_standin_selection_and_scenarios(standin: Path):
    p = run_standin(standin, "-g", "vmexit", KUT_STANDIN_SCENARIO="cycles=2040")
    assert [(o.name, o.status) for o in parse_plain(p.stdout)] == [("vmexit_cpuid", "pass"),
                                                                   ("vmexit_cr0_wp", "pass")]
    assert "toggle_cr0_wp 2040" in (standin / "logs" / "vmexit_cr0_wp.log").read_text()
    p = run_standin(standin, "access", "smap", KUT_STANDIN_SCENARIO="access=fail,smap=crash")
    assert p.stdout == (f"{E}[31mFAIL{E}[0m access (2 tests, 1 unexpected failures)\n"
                        f"{E}[31mFAIL{E}[0m smap (terminated on SIGSEGV)\n")
    p = run_standin(standin, "access", KUT_STANDIN_SCENARIO="access=qemu-error")
    assert p.stdout == f"{E}[31mFAIL{E}[0m access \n"
    assert parse_log((standin / "logs" / "access.log").read_text()).qemu_errors
    p = run_standin(standin, "-l", "-g", "svm")
    assert p.stdout == "svm\n"
    assert run_standin(standin, "--bogus").returncode == 2
    (standin / "config.mak").unlink()
    p = run_standin(standin)
    assert (p.returncode, p.stdout) == (1, "run ./configure && make first. See ./configure -h\n")


# -- runner over a real sshd -------------------------------------------------------------

@pytest.fixture
def lab(sshd, tmp_path: Path):
    conn = HostConnection(sshd.host_spec())
    remote = str(tmp_path / "lab" / "kvm-unit-tests")
    deploy_kut(conn, STANDIN, remote)
    try:
        yield conn, remote
    finally:
        conn.close()


def statuses(records):
    return {r.name: r.status for r in records}


def test_deploy_rewrites_config(lab):
    conn, remote = lab
    cfg = Path(remote, "config.mak").read_text()
    assert f"SRCDIR={remote}\n" in cfg and f"ERRATATXT={remote}/errata.txt\n" in cfg
    assert "PRETTY_PRINT_STACKS=no" in cfg
    assert os.access(Path(remote, "run_tests.sh"), os.X_OK)
    assert not Path(remote, "logs").exists()
    with pytest.raises(KutError):
        deploy_kut(conn, STANDIN, "/tmp")


def test_run_kut_default_set(lab, tmp_path: Path):
    conn, remote = lab
    run_dir = tmp_path / "run"
    logs = run_dir / "kut-logs"
    messages: list[str] = []
    records = run_kut(conn, remote, [], [], {"ACCEL": "tcg"}, 60, logs, log=messages.append,
                      dmesg_argv=["true"])
    assert statuses(records) == EXPECTED
    r = {x.name: x for x in records}
    assert all(x.group == "kvm-unit-tests" for x in records)
    assert r["vmexit_cr0_wp"].metrics == [Metric(name="cycles", unit="cycles", values=[1592.0],
                                                 note="x86/vmexit.c toggle_cr0_wp: TSC cycles per iteration")]
    assert r["vmexit_cr0_wp"].logs == ["kut-logs/vmexit_cr0_wp.log", "kut-logs/run_tests.out"]
    assert (run_dir / r["access"].logs[0]).read_text().count("PASS: 4-level paging tests") == 1
    assert r["access"].metrics == [] and r["access"].detail == "1 tests"
    assert r["cmpxchg8b"].logs == ["kut-logs/run_tests.out"] and r["cmpxchg8b"].detail == "i386 only"
    assert r["hypercall"].detail.startswith("4 tests, 2 unexpected failures; Hypercall via VMMCALL")
    assert r["emulator"].detail.startswith("the test called abort()")
    assert r["msr"].detail.startswith("no SUMMARY line")
    assert r["svm"].detail == "QEMU terminated on SIGSEGV"
    assert r["debug"].detail == "timeout; duration=2s"
    assert r["debug"].duration_s >= 1
    assert (logs / "run_tests.out").read_text().startswith("$ ./run_tests.sh\n")
    assert any("fail 4" in m for m in messages)


def test_run_kut_tap_mode(lab, tmp_path: Path):
    conn, remote = lab
    records = run_kut(conn, remote, [], [], {"ACCEL": "tcg"}, 60, tmp_path / "logs", tap=True,
                      dmesg_argv=["true"])
    got = statuses(records)
    assert got == EXPECTED                  # the same verdicts, from TAP plus the logs
    r = {x.name: x for x in records}
    assert "inferred from the log" in r["vmexit_cr0_wp"].detail
    assert r["vmexit_cr0_wp"].metrics[0].values == [1592.0]
    assert r["cmpxchg8b"].detail == "run_tests.sh skipped it (with -t it does not say why)"
    assert r["hyperv_synic"].detail == "qemu-system-x86_64: CPU model 'host' requires KVM or HVF"


def test_run_kut_groups_tests_union_and_unknown(lab, tmp_path: Path):
    conn, remote = lab
    records = run_kut(conn, remote, ["access", "vmexit_cr0_wp", "nosuchtest"], ["vmexit"],
                      {"ACCEL": "tcg", "KUT_STANDIN_SCENARIO": "cycles=1777"}, 60, tmp_path / "l",
                      dmesg_argv=["true"])
    assert [(r.name, r.status) for r in records] == [
        ("vmexit_cpuid", "pass"), ("vmexit_cr0_wp", "pass"), ("access", "pass"), ("nosuchtest", "error")]
    assert records[1].metrics[0].values == [1777.0]
    assert records[1].logs == ["l/vmexit_cr0_wp.log", "l/run_tests-1.out"]
    assert records[2].logs == ["l/access.log", "l/run_tests-2.out"]
    assert records[3].detail == "no test nosuchtest in unittests.cfg"


def test_run_kut_whole_run_timeout(lab, tmp_path: Path):
    conn, remote = lab
    t0 = time.monotonic()
    records = run_kut(conn, remote, [], [], {"ACCEL": "tcg", "KUT_STANDIN_SCENARIO": "access=hang"},
                      4, tmp_path / "logs", dmesg_argv=["true"])
    assert time.monotonic() - t0 < 4 + kut.KILL_GRACE_S + 8
    got = statuses(records)
    assert got["vmexit_cr0_wp"] == "pass" and got["cmpxchg8b"] == "skip"
    assert got["access"] == "timeout"
    r = {x.name: x for x in records}
    assert r["access"].detail == "run_tests.sh stopped after 4 s while the test was running"
    assert r["access"].logs[0] == "logs/access.log"
    for name in ("smap", "emulator", "hyperv_synic"):
        assert got[name] == "timeout"
        assert r[name].detail == "run_tests.sh stopped after 4 s before the test started"
    # nothing is left running on the host
    ps = subprocess.run(["pgrep", "-f", f"{remote}|sleep 100000"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_run_kut_vmexit_metric_unavailable_when_the_test_dies(lab, tmp_path: Path):
    conn, remote = lab
    (rec,) = run_kut(conn, remote, ["vmexit_cr0_wp"], [], {"KUT_STANDIN_SCENARIO": "vmexit_cr0_wp=crash"},
                     30, tmp_path / "logs", dmesg_argv=["true"])
    assert rec.status == "fail" and rec.detail == "QEMU terminated on SIGSEGV"
    (m,) = rec.metrics
    assert m.values == [None] and not m.available and "SIGSEGV" in m.note


def test_run_kut_splat_fails_the_records(lab, tmp_path: Path):
    conn, remote = lab
    dmesg = tmp_path / "dmesg.txt"
    dmesg.write_text("[    1.000000] Linux version 6.1.192\n")
    records = run_kut(conn, remote, ["cmpxchg8b", "vmexit_cpuid", "smap"], [],
                      {"ACCEL": "tcg", "KUT_STANDIN_SCENARIO": "splat=smap",
                       "KUT_STANDIN_DMESG": str(dmesg)},
                      30, tmp_path / "run" / "logs", dmesg_argv=["cat", str(dmesg)])
    r = {x.name: x for x in records}
    assert r["cmpxchg8b"].status == "skip"
    for name in ("vmexit_cpuid", "smap"):
        assert r[name].status == "fail"
        assert r[name].detail.startswith("kernel warning in dmesg during the run: WARNING: CPU: 1 PID: 2291 "
                                         "at arch/x86/kvm/mmu/tdp_mmu.c:1163")
        assert r[name].logs[-1] == "logs/dmesg-new.txt"
    assert "Linux version" not in (tmp_path / "run" / "logs" / "dmesg-new.txt").read_text()


def test_run_kut_dmesg_unavailable_is_noted(lab, tmp_path: Path):
    conn, remote = lab
    (rec,) = run_kut(conn, remote, ["smap"], [], {}, 30, tmp_path / "logs",
                     dmesg_argv=["sh", "-c", "echo 'dmesg: read kernel buffer failed: Operation not permitted' >&2; exit 1"])
    assert rec.status == "pass"
    assert rec.detail == "18 tests; dmesg unavailable: dmesg: read kernel buffer failed: Operation not permitted"


def test_run_kut_missing_tree_is_an_error(sshd, tmp_path: Path):
    with HostConnection(sshd.host_spec()) as conn:
        records = run_kut(conn, str(tmp_path / "nothing"), ["access"], [], {}, 20, tmp_path / "logs",
                          dmesg_argv=["true"])
    assert [(r.name, r.status) for r in records] == [("access", "error")]
    assert "does not exist" in records[0].detail
    with pytest.raises(ValueError):
        run_kut(conn, "/x/y", ["access; rm -rf /"], [], {}, 5, tmp_path / "logs")


# -- build cache -----------------------------------------------------------------------

def fake_source(d: Path, counter: Path) -> Path:
    d.mkdir()
    (d / "run_tests.sh").write_text("#!/bin/sh\n")
    (d / "configure").write_text("#!/bin/sh\necho 'SRCDIR=/src' > config.mak\n")
    (d / "configure").chmod(0o755)
    (d / "Makefile").write_text(f"all:\n\techo built >> {counter}\n\tmkdir -p x86\n\techo k > x86/t.flat\n")
    return d


def test_build_kut_caches_by_content(tmp_path: Path):
    counter = tmp_path / "builds"
    src = fake_source(tmp_path / "src", counter)
    cache = tmp_path / "cache"
    a = build_kut(src, cache)
    assert (a / "x86" / "t.flat").is_file() and (a / "config.mak").is_file()
    assert build_kut(src, cache) == a and counter.read_text().count("built") == 1
    (src / "x86").mkdir()
    (src / "x86" / "new.c").write_text("int x;\n")
    b = build_kut(src, cache)
    assert b != a and counter.read_text().count("built") == 2
    assert not list(cache.glob(".build-*"))


def test_build_kut_uses_git_head(tmp_path: Path):
    counter = tmp_path / "builds"
    src = fake_source(tmp_path / "src", counter)
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = build_kut(src, tmp_path / "cache")
    assert (out / "build-head").read_text() == head[:8] + "\n"
    assert f'"git:{head}"' in (out / ".kpatchtest-built").read_text()


def test_build_kut_failure(tmp_path: Path):
    src = fake_source(tmp_path / "src", tmp_path / "c")
    (src / "Makefile").write_text("all:\n\t@echo 'x86/foo.c:1: error: boom'; exit 2\n")
    with pytest.raises(KutError) as e:
        build_kut(src, tmp_path / "cache")
    assert "make" in e.value.message and "boom" in (e.value.hint or "")
    with pytest.raises(KutError):
        build_kut(tmp_path, tmp_path / "cache")


# -- source: a local directory or a git URL + ref -----------------------------------------

def git_in(d: Path, *args: str) -> str:
    p = subprocess.run(["git", "-C", str(d), "-c", "user.name=t", "-c", "user.email=t@t",
                        "-c", "init.defaultBranch=master", *args],
                       capture_output=True, text=True, check=True)
    return p.stdout.strip()


@pytest.fixture
def kut_repo(tmp_path: Path) -> Path:
    """A git repository holding the stand-in (plus a trivial configure and Makefile), two commits."""
    d = tmp_path / "origin"
    shutil.copytree(STANDIN, d, ignore=shutil.ignore_patterns("logs", "logs.old"))
    (d / "configure").write_text("#!/bin/sh\nexit 0\n")
    (d / "configure").chmod(0o755)
    (d / "Makefile").write_text("all:\n\t@true\n")
    git_in(d, "init", "-q")
    git_in(d, "add", "-A")
    git_in(d, "commit", "-qm", "first")
    git_in(d, "tag", "v1")
    return d


def test_kut_source_local_directory_as_is(kut_repo: Path, tmp_path: Path):
    (kut_repo / "dirty.txt").write_text("not committed\n")
    assert kut_source(str(kut_repo), None, tmp_path / "cache") == kut_repo.resolve()
    with pytest.raises(KutError) as e:
        kut_source(str(tmp_path / "nothing"), None, tmp_path / "cache")
    assert e.value.message == f"kvm-unit-tests source {tmp_path / 'nothing'} does not exist"
    plain = tmp_path / "plain"
    shutil.copytree(STANDIN, plain)
    assert kut_source(plain, None, tmp_path / "cache") == plain.resolve()
    with pytest.raises(KutError) as e:
        kut_source(plain, "master", tmp_path / "cache")
    assert "is not a git checkout" in e.value.message


def test_kut_source_local_checkout_with_ref(kut_repo: Path, tmp_path: Path):
    first = git_in(kut_repo, "rev-parse", "HEAD")
    (kut_repo / "x86" / "new.flat").write_text("# new\n")
    git_in(kut_repo, "add", "-A")
    git_in(kut_repo, "commit", "-qm", "second")
    cache = tmp_path / "cache"
    tree = kut_source(kut_repo, "v1", cache)
    assert tree == cache / "kut-src" / "trees" / first
    assert (tree / "run_tests.sh").is_file() and not (tree / "x86" / "new.flat").exists()
    assert not (tree / ".git").exists()
    assert os.access(tree / "run_tests.sh", os.X_OK)
    assert json.loads((tree / kut.SOURCE_MARKER).read_text())["commit"] == first
    assert kut_source(kut_repo, first[:10], cache) == tree
    with pytest.raises(KutError) as e:
        kut_source(kut_repo, "no-such-branch", cache)
    assert e.value.message == f"unknown ref no-such-branch in {kut_repo.resolve()}"


def test_kut_source_url_fetch_export_and_build(kut_repo: Path, tmp_path: Path):
    url = kut_repo.as_uri()                                   # file:///...
    cache = tmp_path / "cache"
    first = git_in(kut_repo, "rev-parse", "HEAD")
    messages: list[str] = []
    tree = kut_source(url, None, cache, log=messages.append)  # the remote's HEAD
    assert tree == cache / "kut-src" / "trees" / first
    assert messages == [f"kvm-unit-tests: fetching HEAD from {url}"]
    repos = [p for p in (cache / "kut-src").glob("*.git")]
    assert len(repos) == 1 and subprocess.run(
        ["git", "-C", str(repos[0]), "rev-parse", "--is-bare-repository"],
        capture_output=True, text=True).stdout.strip() == "true"
    # the build goes by the commit: build-head, and one build for one commit
    built = build_kut(tree, tmp_path / "builds")
    assert (built / "build-head").read_text() == first[:8] + "\n"
    assert f'"git:{first}"' in (built / ".kpatchtest-built").read_text()
    assert build_kut(tree, tmp_path / "builds") == built

    # a new commit on the branch: fetched again, exported under its own id
    (kut_repo / "x86" / "new.flat").write_text("# new\n")
    git_in(kut_repo, "add", "-A")
    git_in(kut_repo, "commit", "-qm", "second")
    second = git_in(kut_repo, "rev-parse", "HEAD")
    tree2 = kut_source(url, "master", cache)
    assert tree2.name == second and (tree2 / "x86" / "new.flat").is_file()
    assert kut_source(url, "v1", cache).name == first             # a tag
    assert kut_source(url, second, cache) == tree2                  # a full commit id
    assert kut_source(url, second[:9], cache) == tree2              # an abbreviated one
    # a bare repository given by path is a URL too
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(kut_repo), str(bare)], check=True)
    assert kut_source(str(bare), "master", cache).name == second

    # offline: what was fetched before, without the remote
    shutil.rmtree(kut_repo)
    msgs: list[str] = []
    assert kut_source(url, "master", cache, offline=True, log=msgs.append) == tree2
    assert kut_source(url, first, cache, offline=True) == tree
    assert msgs == [f"kvm-unit-tests: offline, using master = {second[:12]} fetched earlier from {url}"]


def test_kut_source_url_errors(kut_repo: Path, tmp_path: Path):
    url = kut_repo.as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(KutError) as e:
        kut_source(url, "no-such-branch", cache)
    assert e.value.message == f"unknown ref no-such-branch in {url}"
    assert "couldn't find remote ref no-such-branch" in (e.value.hint or "")
    with pytest.raises(KutError) as e:
        kut_source(url, "0123456789abcdef0123456789abcdef01234567", cache)
    assert e.value.message.startswith("unknown ref 0123456789abcdef")
    with pytest.raises(KutError) as e:
        kut_source(url, "deadbeef1", cache)
    assert e.value.message == f"unknown ref deadbeef1 in {url}"

    gone = (tmp_path / "gone.git").as_uri()
    with pytest.raises(KutError) as e:
        kut_source(gone, None, cache)
    assert e.value.message == (f"cannot reach kvm-unit-tests at {gone}: fatal: "
                               f"'{tmp_path / 'gone.git'}' does not appear to be a git repository")
    assert "\n" not in str(e.value)
    assert len(list((cache / "kut-src").glob("*.git"))) == 1     # nothing kept for the bad URL
    with pytest.raises(KutError) as e:
        kut_source("http://127.0.0.1:9/kvm-unit-tests.git", None, cache)
    assert e.value.message.startswith("cannot reach kvm-unit-tests at http://127.0.0.1:9/kvm-unit-tests.git: ")

    # offline with nothing cached: one line and a hint
    with pytest.raises(KutError) as e:
        kut_source(url, None, tmp_path / "empty-cache", offline=True)
    assert e.value.message == f"kvm-unit-tests {url} (HEAD) is not in the cache and the run is offline"
    assert e.value.hint and "\n" not in str(e.value)
    with pytest.raises(KutError):
        kut_source(url, "--upload-pack=touch /tmp/x", cache)


# The opt-in test of the real suite (KPATCHTEST_KUT_SOURCE) runs it inside the local lab VM:
# tests/test_kut_lab.py::test_real_kvm_unit_tests.


def test_kut_source_fetch_that_hangs_is_a_kut_error(tmp_path: Path, monkeypatch):
    """A server that accepts and never answers: git (through gitutil) is killed at the
    fetch timeout and the run gets one line instead of waiting forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/kvm-unit-tests.git"
    monkeypatch.setattr(kut.source, "FETCH_TIMEOUT_S", 2)
    t0 = time.monotonic()
    try:
        with pytest.raises(KutError) as e:
            kut_source(url, "master", tmp_path / "cache")
    finally:
        server.close()
    assert e.value.message == "git fetch gave no answer within 2 s"
    assert time.monotonic() - t0 < 15
