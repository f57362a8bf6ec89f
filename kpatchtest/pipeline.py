"""The pipeline, one direction: spec -> fetch -> apply -> (build -> boot -> workloads) -> report.

Each stage takes typed inputs and appends to the one RunResult. Reports are
written only once the stages ran, so a run that dies on bad input leaves the
previous results in --out untouched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kpatchtest import __version__, rawtext
from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series
from kpatchtest.boot import stage as boot_stage
from kpatchtest.build import stage as build_stage
from kpatchtest.errors import EXIT_GATE, EXIT_INPUT, EXIT_OK, InputError
from kpatchtest.fetch.stage import FetchOptions, fetch_series
from kpatchtest.kernelrepo import KernelCache, ResolvedKernel
from kpatchtest.patchset import Series
from kpatchtest.progress import Progress
from kpatchtest.report import write_all
from kpatchtest.results import SCHEMA_VERSION, ApplyResult, RunResult, SeriesInfo, SeriesPatchInfo
from kpatchtest.gates import evaluate_gates
from kpatchtest.spec import LoadedSpec
from kpatchtest.util import output_error, user_path, write_atomic
from kpatchtest.workloads.stage import Workloads

STAGES = ("fetch", "apply", "build", "boot", "workloads")
FUTURE_STAGES = ("compare",)
# The spec section a stage needs; without it the stage is left out (or, asked for explicitly, an error).
NEEDS = {"build": ("configs", "configs: {base: tinyconfig, fragments: [x86_64-base.config, kvm.config]}"),
         "boot": ("lab", "lab: {name: local}"),
         "workloads": ("workloads", "workloads: {smm_boot: {reads: 200}}")}


@dataclass
class RunOptions:
    out: Path
    cache_dir: Path
    stages: tuple[str, ...] = STAGES
    branches: tuple[str, ...] = ()     # restrict to these branch names
    offline: bool = False
    midmask: str | None = None         # overrides the spec's fetch.midmask
    hints: bool = True
    stages_explicit: bool = False      # --stages given: a stage the spec cannot run is an error

    def __post_init__(self) -> None:
        # git runs in the cache repo and b4 in a scratch cwd: never hand them a relative path
        self.out = user_path(self.out)
        self.cache_dir = user_path(self.cache_dir)


def parse_stages(text: str | None) -> tuple[str, ...]:
    if not text:
        return STAGES
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in stages:
        if s in FUTURE_STAGES:
            raise InputError(f"--stages: stage {s!r} is not implemented yet", hint=f"available: {', '.join(STAGES)}")
        if s not in STAGES:
            raise InputError(f"--stages: unknown stage {s!r}", hint=f"available: {', '.join(STAGES)}")
    return stages


@dataclass
class Outcome:
    result: RunResult
    exit_code: int
    reports: list[Path] = field(default_factory=list)


def series_info(series: Series) -> SeriesInfo:
    return SeriesInfo(
        title=series.title, title_note=series.title_note, sources=list(series.sources), version=series.version,
        base_commit=series.base_commit, link=series.link,
        prerequisite_patch_ids=list(series.prerequisite_patch_ids),
        patches=[SeriesPatchInfo(index=p.index, subject=p.subject, msgid=p.msgid, author=p.author,
                                 attestation=p.attestation, attestation_detail=p.attestation_detail)
                 for p in series.patches])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _RunLog(logging.FileHandler):
    """run.log is best effort: a full disk must not print logging's own tracebacks."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class OutDir:
    """The run directory: one run at a time, with a state cache of finished steps."""

    def __init__(self, path: Path):
        self.path = path
        self.state = path / "state"
        self._lock = None
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> "OutDir":
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".kpatchtest.lock", "a")
        except OSError as e:
            raise (output_error(self.path, e) or e) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{self.path}: another kpatchtest run is using this output directory",
                             hint="wait for it, or pass a different --out") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._log_handler:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        if self._lock:
            self._lock.close()

    def capture_library_logs(self) -> None:
        """Send Python logging (paramiko's banner timeouts while a host boots, fabric,
        kpatchtest's own records) to run.log here instead of the terminal."""
        handler = _RunLog(self.path / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
        self._log_handler = handler

    @property
    def ref_prefix(self) -> str:
        return "refs/kpatchtest/runs/" + hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]

    def cached(self, key: str) -> dict | None:
        p = self.state / f"{key}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def store(self, key: str, data: str) -> None:
        write_atomic(self.state / f"{key}.json", data)


def _apply_key(series: Series, target: BranchTarget, ctx: ApplyContext) -> str:
    h = hashlib.sha256()
    for part in (__version__, str(SCHEMA_VERSION), target.commit, ctx.base or "", ctx.upstream or "", str(ctx.hints),
                 str(ctx.prerequisite_budget_s), *ctx.branches):
        h.update(part.encode() + b"\0")
    for p in series.patches:
        h.update(rawtext.encode(f"{p.index}\0{p.subject}\0{p.upstream_commit}\0{p.diff}\0"))
    return "apply-" + h.hexdigest()[:24]


def _base_for(series: Series, kernel: ResolvedKernel) -> str | None:
    """Prerequisites are searched against the series' base-commit, else kernel.upstream."""
    if series.base_commit:
        sha = kernel.git.rev_parse(series.base_commit)
        if sha:
            return sha
    return kernel.upstream


def run(loaded: LoadedSpec, opts: RunOptions, progress: Progress | None = None) -> Outcome:
    progress = progress or Progress()
    spec = loaded.spec
    branches = spec.kernel.branches
    if opts.branches:
        known = {b.name for b in branches}
        unknown = [b for b in opts.branches if b not in known]
        if unknown:
            raise InputError(f"--branch {unknown[0]}: not a branch of {loaded.path}",
                             hint=f"branches there: {', '.join(sorted(known))}")
        branches = [b for b in branches if b.name in opts.branches]

    result = RunResult(tool_version=__version__, name=spec.name, spec=str(loaded.path), started=_now())
    fetch_opts = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask or spec.fetch.midmask,
                              offline=opts.offline, attestation=spec.fetch.attestation)
    for stage, (section, example) in NEEDS.items():
        if stage in opts.stages and getattr(spec, section) is None:
            if opts.stages_explicit:
                raise InputError(f"{loaded.path}: --stages {stage} needs a {section}: section in the spec",
                                 hint=f"add {example}")
            opts.stages = tuple(s for s in opts.stages if s != stage)
    if "boot" in opts.stages and "build" not in opts.stages:
        raise InputError("--stages boot needs the build stage too", hint="use --stages fetch,apply,build,boot")
    if "workloads" in opts.stages and "boot" not in opts.stages:
        raise InputError("--stages workloads needs the boot stage too (workloads run on booted kernels)",
                         hint="use --stages fetch,apply,build,boot,workloads")
    recipe = build_stage.recipe_for(spec) if "build" in opts.stages else None   # bad fragments: exit 2 now
    if "apply" in opts.stages:
        KernelCache(opts.cache_dir, spec.kernel.repo).preflight(branches)
    result.stages = list(opts.stages)
    with progress.stage("fetch", 1):
        series = fetch_series(spec.sources, fetch_opts, title=None)
        progress.step(series.title, f"{len(series.patches)} patch(es)")
        if series.title_note:
            progress.log(f"note: {series.title_note}")
    result.series = series_info(series)

    with OutDir(opts.out) as out:
        out.capture_library_logs()
        if "apply" in opts.stages:
            kernel = _apply_stage(loaded, opts, series, branches, result, out, progress)
            if recipe is not None:
                build_stage.run(kernel, recipe, spec, opts, result, progress)
            if "boot" in opts.stages:
                workloads = None
                if "workloads" in opts.stages and spec.workloads is not None:
                    workloads = Workloads(spec.workloads, opts.out, opts.cache_dir, offline=opts.offline,
                                          jobs=spec.build.jobs or os.cpu_count() or 2, log=progress.log)
                    workloads.prepare()
                boot_stage.run(spec, loaded.base_dir, opts, result, progress,
                               rounds=spec.workloads.rounds if workloads else 1, after_boot=workloads,
                               nested=workloads is not None)
        result.finished = _now()
        evaluate_gates(loaded, result)
        if _produced_nothing(result) and (opts.out / "results.json").exists():
            # a run whose branches all failed on input (or --stages fetch) must not replace a good record
            progress.log(f"no branch produced a result: kept the previous {opts.out / 'results.json'} and its reports")
            reports = []
        else:
            # series.mbox goes with the record that refers to it, never ahead of it
            reports = write_all(result, opts.out, extra={"series.mbox": series.as_mbox()})
    code = EXIT_OK
    if any(b.error for b in result.branches):
        code = EXIT_INPUT
    elif result.gates_failed():
        code = EXIT_GATE
    return Outcome(result=result, exit_code=code, reports=reports)


def _produced_nothing(result: RunResult) -> bool:
    return not any(b.apply or b.build or b.boot or b.workloads for b in result.branches)


def _apply_stage(loaded: LoadedSpec, opts: RunOptions, series: Series, branches, result: RunResult,
                 out: OutDir, progress: Progress) -> ResolvedKernel:
    spec = loaded.spec
    cache = KernelCache(opts.cache_dir, spec.kernel.repo)
    with progress.stage("apply", len(branches)):
        kernel = cache.resolve(branches, spec.kernel.upstream, opts.offline,
                               on_branch=lambda name, msg: progress.log(f"{name}: {msg}"))
        for name, err in kernel.errors.items():
            if name.startswith("upstream "):
                progress.log(f"warning: {err}; prerequisite hints need it")
        base = _base_for(series, kernel)
        scratch = out.state / "scratch"
        scratch.mkdir(exist_ok=True)
        ctx = ApplyContext(git=kernel.git, scratch=scratch, base=base, upstream=kernel.upstream,
                           ref_prefix=out.ref_prefix, hints=opts.hints,
                           branches=tuple(t.commit for t in kernel.targets),
                           prerequisite_budget_s=spec.apply.prerequisite_budget_s)
        targets = {t.name: t for t in kernel.targets}
        for b in branches:
            br = result.branch(b.name)
            if b.name in kernel.errors:
                br.error = kernel.errors[b.name]
                progress.step(b.name, f"error: {br.error}")
                continue
            target = targets[b.name]
            br.commit = target.commit
            key = _apply_key(series, target, ctx)
            cached = out.cached(key)
            if cached and (not cached.get("patched_commit") or kernel.git.rev_parse(cached["patched_commit"])):
                br.apply = ApplyResult.model_validate(cached)
                progress.step(b.name, f"{br.apply.verdict} (unchanged inputs, reused)")
                continue
            br.apply = rawtext.displayable(apply_series(ctx, series, target))
            out.store(key, br.apply.model_dump_json())
            progress.step(b.name, f"{br.apply.verdict} in {br.apply.duration_s:.2f} s")
    return kernel
