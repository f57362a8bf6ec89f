"""Deploy and boot through the real path: fabric SSH into the local QEMU lab, kexec inside
the VM, the QMP power cycle, a kernel that panics, a changed host key, the whole pipeline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kpatchtest.lab.local.lab import LOCAL_TIMEOUTS, local_host
from kpatchtest.lab.ssh.boot import Booter, KernelToBoot
from kpatchtest.lab.ssh.connection import HostKeyRejected
from tests.conftest_lab import LAB_BASE, LAB_FRAGMENTS, build_lab_kernel
from tests.test_build import harmless_commit, pipeline_spec

pytestmark = pytest.mark.slow

NASTY = "run dir; $(touch PWNED) 'q' \"x\""


@pytest.fixture(scope="module")
def patched_kernel(debian_trees, kpt_cache, tmp_path_factory):
    """The lab kernel plus a harmless one-line change: another kernel release to boot."""
    git, trees = debian_trees
    commit = harmless_commit(git, trees["6.1"].commit, tmp_path_factory.mktemp("pk"))
    bz, release = build_lab_kernel(git, commit, kpt_cache)
    return commit, bz, release


@pytest.fixture(scope="module")
def host(local_vm, lab_image, tmp_path_factory):
    return local_host(local_vm, lab_image, tmp_path_factory.mktemp("kh") / "known_hosts",
                      timeouts=LOCAL_TIMEOUTS.model_copy(update={"boot_s": 90}))


def kernel(bz: Path, release: str, tmp: Path, extra: str = "") -> KernelToBoot:
    d = tmp / "artifacts with space"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(bz, d / "bzImage")
    return KernelToBoot(build="patched", bzimage=d / "bzImage", kernelrelease=release, extra_cmdline=extra)


# First: the pipeline starts its own VM, before this module's `local_vm` exists.
def test_pipeline_builds_and_boots_on_the_local_lab(patched_kernel, debian_trees, kpt_cache, tmp_path):
    """The main job: kpatchtest run with lab: local; builds are reused (same trees and config)."""
    from kpatchtest.cli import main
    git, _ = debian_trees
    commit, _, release = patched_kernel
    spec = pipeline_spec(tmp_path, git, commit, "boot-demo", branch="debian 6.1; $(touch PWNED)", rest=f"""configs:
  base: {LAB_BASE}
  fragments: {list(LAB_FRAGMENTS)}
lab:
  name: local
gates:
  boot: booted
""")
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--cache-dir", str(kpt_cache), "--offline", "-q"])
    res = json.loads((out / "results.json").read_text())
    b = res["branches"][0]
    boots = {r["build"]: r for r in b["boot"]}
    assert code == 0, (b.get("build"), b["boot"])
    assert boots["patched"]["status"] == boots["baseline"]["status"] == "booted"
    assert boots["patched"]["kernelrelease"] == b["build"]["patched"]["kernelrelease"]
    assert boots["baseline"]["kernelrelease"] == b["build"]["baseline"]["kernelrelease"] != boots["patched"]["kernelrelease"]
    assert (out / boots["patched"]["console_log"]).exists()
    junit = (out / "junit.xml").read_text()
    assert "boot patched on local-0" in junit
    assert not list(tmp_path.rglob("PWNED"))


def test_boot_patched_kernel_and_prove_it(host, patched_kernel, tmp_path):
    _, bz, release = patched_kernel
    run_dir = tmp_path / NASTY
    res = Booter(host, run_dir).boot(kernel(bz, release, tmp_path), "boot/one")
    assert res.status == "booted", (res.reason, res.console_excerpt)
    assert res.kernelrelease == release == res.expected_release
    assert res.boot_id and 0 < res.duration_s < 90
    assert f"Linux version {release}" in (run_dir / res.dmesg).read_text()
    console = (run_dir / res.console_log).read_text(errors="replace")
    assert f"Linux version {release}" in console and "Nested Paging enabled" in console
    assert res.splats == []
    before = (run_dir / "boot/one/host-before.txt").read_text()
    assert "## ls -la /boot" in before and "## uname -r" in before and release not in before
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def test_initrd_comes_from_the_vm_disk_unless_the_disk_holds_another(host, patched_kernel, tmp_path):
    """The local lab's initrd is copied from its virtio disk, not uploaded; an initrd the
    disk does not carry (here: the image plus NUL padding, which the kernel's unpacker
    skips) is uploaded, and both boot."""
    _, bz, release = patched_kernel
    said: list[str] = []
    res = Booter(host, tmp_path, log=said.append).boot(kernel(bz, release, tmp_path), "boot/disk")
    assert res.status == "booted", (res.reason, res.console_excerpt)
    assert any("copied from /dev/vd" in m for m in said), said
    other = tmp_path / "other-initrd.img"
    other.write_bytes(Path(host.initrd).read_bytes() + b"\0" * 512)
    said.clear()
    res = Booter(host.model_copy(update={"initrd": str(other)}), tmp_path, log=said.append).boot(
        kernel(bz, release, tmp_path), "boot/upload")
    assert res.status == "booted", (res.reason, res.console_excerpt)
    assert not any("copied from" in m for m in said), said


def test_kernel_that_panics_ends_boot_failed_and_host_recovers(host, patched_kernel, lab_kernel, tmp_path):
    _, bz, release = patched_kernel
    booter = Booter(host, tmp_path)
    # init cannot be found -> panic; panic=0 -> no reboot: only the power cycle brings it back
    res = booter.boot(kernel(bz, release, tmp_path, extra="rdinit=/kpatchtest/no-such-init panic=0"), "boot/bad")
    assert res.status == "boot-failed"
    assert "no SSH on a new boot" in res.reason
    assert res.recovered is True
    assert "Kernel panic" in (res.console_excerpt or "")
    assert "panic" in [s.kind for s in res.splats]
    # back on the known-good kernel, and the next boot works
    again = booter.boot(kernel(bz, release, tmp_path), "boot/again")
    assert again.status == "booted" and again.kernelrelease == release


def test_changed_host_key_is_refused(host, patched_kernel, tmp_path):
    _, bz, release = patched_kernel
    other = tmp_path / "known_hosts"
    line = Path(host.known_hosts).read_text().split()
    # a different valid ed25519 key for the same [127.0.0.1]:port
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path / 'k'} >/dev/null")
    other.write_text(f"{line[0]} {(tmp_path / 'k.pub').read_text().split()[0]} {(tmp_path / 'k.pub').read_text().split()[1]}\n")
    bad = host.model_copy(update={"known_hosts": str(other)})
    with pytest.raises(HostKeyRejected):
        Booter(bad, tmp_path).boot(kernel(bz, release, tmp_path), "boot/key")
