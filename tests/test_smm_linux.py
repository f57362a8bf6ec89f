"""The Linux SMM-boot guest (issue 13): GRUB on SeaBIOS loads the lab's own bzImage and a
tiny initramfs whose init writes the pass code to isa-debug-exit.

Fast: the image (MBR, GRUB core.img, the FAT files read back with mtools), the initramfs
(listed by the real cpio tool), the spec rules, the phase parser, and one real boot of
the image under TCG on this machine through the run wrapper's timestamped console.
Slow (the local lab, nested): the guest on the lab kernel as the KVM host, with probes,
and a guest whose kernel GRUB cannot load, which ends as a timeout in the bootloader phase.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kpatchtest.errors import InputError
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.spec import SmmBootSpec, load_spec
from kpatchtest.workloads import linux_guest as LG
from kpatchtest.workloads.bootsector import EXIT_OK
from kpatchtest.workloads.smm_boot import boot_run, image_for, run_smm_boot
from tests.conftest_lab import metric
from tests.localrunner import LocalRunner

LAB_KERNELS = Path.home() / ".cache" / "kpatchtest" / "lab" / "kernels"
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
need_tools = pytest.mark.skipif(not (shutil.which("grub-mkimage") and shutil.which("mdir")
                                     and (LG.GRUB_DIR / "boot.img").exists()),
                                reason="grub-pc-bin / mtools not installed (apt-get install grub-pc-bin mtools)")


@pytest.fixture(scope="module")
def some_bzimage(tmp_path_factory) -> Path:
    """A real bzImage for the fast tests: a lab kernel already in the cache, else the
    running system's, else skip (the slow tests use the lab_kernel fixture)."""
    found = sorted(LAB_KERNELS.glob("*/bzImage")) + sorted(Path("/boot").glob("vmlinuz-*"))
    for p in found:
        try:
            if p.read_bytes()[0x202:0x206] == b"HdrS":
                return p
        except OSError:
            continue
    pytest.skip("no bzImage in the lab kernel cache or /boot")


def mtools(*argv: str, image: Path) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([argv[0], "-i", f"{image}@@{LG.PART_START * 512}", *argv[1:]], capture_output=True,
                          text=True, env={**os.environ, **MTOOLS_ENV}, check=True)


# --- the image --------------------------------------------------------------------------

@need_tools
def test_image_is_bootable_mbr_with_grub_and_the_files(some_bzimage, tmp_path):
    img = LG.build_image(some_bzimage, tmp_path / "g.img", "hello")
    data = img.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[:440] == (LG.GRUB_DIR / "boot.img").read_bytes()[:440]      # GRUB's boot code
    entry = data[446:462]
    assert entry[4] == 0x0E and int.from_bytes(entry[8:12], "little") == LG.PART_START
    assert int.from_bytes(entry[12:16], "little") * 512 + LG.PART_START * 512 == len(data)
    assert data[512:512 + 0x100] == (LG.GRUB_DIR / "diskboot.img").read_bytes()[:0x100]   # core.img at LBA 1
    listing = mtools("mdir", "-b", "::", image=img).stdout.split()
    assert sorted(listing) == ["::/initrd", "::/vmlinuz"], listing
    mtools("mcopy", "::/vmlinuz", str(tmp_path / "back"), image=img)
    assert (tmp_path / "back").read_bytes() == some_bzimage.read_bytes()
    # small: the kernel, a 1 KiB initramfs, GRUB and a little FAT slack
    assert len(data) < some_bzimage.stat().st_size + 3 * 1024 * 1024


@need_tools
def test_image_is_reproducible_and_cached_by_content(some_bzimage, tmp_path):
    a = LG.cached_image(some_bzimage, tmp_path / "c")
    assert LG.build_image(some_bzimage, tmp_path / "again.img").read_bytes() == a.path.read_bytes()
    assert LG.cached_image(some_bzimage, tmp_path / "c").path == a.path
    assert LG.cached_image(some_bzimage, tmp_path / "c", "another line").key != a.key
    other = tmp_path / "other-bz"
    other.write_bytes(some_bzimage.read_bytes() + b"\0")
    assert LG.cached_image(other, tmp_path / "c").key != a.key


@pytest.mark.skipif(not shutil.which("cpio"), reason="cpio not installed")
def test_initramfs_has_console_port_and_init(tmp_path):
    arc = tmp_path / "initrd"
    arc.write_bytes(LG.initramfs("one line"))
    p = subprocess.run(["cpio", "-itv", "--quiet", "-F", str(arc)], capture_output=True, text=True, check=True)
    rows = {line.split()[-1]: line.split() for line in p.stdout.splitlines()}
    assert set(rows) == {"dev", "dev/console", "dev/port", "init"}, p.stdout
    assert rows["dev/console"][0].startswith("c") and rows["dev/console"][4:6] == ["5,", "1"]
    assert rows["dev/port"][0].startswith("c") and rows["dev/port"][4:6] == ["1,", "4"]
    assert rows["init"][0] == "-rwxr-xr-x"
    elf = LG.init_elf("one line")
    assert elf[:4] == b"\x7fELF" and b"kpt-init: one line\n" in elf and b"/dev/port\0" in elf
    if shutil.which("readelf"):
        (tmp_path / "init").write_bytes(elf)
        h = subprocess.run(["readelf", "-hl", str(tmp_path / "init")], capture_output=True, text=True, check=True).stdout
        assert "EXEC" in h and "X86-64" in h and "LOAD" in h, h


def test_init_message_must_be_one_line():
    with pytest.raises(InputError, match="one line"):
        LG.init_elf("two\nlines")


# --- the spec -----------------------------------------------------------------------------

SPEC = """name: t
kernel: {{repo: /tmp/linux, branches: [linux-6.1.y]}}
series: [{{msgid: abc@example.org}}]
workloads:
  smm_boot: {smm}
"""


@pytest.mark.parametrize("smm,message", [
    ("{guest: linux, reads: 400}", "reads: only for guest bootsector, not guest linux"),
    ("{guest: linux, spread_mb: 4, sectors_per_read: 2}", "sectors_per_read, spread_mb: only for guest bootsector"),
    ("{kernel: /boot/vmlinuz}", "kernel: only for guest linux, not guest bootsector"),
    ("{init_message: hi}", "init_message: only for guest linux"),
    ("{guest: windows}", "workloads.smm_boot.guest"),
])
def test_spec_rejects_fields_of_the_other_guest_in_one_line(tmp_path, smm, message):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.format(smm=smm))
    with pytest.raises(InputError) as e:
        load_spec(path)
    text = str(e.value)
    assert message in text and "\n" not in text.strip(), text


def test_spec_linux_guest_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.format(smm="{guest: linux, timeout_s: 300}"))
    s = load_spec(path).spec.workloads.smm_boot
    assert (s.guest, s.kernel, s.timeout_s) == ("linux", None, 300)
    assert SmmBootSpec().guest == "bootsector"


def test_linux_guest_without_a_kernel_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no kernel"):
        image_for(SmmBootSpec(guest="linux"), tmp_path)
    (tmp_path / "notbz").write_bytes(b"\0" * 4096)
    with pytest.raises(InputError, match="not a bzImage"):
        image_for(SmmBootSpec(guest="linux", kernel=str(tmp_path / "notbz")), tmp_path)


# --- phases -------------------------------------------------------------------------------

GOOD_CONSOLE = [(11.0, "\x1b[H\x1b[J\x1b[1;1Hkpt-grub: start"), (12.5, "\rkpt-grub: boot"),
                (20.0, "Linux version 6.1.192"), (21.0, "Command line: ..."),
                (30.0, "kpt-init: init reached\r")]


def test_phases_of_a_boot_that_reached_init():
    ph = LG.phases(10.0, 31.0, GOOD_CONSOLE)
    assert ph.reached == "init"
    assert ph.durations() == {"firmware": 1.0, "bootloader": 1.5, "decompress": 7.5, "kernel": 10.0, "init": 1.0}


def test_phases_of_grub_that_could_not_load_the_kernel():
    """GRUB's errors and rescue prompt after its `boot` line are GRUB's, not the kernel's."""
    lines = [(11.0, "kpt-grub: start"), (12.0, "error: invalid magic number."), (12.1, "kpt-grub: boot"),
             (12.2, "error: you need to load the kernel first."), (12.3, "Entering rescue mode..."),
             (12.4, "grub rescue> "), (12.5, "grub>")]
    ph = LG.phases(10.0, 60.0, lines)
    assert ph.reached == "bootloader"   # its `linux` failed: the `boot` line does not start the kernel
    d = ph.durations()
    assert d["firmware"] == 1.0 and d["bootloader"] is None and d["kernel"] is None and d["init"] is None
    no_error = [x for x in lines if not x[1].startswith("error: invalid")]
    assert LG.phases(10.0, 60.0, no_error[:2]).reached == "decompress"   # GRUB booted, the kernel said nothing
    assert LG.phases(10.0, 60.0, []).reached == "firmware"
    assert LG.phases(10.0, 60.0, []).durations()["firmware"] is None


# --- one real boot under TCG on this machine --------------------------------------------------

need_qemu = pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86 not installed")


@need_tools
@need_qemu
def test_linux_guest_boots_under_tcg_with_ordered_phases(some_bzimage, tmp_path):
    """The whole chain on this machine (no lab): SeaBIOS -> GRUB -> the kernel -> init ->
    isa-debug-exit, the console timestamped by the run wrapper into five ordered phases."""
    img = LG.build_image(some_bzimage, tmp_path / "g.img", "tcg says hi")
    spec = SmmBootSpec(guest="linux", timeout_s=240)
    run = boot_run(spec, str(img))
    run.accel, run.kvm_debugfs, run.serial_path = "tcg", None, str(tmp_path / "serial")
    t0 = time.monotonic()
    r = run.run(LocalRunner())
    print(f"\nlinux guest under TCG: {r.status} in {time.monotonic() - t0:.1f} s")
    assert (r.status, r.exit_code) == ("pass", EXIT_OK), (r.detail, r.stdout[-2000:], r.stderr[-500:])
    assert r.serial is not None
    assert any(line.endswith("kpt-init: tcg says hi") for _, line in r.serial.lines), r.serial.lines
    ph = LG.phases(r.serial.t0, r.serial.t1, r.serial.lines)
    assert ph.reached == "init", r.serial.lines
    starts = [ph.starts[p] for p in LG.PHASES]
    assert starts == sorted(starts) and starts[-1] <= r.serial.t1
    assert all(v is not None and v >= 0 for v in ph.durations().values()), ph


# --- the local lab (nested: the lab kernel is the KVM host) --------------------------------------

@need_tools
@pytest.mark.slow
def test_linux_guest_in_the_lab_reports_phases_and_roots(traced_host, trace_kernel, tmp_path):
    """The lab kernel boots itself as the L2 guest: pass (exit 33), five phases present
    and positive, SMM transitions and TDP MMU roots counted over the whole boot."""
    bz, _ = trace_kernel
    spec = SmmBootSpec(guest="linux", timeout_s=400)
    image = image_for(spec, tmp_path, bz)
    t0 = time.monotonic()
    with HostConnection(traced_host) as conn:
        conn.open()
        record, probes = run_smm_boot(conn, spec, image, 1, tmp_path / "out", tmp_path, log=print)
    print(f"linux guest in the lab: {record.status} in {time.monotonic() - t0:.1f} s")
    assert record.status == "pass", record.detail
    log = (tmp_path / record.logs[0]).read_text()
    assert f"exit {EXIT_OK}" in log and "kpt-init: init reached" in log
    for ph in LG.PHASES:
        m = metric(record, f"phase.{ph}")
        assert m.available and len(m.values) == 1 and m.values[0] > 0, m
    assert sum(metric(record, f"phase.{p}").values[0] for p in LG.PHASES) == pytest.approx(
        metric(record, "guest_time").values[0], abs=0.1)
    smm = metric(record, "smm_transitions")
    assert smm.available and smm.values[0] >= 100, smm    # GRUB's int 13h reads of ~3 MB on AHCI
    allocs = metric(record, "root_allocs")
    assert allocs.available and 1 <= allocs.values[0] < smm.values[0] / 10, allocs   # 6.1 keeps its roots
    assert probes["smm_transitions"].startswith("tracepoint:kvm:kvm_smm_transition")


@need_tools
@pytest.mark.slow
def test_guest_whose_kernel_grub_cannot_load_times_out_in_the_bootloader(traced_host, trace_kernel, tmp_path):
    """The kernel file on the image is garbage: GRUB reports it and sits at its rescue
    prompt until the limit. Ends as timeout, the detail names the phase; with the probes
    off their metrics are unavailable (None), never 0."""
    bz, _ = trace_kernel
    spec = SmmBootSpec(guest="linux", timeout_s=60, probes=False)
    image = image_for(spec, tmp_path, bz)
    bad = tmp_path / "bad.img"
    shutil.copy(image, bad)
    (tmp_path / "garbage").write_bytes(b"\xde\xad" * 4096)
    mtools("mcopy", "-o", str(tmp_path / "garbage"), "::/vmlinuz", image=bad)
    t0 = time.monotonic()
    with HostConnection(traced_host) as conn:
        conn.open()
        record, probes = run_smm_boot(conn, spec, bad, 2, tmp_path / "out", tmp_path, log=print)
    elapsed = time.monotonic() - t0
    print(f"corrupted linux guest in the lab: {record.status} in {elapsed:.1f} s: {record.detail}")
    assert record.status == "timeout", record.detail
    assert "reached the bootloader phase" in record.detail
    assert re.search(r"last console line: '(grub( rescue)?>|error:)", record.detail), record.detail   # GRUB's prompt
    assert "1 of 2 repetitions ran" in record.detail
    assert metric(record, "phase.firmware").values[0] > 0
    assert metric(record, "phase.kernel").values == [None] and not metric(record, "phase.init").available
    for name in ("smm_transitions", "root_allocs"):
        assert metric(record, name).values == [None] and not metric(record, name).available
        assert probes[name].startswith("unavailable")
