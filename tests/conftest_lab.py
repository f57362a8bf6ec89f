"""The local lab for tests: a known-good lab kernel, the lab image, a running QEMU VM.

Fixtures (load with ``pytest_plugins = [..., "tests.conftest_lab"]`` in tests/conftest.py,
or ``from tests.conftest_lab import *`` in a test module):

- ``lab_kernel`` (session): path of a bzImage of Debian 6.1 built by the project's own
  build code with the demo's recipe (series/demo.yaml: ``tinyconfig`` + x86_64-base +
  kvm + lab-qemu + kvm-trace: KVM_AMD=y, KEXEC, serial console, virtio/e1000 NICs,
  kprobes and tracepoints), in the place `kpatchtest run` builds a tarball branch named
  debian-6.1: the same build the demo's 6.1 baseline is, so `make demo` after the tests
  reuses it (and one cold build serves every test). Uses ``debian_trees`` and
  ``kpt_cache``; a cold build takes 5 to 8 min on 2 cores, a cached one no make at all
  (set ``KPATCHTEST_TEST_CACHE=/some/dir`` to keep it between sessions). The bzImage is
  copied to ``kpt_cache/lab/kernels/<release>/`` so other tests that clean the build
  cache do not pull it from under a running VM.
- ``lab_image`` (session): the :class:`~kpatchtest.lab.image.LabImage` built into
  ``kpt_cache`` (busybox, dropbear, sftp-server, kexec; no nested QEMU).
- ``local_vm`` (module): a started :class:`~kpatchtest.lab.qemu.LocalVM` on the lab
  kernel and image whose SSH answers; stopped at the end of the module.
- ``lab_ssh`` (module): an :class:`SSH` helper for ``local_vm`` (plain ``ssh`` client,
  strict host key checking against a known_hosts file with the image's host key).

Skips (does not fail) when qemu-system-x86_64 or the Debian tarballs are missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kpatchtest.build.builder import Builder, BuildPlace, ConfigRecipe
from kpatchtest.gitutil import Git
from kpatchtest.spec import CONFIGS_DIR, load_spec

__all__ = ["LAB_FRAGMENTS", "SSH", "build_lab_kernel", "lab_image", "lab_kernel", "lab_ssh", "local_vm",
           "need_image_tools", "trace_kernel", "wait_for_ssh"]

# The demo's recipe is the lab kernel's: one definition (series/demo.yaml), one cold build.
DEMO_SPEC = load_spec(Path(__file__).resolve().parent.parent / "series" / "demo.yaml").spec
LAB_BASE = DEMO_SPEC.configs.base
LAB_FRAGMENTS = tuple(Path(f).name for f in DEMO_SPEC.configs.fragments)
# What the lab VM needs from the kernel config; checked on the built .config.
LAB_REQUIRED = ("64BIT", "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "RD_GZIP", "DEVTMPFS", "DEVTMPFS_MOUNT",
                "PCI", "E1000", "VIRTIO_NET", "VIRTIO_PCI", "KEXEC", "NET", "UNIX", "INET", "PACKET",
                "UNIX98_PTYS", "PROC_FS", "SYSFS", "TMPFS", "FILE_LOCKING", "KVM", "KVM_AMD", "BINFMT_ELF",
                "BINFMT_SCRIPT", "MULTIUSER", "FUTEX", "EPOLL")
SSH_BOOT_TIMEOUT_S = float(os.environ.get("KPATCHTEST_LAB_BOOT_TIMEOUT", "180"))


def build_lab_kernel(git: Git, commit: str, cache_dir: Path, log=lambda m: None, *,
                     fragments: tuple[str, ...] = LAB_FRAGMENTS, place: str = "debian-6.1") -> tuple[Path, str]:
    """Build (or reuse) the lab kernel for `commit`; returns (bzImage copy, kernelrelease).

    Another fragment list (e.g. + kvm-trace.config) wants its own `place` (build dir), so
    that the two configs do not rebuild each other's objects."""
    from kpatchtest.build.toolchain import Toolchain
    recipe = ConfigRecipe.from_spec(LAB_BASE, [str(CONFIGS_DIR / f) for f in fragments], list(LAB_REQUIRED))
    toolchain = Toolchain.detect()
    # The copy below is indexed by what identifies the build (the tree, the recipe, the
    # toolchain; the final .config follows from them), so a session whose other tests
    # cleaned the build cache (test_build.py does) still boots without a rebuild.
    key = hashlib.sha256("\0".join([git.tree_of(commit), recipe.key(), toolchain.key()]).encode()).hexdigest()[:24]
    index = cache_dir / "lab" / "kernels" / "by-key" / key
    if index.exists():
        release = index.read_text().strip()
        image = cache_dir / "lab" / "kernels" / release / "bzImage"
        if image.exists():
            return image, release
    builder = Builder(git=git, cache_dir=cache_dir, recipe=recipe, toolchain=toolchain, log=log)
    # the place test_build.py's kbuild uses: same tree and same final .config (its extra
    # fragment only adds a symbol no kernel has), so builds here are incremental or reused
    build_place = BuildPlace.for_branch(cache_dir, git.repo.name.removesuffix(".git"), place)
    run_dir = cache_dir / "lab" / "kernel-run"
    res, _ = builder.build(build_place, commit, "lab kernel", run_dir, "lab")
    if res.status != "pass":
        raise RuntimeError(f"lab kernel build failed: {res.reason}\n{res.error_excerpt or ''}")
    if res.config_errors:
        raise RuntimeError(f"lab kernel config lacks what the lab VM needs: {res.config_errors}")
    dest = cache_dir / "lab" / "kernels" / res.kernelrelease
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("bzImage", "config"):
        src = run_dir / res.artifacts[name]
        if not (dest / name).exists() or (dest / name).stat().st_size != src.stat().st_size:
            shutil.copy2(src, dest / f".{name}.tmp")
            os.replace(dest / f".{name}.tmp", dest / name)
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(res.kernelrelease + "\n")
    return dest / "bzImage", res.kernelrelease


def _need_qemu() -> None:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")


@pytest.fixture(scope="session")
def lab_kernel(debian_trees, kpt_cache) -> Path:
    _need_qemu()
    git, trees = debian_trees
    t0 = time.monotonic()
    path, release = build_lab_kernel(git, trees["6.1"].commit, kpt_cache, log=print)
    print(f"lab kernel {release}: {path} ({time.monotonic() - t0:.1f} s)")
    return path


@pytest.fixture(scope="session")
def trace_kernel(lab_kernel) -> tuple[Path, str]:
    """The lab kernel under the name the probe tests use: it has kvm-trace.config (kprobes,
    tracepoints, debugfs), what the SMM-heavy boot needs to count transitions and roots."""
    return lab_kernel, lab_kernel.parent.name


def need_image_tools() -> None:
    for tool in ("busybox", "dropbear", "dropbearkey", "kexec", "ssh-keygen", "flock", "ldd"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            pytest.skip(f"{tool} not installed (apt-get install busybox-static dropbear-bin kexec-tools "
                        f"openssh-client openssh-sftp-server)")


@pytest.fixture(scope="session")
def lab_image(kpt_cache):
    from kpatchtest.lab.local.image import build_image
    need_image_tools()
    return build_image(kpt_cache)


@dataclass
class SSH:
    """The plain OpenSSH client against one lab VM, strict host key checking."""

    port: int
    key: Path
    known_hosts: Path
    user: str = "root"

    def base(self, connect_timeout: float = 5) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={int(connect_timeout)}", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-i", str(self.key)]

    def run(self, command: str, timeout: float = 60, check: bool = True,
            connect_timeout: float = 5) -> subprocess.CompletedProcess:
        argv = ["ssh", *self.base(connect_timeout), "-p", str(self.port), f"{self.user}@127.0.0.1", command]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"ssh {command!r} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def put(self, local: Path, remote: str, timeout: float = 120) -> None:
        argv = ["scp", "-q", *self.base(), "-P", str(self.port), str(local), f"{self.user}@127.0.0.1:{remote}"]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise AssertionError(f"scp {local} -> {remote} exited {p.returncode}: {p.stderr.strip()}")


def wait_for_ssh(ssh: SSH, timeout: float = SSH_BOOT_TIMEOUT_S, not_boot_id: str | None = None,
                 vm=None) -> str:
    """Poll until `cat boot_id` answers (with a boot_id other than `not_boot_id`); returns it."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if vm is not None and not vm.running():
            raise AssertionError(f"QEMU exited while waiting for SSH; console:\n{vm.console_tail()}")
        try:
            p = ssh.run("cat /proc/sys/kernel/random/boot_id", timeout=15, check=False, connect_timeout=3)
            if p.returncode == 0 and p.stdout.strip() and p.stdout.strip() != not_boot_id:
                return p.stdout.strip()
            last = p.stderr.strip()
        except subprocess.TimeoutExpired:
            last = "timeout"
        time.sleep(0.5)
    tail = vm.console_tail() if vm is not None else ""
    raise AssertionError(f"no SSH on port {ssh.port} within {timeout:.0f} s (last: {last}); console:\n{tail}")


@pytest.fixture(scope="module")
def local_vm(lab_kernel, lab_image, tmp_path_factory):
    from kpatchtest.lab.local.qemu import LocalVM, VMConfig
    workdir = tmp_path_factory.mktemp("local-vm")
    vm = LocalVM(workdir, VMConfig(kernel=lab_kernel, initrd=lab_image.initramfs))
    t0 = time.monotonic()
    vm.start()
    try:
        ssh = _ssh_for(vm, lab_image, workdir)
        vm.boot_id = wait_for_ssh(ssh, vm=vm)       # type: ignore[attr-defined]
        vm.cold_boot_s = time.monotonic() - t0      # type: ignore[attr-defined]
        print(f"local VM ({vm.accel}): cold start to SSH {vm.cold_boot_s:.1f} s")
        yield vm
    finally:
        vm.stop()


def _ssh_for(vm, image, workdir: Path) -> SSH:
    kh = workdir / "known_hosts"
    kh.write_text(image.known_hosts_line(vm.ssh_port) + "\n")
    return SSH(port=vm.ssh_port, key=image.client_key, known_hosts=kh)


@pytest.fixture(scope="module")
def lab_ssh(local_vm, lab_image) -> SSH:
    return _ssh_for(local_vm, lab_image, local_vm.workdir)


@pytest.fixture(scope="module")
def traced_host(trace_kernel, kpt_cache, tmp_path_factory):
    """The local lab on the kernel with kprobes and tracepoints, nested image (QEMU + SeaBIOS)."""
    from kpatchtest.lab.local.lab import local_lab
    bz, _ = trace_kernel
    with local_lab(bz, kpt_cache, tmp_path_factory.mktemp("lab"), nested=True) as host:
        yield host


def metric(record, name):
    """A workload record's metric by name."""
    return next(m for m in record.metrics if m.name == name)
