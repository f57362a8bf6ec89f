"""The local lab image: one gzip'd newc initramfs that is the lab VM's whole userspace.

Built from the Debian packages installed on this machine by copying binaries and the
shared libraries ``ldd`` lists for them (no package manager, no network):

- busybox-static, with a symlink per applet;
- dropbear (sshd) with the image's host key, root login with the lab client key only;
- OpenSSH's sftp-server at the path Debian's dropbear runs for SFTP, and scp (``scp -O``);
- kexec (kexec-tools) and flock (util-linux; Debian's busybox has no flock applet);
- ``/init``: mounts, static user-net address, sshd, a marker line on the console, then
  busybox init with a shell on the console (so ``reboot`` works as on a real box);
- with ``nested=True`` also qemu-system-x86_64 and its libraries plus SeaBIOS and the
  option ROMs, for nested guests (about 16 MB more, gzipped), and what kvm-unit-tests'
  scripts need beyond busybox (``KUT_BINARIES``: bash, coreutils timeout, getconf; about
  0.6 MB more): the nested image is the one workloads run on.

Reproducible: entries sorted, owners 0, mtimes 0, gzip without name or time, so the same
inputs give the same bytes. Cached under ``cache_dir/lab/image-<hash>/``; the hash covers
the init script, every copied file's destination and content, and the keys. Keys are made
once per cache dir, in ``cache_dir/lab/keys/``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kpatchtest.locks import exclusive
from kpatchtest.rundir import CacheDir

__all__ = ["LabImage", "build_image", "IMAGE_FORMAT", "MARKER", "GUEST_ADDRESS", "GUEST_GATEWAY"]

IMAGE_FORMAT = 1            # bump when the layout changes in a way the hash cannot see
MARKER = "kpatchtest-lab: sshd up"
GUEST_ADDRESS = "10.0.2.15/24"     # QEMU user networking's fixed guest address
GUEST_GATEWAY = "10.0.2.2"
HOST_KEY_PATH = "/etc/dropbear/dropbear_ed25519_host_key"

# Where Debian's dropbear runs the SFTP server (compiled in: SFTPSERVER_PATH).
SFTP_SERVER_PATH = "/usr/lib/sftp-server"

BASE_BINARIES = {
    # destination in the image: source on this machine (resolved through PATH if bare)
    "/usr/sbin/dropbear": "dropbear",
    SFTP_SERVER_PATH: "/usr/lib/openssh/sftp-server",
    "/usr/bin/scp": "scp",
    "/usr/sbin/kexec": "kexec",
    "/usr/bin/flock": "flock",
}
NESTED_BINARIES = {"/usr/bin/qemu-system-x86_64": "qemu-system-x86_64"}
# What kvm-unit-tests' run_tests.sh, x86/run and scripts/*.bash need beyond busybox (the
# nested image is the one workloads run on). Checked against upstream master of 2026-06:
# the rest they call (env, getopt -T/-u/-l, mktemp, tee, grep -E/-F/-q, sed, cut, tr, sort,
# uniq, head, tail, wc, uname, cat, sleep) are busybox applets that behave alike here.
KUT_BINARIES = {
    # run_tests.sh, x86/run, scripts/*.bash: arrays, [[ =~ ]], <(...) >(...), {fd} redirections
    "/bin/bash": "bash",
    # x86/run runs `timeout -k 1s --foreground $TIMEOUT qemu ...`: busybox's timeout has
    # no --foreground and would make every test fail with a usage error (coreutils)
    "/usr/bin/timeout": "timeout",
    # scripts/runtime.bash: MAX_SMP=$(getconf _NPROCESSORS_ONLN) when sourced (libc-bin)
    "/usr/bin/getconf": "getconf",
}
# Firmware a nested q35/pc guest loads (SeaBIOS, the -kernel boot ROMs, VGA BIOS, NIC ROMs).
NESTED_DATA = [
    "/usr/share/seabios/bios.bin", "/usr/share/seabios/bios-256k.bin", "/usr/share/seabios/vgabios-stdvga.bin",
    "/usr/share/seabios/vgabios.bin", "/usr/share/qemu/kvmvapic.bin", "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/linuxboot_dma.bin", "/usr/share/qemu/multiboot.bin", "/usr/share/qemu/multiboot_dma.bin",
    "/usr/share/qemu/pvh.bin", "/usr/share/qemu/sgabios.bin",
    "/usr/lib/ipxe/qemu/efi-e1000.rom", "/usr/lib/ipxe/qemu/efi-e1000e.rom", "/usr/lib/ipxe/qemu/efi-virtio.rom",
    # Debian builds TCG as a loadable module (needs only libc): a nested guest without KVM
    "/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
]

INIT_SCRIPT = r"""#!/bin/sh
# kpatchtest local lab: the whole userspace of the lab VM.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# devtmpfs has no /dev/fd: bash passes <(...) to other programs as /dev/fd/N, and
# kvm-unit-tests' arch-run.bash runs `tee /dev/stderr`
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /run/lock /var/log /var/run
hostname kpatchtest-lab
exec </dev/console >/dev/console 2>&1
echo "kpatchtest-lab: init, kernel $(uname -r)"

ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    ip addr add @ADDRESS@ dev eth0
    ip route add default via @GATEWAY@
else
    echo "kpatchtest-lab: no eth0 (no NIC driver for this machine?)"
fi

dropbear -F -E -s -p 22 -r @HOSTKEY@ >>/run/dropbear.log 2>&1 &
# sshd is up when port 22 (0x0016) listens (state 0A)
i=0
while ! grep -q '^ *[0-9]*: [0-9A-F]*:0016 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null \
        && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "@MARKER@, boot_id $(cat /proc/sys/kernel/random/boot_id), kernel $(uname -r)"
exec /sbin/init
"""

INITTAB = """::sysinit:/bin/true
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::restart:/sbin/init
"""

PROFILE = """export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
PS1='\\u@\\h:\\w\\$ '
"""


@dataclass(frozen=True)
class LabImage:
    initramfs: Path
    client_key: Path           # private key (no passphrase) that root in the VM accepts
    host_public_key: str       # "ssh-ed25519 AAAA..." of the image's sshd
    hash: str = ""
    cached: bool = False       # True when this call found the image already built

    def known_hosts_line(self, port: int, address: str = "127.0.0.1") -> str:
        host = address if port == 22 else f"[{address}]:{port}"
        return f"{host} {self.host_public_key}"

    @property
    def size(self) -> int:
        return self.initramfs.stat().st_size


# -- newc cpio --------------------------------------------------------------------------

class _Cpio:
    """A deterministic newc archive writer: owner 0, mtime 0, inode numbers in order."""

    def __init__(self, out):
        self.out = out
        self.ino = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        self.ino += 1
        namez = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(hdr + namez)
        self.out.write(b"\0" * (-(len(hdr) + len(namez)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name, mode=0o755):
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name, data: bytes, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target: str):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def trailer(self):
        self._entry("TRAILER!!!", 0, nlink=1)


# -- collecting files ---------------------------------------------------------------------

def _which(name: str) -> Path:
    if name.startswith("/"):
        p = Path(name)
    else:
        found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin:/bin")
        if not found:
            raise FileNotFoundError(f"lab image: {name} not found (install busybox-static dropbear-bin "
                                    f"kexec-tools openssh-sftp-server openssh-client util-linux)")
        p = Path(found)
    if not p.exists():
        raise FileNotFoundError(f"lab image: {p} not found")
    return p


_LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x[0-9a-f]+\)")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)")


def shared_libraries(binary: Path) -> list[str]:
    """Paths of the shared libraries `binary` loads (the loader included), as ldd names them."""
    p = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if p.returncode != 0:
        if "not a dynamic executable" in (p.stdout + p.stderr):
            return []
        raise RuntimeError(f"ldd {binary}: {p.stderr.strip()}")
    libs = []
    for line in p.stdout.splitlines():
        if "not found" in line:
            raise RuntimeError(f"ldd {binary}: {line.strip()}")
        m = _LDD_ARROW.match(line) or _LDD_PLAIN.match(line)
        if m:
            path = m.group(m.lastindex or 1)
            if path.startswith("/"):
                libs.append(path)
    return libs


def _busybox_applets(busybox: Path) -> list[str]:
    p = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True)
    return sorted(line.strip() for line in p.stdout.splitlines() if line.strip())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Tree:
    """The image's file tree: directories, files (from host paths or bytes), symlinks, devices."""

    dirs: dict[str, int]
    files: dict[str, tuple[Path | bytes, int]]
    links: dict[str, str]
    devs: dict[str, tuple[int, int, int]]

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d in self.links:
                continue
            self.dirs.setdefault(d, 0o755)
        self.dirs[path.strip("/")] = mode

    def _parent(self, path: str) -> None:
        parent = os.path.dirname(path.strip("/"))
        if parent and parent not in self.dirs and parent not in self.links:
            self.add_dir(parent)

    def add_file(self, path: str, src: Path | bytes, mode: int) -> None:
        self._parent(path)
        self.files[path.strip("/")] = (src, mode)

    def add_link(self, path: str, target: str) -> None:
        self._parent(path)
        self.links[path.strip("/")] = target

    def add_host_file(self, dest: str, src: Path, mode: int | None = None) -> None:
        real = src.resolve()
        self.add_file(dest, real, mode if mode is not None else stat.S_IMODE(real.stat().st_mode))

    def add_binary(self, dest: str, src: Path) -> None:
        self.add_host_file(dest, src)
        for lib in shared_libraries(src):
            if lib.strip("/") not in self.files:
                self.add_host_file(lib, Path(lib))

    def manifest(self) -> list[str]:
        """One line per entry, sorted: what the cache hash covers (file contents by sha256)."""
        out = [f"dir {d} {m:o}" for d, m in self.dirs.items()]
        for f, (src, mode) in self.files.items():
            digest = hashlib.sha256(src).hexdigest() if isinstance(src, bytes) else _sha256(src)
            out.append(f"file {f} {mode:o} {digest}")
        out += [f"link {p} {t}" for p, t in self.links.items()]
        out += [f"dev {p} {ma},{mi} {m:o}" for p, (ma, mi, m) in self.devs.items()]
        return sorted(out)

    def write(self, dest: Path) -> None:
        entries: list[tuple[str, str]] = sorted([(d, "d") for d in self.dirs] + [(f, "f") for f in self.files]
                                               + [(p, "l") for p in self.links] + [(p, "c") for p in self.devs])
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
                buf = io.BufferedWriter(gz, buffer_size=1 << 20)
                cpio = _Cpio(buf)
                for name, kind in entries:
                    if kind == "d":
                        cpio.dir(name, self.dirs[name])
                    elif kind == "f":
                        src, mode = self.files[name]
                        cpio.file(name, src if isinstance(src, bytes) else src.read_bytes(), mode)
                    elif kind == "l":
                        cpio.symlink(name, self.links[name])
                    else:
                        ma, mi, m = self.devs[name]
                        cpio.chardev(name, ma, mi, m)
                cpio.trailer()
                buf.flush()
        os.replace(tmp, dest)


# -- keys ---------------------------------------------------------------------------------

def _run(argv: list[str]) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def _public_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith(("ssh-", "ecdsa-")):
            kind, blob = line.split()[:2]
            return f"{kind} {blob}"
    raise RuntimeError(f"no OpenSSH public key line in: {text!r}")


def ensure_keys(keys_dir: Path) -> tuple[Path, Path, str, str]:
    """(host key (dropbear format), client private key, host public line, client public line).

    Made once per directory: dropbearkey for the host key, ssh-keygen for the client key."""
    host, client = keys_dir / "host_ed25519.dropbear", keys_dir / "client_ed25519"
    with exclusive(keys_dir / ".lock"):
        if not host.exists():
            tmp = host.with_name(host.name + ".tmp")
            tmp.unlink(missing_ok=True)
            _run([str(_which("dropbearkey")), "-t", "ed25519", "-f", str(tmp)])
            os.replace(tmp, host)
        if not client.exists():
            tmp = client.with_name(client.name + ".tmp")
            for p in (tmp, tmp.with_name(tmp.name + ".pub")):
                p.unlink(missing_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kpatchtest-lab-client", "-f", str(tmp)])
            os.replace(tmp.with_name(tmp.name + ".pub"), client.with_name(client.name + ".pub"))
            os.replace(tmp, client)
        client.chmod(0o600)
        host_pub = _public_line(_run([str(_which("dropbearkey")), "-y", "-f", str(host)]))
        client_pub = _public_line(client.with_name(client.name + ".pub").read_text())
    return host, client, host_pub, client_pub


# -- the image ------------------------------------------------------------------------------

def init_script() -> str:
    return (INIT_SCRIPT.replace("@ADDRESS@", GUEST_ADDRESS).replace("@GATEWAY@", GUEST_GATEWAY)
            .replace("@HOSTKEY@", HOST_KEY_PATH).replace("@MARKER@", MARKER))


def _tree(host_key: Path, client_pub: str, nested: bool) -> _Tree:
    t = _Tree({}, {}, {}, {})
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib", "lib", "lib64", "etc", "proc", "sys", "dev",
              "run", "tmp", "var", "mnt", "boot"):
        t.add_dir(d)
    t.add_dir("tmp", 0o1777)
    t.add_dir("root", 0o700)
    t.add_dir("root/.ssh", 0o700)
    t.devs["dev/console"] = (5, 1, 0o600)
    t.devs["dev/null"] = (1, 3, 0o666)
    t.add_link("var/run", "../run")
    t.add_link("var/tmp", "../tmp")

    busybox = _which("busybox")
    if shared_libraries(busybox):
        raise RuntimeError(f"{busybox} is not static: install busybox-static")
    t.add_host_file("/bin/busybox", busybox, 0o755)
    for applet in _busybox_applets(busybox):
        dest = "/" + applet.strip("/")
        if dest != "/bin/busybox":
            t.add_link(dest, os.path.relpath("/bin/busybox", os.path.dirname(dest)))
    binaries = dict(BASE_BINARIES, **(dict(NESTED_BINARIES, **KUT_BINARIES) if nested else {}))
    for dest, src in sorted(binaries.items()):
        t.links.pop(dest.strip("/"), None)      # a real binary beats a busybox applet
        t.add_binary(dest, _which(src))
    if nested:
        t.add_link("/usr/bin/bash", "../../bin/bash")     # for #!/usr/bin/bash as well
        for path in NESTED_DATA:
            if Path(path).exists():
                t.add_host_file(path, Path(path), 0o644)

    t.add_file("/init", init_script().encode(), 0o755)
    t.add_file("/etc/inittab", INITTAB.encode(), 0o644)
    t.add_file("/etc/profile", PROFILE.encode(), 0o644)
    t.add_file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    t.add_file("/etc/group", b"root:x:0:\ntty:x:5:\n", 0o644)
    t.add_file("/etc/shells", b"/bin/sh\n", 0o644)
    t.add_file("/etc/hostname", b"kpatchtest-lab\n", 0o644)
    t.add_file("/etc/hosts", b"127.0.0.1 localhost kpatchtest-lab\n", 0o644)
    t.add_file("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\nhosts: files\n", 0o644)
    t.add_file(HOST_KEY_PATH, host_key.read_bytes(), 0o600)
    t.add_file("/root/.ssh/authorized_keys", (client_pub + "\n").encode(), 0o600)
    return t


def build_image(cache_dir: Path, *, nested: bool = False, log=lambda msg: None) -> LabImage:
    """Build (or find in the cache) the lab initramfs; see the module docstring."""
    lab = CacheDir(Path(cache_dir)).lab
    host_key, client_key, host_pub, client_pub = ensure_keys(lab / "keys")
    tree = _tree(host_key, client_pub, nested)
    h = hashlib.sha256(f"kpatchtest lab image format {IMAGE_FORMAT}\n".encode())
    h.update(init_script().encode())
    h.update(("\n".join(tree.manifest()) + "\n").encode())
    h.update(host_pub.encode() + b"\n" + client_pub.encode() + b"\n")
    digest = h.hexdigest()[:16]
    out_dir = lab / f"image-{digest}"
    initramfs = out_dir / "initramfs.cpio.gz"
    with exclusive(lab / f".image-{digest}.lock"):
        if initramfs.exists():
            return LabImage(initramfs, client_key, host_pub, digest, cached=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        log(f"building lab image {digest}{' (nested)' if nested else ''}")
        tree.write(initramfs)
        (out_dir / "manifest.txt").write_text("\n".join(tree.manifest()) + "\n")
        meta = {"hash": digest, "nested": nested, "size": initramfs.stat().st_size, "host_public_key": host_pub}
        (out_dir / "image.json").write_text(json.dumps(meta, indent=1) + "\n")
    return LabImage(initramfs, client_key, host_pub, digest, cached=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kpatchtest.lab.local.image", description="build the local lab initramfs")
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--nested", action="store_true", help="include qemu-system-x86_64 and SeaBIOS for nested guests")
    a = ap.parse_args(argv)
    img = build_image(a.cache_dir, nested=a.nested, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"initramfs": str(img.initramfs), "client_key": str(img.client_key), "hash": img.hash,
                      "cached": img.cached, "size": img.size, "host_public_key": img.host_public_key}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
