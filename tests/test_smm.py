"""The SMM-heavy boot: the boot image, the QEMU command line, exit codes, probes.

The QEMU tests boot for real on this machine: no nesting (`-accel tcg`), q35 with SMM,
Debian's SeaBIOS. QEMU's `-d int` log shows SMM entries ("SMM: enter"), which checks that
the image really is SMM-heavy on AHCI and not on PIIX IDE.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from kpatchtest.workloads import probes as P
from kpatchtest.workloads.bootsector import (
    EXIT_MOVE_ERROR,
    EXIT_NO_EDD,
    EXIT_OK,
    EXIT_READ_ERROR,
    SECTOR,
    boot_sector,
    boot_sector_listing,
    debug_exit_code,
    make_boot_image,
)
from kpatchtest.workloads.smm import (
    RUN_SCRIPT,
    SmmBootRun,
    guest_memory_mb,
    interpret_exit,
    nested_qemu_argv,
    parse_run_output,
    parse_serial,
)
from tests.localrunner import LocalRunner

QEMU = shutil.which("qemu-system-x86_64")
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
need_qemu = pytest.mark.skipif(not QEMU or not SEABIOS.exists(), reason="qemu-system-x86 / seabios not installed")


# --- the boot image -------------------------------------------------------------------

def test_exit_codes():
    assert (EXIT_OK, EXIT_READ_ERROR, EXIT_MOVE_ERROR, EXIT_NO_EDD) == (33, 35, 37, 39)
    assert debug_exit_code(0x10) == (0x10 << 1) | 1


@pytest.mark.parametrize("spread", [0, 16])
def test_boot_sector_shape(spread):
    mbr = boot_sector(200, 8, spread)
    assert len(mbr) == 512 and mbr[510:] == b"\x55\xaa"
    assert mbr[446:510] == b"\0" * 64                      # partition table area untouched
    assert b"\xe6\xf4" in mbr                               # out 0xf4, al
    assert b"\xcd\x13" in mbr                               # int 0x13
    assert (b"\xcd\x15" in mbr) == bool(spread)             # int 0x15 block move only with spread
    assert struct.pack("<H", 200) in mbr                    # the read count
    listing = boot_sector_listing(200, 8, spread)
    assert "int 0x13" in listing and "out 0xf4, al" in listing


def test_image_size_and_sector_labels():
    img = make_boot_image(5, disk_mb=1)
    assert len(img) == 1024 * 1024
    assert img[SECTOR:SECTOR + 15] == b"KPT-LBA" + struct.pack("<Q", 1)
    assert img[100 * SECTOR:100 * SECTOR + 15] == b"KPT-LBA" + struct.pack("<Q", 100)


@pytest.mark.parametrize("kw", [dict(reads=-1), dict(reads=70000), dict(reads=1, sectors_per_read=0),
                                dict(reads=1, sectors_per_read=128), dict(reads=1, spread_mb=-1),
                                dict(reads=1, spread_mb=4, touch_kb_per_read=4)])
def test_bad_parameters(kw):
    with pytest.raises(ValueError):
        make_boot_image(**kw)


# --- the command line and exit codes ---------------------------------------------------

def test_nested_argv():
    argv = nested_qemu_argv("/tmp/smm.img", "kvm", "ahci", 30)
    assert argv[:4] == ["timeout", "-s", "KILL", "30"]     # busybox knows no --signal=
    joined = " ".join(argv)
    for part in ("-accel kvm", "-machine q35,smm=on", "-no-reboot",
                 "-device isa-debug-exit,iobase=0xf4,iosize=0x04",
                 "-drive file=/tmp/smm.img,format=raw,if=none,id=d0", "-device ide-hd,drive=d0,bus=ide.0"):
        assert part in joined
    ide = nested_qemu_argv("/tmp/smm.img", "tcg", "ide")
    assert ide[0] == "qemu-system-x86_64" and "pc,smm=on" in ide
    with pytest.raises(ValueError):
        nested_qemu_argv("/tmp/a,b.img")
    with pytest.raises(ValueError):
        nested_qemu_argv("/tmp/a.img", disk_if="virtio")  # type: ignore[arg-type]
    assert guest_memory_mb(0) == 64 and guest_memory_mb(100) > 101


@pytest.mark.parametrize("code,status", [(33, "pass"), (35, "fail"), (37, "fail"), (39, "fail"),
                                         (137, "timeout"), (124, "timeout"), (-1, "timeout"), (None, "timeout"),
                                         (0, "error"), (1, "error"), (127, "error"), (3, "error"), (2, "error")])
def test_interpret_exit(code, status):
    st, detail = interpret_exit(code)
    assert st == status and detail


# --- real boots under TCG ---------------------------------------------------------------

def _boot(tmp_path: Path, name: str, image: bytes, timeout_s: float, **kw):
    path = tmp_path / f"{name}.img"
    path.write_bytes(image)
    run = SmmBootRun(str(path), timeout_s=timeout_s, accel="tcg", kvm_debugfs=None, **kw)
    r = run.run(LocalRunner())
    print(f"\n{name}: exit {r.exit_code} {r.status} wall {r.wall_s:.2f} s (host clock {r.guest_s} s)")
    return r


def _smm_entries(tmp_path: Path, image: bytes, disk_if: str) -> tuple[int, int]:
    path = tmp_path / f"count-{disk_if}.img"
    path.write_bytes(image)
    log = tmp_path / f"int-{disk_if}.log"
    argv = nested_qemu_argv(str(path), "tcg", disk_if, 60, extra=["-d", "int", "-D", str(log)])
    rc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode
    text = log.read_text(errors="replace")
    return rc, text.count("SMM: enter")


@need_qemu
def test_reads_20_boots_and_exits_ok(tmp_path):
    r = _boot(tmp_path, "reads20", make_boot_image(20), 60)
    assert (r.exit_code, r.status) == (EXIT_OK, "pass"), r
    assert r.wall_s < 60 and r.guest_s is not None


@need_qemu
def test_reads_0_boots_and_exits_ok(tmp_path):
    r = _boot(tmp_path, "reads0", make_boot_image(0), 60)
    assert (r.exit_code, r.status) == (EXIT_OK, "pass"), r


@need_qemu
def test_spread_touches_high_memory_and_exits_ok(tmp_path):
    r = _boot(tmp_path, "spread", make_boot_image(20, 8, 4, touch_kb_per_read=256), 60,
              memory_mb=guest_memory_mb(4))
    assert (r.exit_code, r.status) == (EXIT_OK, "pass"), r


@need_qemu
def test_ahci_reads_enter_smm_ide_reads_do_not(tmp_path):
    # Under TCG the count varies from run to run (SeaBIOS's AHCI polling meets TCG
    # timing): 2 to 6 entries per read, and the boot itself 3 to ~50. Never below
    # 2 per read (enter + RSM twice: the four transitions per read of DESIGN.md).
    img = make_boot_image(20)
    rc, ahci = _smm_entries(tmp_path, img, "ahci")
    rc2, ide = _smm_entries(tmp_path, img, "ide")
    print(f"\nSMM entries: 20 AHCI reads {ahci}, 20 IDE reads {ide}")
    assert rc == rc2 == EXIT_OK
    assert ahci >= 2 * 20
    assert ide < 10


@need_qemu
def test_corrupted_image_times_out(tmp_path):
    img = bytearray(make_boot_image(20))
    img[510:512] = b"\0\0"                # SeaBIOS: "not a bootable disk", then waits 60 s
    r = _boot(tmp_path, "corrupt", bytes(img), 10)
    assert r.status == "timeout" and r.exit_code == 137, r
    assert interpret_exit(r.exit_code)[0] == "timeout"
    assert 9 <= r.wall_s < 30


# --- the run wrapper, with a stand-in for KVM's debugfs -----------------------------------

def test_run_script_samples_kvm_debugfs_while_alive(tmp_path):
    vm = tmp_path / "kvm" / "4242-12"
    vm.mkdir(parents=True)
    (vm / "remote_tlb_flush").write_text("17\n")
    (vm / "exits").write_text("12345\n")
    (vm / "vcpu0").mkdir()
    # a file whose read fails (6.1's mmu_rmaps_stat on a TDP-MMU VM) must not void the
    # sample: /proc/self/mem is a regular file whose read at offset 0 fails, even for root
    (vm / "mmu_rmaps_stat").symlink_to("/proc/self/mem")
    r = LocalRunner().run(["sh", "-c", RUN_SCRIPT, "sh", "10", str(tmp_path / "kvm"), "", "sleep", "0.5"],
                          timeout=30, check=False)
    code, secs, stats = parse_run_output(r.stdout)
    assert code == 0 and secs is not None and secs >= 0.4
    assert stats == {"remote_tlb_flush": 17, "exits": 12345}
    assert interpret_exit(code)[0] == "error"   # QEMU 0 without isa-debug-exit


def test_run_script_reports_timeout_and_no_stats_without_vm(tmp_path):
    (tmp_path / "kvm").mkdir()
    r = LocalRunner().run(["sh", "-c", RUN_SCRIPT, "sh", "1", str(tmp_path / "kvm"), "", "sleep", "20"],
                          timeout=30, check=False)
    code, secs, stats = parse_run_output(r.stdout)
    assert code == 137 and stats == {} and secs is not None and secs < 10


WRITER = r"""
exec > "$1"
printf 'first\n'; sleep 0.3; printf 'se\033[1;1Hcond\r\n'; sleep 0.3; printf 'no newline'
"""


@pytest.mark.parametrize("shell", [s for s in ("sh", "dash", "busybox") if shutil.which(s)])
def test_run_script_timestamps_serial_lines_as_they_arrive(tmp_path, shell):
    """A stand-in for QEMU writes three lines (the last without a newline) to the serial
    FIFO, 0.3 s apart: each comes back once, in order, stamped between t0 and t1 and
    about that far apart; the FIFO is removed."""
    fifo = str(tmp_path / "serial")
    argv = [shell, "sh", "-c", RUN_SCRIPT] if shell == "busybox" else [shell, "-c", RUN_SCRIPT]
    r = LocalRunner().run([*argv, "sh", "10", "", fifo, "sh", "-c", WRITER, "w", fifo], timeout=30, check=False)
    log = parse_serial(r.stdout)
    assert log is not None, r.stdout + r.stderr
    assert [line for _, line in log.lines] == ["first", "se\x1b[1;1Hcond", "no newline"], r.stdout
    times = [t for t, _ in log.lines]
    assert log.t0 <= times[0] <= times[1] <= times[2] <= log.t1
    assert times[2] - times[0] >= 0.4
    assert not Path(fifo).exists()


def test_run_script_serial_fifo_without_writer_does_not_hang(tmp_path):
    """QEMU failing before it opens the serial file must not leave the reader blocked."""
    fifo = str(tmp_path / "serial")
    r = LocalRunner().run(["sh", "-c", RUN_SCRIPT, "sh", "5", "", fifo, "false"], timeout=20, check=False)
    log = parse_serial(r.stdout)
    assert log is not None and log.lines == [] and parse_run_output(r.stdout)[0] == 1


# --- probes ----------------------------------------------------------------------------

SHELLS = [s for s in ("sh", "dash", "busybox") if shutil.which(s)]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("which", ["setup", "collect", "teardown"])
def test_probe_scripts_parse(shell, which):
    text = {"setup": P.setup_script, "collect": P.collect_script, "teardown": P.teardown_script}[which]()
    argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
    p = subprocess.run(argv, input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


TRACE_61 = """\
# tracer: nop
#
# entries-in-buffer/entries-written: 9/9   #P:2
#
#                                _-----=> irqs-off/BH-disabled
#                               / _----=> need-resched
#                              | / _---=> hardirq/softirq
#                              || / _--=> preempt-depth
#                              ||| / _-=> migrate-disable
#                              |||| /     delay
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
       CPU 0/KVM-212     [001] .....    41.204411: kvm_smm_transition: vcpu 0: entering SMM, smbase 0x30000
       CPU 0/KVM-212     [001] d..1.    41.204430: root_lookups: (kvm_mmu_load+0x7f/0x1e0)
       CPU 0/KVM-212     [001] d..1.    41.204440: root_allocs: (kvm_mmu_load+0x7f/0x1e0 <- kvm_tdp_mmu_get_vcpu_root_hpa) hpa=0x2a61000
       CPU 0/KVM-212     [001] .....    41.204501: kvm_smm_transition: vcpu 0: leaving SMM, smbase 0x30000
       CPU 0/KVM-212     [001] d..1.    41.204520: root_lookups: (kvm_mmu_load+0x7f/0x1e0)
       CPU 0/KVM-212     [001] d..1.    41.204530: root_allocs: (kvm_mmu_load+0x7f/0x1e0 <- kvm_tdp_mmu_get_vcpu_root_hpa) hpa=0x2b07000
       CPU 0/KVM-212     [000] .....    41.204611: kvm_smm_transition: vcpu 0: entering SMM, smbase 0x30000
       CPU 0/KVM-212     [000] d..1.    41.204640: root_allocs: (kvm_mmu_load+0x7f/0x1e0 <- kvm_tdp_mmu_get_vcpu_root_hpa) hpa=0x2a61000
          <idle>-0       [000] ..s1.    41.210000: tdp_pages_freed: (rcu_do_batch+0x19b/0x4b0)
"""

TRACE_510 = """\
# tracer: nop
#
#                              _-----=> irqs-off
#                             / _----=> need-resched
#                            | / _---=> hardirq/softirq
#                            || / _--=> preempt-depth
#                            ||| /     delay
#           TASK-PID   CPU#  ||||    TIMESTAMP  FUNCTION
#              | |       |   ||||       |         |
       CPU 0/KVM-188   [000] ....    33.100001: kvm_enter_smm: vcpu 0: entering SMM, smbase 0x30000
       CPU 0/KVM-188   [000] ....    33.100101: root_allocs: (get_tdp_mmu_vcpu_root+0x5a/0xf0) level=4
       CPU 0/KVM-188   [000] ....    33.100201: kvm_enter_smm: vcpu 0: leaving SMM, smbase 0x30000
"""

KPROBE_PROFILE = """\
  root_lookups                                                     811               0
  root_puts                                                        809               0
  tdp_pages_freed                                                   46               0
  other_probe                                                        3               0
"""


def test_count_trace_events_61_and_510():
    counts, distinct = P.count_trace_events(TRACE_61, {"root_allocs": "hpa"})
    assert counts == {"kvm_smm_transition": 3, "root_lookups": 2, "root_allocs": 3, "tdp_pages_freed": 1}
    assert distinct == {"root_allocs": 2}
    counts, _ = P.count_trace_events(TRACE_510)
    assert counts == {"kvm_enter_smm": 2, "root_allocs": 1}


def test_parse_kprobe_profile():
    assert P.parse_kprobe_profile(KPROBE_PROFILE)["root_lookups"] == (811, 0)


SETUP_61 = """\
kpt-tracefs /sys/kernel/tracing
kpt-probe smm_transitions tracepoint kvm:kvm_smm_transition registered kvm:kvm_smm_transition
kpt-probe smm_transitions tracepoint kvm:kvm_enter_smm skipped
kpt-probe root_lookups kprobe kvm_tdp_mmu_get_vcpu_root_hpa registered kvm_tdp_mmu_get_vcpu_root_hpa
kpt-probe root_lookups kprobe kvm_tdp_mmu_alloc_root skipped
kpt-probe root_lookups kprobe mmu_alloc_direct_roots skipped
kpt-probe root_allocs kprobe alloc_tdp_mmu_page missing
kpt-probe root_allocs kprobe tdp_mmu_init_sp missing
kpt-probe root_allocs kretprobe kvm_tdp_mmu_get_vcpu_root_hpa registered kvm_tdp_mmu_get_vcpu_root_hpa
kpt-probe roots_freed kprobe kvm_tdp_mmu_free_root missing
kpt-probe root_puts kprobe kvm_tdp_mmu_put_root registered kvm_tdp_mmu_put_root
kpt-probe tdp_pages_allocated kprobe alloc_tdp_mmu_page missing
kpt-probe tdp_pages_allocated kprobe tdp_mmu_alloc_sp missing
kpt-probe tdp_pages_freed kprobe tdp_mmu_free_sp_rcu_callback registered tdp_mmu_free_sp_rcu_callback.constprop.0
kpt-probe tdp_pages_freed kprobe tdp_mmu_free_sp skipped
kpt-probe fast_zaps tracepoint kvmmmu:kvm_mmu_zap_all_fast registered kvmmmu:kvm_mmu_zap_all_fast
"""


def _collect_out(overrun: int = 0) -> str:
    counts, distinct = P.count_trace_events(TRACE_61, {"root_allocs": "hpa"})
    lines = ["kpt-tracefs /sys/kernel/tracing"]
    lines += [f"kpt-profile {k} {h} {m}" for k, (h, m) in P.parse_kprobe_profile(KPROBE_PROFILE).items()]
    lines += [f"kpt-overrun 0 {overrun}", "kpt-overrun 1 0"]
    lines += [f"kpt-count {k} {v}" for k, v in counts.items()]
    lines += [f"kpt-distinct {k} {v}" for k, v in distinct.items()]
    return "\r\n".join(lines) + "\r\n"     # serial-console style line ends are fine too


def test_read_probes_61():
    r = P.read_probes(SETUP_61, _collect_out())
    counts = {k: v.value for k, v in r.items()}
    assert counts == {"smm_transitions": 3, "root_lookups": 811, "root_allocs": 2, "roots_freed": None,
                      "root_puts": 809, "tdp_pages_allocated": None, "tdp_pages_freed": 46, "fast_zaps": 0}
    assert r["root_lookups"].probe == "kprobe:kvm_tdp_mmu_get_vcpu_root_hpa"
    assert r["tdp_pages_freed"].probe.endswith("(tdp_mmu_free_sp_rcu_callback.constprop.0)")
    assert r["roots_freed"].value is None and "kvm_tdp_mmu_free_root" in r["roots_freed"].note


def test_overrun_makes_trace_counts_unknown_not_low():
    counts = P.probe_counts(SETUP_61, _collect_out(overrun=12))
    assert counts["smm_transitions"] is None and counts["root_allocs"] is None
    assert counts["root_lookups"] == 811            # kprobe_profile does not depend on the buffer


def test_kernel_without_tracing_gives_none_everywhere():
    setup = "kpt-tracefs none\n" + "".join(
        f"kpt-probe {m.metric} {c.kind} {c.target} missing\n" for m in P.PROBES for c in m.candidates)
    counts = P.probe_counts(setup, "kpt-tracefs none\n")
    assert set(counts) == {m.metric for m in P.PROBES}
    assert all(v is None for v in counts.values())


def _fake_tracefs(root: Path) -> Path:
    """A directory shaped like tracefs: registering a kprobe 'works' when its
    events/kpt/<metric> directory exists, as if the kernel had created it."""
    t = root / "tracing"
    for d in ("events/kvm/kvm_smm_transition", "events/kpt/root_lookups", "events/kpt/root_allocs",
              "events/kpt/root_puts", "events/kpt/tdp_pages_freed", "per_cpu/cpu0", "per_cpu/cpu1"):
        (t / d).mkdir(parents=True)
    for f in ("trace", "kprobe_events", "tracing_on", "events/kvm/kvm_smm_transition/enable"):
        (t / f).write_text("")
    (t / "buffer_size_kb").write_text("1408 (expanded: 1408)\n")
    for c in ("cpu0", "cpu1"):
        (t / "per_cpu" / c / "stats").write_text("entries: 9\noverrun: 0\ncommit overrun: 0\n")
    return t


@pytest.mark.parametrize("which", ["setup", "collect", "teardown"])
def test_scripts_never_fall_back_to_the_real_tracefs(tmp_path, which):
    """KPT_TRACEFS naming a directory that is not a tracefs: the scripts must report
    none and touch nothing, rather than find /sys/kernel/tracing of this machine."""
    empty = tmp_path / "not-tracefs"
    empty.mkdir()
    text = {"setup": P.setup_script, "collect": P.collect_script, "teardown": P.teardown_script}[which]()
    env = dict(os.environ, KPT_TRACEFS=str(empty), TMPDIR=str(tmp_path))
    p = subprocess.run(["sh", "-c", text], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    if which != "teardown":
        assert "kpt-tracefs none" in p.stdout
    assert "registered" not in p.stdout
    assert list(empty.iterdir()) == []


def _run_guarded(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    assert Path(env["KPT_TRACEFS"], "trace").is_file()     # else the script would look elsewhere
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def _setup_on_fake(tmp_path, t, shell, kallsyms_text):
    """setup_script() in `shell` against the fake tracefs `t` and this kallsyms text."""
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(kallsyms_text)
    env = dict(os.environ, KPT_TRACEFS=str(t), KPT_KALLSYMS=str(kallsyms), TMPDIR=str(tmp_path))
    sh = [shell, "sh"] if shell == "busybox" else [shell]
    setup = _run_guarded(sh + ["-c", P.setup_script(4096)], env)
    assert setup.returncode == 0, setup.stderr
    return env, sh, setup, {(s.metric, s.target): s.status for s in P.parse_setup(setup.stdout)}


@pytest.mark.parametrize("shell", [s for s in ("dash", "busybox") if shutil.which(s)])
def test_scripts_against_a_fake_tracefs(tmp_path, shell):
    t = _fake_tracefs(tmp_path)
    env, sh, setup, states = _setup_on_fake(tmp_path, t, shell,
                                            "ffffffff81a00000 t tdp_mmu_free_sp_rcu_callback.constprop.0\n"
                                            "ffffffff81a00100 T kvm_tdp_mmu_put_root\n"
                                            "ffffffff81a00200 T kvm_tdp_mmu_get_vcpu_root_hpa\n"
                                            "ffffffff81a00300 T kvm_tdp_mmu_map\n")
    assert states[("smm_transitions", "kvm:kvm_smm_transition")] == "registered"
    assert states[("smm_transitions", "kvm:kvm_enter_smm")] == "skipped"
    assert states[("roots_freed", "kvm_tdp_mmu_free_root")] == "missing"
    assert states[("fast_zaps", "kvmmmu:kvm_mmu_zap_all_fast")] == "missing"
    events = (t / "kprobe_events").read_text()
    # root allocations on 5.10: alloc_tdp_mmu_page called from the root lookup only
    assert "p:kpt/root_allocs alloc_tdp_mmu_page caller=$stack0:x64" in events
    assert "-:kpt/roots_freed" in events                      # a probe that did not take is removed
    assert ((t / "events/kpt/root_allocs/filter").read_text().strip()
            == "(caller >= 0xffffffff81a00200 && caller < 0xffffffff81a00300)")
    assert (t / "events/kvm/kvm_smm_transition/enable").read_text().strip() == "1"
    assert (t / "buffer_size_kb").read_text().strip() == "4096"
    assert (t / "tracing_on").read_text().strip() == "1"

    # the boot happened: the kernel filled trace and kprobe_profile
    (t / "trace").write_text(TRACE_61)
    (t / "kprobe_profile").write_text(KPROBE_PROFILE)
    collect = _run_guarded(sh + ["-c", P.collect_script()], env)
    assert collect.returncode == 0, collect.stderr
    col = P.parse_collect(collect.stdout)
    assert col.profile == {"root_lookups": (811, 0), "root_puts": (809, 0), "tdp_pages_freed": (46, 0)}
    assert col.counts["kvm_smm_transition"] == 3 and col.distinct == {"root_allocs": 2}
    assert col.overrun == {"0": 0, "1": 0}
    counts = P.probe_counts(setup.stdout, collect.stdout)
    assert counts["smm_transitions"] == 3 and counts["root_lookups"] == 811
    # the fake "took" the first root_allocs candidate (alloc_tdp_mmu_page, filtered, so
    # counted from trace lines): the three root_allocs lines of TRACE_61
    assert counts["root_allocs"] == 3
    assert counts["roots_freed"] is None
    # teardown: probes removed, tracing off, buffer size restored
    assert (t / "tracing_on").read_text().strip() == "0"
    assert (t / "buffer_size_kb").read_text().strip() == "1408"
    assert "-:kpt/root_lookups" in (t / "kprobe_events").read_text()


@pytest.mark.parametrize("shell", [s for s in ("dash", "busybox") if shutil.which(s)])
def test_caller_filter_ranges_and_missing_callers(tmp_path, shell):
    """`callers`: ranges from kallsyms (clones and .cold parts included, up to the next text
    symbol, module symbols too); with none of the callers in kallsyms the candidate does
    not take and the next one is tried."""
    t = _fake_tracefs(tmp_path)
    (t / "events/kpt/tdp_pages_freed").mkdir(exist_ok=True)
    env, sh, setup, states = _setup_on_fake(tmp_path, t, shell, "ffffffff81000000 T _stext\n"
                                            "ffffffff81055100 t __handle_changed_spte.constprop.0\n"
                                            "ffffffff81055200 d some_data\n"
                                            "ffffffff81055400 t zap_gfn_range\n"
                                            "ffffffff810560b7 T kvm_tdp_mmu_free_root\n"
                                            "ffffffff81056136 t tdp_mmu_put_root\n"
                                            "ffffffffa0001000 t kvm_tdp_mmu_free_root.cold\t[kvm]\n"
                                            "ffffffffa0001040 t other_cold\t[kvm]\n")
    # no kvm_tdp_mmu_get_vcpu_root_hpa / get_tdp_mmu_vcpu_root: the 5.10 root candidate
    # does not take, the next one (tdp_mmu_init_sp, filtered on sptep) does
    assert states[("root_allocs", "alloc_tdp_mmu_page")] == "missing"
    assert states[("root_allocs", "tdp_mmu_init_sp")] == "registered"
    assert (t / "events/kpt/root_allocs/filter").read_text().strip() == "sptep == 0"
    # tdp_pages_freed: the fake registers whatever is tried first; to reach the 5.10
    # candidate (free_pages from the functions that free TDP pages), skip the 6.x ones
    script = re.sub(r"kpt_try tdp_pages_freed kprobe tdp_mmu_free_sp\S* [^&]*&&", "false &&",
                    P.setup_script(4096))
    assert script.count("false &&") == 2
    setup = _run_guarded(sh + ["-c", script], env)
    assert setup.returncode == 0, setup.stderr
    states = {(s.metric, s.target): s.status for s in P.parse_setup(setup.stdout)}
    assert states[("tdp_pages_freed", "free_pages")] == "registered"
    filt = (t / "events/kpt/tdp_pages_freed/filter").read_text().strip()
    parts = sorted(filt.split(" || "))
    assert parts == ["(caller >= 0xffffffff81055100 && caller < 0xffffffff81055400)",
                     "(caller >= 0xffffffff810560b7 && caller < 0xffffffff81056136)",
                     "(caller >= 0xffffffffa0001000 && caller < 0xffffffffa0001040)"]
    assert "p:kpt/tdp_pages_freed free_pages caller=$stack0:x64" in (t / "kprobe_events").read_text()


def test_hot_probes_only_on_request():
    """_raw_spin_lock (6.x roots freed) is tried only with hot=True: the pipeline's
    probed boots must not pay for it."""
    hot = [(m.metric, c.target) for m in P.PROBES for c in m.candidates if c.hot]
    assert ("roots_freed", "_raw_spin_lock") in hot
    assert "kpt_try roots_freed kprobe _raw_spin_lock" not in P.setup_script()
    assert "echo 'kpt-probe roots_freed kprobe _raw_spin_lock skipped'" in P.setup_script()
    assert "kpt_try roots_freed kprobe _raw_spin_lock" in P.setup_script(hot=True)
    setup = SETUP_61.replace("kpt-probe roots_freed kprobe kvm_tdp_mmu_free_root missing\n",
                             "kpt-probe roots_freed kprobe kvm_tdp_mmu_free_root missing\n"
                             "kpt-probe roots_freed kprobe _raw_spin_lock skipped\n")
    r = P.read_probes(setup, _collect_out())["roots_freed"]
    assert r.value is None and "_raw_spin_lock (hot probe, off)" in r.note


def test_missed_hits_of_a_trace_counted_kprobe_are_noted():
    setup = SETUP_61.replace("kpt-probe roots_freed kprobe kvm_tdp_mmu_free_root missing\n",
                             "kpt-probe roots_freed kprobe kvm_tdp_mmu_free_root missing\n"
                             "kpt-probe roots_freed kprobe _raw_spin_lock registered _raw_spin_lock\n")
    collect = _collect_out() + "kpt-profile roots_freed 18619 54\nkpt-count roots_freed 7\n"
    r = P.read_probes(setup, collect)["roots_freed"]
    assert r.value == 7 and "54 missed hits of 18673" in r.note
    assert r.probe == "kprobe:_raw_spin_lock from kvm_tdp_mmu_put_root"


def test_callers_need_a_filtered_kprobe_counted_from_trace():
    bad = P.MetricProbes("x", "calls", "", (P.Candidate("kprobe", "f", callers=("g",)),))
    with pytest.raises(ValueError):
        P._validate((bad,))
    ok = P.MetricProbes("x", "calls", "", (P.Candidate("kprobe", "f", callers=("g",), count="trace"),))
    P._validate((ok,))


# --- the probe table against the Debian sources (slow: decompresses the tarballs) ---------

SOURCES = {"6.1": Path("/usr/src/linux-source-6.1.tar.xz"), "6.12": Path("/usr/src/linux-source-6.12.tar.xz")}
_WANTED = re.compile(r"[^/]+/(arch/x86/kvm/(mmu/[^/]+\.[ch]|trace\.h))$")


def _kvm_sources(tarball: Path) -> dict[str, str]:
    out = {}
    with tarfile.open(tarball) as tf:
        for m in tf:
            mm = _WANTED.match(m.name)
            if mm and m.isfile():
                out[mm[1]] = tf.extractfile(m).read().decode(errors="replace")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(SOURCES))
def test_probe_table_matches_debian_sources(version):
    if not SOURCES[version].exists():
        pytest.skip(f"{SOURCES[version]} not installed")
    src = _kvm_sources(SOURCES[version])
    c_files = "\n".join(v for k, v in src.items() if k.endswith(".c"))
    headers = "\n".join(v for k, v in src.items() if k.endswith(".h"))
    for m in P.PROBES:
        for c in m.candidates:
            if version not in c.versions.split():
                continue
            if c.kind == "tracepoint":
                assert re.search(rf"TRACE_EVENT\(\s*{c.target.split(':')[1]}\b", headers), c.label
                continue
            if c.callers:       # a core kernel function, counted when called from KVM's
                assert any(re.search(rf"^(static\s+)?[\w \*]*\b{f}\(", c_files, re.M) for f in c.callers), \
                    f"{c.label}: no caller defined in {version}"
                continue
            d = re.search(rf"^(static\s+)?[\w \*]*\b{c.target}\(", c_files, re.M)
            assert d, f"{c.label} not defined in {version}"
            assert bool(d[1]) == c.static, f"{c.label}: static is {bool(d[1])} in {version}"
