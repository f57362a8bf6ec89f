"""The local lab for real: QEMU (TCG, -cpu qemu64,+svm,+npt here), the lab image's dropbear,
the plain OpenSSH client with strict host key checking, kexec inside the VM, and the QMP
power cycle as a shell command. Boot times are printed (run with -s to see them)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpatchtest.lab.local.image import MARKER, build_image
from kpatchtest.lab.local.qemu import LocalVM, VMConfig, detect_accel
from tests.conftest_lab import SSH, need_image_tools, wait_for_ssh

pytestmark = pytest.mark.slow


def read_cpio(path: Path) -> list[dict]:
    """Entries of a gzip'd newc archive: name, mode, uid, gid, mtime, size, data."""
    raw = gzip.decompress(path.read_bytes())
    out, off = [], 0
    while True:
        assert raw[off:off + 6] == b"070701", f"bad cpio magic at {off}"
        f = [int(raw[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = raw[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = raw[off: off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append(dict(name=name, mode=f[1], uid=f[2], gid=f[3], mtime=f[5], size=filesize, data=data))


# -- the image, no VM ---------------------------------------------------------------------

def test_image_contents_and_reproducible(tmp_path):
    need_image_tools()
    a = build_image(tmp_path / "a")
    assert not a.cached
    again = build_image(tmp_path / "a")
    assert again.cached and again.initramfs == a.initramfs and again.hash == a.hash
    # same keys in another cache dir: the same bytes
    (tmp_path / "b" / "lab").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "lab" / "keys", tmp_path / "b" / "lab" / "keys")
    b = build_image(tmp_path / "b")
    assert not b.cached and b.initramfs != a.initramfs
    assert b.initramfs.read_bytes() == a.initramfs.read_bytes()
    # other keys: another image
    c = build_image(tmp_path / "c")
    assert c.hash != a.hash and c.host_public_key != a.host_public_key

    entries = read_cpio(a.initramfs)
    names = [e["name"] for e in entries]
    assert names == sorted(names)
    assert all(e["uid"] == 0 and e["gid"] == 0 and e["mtime"] == 0 for e in entries)
    by = {e["name"]: e for e in entries}
    for need in ("init", "bin/busybox", "bin/sh", "sbin/init", "usr/sbin/dropbear", "usr/lib/sftp-server",
                 "usr/bin/scp", "usr/sbin/kexec", "usr/bin/flock", "lib64/ld-linux-x86-64.so.2",
                 "lib/x86_64-linux-gnu/libc.so.6", "dev/console", "root/.ssh/authorized_keys",
                 "etc/dropbear/dropbear_ed25519_host_key"):
        assert need in by, need
    assert not any("qemu-system" in n for n in names)
    assert "bin/bash" not in by and by["usr/bin/timeout"]["mode"] & 0o170000 == 0o120000   # busybox's
    init = by["init"]["data"].decode()
    assert "10.0.2.15/24" in init and "-r /etc/dropbear/dropbear_ed25519_host_key" in init and MARKER in init
    assert by["root/.ssh/authorized_keys"]["data"].decode().split()[:2] == \
        Path(str(a.client_key) + ".pub").read_text().split()[:2]
    assert a.host_public_key.startswith("ssh-ed25519 AAAA")
    assert a.known_hosts_line(2222) == f"[127.0.0.1]:2222 {a.host_public_key}"
    print(f"lab image: {a.size / 1e6:.2f} MB gzipped, {len(entries)} entries")
    assert a.size < 8_000_000


def test_nested_image_has_qemu_and_seabios(tmp_path):
    need_image_tools()
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86 not installed")
    t0 = time.monotonic()
    img = build_image(tmp_path, nested=True)
    build_s = time.monotonic() - t0
    entries = {e["name"]: e for e in read_cpio(img.initramfs)}
    names = set(entries)
    for need in ("usr/bin/qemu-system-x86_64", "usr/share/seabios/bios-256k.bin", "usr/share/seabios/bios.bin",
                 "usr/share/qemu/kvmvapic.bin", "usr/share/qemu/linuxboot_dma.bin",
                 "usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
                 # kvm-unit-tests' scripts: bash (and libtinfo), coreutils timeout, getconf
                 "bin/bash", "usr/bin/bash", "lib/x86_64-linux-gnu/libtinfo.so.6", "usr/bin/timeout",
                 "usr/bin/getconf"):
        assert need in names, need
    assert entries["usr/bin/timeout"]["mode"] & 0o170000 == 0o100000      # a file, not busybox's applet
    assert entries["usr/bin/timeout"]["data"] != entries["bin/busybox"]["data"]
    assert b"--foreground" in entries["usr/bin/timeout"]["data"]
    init = entries["init"]["data"].decode()
    assert "ln -sfn /proc/self/fd /dev/fd" in init and "/dev/stderr" in init
    plain = build_image(tmp_path)
    assert plain.hash != img.hash
    # reproducible: the same keys in another cache dir give the same bytes
    (tmp_path / "again" / "lab").mkdir(parents=True)
    shutil.copytree(tmp_path / "lab" / "keys", tmp_path / "again" / "lab" / "keys")
    again = build_image(tmp_path / "again", nested=True)
    assert not again.cached and again.initramfs.read_bytes() == img.initramfs.read_bytes()
    print(f"nested lab image: {img.size / 1e6:.1f} MB gzipped, built in {build_s:.1f} s")
    assert 8_000_000 < img.size < 40_000_000


def test_detect_accel_here_and_override(monkeypatch):
    monkeypatch.setenv("KPATCHTEST_LAB_ACCEL", "kvm")
    assert detect_accel() == "kvm"
    monkeypatch.setenv("KPATCHTEST_LAB_ACCEL", "tcg")
    assert detect_accel() == "tcg"
    monkeypatch.delenv("KPATCHTEST_LAB_ACCEL")
    flags = Path("/proc/cpuinfo").read_text()
    if " vmx" not in flags and " svm" not in flags:
        assert detect_accel() == "tcg"      # e.g. the paravirtual /dev/kvm of the CI machines


def test_tcg_kernel_command_line_sets_the_tsc_rate(monkeypatch, tmp_path):
    """Under TCG the lab kernel's TSC calibration can fail (tsc_khz 0), and then KVM runs
    no nested guest at all: a TCG lab VM boots with tsc_early_khz=<the host's rate>."""
    from kpatchtest.lab.local import qemu
    khz = qemu.host_tsc_khz()
    assert khz is None or khz > 100_000
    monkeypatch.setattr(qemu, "host_tsc_khz", lambda: 2596130)
    assert qemu.tcg_cmdline("console=ttyS0") == "console=ttyS0 tsc_early_khz=2596130"
    assert qemu.tcg_cmdline("a tsc_early_khz=1000 b") == "a tsc_early_khz=1000 b"
    for f in ("k", "i"):
        (tmp_path / f).write_bytes(b"x")
    vm = LocalVM(tmp_path, VMConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", cmdline="console=ttyS0"), 2222)
    vm.accel = "tcg"
    argv = vm.qemu_argv()
    assert argv[argv.index("-append") + 1] == "console=ttyS0 tsc_early_khz=2596130"
    vm.accel = "kvm"
    argv = vm.qemu_argv()
    assert argv[argv.index("-append") + 1] == "console=ttyS0"


def test_initrd_disk_is_named_by_content_and_optional(tmp_path):
    """The initrd rides along as a read-only virtio disk whose serial is its content's
    digest: the booter finds it by that serial, so another file never passes for it."""
    from kpatchtest.lab.ssh.boot import initrd_disk_serial
    kernel, initrd = tmp_path / "k", tmp_path / "dir,with,commas" / "initrd"
    initrd.parent.mkdir()
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"initrd one")
    serial = initrd_disk_serial(initrd)
    assert serial.startswith("kpt") and len(serial) == 20     # virtio-blk serials hold 20 bytes
    argv = LocalVM(tmp_path, VMConfig(kernel=kernel, initrd=initrd), 2222).qemu_argv()
    drive = argv[argv.index("-drive") + 1]
    assert drive == f"file={tmp_path}/dir,,with,,commas/initrd,if=none,id=initrd,format=raw,readonly=on"
    assert f"virtio-blk-pci,drive=initrd,serial={serial}" in argv
    time.sleep(0.01)
    initrd.write_bytes(b"initrd two")
    assert initrd_disk_serial(initrd) != serial                # a changed file is another disk
    off = LocalVM(tmp_path, VMConfig(kernel=kernel, initrd=initrd, initrd_disk=False), 2222).qemu_argv()
    assert "-drive" not in off and not any("virtio-blk" in a for a in off)


# -- the VM ------------------------------------------------------------------------------------

def test_boots_with_ssh_svm_and_nested_paging(local_vm, lab_ssh, lab_kernel):
    print(f"cold start to SSH: {local_vm.cold_boot_s:.1f} s ({local_vm.accel})")
    release = lab_kernel.parent.name
    assert lab_ssh.run("uname -r").stdout.strip() == release
    boot_id = lab_ssh.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    assert len(boot_id) == 36
    assert int(lab_ssh.run("grep -c svm /proc/cpuinfo").stdout.strip()) > 0
    assert lab_ssh.run("test -d /sys/module/kvm_amd && echo yes").stdout.strip() == "yes"
    assert lab_ssh.run("cat /sys/module/kvm/parameters/tdp_mmu").stdout.strip() == "Y"
    console = local_vm.console_text()
    assert "Nested Paging enabled" in console
    assert f"{MARKER}, boot_id {boot_id}, kernel {release}" in console
    # what the boot stage needs on the box: flock, sftp (scp's default protocol), kexec
    assert lab_ssh.run("flock /run/kpt.lock true && echo locked").stdout.strip() == "locked"
    assert "kexec-tools" in lab_ssh.run("kexec --version").stdout


def test_wrong_host_key_is_refused(local_vm, lab_ssh, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{local_vm.ssh_port} {' '.join(other)}\n")
    p = SSH(local_vm.ssh_port, lab_ssh.key, kh).run("true", check=False)
    assert p.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in p.stderr or "Host key verification failed" in p.stderr
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    p = SSH(local_vm.ssh_port, lab_ssh.key, empty).run("true", check=False)
    assert p.returncode == 255 and "Host key verification failed" in p.stderr
    # and a key root does not accept
    p = SSH(local_vm.ssh_port, tmp_path / "other", lab_ssh.known_hosts).run("true", check=False)
    assert p.returncode == 255 and "Permission denied" in p.stderr


def test_console_command_follows_the_serial_console(local_vm, lab_ssh):
    follower = subprocess.Popen(local_vm.console_command(), shell=True, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        lab_ssh.run("echo kpatchtest-console-check-$((6*7)) > /dev/console")
        deadline = time.monotonic() + 20
        seen = ""
        import select
        while time.monotonic() < deadline and "kpatchtest-console-check-42" not in seen:
            r, _, _ = select.select([follower.stdout], [], [], 1)
            if r:
                seen += follower.stdout.readline()
        assert "kpatchtest-console-check-42" in seen
    finally:
        follower.kill()
        follower.wait()


def test_vm_carries_its_initrd_on_a_read_only_disk(local_vm, lab_ssh, lab_image):
    """The guest sees the image as a disk with the content serial, byte for byte (the disk
    is padded to whole sectors), and cannot write to it."""
    from kpatchtest.lab.ssh.boot import initrd_disk_serial
    size = lab_image.initramfs.stat().st_size
    assert lab_ssh.run("cat /sys/block/vda/serial").stdout.strip() == initrd_disk_serial(lab_image.initramfs)
    assert lab_ssh.run("cat /sys/block/vda/ro").stdout.strip() == "1"
    assert int(lab_ssh.run("cat /sys/block/vda/size").stdout) * 512 >= size
    t0 = time.monotonic()
    guest = lab_ssh.run(f"head -c {size} /dev/vda | sha256sum").stdout.split()[0]
    print(f"initrd from the disk: {size / 1e6:.1f} MB read and hashed in the VM in {time.monotonic() - t0:.1f} s")
    assert guest == hashlib.sha256(lab_image.initramfs.read_bytes()).hexdigest()
    assert lab_ssh.run("echo x | dd of=/dev/vda conv=fsync 2>&1", check=False).returncode != 0


def test_kexec_into_uploaded_kernel_brings_ssh_back_with_new_boot_id(local_vm, lab_ssh, lab_kernel, lab_image):
    before = lab_ssh.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    lab_ssh.put(lab_kernel, "/tmp/k")                       # scp: SFTP protocol (sftp-server in the image)
    lab_ssh.put(lab_image.initramfs, "/tmp/i")
    assert lab_ssh.run("cmp /tmp/k /tmp/k && wc -c < /tmp/k").stdout.strip() == str(lab_kernel.stat().st_size)
    lab_ssh.run('kexec -l /tmp/k --initrd=/tmp/i --command-line="$(cat /proc/cmdline) kpatchtest.kexec=1"')
    console_at = local_vm.console_size()
    t0 = time.monotonic()
    lab_ssh.run("setsid sh -c 'sleep 1; kexec -e' </dev/null >/dev/null 2>&1 &", timeout=30)
    after = wait_for_ssh(lab_ssh, not_boot_id=before, vm=local_vm)
    dt = time.monotonic() - t0
    print(f"kexec to SSH: {dt:.1f} s (including the 1 s delay)")
    assert after != before
    assert "kpatchtest.kexec=1" in lab_ssh.run("cat /proc/cmdline").stdout
    assert f"{MARKER}, boot_id {after}" in local_vm.console_text(console_at)
    assert "Nested Paging enabled" in local_vm.console_text(console_at)


def test_power_cycle_command_resets_into_the_known_good_kernel(local_vm, lab_ssh):
    before = wait_for_ssh(lab_ssh, vm=local_vm)
    console_at = local_vm.console_size()
    t0 = time.monotonic()
    p = subprocess.run(local_vm.power_cycle_command(), shell=True, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    after = wait_for_ssh(lab_ssh, not_boot_id=before, vm=local_vm)
    dt = time.monotonic() - t0
    print(f"power cycle (QMP system_reset) to SSH: {dt:.1f} s")
    assert after != before
    assert "kpatchtest.kexec=1" not in lab_ssh.run("cat /proc/cmdline").stdout      # the -kernel/-append again
    assert f"{MARKER}, boot_id {after}" in local_vm.console_text(console_at)
    assert local_vm.console_text().count(MARKER) >= 2          # console.log kept across resets


def test_guest_reboot_stays_inside_the_vm(local_vm, lab_ssh):
    before = wait_for_ssh(lab_ssh, vm=local_vm)
    t0 = time.monotonic()
    lab_ssh.run("setsid sh -c 'sleep 1; reboot -f' </dev/null >/dev/null 2>&1 &", timeout=30)
    after = wait_for_ssh(lab_ssh, not_boot_id=before, vm=local_vm)
    print(f"guest reboot -f to SSH: {time.monotonic() - t0:.1f} s")
    assert after != before and local_vm.running()


def test_start_stop_idempotent_and_qmp_cli(lab_kernel, lab_image, tmp_path):
    long_dir = tmp_path / ("d" * 60) / ("e" * 60)       # longer than a unix socket path may be
    vm = LocalVM(long_dir, VMConfig(kernel=lab_kernel, initrd=lab_image.initramfs))
    vm.start()
    try:
        assert vm.running() and vm.pid and len(str(vm.qmp_socket)) < 108
        assert vm.qmp("query-status")["status"] == "running"
        q = subprocess.run([sys.executable, "-m", "kpatchtest.lab.local.qmp", str(vm.qmp_socket), "query-status"],
                           capture_output=True, text=True)
        assert q.returncode == 0 and '"running"' in q.stdout
        bad = subprocess.run([sys.executable, "-m", "kpatchtest.lab.local.qmp", str(vm.qmp_socket), "no-such-command"],
                             capture_output=True, text=True)
        assert bad.returncode == 1 and "CommandNotFound" in bad.stderr
        sock = vm.qmp_socket
    finally:
        vm.stop()
    vm.stop()
    assert not vm.running()
    gone = subprocess.run([sys.executable, "-m", "kpatchtest.lab.local.qmp", str(sock), "system_reset"],
                          capture_output=True, text=True)
    assert gone.returncode == 2
