"""Kconfig fragments: parse, merge (as scripts/kconfig/merge_config.sh does), verify.

The flow a build uses, per branch:

    base (make <target> or a copied file) -> merged_text(base .config, merge_fragments(...))
        -> make olddefconfig -> verify(merge, final .config)

Semantics follow merge_config.sh (kernel 5.10 to 6.12, unchanged in that range):

- a fragment line is ``CONFIG_FOO=value`` or ``# CONFIG_FOO is not set``; other lines
  starting with ``#`` and blank lines are comments. merge_config.sh passes anything else
  through to Kconfig, which warns and ignores it; here it is an input error (file:line),
  because a silently ignored line is a config the user did not get.
- later fragments override earlier ones; each redefinition to a different value is
  noted ("Value of CONFIG_X is redefined by fragment Y"), a repeat of the same value is not.
- merging into the base removes the base's lines for the fragments' symbols and appends
  the fragments' lines (merge_config.sh -m).
- after olddefconfig every requested value is checked against the final .config
  (merge_config.sh's "Value requested for CONFIG_X not in final .config").

Symbols are Kconfig names without the ``CONFIG_`` prefix (``KVM``, not ``CONFIG_KVM``);
values are the text after ``=`` (strings keep their quotes), and ``"n"`` stands for
``# CONFIG_FOO is not set`` (and for ``CONFIG_FOO=n``, which Kconfig reads the same way).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kpatchtest.errors import InputError
from kpatchtest.util import sha256_text

PREFIX = "CONFIG_"

# merge_config.sh: SED_CONFIG_EXP1 / SED_CONFIG_EXP2
_SET_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")
# What Kconfig accepts as a value: tristate, decimal, hex, or a double-quoted string.
_VALUE_RE = re.compile(r'^(?:[ymn]|-?[0-9]+|0[xX][0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')
_HEX_RE = re.compile(r"^(?:0[xX])?([0-9a-fA-F]+)$")


@dataclass(frozen=True)
class Setting:
    """One requested value: ``symbol`` without the CONFIG_ prefix, ``value`` "n" for not set."""

    symbol: str
    value: str
    source: str  # "file:line"

    @property
    def line(self) -> str:
        """The line as it appears in a .config."""
        return config_line(self.symbol, self.value)


@dataclass(frozen=True)
class Fragment:
    path: Path
    settings: tuple[Setting, ...]


@dataclass
class MergeResult:
    """The fragments' final values (symbol -> Setting, in first-seen order) and the
    human-readable redefinition notes, in the order merge_config.sh prints them."""

    settings: dict[str, Setting] = field(default_factory=dict)
    redefined: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Mismatch:
    """A requested value that is not in the final .config.

    ``actual`` None: the symbol is absent (unknown on this branch, or its dependencies are
    unmet so Kconfig did not write it). ``required``: the spec says this symbol must take,
    so the build is an error rather than a warning.
    """

    symbol: str
    requested: str
    actual: str | None
    source: str
    required: bool

    def describe(self) -> str:
        got = "absent (unknown symbol or unmet dependency)" if self.actual is None else config_line(
            self.symbol, self.actual)
        return f"{self.source}: requested {config_line(self.symbol, self.requested)}, got {got}"


def config_line(symbol: str, value: str) -> str:
    return f"# {PREFIX}{symbol} is not set" if value == "n" else f"{PREFIX}{symbol}={value}"


def normalise_symbol(name: str) -> str:
    """``CONFIG_KVM`` or ``KVM`` -> ``KVM``."""
    name = name.strip()
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _parse_line(line: str) -> tuple[str, str] | None:
    """(symbol, value) for a setting line, None for anything else."""
    m = _UNSET_RE.match(line)
    if m:
        return m.group(1), "n"
    m = _SET_RE.match(line)
    if m:
        return m.group(1), m.group(2)
    return None


def parse_fragment(path: Path) -> Fragment:
    """Read a Kconfig fragment; InputError (file:line) for a missing file or a bad line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"config fragment {path} does not exist",
                         hint="fix the path in the spec (relative paths are relative to the spec file)") from None
    except IsADirectoryError:
        raise InputError(f"config fragment {path} is a directory, not a file",
                         hint="name a fragment file such as configs/kvm.config") from None
    except OSError as exc:
        raise InputError(f"config fragment {path} cannot be read: {exc.strerror}",
                         hint="check the file's permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"config fragment {path} is not UTF-8 text (byte {exc.start})",
                         hint="a fragment holds CONFIG_FOO=value lines") from None

    settings: list[Setting] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip()
        where = f"{path}:{lineno}"
        if not line:
            continue
        parsed = _parse_line(line)
        if parsed is None:
            if line.startswith("#"):
                continue  # a comment
            raise InputError(
                f"{where}: not a Kconfig fragment line: {line[:80]!r}",
                hint="write CONFIG_FOO=y|m|<number>|\"<string>\", '# CONFIG_FOO is not set', or a '#' comment")
        symbol, value = parsed
        if not _VALUE_RE.match(value):
            raise InputError(
                f"{where}: bad value for {PREFIX}{symbol}: {value!r}",
                hint="a value is y, m, n, a number, 0x<hex> or a \"quoted string\" (no trailing comment)")
        settings.append(Setting(symbol, value, where))
    return Fragment(path, tuple(settings))


def parse_config(text: str) -> dict[str, str]:
    """A full .config -> symbol -> value ("n" for not set). Other lines are ignored; a
    symbol set twice keeps its last value, as Kconfig does."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parsed = _parse_line(line.rstrip())
        if parsed is not None:
            out[parsed[0]] = parsed[1]
    return out


def merge_fragments(fragments: Sequence[Fragment]) -> MergeResult:
    """Apply fragments in order; a later value wins, with a note when it differs."""
    result = MergeResult()
    for frag in fragments:
        for s in frag.settings:
            prev = result.settings.get(s.symbol)
            if prev is not None and prev.value != s.value:
                result.redefined.append(
                    f"Value of {PREFIX}{s.symbol} is redefined by fragment {frag.path}: "
                    f"previous value {prev.line} ({prev.source}), new value {s.line} ({s.source})")
            result.settings[s.symbol] = s
    return result


def merged_text(base_config: str, merge: MergeResult) -> str:
    """The base .config with the fragments applied, as merge_config.sh -m writes it: the
    base's lines for the fragments' symbols are removed, the fragments' lines appended.
    Feed the result to ``make olddefconfig``."""
    symbols = merge.settings.keys()
    kept = [line for line in base_config.splitlines()
            if (p := _parse_line(line.rstrip())) is None or p[0] not in symbols]
    out = kept + ([""] if kept and kept[-1].strip() else [])
    out.append("# merged by kpatchtest from config fragments")
    out.extend(f"{s.line}" for s in merge.settings.values())
    return "\n".join(out) + "\n"


def _same_value(requested: str, actual: str) -> bool:
    if requested == actual:
        return True
    # Kconfig writes a hex symbol's value with a 0x prefix whatever the fragment said.
    a, b = _HEX_RE.match(requested), _HEX_RE.match(actual)
    return bool(a and b and actual[:2].lower() == "0x" and int(a.group(1), 16) == int(b.group(1), 16))


def verify(merge: MergeResult, final_config: str, required: Iterable[str] = frozenset()) -> list[Mismatch]:
    """Every requested value against the .config after olddefconfig.

    "n" requested and the symbol absent is fine (absent means not built). A symbol in
    ``required`` that no fragment sets must come out enabled (y or m); if it does not,
    it is reported with requested "y" and source "required".
    """
    final = parse_config(final_config)
    req = {normalise_symbol(r) for r in required}
    out: list[Mismatch] = []
    for sym, s in merge.settings.items():
        actual = final.get(sym)
        if actual is None and s.value == "n":
            continue
        if actual is not None and _same_value(s.value, actual):
            continue
        out.append(Mismatch(sym, s.value, actual, s.source, sym in req))
    for sym in sorted(req - merge.settings.keys()):
        actual = final.get(sym)
        if actual not in ("y", "m"):
            out.append(Mismatch(sym, "y", actual, "required", True))
    return out


def config_hash(config_text: str) -> str:
    """sha256 of the normalised .config: the settings sorted by symbol, one line each;
    comments (the header with version and date) and order do not matter."""
    settings = parse_config(config_text)
    norm = "".join(config_line(sym, settings[sym]) + "\n" for sym in sorted(settings))
    return sha256_text(norm)


# --- base configs ---------------------------------------------------------------------

# Targets scripts/kconfig/Makefile implements itself (5.10 .. 6.12), usable as a base.
BUILTIN_BASE_TARGETS = frozenset({
    "defconfig", "tinyconfig", "allnoconfig", "allyesconfig", "allmodconfig",
    "alldefconfig", "randconfig",
})
# Config targets that are not a base: interactive, or they start from an existing .config.
NOT_A_BASE = frozenset({
    "config", "menuconfig", "nconfig", "gconfig", "xconfig", "oldconfig", "olddefconfig",
    "syncconfig", "listnewconfig", "helpnewconfig", "savedefconfig", "localmodconfig",
    "localyesconfig", "yes2modconfig", "mod2yesconfig", "mod2noconfig", "oldnoconfig",
})
_TARGET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*config$")


def base_kind(base: str) -> Literal["target", "file"]:
    """A base is a make target (``defconfig``, ``tinyconfig``, ``x86_64_defconfig``,
    ``kvm_guest.config``: a bare name ending in ``config``) or a file path (anything with
    a ``/``, or not ending in ``config``). Write ``./my.config`` for a file in the
    current directory."""
    base = base.strip()
    if not base:
        raise InputError("empty base config", hint="use defconfig, tinyconfig, an in-tree target or a file path")
    if "/" in base or base.startswith("~") or not _TARGET_RE.match(base):
        return "file"
    if base in NOT_A_BASE:
        raise InputError(f"base config {base!r} is not a base configuration target",
                         hint="use defconfig, tinyconfig, allnoconfig, <name>_defconfig, <name>.config "
                              "or a file path")
    return "target"


def in_tree_target_paths(target: str, srcarch: str = "x86") -> list[str]:
    """Where the tree must hold a file for this target (relative to the source tree);
    [] for targets Kconfig implements itself. The make target exists on a branch if any
    of these paths exists there (scripts/kconfig/Makefile's lookup)."""
    if target in BUILTIN_BASE_TARGETS:
        return []
    if target.endswith("_defconfig"):
        return [f"arch/{srcarch}/configs/{target}"]
    if target.endswith(".config"):
        return [f"kernel/configs/{target}", f"arch/{srcarch}/configs/{target}"]
    return [f"arch/{srcarch}/configs/{target}"]


@dataclass(frozen=True)
class BaseConfig:
    """The spec's base: a make target, or a .config file (resolved against ``relative_to``)."""

    name: str
    kind: Literal["target", "file"]
    path: Path | None = None  # for kind "file"

    @classmethod
    def parse(cls, base: str, relative_to: Path | None = None) -> BaseConfig:
        kind = base_kind(base)
        if kind == "target":
            return cls(base.strip(), "target")
        p = Path(base.strip()).expanduser()
        if not p.is_absolute() and relative_to is not None:
            p = relative_to / p
        return cls(base.strip(), "file", p)

    def read(self) -> str:
        """The base file's text (kind "file" only); InputError if it is missing."""
        assert self.kind == "file" and self.path is not None
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            raise InputError(f"base config file {self.path} does not exist or cannot be read",
                             hint="fix the base path in the spec, or use a make target such as tinyconfig") from None
