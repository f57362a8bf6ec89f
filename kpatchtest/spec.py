"""The series spec: one YAML file that drives a laptop run, Jenkins and a real lab.

Validation errors name file:line, the key path, what was expected and what was
found; unknown keys are errors, because a typo must never be silently ignored.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, ScalarEvent

from kpatchtest.errors import InputError
from kpatchtest.fetch.sources import CommitsSource, MboxSource, MsgidSource, Source
from kpatchtest.urls import check_ref, check_repo, is_url
from kpatchtest.util import StrictModel, user_path

ApplyLevel = Literal["clean", "three-way", "partial", "any"]

# Which apply verdicts satisfy a gate level.
GATE_ACCEPTS: dict[str, set[str]] = {
    "clean": {"clean", "already-applied"},
    "three-way": {"clean", "already-applied", "three-way"},
    "partial": {"clean", "already-applied", "three-way", "partial"},
    "any": {"clean", "already-applied", "three-way", "partial", "conflict"},
}


# Strings that reach git: no option injection, only allowed transports (see urls).
GitRef = Annotated[str, AfterValidator(check_ref)]
GitRepo = Annotated[str, AfterValidator(check_repo)]


class BranchSpec(StrictModel):
    """A branch to test: a ref of kernel.repo, or a source tarball imported as a branch."""

    name: GitRef = Field(min_length=1)
    ref: GitRef | None = None       # default: name
    tarball: str | None = None      # e.g. /usr/src/linux-source-6.1.tar.xz

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_kind(self) -> "BranchSpec":
        if self.ref and self.tarball:
            raise ValueError("give either ref or tarball, not both")
        return self

    @property
    def git_ref(self) -> str:
        return self.ref or self.name


class KernelSpec(StrictModel):
    repo: GitRepo | None = None     # URL, local path, or a source tarball
    upstream: GitRef | None = None  # the ref the series was written against
    branches: list[BranchSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _repo_needed(self) -> "KernelSpec":
        if not self.repo and any(not b.tarball for b in self.branches):
            raise ValueError("kernel.repo is required unless every branch names a tarball")
        return self


class FetchSpec(StrictModel):
    midmask: str | None = None      # b4.midmask, e.g. https://lore.kernel.org/all/%s
    attestation: Literal["off", "softfail", "hardfail"] = "softfail"

    @field_validator("midmask")
    @classmethod
    def _has_placeholder(cls, v: str | None) -> str | None:
        if v is not None and "%s" not in v:
            raise ValueError("midmask must contain %s where the message-id goes")
        return v


class ConfigsSpec(StrictModel):
    """The kernel config: a base plus Kconfig fragments, merged like merge_config.sh."""

    base: str = "tinyconfig"        # a make target (defconfig, tinyconfig, kvm_guest.config) or a file
    fragments: list[str] = Field(default_factory=list)  # paths, or names of files in configs/
    required: list[str] = Field(default_factory=list)   # symbols whose loss is an error, not a warning


class ApplySpec(StrictModel):
    """How the apply stage searches; what its verdicts must be is gates.apply."""

    prerequisite_budget_s: float = Field(default=30, ge=0)  # per conflicting patch


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"        # also make's: a key `--eval=...` would be an option


class BuildSpec(StrictModel):
    """Which branches to build and how."""

    when: ApplyLevel = "partial"    # build branches whose apply verdict passes this level
    per_patch: bool = False         # also build after each patch: the first patch that breaks the build
    jobs: int | None = Field(default=None, ge=1)    # default: CPU count
    make_vars: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = Field(default_factory=dict)


_HTTP_URL = r"^https?://[^\s/]+(/\S*)?$"


class LavaRef(StrictModel):
    """A LAVA server the boots are submitted to (lab: {name: lava, lava: {...}}; docs/lava.md).

    Credentials come from the environment (`token_env`, with `user`) or from a lavacli
    identity (~/.config/lavacli.yaml), never from the spec. Artifacts reach the lab at
    `artifact_url`: copied into `artifact_dir` when it is served by a server of its own,
    else served by kpatchtest from the run directory while the run lasts."""

    url: Annotated[str, Field(pattern=_HTTP_URL)]   # the server, e.g. http://127.0.0.1:8800 (XML-RPC: URL/RPC2)
    user: str | None = None         # with token_env; default $LAVA_USER
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "LAVA_TOKEN"
    identity: str | None = None     # a lavacli identity instead of user + token_env
    device_type: str = "qemu"
    artifact_url: Annotated[str, Field(pattern=_HTTP_URL)]
    artifact_dir: str | None = None
    tcg: bool = True                # the device is QEMU under TCG on this machine: pin the guest's TSC rate
    prompt: str = "root@kpatchtest-lab"     # the lab image's shell prompt on the console
    timeout_minutes: int = Field(default=30, ge=1)   # the whole LAVA job


class LabRef(StrictModel):
    """Where kernels boot: the local QEMU lab (default), a LAVA server, or an inventory in configs/labs/."""

    name: str = "local"             # "local", a configs/labs/<name>.yaml, or a path to one
    tags: list[str] = Field(default_factory=list)   # only hosts with all these tags (e.g. [amd])
    kernel: str | None = None       # local lab: the known-good kernel (default: the first baseline build)
    memory_mb: int = Field(default=1024, ge=256)
    cpus: int = Field(default=2, ge=1)
    cmdline: str = ""               # appended to the kernel command line of test kernels
    lava: LavaRef | None = None     # name: lava

    @model_validator(mode="after")
    def _lava_needs_server(self) -> "LabRef":
        if self.name == "lava" and self.lava is None:
            raise ValueError("lab: {name: lava} needs a lava: {url, artifact_url} section")
        if self.lava is not None and self.name != "lava":
            raise ValueError(f"lab.lava is only for name: lava, not {self.name!r}")
        return self


KUT_UPSTREAM = "https://gitlab.com/kvm-unit-tests/kvm-unit-tests.git"
_TEST_NAME = r"^[A-Za-z0-9_.+][A-Za-z0-9_.+-]*$"     # never an option of run_tests.sh


class KutSpec(StrictModel):
    """kvm-unit-tests: built once per (source, ref, arch) on this machine, run on the lab host."""

    source: GitRepo = KUT_UPSTREAM  # a git URL or a local checkout
    ref: GitRef | None = None       # a git URL: default its HEAD; a local checkout: its working tree
    tests: list[Annotated[str, Field(pattern=_TEST_NAME)]] = Field(default_factory=list)
    groups: list[Annotated[str, Field(pattern=_TEST_NAME)]] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=_ENV_NAME)], str] = Field(default_factory=dict)  # ACCEL, QEMU, TIMEOUT, MACHINE
    timeout_s: float = Field(default=1800, gt=0)    # the whole run_tests.sh call
    tap: bool = False               # parse -t (TAP 13) output instead of the plain lines; logs are read either way


_SMM_GUEST_ONLY = {"bootsector": ("reads", "sectors_per_read", "spread_mb"), "linux": ("kernel", "init_message")}


class SmmBootSpec(StrictModel):
    """The SMM-heavy boot: a nested SeaBIOS guest on q35,smm=on.

    guest bootsector: a boot sector doing `reads` BIOS disk reads (the cheap case);
    guest linux: GRUB loads a bzImage and a tiny initramfs through the BIOS (the case users
    suffer from). `kernel` (linux): the guest's bzImage; default the run's first passing
    baseline build. Fields of the other guest kind are errors, not silently ignored."""

    guest: Literal["bootsector", "linux"] = "bootsector"
    reads: int = Field(default=200, ge=1, le=0xFFFF)
    sectors_per_read: int = Field(default=8, ge=1, le=127)
    spread_mb: int = Field(default=0, ge=0, le=512)     # MB the guest copies reads across (working set)
    kernel: str | None = Field(default=None, min_length=1)   # linux: path of the guest's bzImage
    init_message: str = Field(default="init reached", max_length=100, pattern=r"^[ -~]*$")  # linux: init's line
    disk: Literal["ahci", "ide"] = "ahci"               # ahci: SeaBIOS drives it from SMM; ide: control
    timeout_s: float = Field(default=120, gt=0)         # per nested boot
    probes: bool = True             # count SMM transitions and TDP MMU roots with tracefs on the host

    @model_validator(mode="after")
    def _fields_of_the_guest(self) -> "SmmBootSpec":
        other = "linux" if self.guest == "bootsector" else "bootsector"
        wrong = [f for f in _SMM_GUEST_ONLY[other] if f in self.model_fields_set]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: only for guest {other}, not guest {self.guest}; "
                             f"remove {'it' if len(wrong) == 1 else 'them'} or set guest: {other}")
        return self


class WorkloadsSpec(StrictModel):
    """What runs on each booted kernel, before the host goes back to its known-good kernel.

    `rounds` boots each build that many times, baseline and patched in pairs (B1 P1 P2 B2
    ...), so drift in the lab hits both sides alike; `repetitions` runs each workload that
    many times per boot."""

    rounds: int = Field(default=1, ge=1, le=50)
    repetitions: int = Field(default=3, ge=1, le=1000)
    # random: half the rounds B first, half P first, shuffled by a generator seeded with
    # `seed` (a fixed order lets an effect of the slot or drift fall on one kernel);
    # alternate: B then P in every round
    order: Literal["alternate", "random"] = "random"
    seed: int = 1
    kvm_unit_tests: KutSpec | None = None
    smm_boot: SmmBootSpec | None = None

    @model_validator(mode="after")
    def _something(self) -> "WorkloadsSpec":
        if self.kvm_unit_tests is None and self.smm_boot is None:
            raise ValueError("name at least one workload: kvm_unit_tests or smm_boot")
        return self


def _percent(v: Any) -> Any:
    """A share as "2%" or as a fraction (0.02); a bare number above 1 is ambiguous (2 = 2%? 200%?)."""
    if isinstance(v, str):
        text = v.strip()
        if not text.endswith("%"):
            raise ValueError("expected a percentage like '2%' or a fraction like 0.02")
        try:
            return float(text[:-1]) / 100
        except ValueError:
            raise ValueError("expected a percentage like '2%' or a fraction like 0.02") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("expected a percentage like '2%' or a fraction like 0.02")
    if v > 1:
        raise ValueError(f"a bare number is a fraction (0.02 = 2%): write '{v:g}%' if you mean {v:g} percent")
    return float(v)


Percent = Annotated[float, BeforeValidator(_percent), Field(ge=0)]


class CompareSpec(StrictModel):
    """How baseline and patched are compared (kpatchtest/compare)."""

    threshold: Percent = 0.02       # a metric changed only if its whole 95% CI lies beyond 1 +- this
    reruns: int = Field(default=2, ge=0, le=20)     # reruns on both kernels before calling a regression
    bootstrap: int = Field(default=10000, ge=1000, le=1_000_000)    # resamples
    seed: int = Field(default=1, ge=0)              # the bootstrap's: a re-render gives the same numbers


class MetricGate(StrictModel):
    """The largest change of one metric a run accepts: max_slowdown for times, max_increase for counts."""

    max_slowdown: Percent | None = None
    max_increase: Percent | None = None

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("expected a mapping like {max_slowdown: 5%} or {max_increase: 0%}")
        bad = [k for k in v if k not in cls.model_fields]
        if bad:
            raise ValueError(f"unknown key {bad[0]!r} (allowed: {', '.join(cls.model_fields)})")
        if len(v) != 1:
            raise ValueError("give one of max_slowdown, max_increase")
        return v

    @property
    def key(self) -> str:
        return "max_slowdown" if self.max_slowdown is not None else "max_increase"

    @property
    def limit(self) -> float:
        return self.max_slowdown if self.max_slowdown is not None else self.max_increase  # type: ignore[return-value]


def _known_metric(name: str) -> str:
    from kpatchtest.compare.metrics import METRICS, metric_info
    if metric_info(name) is None:
        plain = sorted(n for n in METRICS if not n.startswith("kvm."))
        raise ValueError(f"unknown metric {name!r} (known: {', '.join(plain)}, kvm.<counter>)")
    return name


def _check_metric_gates(v: dict[str, MetricGate]) -> dict[str, MetricGate]:
    """A gate must make sense for its metric: a way to be worse, and a limit of its kind."""
    from kpatchtest.compare.metrics import metric_info
    for name, gate in v.items():
        info = metric_info(name)
        assert info is not None     # _known_metric checked the key
        if info.direction == "none":
            raise ValueError(f"metric {name!r} only describes the workload (no better or worse): it cannot be gated")
        if gate.key == "max_slowdown" and not info.time:
            raise ValueError(f"metric {name!r} is a count ({info.unit}), not a time: use max_increase")
        if gate.key == "max_increase" and info.time:
            raise ValueError(f"metric {name!r} is a time ({info.unit}): use max_slowdown")
    return v


RegressionsGate = Literal["none", "allow-flaky"]
BuildGate = Literal["pass", "no-new-warnings"]
BootGate = Literal["booted", "no-splats"]
WorkloadGate = Literal["pass", "no-new-failures"]


class GatesSpec(StrictModel):
    """Gates turn results into exit code 1: `apply: clean`, or per branch."""

    apply: ApplyLevel | dict[str, ApplyLevel] | None = None
    build: BuildGate | None = None  # pass: the patched build passes; no-new-warnings: and adds no warning
    boot: BootGate | None = None    # booted: the patched kernel booted; no-splats: and logged no splat
    # pass: every patched workload passes (or skips); no-new-failures: none fails that passed on baseline
    workloads: WorkloadGate | None = None
    # none: no regression, no new splat, no test that failed on patched only in some rounds;
    # allow-flaky: flaky tests do not fail the gate
    regressions: RegressionsGate | None = None
    metrics: Annotated[dict[Annotated[str, AfterValidator(_known_metric)], MetricGate],
                       AfterValidator(_check_metric_gates)] = Field(default_factory=dict)

    def apply_level(self, branch: str) -> str | None:
        if isinstance(self.apply, dict):
            return self.apply.get(branch, self.apply.get("default"))
        return self.apply


_SOURCE_KEYS = ("msgid", "mbox", "commits")


def _git_safe_commits(s: CommitsSource) -> CommitsSource:
    """The range and repo of a commits: entry reach git: the same checks as kernel.*."""
    check_ref(s.commits.strip())
    check_repo(s.repo)
    return s


def _source_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return next((k for k in _SOURCE_KEYS if k in v), None)
    if isinstance(v, BaseModel):
        return next((k for k in _SOURCE_KEYS if k in type(v).model_fields), None)
    return None


SourceItem = Annotated[
    Annotated[MsgidSource, Tag("msgid")] | Annotated[MboxSource, Tag("mbox")]
    | Annotated[CommitsSource, AfterValidator(_git_safe_commits), Tag("commits")],
    Discriminator(_source_kind, custom_error_type="source_kind",
                  custom_error_message="expected a mapping with one of msgid:, mbox:, commits:"),
]


class Spec(StrictModel):
    # the default --out is out/<name> and the local lab names files after it: a plain name
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
    series: list[SourceItem] = Field(min_length=1)
    kernel: KernelSpec
    fetch: FetchSpec = Field(default_factory=FetchSpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    apply: ApplySpec = Field(default_factory=ApplySpec)
    configs: ConfigsSpec | None = None     # no configs: no build stage
    build: BuildSpec = Field(default_factory=BuildSpec)
    lab: LabRef | None = None       # no lab: no boot stage
    workloads: WorkloadsSpec | None = None  # no workloads: boots only
    compare: CompareSpec = Field(default_factory=CompareSpec)

    @property
    def sources(self) -> list[Source]:
        return self.series  # type: ignore[return-value]


class LoadedSpec(BaseModel):
    """A validated spec plus where it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: Spec
    path: Path

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _line_of(doc: Any, loc: tuple) -> int | None:
    """Walk ruamel's line info along a pydantic error location."""
    line = None
    node = doc
    for step in loc:
        try:
            if isinstance(step, int) and isinstance(node, list):
                line = node.lc.item(step)[0] + 1
                node = node[step]
            elif isinstance(node, dict) and step in node:
                line = node.lc.key(step)[0] + 1
                node = node[step]
            else:
                break
        except (AttributeError, KeyError, IndexError, TypeError):
            break
    return line


def _fmt_loc(loc: tuple) -> str:
    out = ""
    for step in loc:
        key = str(step) if str(step).isprintable() else repr(str(step))    # a key "\n" keeps one line
        out += f"[{step}]" if isinstance(step, int) else ("." if out else "") + key
    return out or "(top level)"


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's union members, validator and discriminator tags from a location."""
    out = tuple(s for s in loc if isinstance(s, int) or ("[" not in s and "(" not in s))
    if len(out) > 2 and out[0] == "series" and out[2] in _SOURCE_KEYS:
        out = out[:2] + out[3:]
    if len(out) > 1 and out[0] == "gates" and out[-1] in ("str", "dict"):
        out = out[:-1]
    return out


def _describe(err: dict, allowed: list[str] | None) -> str:
    kind = err.get("type", "")
    found = err.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    found_s = repr(found)
    if len(found_s) > 60:
        found_s = f"a {type(found).__name__}"
    return f"{msg}; found {found_s}"


def _allowed_keys(loc: tuple) -> list[str] | None:
    if len(loc) == 3 and loc[0] == "series":
        return ["commits", "mbox", "msgid", "repo", "version"]
    model: Any = Spec
    for step in loc[:-1]:
        if isinstance(step, int):
            continue
        field = getattr(model, "model_fields", {}).get(step)
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return sorted(getattr(model, "model_fields", {}).keys()) if model else None


# A real spec has a few hundred nodes, nested five or six deep.
MAX_YAML_NODES = 10_000     # counted with every alias expanded
MAX_YAML_DEPTH = 64


def _check_shape(yaml: YAML, text: str, path: Path) -> None:
    """Refuse alias bombs, self-referring aliases and deep nesting from the event stream,
    before any node is built: composing them is what takes gigabytes, or the recursion
    limit (a RecursionError traceback)."""
    sizes: dict[str, int] = {}              # anchor -> nodes it expands to
    open_: list[tuple[str | None, int]] = []    # open collections: (anchor, nodes before it)
    nodes = 0
    for ev in yaml.parse(io.StringIO(text)):
        line = f"{path}:{ev.start_mark.line + 1}"
        if isinstance(ev, CollectionStartEvent):
            open_.append((ev.anchor, nodes))
            nodes += 1
            if len(open_) > MAX_YAML_DEPTH:
                raise InputError(f"{line}: YAML nested deeper than {MAX_YAML_DEPTH} levels",
                                 hint="a spec needs a handful")
        elif isinstance(ev, CollectionEndEvent):
            anchor, before = open_.pop()
            if anchor:
                sizes[anchor] = nodes - before
        elif isinstance(ev, ScalarEvent):
            nodes += 1
            if ev.anchor:
                sizes[ev.anchor] = 1
        elif isinstance(ev, AliasEvent):
            if any(a == ev.anchor for a, _ in open_):
                raise InputError(f"{line}: YAML alias *{ev.anchor} refers to a node that contains it",
                                 hint="a spec cannot be infinitely deep")
            nodes += sizes.get(ev.anchor, 0)    # an undefined alias: the loader says so
        if nodes > MAX_YAML_NODES:
            raise InputError(f"{line}: YAML expands to more than {MAX_YAML_NODES} nodes (an alias bomb?)",
                             hint="write the spec without nested aliases")


def parse_spec(text: str, path: Path) -> LoadedSpec:
    yaml = YAML(typ="rt")
    try:
        _check_shape(yaml, text, path)
        doc = yaml.load(io.StringIO(text))
    except MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: malformed YAML: {e.problem}", hint="fix the syntax") from None
    except YAMLError as e:          # the reader's: a control character, bad encoding
        raise InputError(f"{path}: malformed YAML: {str(e).splitlines()[0]}", hint="fix the syntax") from None
    except (ValueError, IndexError) as e:
        # ruamel's constructor: `._` matches its float pattern, `0x_` its int one, `2026-13-45`
        # its date one, and converting them raises (IndexError for `0x_`, which says nothing).
        why = f" ({str(e).splitlines()[0]})" if isinstance(e, ValueError) else ""
        raise InputError(f"{path}: malformed YAML: a value looks like a number or a date but is not one{why}",
                         hint="quote it to make it a string") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}:1: expected a mapping at the top level; found {type(doc).__name__}",
                         hint="see series/demo.yaml for the format")
    try:
        spec = Spec.model_validate(_plain(doc))
    except ValidationError as e:
        lines, seen = [], set()
        # Unknown keys first: a typo usually explains the "missing" error next to it.
        # Of a union's alternatives, the deepest location is the one the user meant.
        for err in sorted(e.errors(), key=lambda x: (x["type"] != "extra_forbidden", -len(_clean_loc(x["loc"])))):
            loc = _clean_loc(err["loc"])
            if any(loc[:len(o)] == o or o[:len(loc)] == loc for o in seen):
                continue    # another alternative of the same union
            seen.add(loc)
            line = _line_of(doc, loc)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {_fmt_loc(loc)}: {_describe(err, _allowed_keys(loc))}")
        raise InputError("; ".join(lines[:1]) + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""),
                         hint=None) from None
    try:
        _resolve_paths(spec, path.parent)
    except (ValueError, OSError) as e:      # a NUL byte in a path; a name longer than the OS allows
        raise InputError(f"{path}: a path in the spec is not a usable file name "
                         f"({e.strerror if isinstance(e, OSError) else e})",
                         hint="check the mbox, repo, tarball, configs and kvm_unit_tests paths") from None
    return LoadedSpec(spec=spec, path=path)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, (int, bool)) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _abs(p: str, base: Path) -> str:
    """`p` absolute against the spec's directory, `~` expanded. os.path.expanduser, not
    Path.expanduser: an unknown `~user` stays as written (and then "does not exist")
    instead of raising RuntimeError."""
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (base / q).resolve())


def _resolve_paths(spec: Spec, base: Path) -> None:
    """Make spec-relative paths absolute so a spec works from any directory."""
    srcs = []
    for s in spec.sources:
        if isinstance(s, MboxSource):
            s = MboxSource(mbox=_abs(s.mbox, base))
        elif isinstance(s, CommitsSource):
            repo = s.repo or spec.kernel.repo      # the README: repo defaults to kernel.repo
            if repo and not is_url(repo):
                repo = _abs(repo, base)
            s = CommitsSource(commits=s.commits, repo=repo)
        srcs.append(s)
    spec.series = srcs
    if spec.kernel.repo and not is_url(spec.kernel.repo):
        spec.kernel.repo = _abs(spec.kernel.repo, base)
    for b in spec.kernel.branches:
        if b.tarball:
            b.tarball = _abs(b.tarball, base)
    if spec.configs:
        from kpatchtest.build.kconfig import base_kind
        spec.configs.fragments = [resolve_fragment(f, base) for f in spec.configs.fragments]
        if base_kind(spec.configs.base) == "file":
            spec.configs.base = _abs(spec.configs.base, base)
    kut = spec.workloads.kvm_unit_tests if spec.workloads else None
    if kut and not is_url(kut.source):
        kut.source = _abs(kut.source, base)


CONFIGS_DIR = Path(__file__).resolve().parent / "data" / "configs"


def resolve_fragment(name: str, base: Path) -> str:
    """A fragment path relative to the spec, else a file of the shipped configs/ directory."""
    p = Path(os.path.expanduser(name))      # as _abs: an unknown ~user stays as written
    if p.is_absolute():
        return str(p)
    if (base / p).exists() or "/" in name:
        return str((base / p).resolve())
    return str(CONFIGS_DIR / name)


def load_spec(path: str | Path) -> LoadedSpec:
    p = user_path(path)     # paths inside are relative to it
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise InputError(f"{p}: spec file not found", hint="give the path of a series YAML, e.g. series/demo.yaml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read spec: {e}") from None
    return parse_spec(text, p)
