"""The Linux SMM-boot guest: GRUB on SeaBIOS loads a real bzImage and a tiny initramfs.

This is the case users suffer from (issue 13): a bootloader that loads a kernel and
initrd through BIOS int 13h (on q35's AHCI, SeaBIOS serves every read through SMM), then
the kernel decompresses and starts init. The image is built without root and without
loop mounts:

- sector 0: GRUB's boot.img (its first 440 bytes) + one MBR partition entry + 55 AA;
- sectors 1..: GRUB's core.img (grub-mkimage -O i386-pc with biosdisk, part_msdos, fat,
  linux, serial, echo, terminal and an embedded config), in the gap before the partition;
- a FAT partition at 1 MiB made by mtools (mformat, mcopy -i image@@offset) holding
  /vmlinuz (the kernel given) and /initrd (a cpio newc archive written here).

The initramfs holds /dev/console, /dev/port and /init: a 250-byte static x86-64 ELF
emitted below that prints one line (`kpt-init: <message>`) and writes the pass code to
isa-debug-exit through /dev/port (the lab kernels have CONFIG_DEVPORT but no ioperm/iopl).
Should that write return (no isa-debug-exit device, no /dev/port), init exits: the kernel
panics, `panic=-1` resets, and QEMU's `-no-reboot` ends the run with status 0 (an error).

Phases, from the serial console timestamped on the lab host (see smm.RUN_SCRIPT):
firmware (QEMU start -> GRUB's first line), bootloader (GRUB loads the kernel and initrd
through int 13h, i.e. SMM -> GRUB's `boot` line), decompress (-> the kernel's first
line), kernel (-> init's line), init (-> QEMU's exit).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kpatchtest.errors import InputError, KpatchtestError
from kpatchtest.util import write_atomic
from kpatchtest.workloads.bootsector import DEBUG_EXIT_PORT, SECTOR, STATUS_OK

GRUB_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_MODULES = ("biosdisk", "part_msdos", "fat", "linux", "serial", "terminal", "echo")
PART_START = 2048                      # sectors: the partition at 1 MiB; core.img lives before it
GRUB_START = "kpt-grub: start"
GRUB_BOOT = "kpt-grub: boot"
INIT_PREFIX = "kpt-init: "
# GRUB's own lines after GRUB_BOOT when `boot` fails (a kernel it could not load)
GRUB_OWN = re.compile(r"^(error:|Entering rescue mode|grub( rescue)?>)")
CMDLINE = "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 loglevel=6 panic=-1 rdinit=/init"
GUEST_MEMORY_MB = 256
# decompress: GRUB's `boot` -> the kernel's first line (its setup code and decompressor
# print nothing without CONFIG_X86_VERBOSE_BOOTUP)
PHASES = ("firmware", "bootloader", "decompress", "kernel", "init")
PHASE_NOTES = {"firmware": "QEMU start (SeaBIOS) to GRUB's first line",
               "bootloader": "GRUB's first line to its `boot` (kernel + initrd read through int 13h)",
               "decompress": "GRUB's `boot` to the kernel's first line (setup code, decompression)",
               "kernel": "the kernel's first line to init's line",
               "init": "init's line to QEMU's exit (isa-debug-exit)"}
# Bump when the image layout changes: part of the cache key.
LAYOUT_VERSION = "1"


# --- /init: a static x86-64 ELF, hand-assembled ----------------------------------------

def init_elf(message: str, status: int = STATUS_OK) -> bytes:
    """write(1, "kpt-init: <message>\\n"); fd = open("/dev/port", O_WRONLY);
    pwrite64(fd, &status, 1, DEBUG_EXIT_PORT); exit(1)."""
    base, hdr = 0x400000, 64 + 56
    msg = (INIT_PREFIX + message + "\n").encode()
    if b"\n" in msg[:-1] or len(msg) > 200:
        raise InputError(f"smm_boot.init_message must be one line of at most {200 - len(INIT_PREFIX) - 1} "
                         f"characters, not {message!r}")
    path = b"/dev/port\0"

    def rip(insn: bytes, disp_at: int, end: int, target: int) -> bytes:
        return insn[:disp_at] + struct.pack("<i", target - end) + insn[disp_at + 4:]

    # code layout first, displacements after (the data follows the code)
    parts = [
        b"\xb8\x01\x00\x00\x00",              # mov eax, 1         (write)
        b"\xbf\x01\x00\x00\x00",              # mov edi, 1         (stdout: /dev/console)
        b"\x48\x8d\x35\0\0\0\0",              # lea rsi, [rip+msg]
        b"\xba" + struct.pack("<I", len(msg)),  # mov edx, len
        b"\x0f\x05",                          # syscall
        b"\xb8\x02\x00\x00\x00",              # mov eax, 2         (open)
        b"\x48\x8d\x3d\0\0\0\0",              # lea rdi, [rip+path]
        b"\xbe\x01\x00\x00\x00",              # mov esi, 1         (O_WRONLY)
        b"\x31\xd2",                          # xor edx, edx
        b"\x0f\x05",                          # syscall
        b"\x89\xc7",                          # mov edi, eax       (the fd)
        b"\xb8\x12\x00\x00\x00",              # mov eax, 18        (pwrite64)
        b"\x48\x8d\x35\0\0\0\0",              # lea rsi, [rip+code]
        b"\xba\x01\x00\x00\x00",              # mov edx, 1
        b"\x41\xba" + struct.pack("<I", DEBUG_EXIT_PORT),  # mov r10d, 0xf4 (offset = port)
        b"\x0f\x05",                          # syscall            (QEMU exits here)
        b"\xb8\x3c\x00\x00\x00",              # mov eax, 60        (exit: init dies, the kernel panics)
        b"\xbf\x01\x00\x00\x00",              # mov edi, 1
        b"\x0f\x05",                          # syscall
    ]
    code_len = sum(map(len, parts))
    msg_at, path_at = code_len, code_len + len(msg)
    status_at = path_at + len(path)
    targets = {2: msg_at, 6: path_at, 12: status_at}
    out, off = [], 0
    for i, p in enumerate(parts):
        end = off + len(p)
        out.append(rip(p, 3, end, targets[i]) if i in targets else p)
        off = end
    body = b"".join(out) + msg + path + bytes([status])
    size = hdr + len(body)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 0x3E, 1, base + hdr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)   # PT_LOAD, R+X
    return ehdr + phdr + body


# --- the initramfs: cpio newc ----------------------------------------------------------

def _cpio_entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    n = name.encode() + b"\0"
    head = b"070701" + b"".join(b"%08X" % v for v in (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data),
                                                       0, 0, rdev[0], rdev[1], len(n), 0))
    return _pad4(head + n) + _pad4(data)


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def initramfs(message: str) -> bytes:
    """dev/, dev/console (5,1: init's fds 0-2), dev/port (1,4), /init; uid 0, mtime 0."""
    entries = [("dev", 0o040755, b"", (0, 0)), ("dev/console", 0o020600, b"", (5, 1)),
               ("dev/port", 0o020600, b"", (1, 4)), ("init", 0o100755, init_elf(message), (0, 0))]
    body = b"".join(_cpio_entry(i, *e) for i, e in enumerate(entries, 1))
    body += _cpio_entry(0, "TRAILER!!!", 0)
    return body + b"\0" * (-len(body) % 512)


# --- GRUB -----------------------------------------------------------------------------

def grub_config(cmdline: str = CMDLINE) -> str:
    """The config embedded in core.img: run by GRUB's rescue parser, one command a line."""
    return "\n".join(["serial --unit=0 --speed=115200", "terminal_output serial",
                      f"echo {GRUB_START}", "set root=(hd0,msdos1)",
                      f"linux /vmlinuz {cmdline}", "initrd /initrd", f"echo {GRUB_BOOT}", "boot", ""])


def _need_tools() -> None:
    missing = [t for t in ("grub-mkimage", "mformat", "mcopy") if not shutil.which(t)]
    if not (GRUB_DIR / "boot.img").exists():
        missing.append(str(GRUB_DIR / "boot.img"))
    if missing:
        raise InputError(f"smm_boot guest linux needs {', '.join(missing)}",
                         hint="apt-get install grub-pc-bin mtools (make system)")


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if p.returncode != 0:
        raise KpatchtestError(f"{argv[0]} exited {p.returncode}: {p.stderr.strip()[-300:]}")


def grub_core(config: str, work: Path) -> bytes:
    cfg = work / "embedded.cfg"
    cfg.write_text(config)
    core = work / "core.img"
    _run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_DIR), "-o", str(core), "-c", str(cfg),
          "-p", "(hd0,msdos1)/", *GRUB_MODULES])
    return core.read_bytes()


def _mbr(part_sectors: int) -> bytes:
    """boot.img's code (440 bytes) + one FAT16 (LBA) partition entry + 55 AA.

    boot.img's defaults fit: core.img's first sector at LBA 1 (offset 0x5C), and the
    boot drive taken from DL (0x64 = 0xFF)."""
    boot = (GRUB_DIR / "boot.img").read_bytes()
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", PART_START, part_sectors)
    return boot[:440] + b"\0" * 6 + entry + b"\0" * 48 + b"\x55\xaa"


# --- the disk -------------------------------------------------------------------------

@dataclass(frozen=True)
class LinuxGuestImage:
    path: Path
    kernel: Path
    key: str


def image_key(kernel: Path, message: str, cmdline: str = CMDLINE) -> str:
    h = hashlib.sha256()
    for part in (LAYOUT_VERSION, message, cmdline, (GRUB_DIR / "boot.img").read_bytes().hex()):
        h.update(part.encode() + b"\0")
    with open(kernel, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def build_image(kernel: Path, out: Path, message: str = "init reached", cmdline: str = CMDLINE) -> Path:
    """Write the disk image to `out`: MBR, core.img, a FAT partition sized to its files."""
    _need_tools()
    if not kernel.is_file():
        raise InputError(f"smm_boot.kernel: {kernel} is not a file", hint="give the path of a bzImage")
    with open(kernel, "rb") as f:
        head = f.read(0x206)
    if len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
        raise InputError(f"smm_boot.kernel: {kernel} is not a bzImage (no 'HdrS' boot header)",
                         hint="give arch/x86/boot/bzImage of a build")
    with tempfile.TemporaryDirectory(prefix="kpt-linux-guest-") as tmp:
        work = Path(tmp)
        core = grub_core(grub_config(cmdline), work)
        if SECTOR + len(core) > PART_START * SECTOR:
            raise KpatchtestError(f"GRUB core.img is {len(core)} bytes: it does not fit before the partition")
        (work / "initrd").write_bytes(initramfs(message))
        files = [kernel, work / "initrd"]
        data_kb = sum(-(-p.stat().st_size // 1024) for p in files)
        part_sectors = (data_kb + 512) * 2          # the files, the FATs and the root dir, some slack
        part_sectors += -part_sectors % 2048        # whole MiB
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.write(_mbr(part_sectors))
            f.write(core)
            f.truncate((PART_START + part_sectors) * SECTOR)
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": "315532800", "TZ": "UTC"}
        target = f"{disk}@@{PART_START * SECTOR}"
        _run(["mformat", "-i", target, "-T", str(part_sectors), "-h", "64", "-s", "32", "-H", str(PART_START),
              "-N", "4b505431", "-v", "KPTGUEST", "::"], env)
        _run(["mcopy", "-i", target, str(kernel), "::/vmlinuz"], env)
        _run(["mcopy", "-i", target, str(work / "initrd"), "::/initrd"], env)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, disk.read_bytes())
    return out


def cached_image(kernel: Path, directory: Path, message: str = "init reached") -> LinuxGuestImage:
    """The image for this kernel and message under `directory`, built once (keyed by content)."""
    key = image_key(kernel, message)
    path = directory / f"linux-guest-{key}.img"
    if not path.exists():
        build_image(kernel, path, message)
    return LinuxGuestImage(path, kernel, key)


# --- phases from the timestamped serial console ----------------------------------------

_ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Phases:
    """Phase start times (host uptime, s) and the phase the guest reached."""

    starts: dict[str, float]       # phase -> start; only the phases that started
    end: float | None              # QEMU's exit

    @property
    def reached(self) -> str:
        return [p for p in PHASES if p in self.starts][-1]

    def durations(self) -> dict[str, float | None]:
        """Wall time per phase; None for a phase that did not start or did not end."""
        out: dict[str, float | None] = {}
        for i, p in enumerate(PHASES):
            nxt = self.starts.get(PHASES[i + 1]) if i + 1 < len(PHASES) else self.end
            out[p] = round(nxt - self.starts[p], 3) if p in self.starts and nxt is not None else None
        return out


def clean_line(text: str) -> str:
    return _ESC.sub("", text).strip()


def phases(t0: float, t1: float | None, lines: list[tuple[float, str]]) -> Phases:
    """(uptime, line) pairs of the serial console -> phase starts. The firmware phase
    starts with QEMU (t0); the bootloader with GRUB's first line; decompress with GRUB's
    line before `boot`, unless GRUB printed an error before it (the kernel or initrd did
    not load); the kernel with the next line that is not GRUB's own; init with init's line."""
    starts = {"firmware": t0}
    failed = False
    for t, raw in lines:
        line = clean_line(raw)
        if not line:
            continue
        if "bootloader" not in starts and GRUB_START in line:
            starts["bootloader"] = t
        elif "bootloader" in starts and "decompress" not in starts and GRUB_OWN.match(line):
            failed = True                   # `linux` or `initrd` failed: GRUB's `boot` will too
        elif "bootloader" in starts and "decompress" not in starts and GRUB_BOOT in line and not failed:
            starts["decompress"] = t
        elif "decompress" in starts and "kernel" not in starts and not GRUB_OWN.match(line):
            starts["kernel"] = t
        if "kernel" in starts and "init" not in starts and line.startswith(INIT_PREFIX):
            starts["init"] = t
    return Phases(starts, t1)
