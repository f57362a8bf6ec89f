"""Find kernel splats (panic, Oops, BUG, WARNING, KASAN, lockdep, RCU stall, ...) in a log.

Works on serial console captures (CR LF line ends, userspace output mixed in) and on
dmesg / journalctl -k output. Each line is normalised first: CRs, a syslog level
(`<4>`), timestamps (`[    1.234567]`, `dmesg -T` dates), a printk caller id
(`[    T1]`) and a journal prefix (`... kernel: `) are removed. A header only counts
at the start of a normalised line, in the exact shape the kernel prints it, so
userspace lines such as "WARNING: Unsupported ..." or the kernel's own
"[Firmware Bug]: ..." and "RETBleed: WARNING: ..." notices are not splats.

One splat per report: a "cut here" block is one splat starting after the marker
(a WARN message printed before "WARNING: CPU:" belongs to it), and the Oops line a
BUG report prints a few lines after its header ("BUG: kernel NULL pointer
dereference" ... "Oops: 0000 [#1]") is part of that BUG. A panic that follows an
Oops is reported separately: it says how the oops ended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CUT_HERE = "------------[ cut here ]------------"

_PREFIX = re.compile(
    r"^(?:<\d+>)?"                                   # syslog level (dmesg -r, /dev/kmsg)
    r"(?:\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: )?"  # journalctl -k / syslog
    r"(?:\[\s*\d+\.\d+\]\s?|\[\w{3} \w{3} [ \d]\d [\d:]{8} \d{4}\]\s?)?"  # [ 1.23] or dmesg -T
    r"(?:\[\s*[TC]\d+\]\s?)?"                        # CONFIG_PRINTK_CALLER
)
_MIDLINE_TS = re.compile(r"\[\s*\d+\.\d{6}\]\s?")

_LOCKDEP = (r"possible circular locking dependency detected|possible recursive locking detected"
            r"|inconsistent lock state|suspicious RCU usage|possible irq lock inversion dependency"
            r" detected|bad unlock balance detected!?|held lock freed!?"
            r"|lock held when returning to user space!?")

# (kind, pattern): first match wins, so the specific ones come first.
_HEADERS: list[tuple[str, re.Pattern[str]]] = [(k, re.compile(p)) for k, p in [
    ("kasan", r"BUG: KASAN: "),
    ("lockdep", rf"(?:WARNING|INFO): (?:{_LOCKDEP})|\[ INFO: (?:{_LOCKDEP}) \]"),
    ("rcu-stall", r"(?:rcu: )?INFO: rcu_\w+ (?:self-detected stall|detected (?:expedited )?stalls?)"),
    ("hung-task", r"INFO: task \S.* blocked for more than \d+ seconds"),
    ("panic", r"Kernel panic - not syncing"),
    ("bug", r"(?:watchdog: )?BUG: |kernel BUG at |(?:NMI )?watchdog: Watchdog detected hard LOCKUP"),
    ("oops", r"Oops: |general protection fault\b|Unable to handle kernel |"
             r"[a-z][a-z ]{2,30}: [0-9a-f]{4} \[#\d+\]"),   # die(): "invalid opcode: 0000 [#1] SMP"
    ("warning", r"WARNING: CPU: \d+ PID: \d+ at |WARNING: at \S+:\d+ "),
    ("ubsan", r"UBSAN: "),
]]
_CUT_LOOKAHEAD = 10     # lines between "cut here" and the header it announces (WARN message)
_BUG_OOPS_GAP = 8       # an Oops this close after a BUG header is the same report


@dataclass(frozen=True)
class Splat:
    kind: str               # panic oops bug warning kasan lockdep rcu-stall hung-task ubsan
    first_lines: list[str]  # the header line and up to `context` more, normalised
    line_no: int            # 1-based line number of first_lines[0] in the log


def normalise(line: str) -> str:
    """Strip CR, timestamps and similar prefixes; keep the kernel's text."""
    line = line.replace("\r", "").rstrip()
    m = None
    for m in _MIDLINE_TS.finditer(line):   # console: userspace text, then a kernel line
        pass
    if m is not None and m.start() > 0:
        line = line[m.start():]
    return _PREFIX.sub("", line, count=1)


def header_kind(line: str) -> str | None:
    """The splat kind a normalised line starts, or None."""
    for kind, pattern in _HEADERS:
        if pattern.match(line):
            return kind
    return None


def scan(log: str, context: int = 8) -> list[Splat]:
    lines = [normalise(raw) for raw in log.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    kinds = [header_kind(line) for line in lines]

    starts: list[tuple[int, int, str]] = []   # (first line, header line, kind)
    i = 0
    while i < len(lines):
        if lines[i] == CUT_HERE:
            for j in range(i + 1, min(i + 1 + _CUT_LOOKAHEAD, len(lines))):
                if kinds[j] is not None:
                    starts.append((i + 1, j, kinds[j] or ""))
                    i = j
                    break
        elif kinds[i] is not None:
            kind = kinds[i] or ""
            prev = starts[-1] if starts else None
            if not (kind == "oops" and prev and prev[2] == "bug" and i - prev[1] <= _BUG_OOPS_GAP):
                starts.append((i, i, kind))
        i += 1

    splats = []
    for n, (first, header, kind) in enumerate(starts):
        stop = starts[n + 1][0] if n + 1 < len(starts) else len(lines)
        if n + 1 < len(starts) and lines[stop - 1] == CUT_HERE:
            stop -= 1
        end = min(header + 1 + context, stop)
        splats.append(Splat(kind, lines[first:end], first + 1))
    return splats
