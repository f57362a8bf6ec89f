"""Reading a kernel build's output (kbuild quiet output, ``make V=0``, gcc or clang).

- ``objects_compiled``: how many objects make really compiled (the incremental-build check);
- ``warnings`` / ``new_warnings``: compiler warnings normalised so that a patch that only
  shifts lines does not turn old warnings into new ones;
- ``first_error``: the first compiler/linker/make error with context, for the report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

# kbuild: quiet_cmd_cc_o_c = CC $(quiet_modtag)  $@   (modtag "[M]" or three spaces)
_COMPILE_RE = re.compile(r"^  (?:CC|AS)(?: \[M\])?\s+(\S+\.o)$")

# ANSI colours and OSC 8 hyperlinks (gcc >= 10 with -fdiagnostics-urls on a terminal).
_ANSI_RE = re.compile(r"\x1b\]8;[^\x1b\x07]*(?:\x1b\\|\x07)|\x1b\[[0-9;]*[A-Za-z]")

# "file:line:col: warning: message [-Wflag]"  (line/col optional: objtool, ld)
_WARN_RE = re.compile(r"^(?P<file>[^\s:][^:]*?):(?:(?P<line>\d+):)?(?:(?P<col>\d+):)? warning: (?P<msg>.*)$")
_FLAG_RE = re.compile(r"\s*\[(?P<flag>-W[A-Za-z0-9_=+-]+)\]$")
# "file: In function 'foo':"  or "file: In function 'foo'," (followed by "inlined from")
# gcc omits the file when an inlined-from chain follows: "In function 'fill',"
_INFUNC_RE = re.compile(
    r"^(?:(?P<file>[^\s:][^:]*?): )?In (?:static |member )?function '(?P<func>[^']+)'(?P<end>[:,])$")
_INLINED_RE = re.compile(r"^\s+inlined from '(?P<func>[^']+)'")
_TOPLEVEL_RE = re.compile(r"^(?P<file>[^\s:][^:]*?): At (?:top level|global scope):$")
_INCLUDED_RE = re.compile(r"^(?:In file included from |\s+from )\S+")
# a "file:line[:col]" reference inside a message
_LOCREF_RE = re.compile(r"(?P<path>[\w./+-]+\.\w+):\d+(?::\d+)?")
# objtool/modpost offsets: "func+0x1f/0x80" or "func()+0x1f"
_OFFSET_RE = re.compile(r"\+0x[0-9a-fA-F]+(?:/0x[0-9a-fA-F]+)?")
_MAKE_TOOL_RE = re.compile(r"^(?:\S*/)?g?make(?:\[\d+\])?$")

_ERROR_RE = re.compile(r"(?:^|[\s:])(?:fatal )?error:", re.IGNORECASE)
_MAKE_ERROR_RE = re.compile(r": \*\*\* ")

# Top-level directories of a kernel source tree, for paths whose prefix we do not know.
_TOP_DIRS = frozenset({
    "arch", "block", "certs", "crypto", "drivers", "fs", "include", "init", "io_uring", "ipc",
    "kernel", "lib", "mm", "net", "rust", "samples", "scripts", "security", "sound", "tools",
    "usr", "virt",
})


def _clean(log: str) -> list[str]:
    return [_ANSI_RE.sub("", line).rstrip("\r\n ") for line in log.splitlines()]


def compiled_objects(log: str) -> list[str]:
    """Kernel objects the log shows compiled: kbuild's ``CC``/``AS`` lines for ``.o``
    files, built-in or module (``[M]``). Not counted: LD, AR, GEN, HOSTCC, ``.s`` files
    (asm-offsets), and the host tools that tools/ builds (objtool, libsubcmd), which
    kbuild prints with absolute paths in the build directory."""
    return [m.group(1) for line in _clean(log) if (m := _COMPILE_RE.match(line)) and not m.group(1).startswith("/")]


def objects_compiled(log: str) -> int:
    return len(compiled_objects(log))


@dataclass(frozen=True)
class CompilerWarning:
    """A normalised warning: no line or column numbers, paths relative to the source tree."""

    file: str
    function: str | None
    message: str
    flag: str | None

    def __str__(self) -> str:
        where = f"{self.file}: {self.function}()" if self.function else self.file
        flag = f" [{self.flag}]" if self.flag else ""
        return f"{where}: warning: {self.message}{flag}"


Warning = CompilerWarning  # the name the design uses; shadows the builtin only in this module's API


def normalise_path(path: str, trees: Sequence[str] = ()) -> str:
    """A path as kbuild/gcc printed it -> relative to the source (or build) tree.

    Strips the given tree prefixes (source tree, O= build dir), leading ``./`` and ``../``;
    for other absolute paths keeps the part from the first kernel top-level directory.
    """
    p = path.strip()
    for tree in sorted((str(t).rstrip("/") for t in trees if str(t).strip("/")), key=len, reverse=True):
        if p.startswith(tree + "/"):
            p = p[len(tree) + 1:]
            break
    else:
        if p.startswith("/"):
            parts = PurePosixPath(p).parts[1:]
            for i, part in enumerate(parts[:-1]):
                if part in _TOP_DIRS:
                    p = "/".join(parts[i:])
                    break
    while p.startswith("./") or p.startswith("../"):
        p = p[p.index("/") + 1:]
    return p


def _normalise_message(msg: str, trees: Sequence[str]) -> str:
    msg = msg.replace("\u2018", "'").replace("\u2019", "'")
    msg = _LOCREF_RE.sub(lambda m: normalise_path(m.group("path"), trees), msg)
    msg = _OFFSET_RE.sub("", msg)
    return msg.strip()


def warnings(log: str, *, trees: Sequence[str] = ()) -> list[CompilerWarning]:
    """The compiler (and objtool/linker) warnings in a build log, normalised and deduplicated,
    in order of first appearance. ``trees``: absolute source/build directory prefixes to strip.

    The function comes from gcc's "file: In function 'foo':" context line (tracked per
    file, so parallel make output mostly keeps it right); inlined-from chains are kept
    as "foo (inlined from bar)" without their locations.
    """
    seen: dict[CompilerWarning, None] = {}
    context: dict[str, str | None] = {}
    # "In function 'f'," awaiting its inlined-from lines: (file or None, f, callers)
    pending_func: tuple[str | None, str, list[str]] | None = None
    next_function: str | None = None  # a file-less context: applies to the next warning
    fresh_include_chain = False
    for line in _clean(log):
        line = line.replace("\u2018", "'").replace("\u2019", "'")
        if pending_func is not None:
            m = _INLINED_RE.match(line)
            if m:
                pending_func[2].append(m.group("func"))
                continue
            f, func, inl = pending_func
            name = f"{func} (inlined from {', '.join(inl)})" if inl else func
            if f is None:
                next_function = name
            else:
                context[f] = name
            pending_func = None
        if _INCLUDED_RE.match(line):
            fresh_include_chain = True
            continue
        m = _INFUNC_RE.match(line)
        if m:
            f = normalise_path(m.group("file"), trees) if m.group("file") else None
            if m.group("end") == ",":
                pending_func = (f, m.group("func"), [])
            elif f is None:
                next_function = m.group("func")
            else:
                context[f] = m.group("func")
            fresh_include_chain = False
            continue
        m = _TOPLEVEL_RE.match(line)
        if m:
            context[normalise_path(m.group("file"), trees)] = None
            fresh_include_chain = False
            continue
        m = _WARN_RE.match(line)
        if not m or _MAKE_TOOL_RE.match(m.group("file")):
            continue
        f = normalise_path(m.group("file"), trees)
        if next_function is not None:
            context[f] = next_function
            next_function = None
        elif fresh_include_chain:
            # a new include stack without an "In function" line: a new translation unit's
            # diagnostic at top level; what we knew about this (header) file is stale
            context[f] = None
        fresh_include_chain = False
        msg = m.group("msg")
        flag = None
        fm = _FLAG_RE.search(msg)
        if fm:
            flag = fm.group("flag")
            msg = msg[:fm.start()]
        function = context.get(f) if m.group("line") else None
        w = CompilerWarning(f, function, _normalise_message(msg, trees), flag)
        seen.setdefault(w, None)
    return list(seen)


def new_warnings(baseline: Sequence[CompilerWarning], patched: Sequence[CompilerWarning]) -> list[CompilerWarning]:
    """Warnings of the patched build that the baseline does not have (file + function +
    message + flag; line numbers play no part, so shifted lines are not new)."""
    old = set(baseline)
    out: dict[CompilerWarning, None] = {}
    for w in patched:
        if w not in old:
            out.setdefault(w, None)
    return list(out)


def first_error(log: str, context: int = 10) -> str | None:
    """The first compiler/assembler/linker ``error:`` line, or failing that the first make
    ``*** `` line, with ``context`` lines before and after it; None if there is neither."""
    lines = _clean(log)
    idx = next((i for i, line in enumerate(lines) if _ERROR_RE.search(line)), None)
    if idx is None:
        idx = next((i for i, line in enumerate(lines) if _MAKE_ERROR_RE.search(line)), None)
    if idx is None:
        return None
    return "\n".join(lines[max(0, idx - context): idx + context + 1])
