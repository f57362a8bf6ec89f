"""The SMM-heavy boot image: a 512-byte MBR that hammers BIOS int 13h, then exits QEMU.

No assembler is needed: the machine code is emitted here, one commented instruction at a
time (`boot_sector_listing()` prints it), by a small two-pass assembler for the dozen
16-bit real-mode encodings the program uses.

What the guest does (SeaBIOS loads sector 0 at 0000:7C00, DL = boot drive):

1. set up segments and a stack; save DL;
2. check for the int 13h extensions (AH=41h); without them: status NO_EDD;
3. `reads` times: int 13h AH=42h (extended read, a Disk Address Packet) of
   `sectors_per_read` sectors into a buffer. On q35, SeaBIOS serves AHCI reads in 32-bit
   code entered through SMM (about four SMM transitions per read). The LBA advances and
   wraps inside the image, so every read hits a real sector of the disk;
4. with `spread_mb > 0` the guest's working set grows the way a bootloader's does when it
   loads a kernel: the read buffer walks through low memory (0x10000..0x8FFFF, 64 KiB
   segments' worth), and after every read int 15h AH=87h (the BIOS block move, done by
   SeaBIOS in protected mode without SMM) copies `touch_kb_per_read` KiB, in 64 KiB
   chunks, from 0x10000 into a window [1 MiB, 1 MiB + spread_mb MiB) above 1 MiB, the
   destination walking through the window and wrapping. Every read therefore touches
   `touch_kb_per_read` KiB of fresh memory between two SMM episodes: on a kernel that
   rebuilds the TDP root at every SMM transition, each of those pages faults again;
5. write a status byte to I/O port 0xf4 (QEMU `-device isa-debug-exit,iobase=0xf4`);
   QEMU then exits with status (byte << 1) | 1. If the device is missing the guest halts
   (the run ends in its timeout).

Exit statuses of QEMU (isa-debug-exit: (status << 1) | 1):

    status 0x10 -> exit 33  EXIT_OK          all reads (and block moves) succeeded
    status 0x11 -> exit 35  EXIT_READ_ERROR  an int 13h read returned CF=1
    status 0x12 -> exit 37  EXIT_MOVE_ERROR  an int 15h AH=87h block move returned CF=1
    status 0x13 -> exit 39  EXIT_NO_EDD      int 13h extensions (AH=41h) not present

Other exits are not the guest's: 0 = QEMU quit without the guest writing 0xf4 (with
`-no-reboot`, a reset or triple fault), 1 = QEMU itself failed (bad argument, no KVM,
missing firmware), 137 / 124 = killed by `timeout` (see smm.interpret_exit).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SECTOR = 512
LOAD_ADDR = 0x7C00

STATUS_OK = 0x10
STATUS_READ_ERROR = 0x11
STATUS_MOVE_ERROR = 0x12
STATUS_NO_EDD = 0x13
DEBUG_EXIT_PORT = 0xF4


def debug_exit_code(status: int) -> int:
    """QEMU's exit status when the guest writes `status` to isa-debug-exit."""
    return ((status << 1) | 1) & 0xFF


EXIT_OK = debug_exit_code(STATUS_OK)                   # 33
EXIT_READ_ERROR = debug_exit_code(STATUS_READ_ERROR)   # 35
EXIT_MOVE_ERROR = debug_exit_code(STATUS_MOVE_ERROR)   # 37
EXIT_NO_EDD = debug_exit_code(STATUS_NO_EDD)           # 39

# Memory map used by the guest program.
BUF_SEG = 0x1000                 # first read buffer: 1000:0000 = phys 0x10000
LOW_END_SEG = 0x9000             # buffers stay below phys 0x90000 (EBDA sits at 0x9FC00)
HIGH_BASE_64K = 0x10             # the high window starts at 1 MiB (in 64 KiB units)
MOVE_WORDS = 0x8000              # one block move: 64 KiB (CX counts 16-bit words)
MAX_READS = 0xFFFF
MAX_SECTORS_PER_READ = 127       # the DAP count limit most BIOSes honour; 127*512 < 64 KiB


class AsmError(ValueError):
    pass


@dataclass
class _Insn:
    offset: int
    code: bytearray
    comment: str


@dataclass
class _Asm:
    """Just enough of a 16-bit assembler: raw encodings, labels, rel16 and abs16 fixups."""

    origin: int = LOAD_ADDR
    insns: list[_Insn] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    fixups: list[tuple[_Insn, int, str, str, int]] = field(default_factory=list)  # insn, pos, kind, label, addend

    @property
    def here(self) -> int:
        return sum(len(i.code) for i in self.insns)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise AsmError(f"label {name} defined twice")
        self.labels[name] = self.here

    def emit(self, code: bytes, comment: str, *, abs16: tuple[int, str, int] | None = None,
             rel16: tuple[int, str] | None = None) -> None:
        insn = _Insn(self.here, bytearray(code), comment)
        self.insns.append(insn)
        if abs16:
            pos, name, addend = abs16
            self.fixups.append((insn, pos, "abs16", name, addend))
        if rel16:
            pos, name = rel16
            self.fixups.append((insn, pos, "rel16", name, 0))

    # -- instruction helpers (each one encoding; the comment says what it is for) -------

    def mem(self, opcode: bytes, name: str, addend: int = 0, imm: bytes = b"", comment: str = "") -> None:
        """opcode, then a 16-bit absolute address of `name`+addend, then an immediate."""
        self.emit(opcode + b"\0\0" + imm, comment, abs16=(len(opcode), name, addend))

    def jcc(self, opcode: int, target: str, comment: str) -> None:
        """Jump to a label: rel16 (0F 8x cw for conditions, E9 cw for jmp; 386+ in real mode)."""
        if opcode == JMP:
            self.emit(b"\xE9\0\0", comment, rel16=(1, target))
        else:
            self.emit(bytes([0x0F, opcode + 0x10, 0, 0]), comment, rel16=(2, target))

    def assemble(self) -> bytes:
        for insn, pos, kind, name, addend in self.fixups:
            if name not in self.labels:
                raise AsmError(f"undefined label {name}")
            target = self.labels[name]
            if kind == "abs16":
                struct.pack_into("<H", insn.code, pos, self.origin + target + addend)
            else:
                rel = target - (insn.offset + len(insn.code))
                struct.pack_into("<h", insn.code, pos, rel)
        return b"".join(bytes(i.code) for i in self.insns)

    def listing(self) -> str:
        self.assemble()
        lines = []
        for i in self.insns:
            names = [n for n, off in self.labels.items() if off == i.offset]
            head = "".join(f"{n}:\n" for n in names)
            hexcode = i.code.hex(" ") if len(i.code) <= 12 else i.code[:12].hex(" ") + " ..."
            lines.append(f"{head}  {self.origin + i.offset:04x}  {hexcode:<40} ; {i.comment}")
        return "\n".join(lines)


# Condition codes as their short-jump opcodes (7x); jcc() emits the near form 0F 8x.
# 16-bit real mode throughout; 0x66 is the operand-size prefix for 32-bit operands.
JC, JNC, JZ, JNZ, JBE, JA, JB = 0x72, 0x73, 0x74, 0x75, 0x76, 0x77, 0x72
JMP = 0xEB


def _check(reads: int, sectors_per_read: int, spread_mb: int, disk_mb: int,
           touch_kb_per_read: int) -> None:
    if not 0 <= reads <= MAX_READS:
        raise ValueError(f"reads must be 0..{MAX_READS}, not {reads}")
    if not 1 <= sectors_per_read <= MAX_SECTORS_PER_READ:
        raise ValueError(f"sectors_per_read must be 1..{MAX_SECTORS_PER_READ}, not {sectors_per_read}")
    if not 0 <= spread_mb <= 3000:
        raise ValueError(f"spread_mb must be 0..3000, not {spread_mb}")
    if not 1 <= disk_mb <= 64:
        raise ValueError(f"disk_mb must be 1..64, not {disk_mb}")
    if disk_mb * 1024 * 1024 // SECTOR < sectors_per_read + 1:
        raise ValueError("the disk is smaller than one read")
    if spread_mb and not 64 <= touch_kb_per_read <= 64 * 0xFFFF:
        raise ValueError(f"touch_kb_per_read must be at least 64 (one block move), not {touch_kb_per_read}")


def _program(reads: int, sectors_per_read: int, spread_mb: int, disk_sectors: int,
             touch_kb_per_read: int) -> _Asm:
    a = _Asm()
    spr = sectors_per_read
    last_lba = disk_sectors - spr          # the last LBA a read may start at
    seg_step = spr * SECTOR // 16           # paragraphs per read
    moves = -(-touch_kb_per_read // 64) if spread_mb else 0
    high_end_64k = HIGH_BASE_64K + spread_mb * 16

    # --- set-up -------------------------------------------------------------------
    a.emit(b"\xFA", "cli                      ; no interrupts while the stack moves")
    a.emit(b"\x31\xC0", "xor ax, ax")
    a.emit(b"\x8E\xD8", "mov ds, ax               ; DS = 0: data below is at 0000:7Cxx")
    a.emit(b"\x8E\xC0", "mov es, ax               ; ES = 0: the block-move GDT is at 0000:7Cxx")
    a.emit(b"\x8E\xD0", "mov ss, ax")
    a.emit(b"\xBC" + struct.pack("<H", LOAD_ADDR), "mov sp, 0x7c00          ; stack grows down below the MBR")
    a.emit(b"\xFB", "sti")
    a.emit(b"\xFC", "cld")
    a.mem(b"\x88\x16", "drive", comment="mov [drive], dl          ; the boot drive the BIOS gave us")

    # --- int 13h extensions present? -------------------------------------------------
    a.emit(b"\xB4\x41", "mov ah, 0x41             ; int 13h: extensions installation check")
    a.emit(b"\xBB\xAA\x55", "mov bx, 0x55aa")
    a.mem(b"\x8A\x16", "drive", comment="mov dl, [drive]")
    a.emit(b"\xCD\x13", "int 0x13")
    a.jcc(JC, "no_edd", "jc no_edd                ; CF set: no extensions")
    a.emit(b"\x81\xFB\x55\xAA", "cmp bx, 0xaa55           ; BX is swapped when they exist")
    a.jcc(JNZ, "no_edd", "jne no_edd")

    # --- the read loop ---------------------------------------------------------------
    a.mem(b"\x83\x3E", "count", imm=b"\x00", comment="cmp word [count], 0      ; reads == 0: nothing to do")
    a.jcc(JZ, "done", "je done")
    a.label("read")
    a.emit(b"\xB4\x42", "mov ah, 0x42             ; int 13h: extended read")
    a.mem(b"\x8A\x16", "drive", comment="mov dl, [drive]")
    a.mem(b"\xBE", "dap", comment="mov si, dap              ; DS:SI -> Disk Address Packet")
    a.emit(b"\xCD\x13", "int 0x13                 ; SeaBIOS: AHCI in 32-bit code, via SMM on q35")
    a.jcc(JC, "read_error", "jc read_error            ; CF set: the read failed")
    a.mem(b"\x66\x83\x06", "dap", 8, imm=bytes([spr]),
          comment=f"add dword [dap.lba], {spr}  ; next sectors")
    a.mem(b"\x66\x81\x3E", "dap", 8, imm=struct.pack("<I", last_lba),
          comment=f"cmp dword [dap.lba], {last_lba} ; past the end of the disk?")
    a.jcc(JBE, "lba_ok", "jbe lba_ok")
    a.mem(b"\x66\xC7\x06", "dap", 8, imm=struct.pack("<I", 1),
          comment="mov dword [dap.lba], 1   ; wrap to sector 1 (0 is this MBR)")
    a.label("lba_ok")
    if spread_mb:
        # The read buffer walks through low memory, wrapping before LOW_END_SEG.
        a.mem(b"\x81\x06", "dap", 6, imm=struct.pack("<H", seg_step),
              comment=f"add word [dap.seg], {seg_step:#x} ; next buffer: {spr * SECTOR} bytes on")
        a.mem(b"\x81\x3E", "dap", 6, imm=struct.pack("<H", LOW_END_SEG - seg_step),
              comment=f"cmp word [dap.seg], {LOW_END_SEG - seg_step:#x} ; would it cross 0x90000?")
        a.jcc(JBE, "seg_ok", "jbe seg_ok")
        a.mem(b"\xC7\x06", "dap", 6, imm=struct.pack("<H", BUF_SEG),
              comment=f"mov word [dap.seg], {BUF_SEG:#x} ; wrap to phys 0x10000")
        a.label("seg_ok")
        # Touch memory above 1 MiB: `moves` block moves of 64 KiB each.
        a.mem(b"\xC7\x06", "moves_left", imm=struct.pack("<H", moves),
              comment=f"mov word [moves_left], {moves} ; 64 KiB block moves per read")
        a.label("move")
        a.mem(b"\xA1", "hi64k", comment="mov ax, [hi64k]           ; destination, in 64 KiB units")
        a.mem(b"\xA2", "gdt", 0x18 + 4, comment="mov [gdt.dst.base16], al  ; base bits 16..23")
        a.mem(b"\x88\x26", "gdt", 0x18 + 7, comment="mov [gdt.dst.base24], ah  ; base bits 24..31")
        a.emit(b"\xB4\x87", "mov ah, 0x87             ; int 15h: block move (protected mode, no SMM)")
        a.emit(b"\xB9" + struct.pack("<H", MOVE_WORDS), "mov cx, 0x8000           ; 64 KiB in words")
        a.mem(b"\xBE", "gdt", comment="mov si, gdt              ; ES:SI -> the move's GDT")
        a.emit(b"\xCD\x15", "int 0x15")
        a.jcc(JC, "move_error", "jc move_error")
        a.mem(b"\xFF\x06", "hi64k", comment="inc word [hi64k]         ; next 64 KiB of the window")
        a.mem(b"\x81\x3E", "hi64k", imm=struct.pack("<H", high_end_64k),
              comment=f"cmp word [hi64k], {high_end_64k:#x} ; end of the {spread_mb} MiB window?")
        a.jcc(JB, "hi_ok", "jb hi_ok")
        a.mem(b"\xC7\x06", "hi64k", imm=struct.pack("<H", HIGH_BASE_64K),
              comment="mov word [hi64k], 0x10   ; wrap to 1 MiB")
        a.label("hi_ok")
        a.mem(b"\xFF\x0E", "moves_left", comment="dec word [moves_left]")
        a.jcc(JNZ, "move", "jnz move")
    a.mem(b"\xFF\x0E", "count", comment="dec word [count]         ; one read done")
    a.jcc(JNZ, "read", "jnz read")

    # --- exits ---------------------------------------------------------------------
    exits = (("done", STATUS_OK, f"success: QEMU exits {EXIT_OK}"),
             ("read_error", STATUS_READ_ERROR, f"read error: exit {EXIT_READ_ERROR}"),
             ("move_error", STATUS_MOVE_ERROR, f"block move error: exit {EXIT_MOVE_ERROR}"),
             ("no_edd", STATUS_NO_EDD, f"no int 13h extensions: exit {EXIT_NO_EDD}"))
    for label, status, what in exits:
        a.label(label)
        a.emit(bytes([0xB0, status]), f"mov al, {status:#x}             ; {what}")
        if label != exits[-1][0]:       # the last one falls through to exit
            a.jcc(JMP, "exit", "jmp exit")
    a.label("exit")
    a.emit(bytes([0xE6, DEBUG_EXIT_PORT]), "out 0xf4, al             ; isa-debug-exit: QEMU exits (al<<1)|1")
    a.label("halt")
    a.emit(b"\xFA", "cli                      ; no isa-debug-exit device: stop here")
    a.emit(b"\xF4", "hlt")
    a.jcc(JMP, "halt", "jmp halt")

    # --- data ----------------------------------------------------------------------
    a.label("drive")
    a.emit(b"\x80", "data: drive (overwritten with DL)")
    a.label("count")
    a.emit(struct.pack("<H", reads), f"data: count = {reads} reads left")
    a.label("moves_left")
    a.emit(b"\0\0", "data: moves_left")
    a.label("hi64k")
    a.emit(struct.pack("<H", HIGH_BASE_64K), "data: hi64k = 0x10 (next block-move destination / 64 KiB)")
    a.label("dap")
    a.emit(struct.pack("<BBHHHQ", 0x10, 0, spr, 0, BUF_SEG, 1),
           f"data: DAP {{size 16, {spr} sectors, buffer {BUF_SEG:04x}:0000, LBA 1}}")
    if spread_mb:
        a.label("gdt")
        null = b"\0" * 8
        src = _descriptor(BUF_SEG * 16)
        dst = _descriptor(HIGH_BASE_64K << 16)
        a.emit(null + null + src + dst + null + null,
               "data: int 15h/87h GDT {null, gdt (BIOS), src 0x10000, dst (patched), cs, ss (BIOS)}")
    return a


def _descriptor(base: int) -> bytes:
    """A 16-bit data segment descriptor: limit 0xFFFF, present, writable (0x93)."""
    return struct.pack("<HHBBBB", 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF, 0x93, 0, (base >> 24) & 0xFF)


def boot_sector(reads: int, sectors_per_read: int = 8, spread_mb: int = 0, *,
                disk_mb: int = 2, touch_kb_per_read: int = 1024) -> bytes:
    """The 512-byte MBR alone (ends in 0x55 0xAA)."""
    _check(reads, sectors_per_read, spread_mb, disk_mb, touch_kb_per_read)
    code = _program(reads, sectors_per_read, spread_mb, disk_mb * 1024 * 1024 // SECTOR,
                    touch_kb_per_read).assemble()
    if len(code) > 446:   # keep the partition table area free, as a real MBR would
        raise AsmError(f"boot code is {len(code)} bytes, more than 446")
    return code.ljust(510, b"\0") + b"\x55\xAA"


def boot_sector_listing(reads: int, sectors_per_read: int = 8, spread_mb: int = 0, *,
                        disk_mb: int = 2, touch_kb_per_read: int = 1024) -> str:
    """The program as an annotated listing (address, bytes, instruction)."""
    _check(reads, sectors_per_read, spread_mb, disk_mb, touch_kb_per_read)
    return _program(reads, sectors_per_read, spread_mb, disk_mb * 1024 * 1024 // SECTOR,
                    touch_kb_per_read).listing()


def make_boot_image(reads: int, sectors_per_read: int = 8, spread_mb: int = 0, *,
                    disk_mb: int = 2, touch_kb_per_read: int = 1024) -> bytes:
    """A raw disk image: the MBR, then `disk_mb` MiB of sectors for the reads to hit.

    reads: int 13h reads to issue (0..65535); sectors_per_read: sectors per read (1..127);
    spread_mb: size of the window above 1 MiB the guest touches after every read (0: all
    reads go to one buffer and nothing above 1 MiB is touched); touch_kb_per_read: KiB
    copied into that window after each read (rounded up to 64 KiB block moves). The guest
    needs RAM for 1 MiB + spread_mb MiB plus SeaBIOS's high tables: see smm.guest_memory_mb.
    Every data sector carries its LBA (b"KPT-LBA" + 8-byte little-endian number) so a
    dump of guest memory shows what landed where.
    """
    mbr = boot_sector(reads, sectors_per_read, spread_mb, disk_mb=disk_mb,
                      touch_kb_per_read=touch_kb_per_read)
    sectors = disk_mb * 1024 * 1024 // SECTOR
    out = bytearray(mbr)
    for lba in range(1, sectors):
        out += (b"KPT-LBA" + struct.pack("<Q", lba)).ljust(SECTOR, b"\xA5")
    return bytes(out)
