"""The pipeline: plans the stages a spec needs, runs each over its units, saves after each.

    spec -> fetch -> apply -> build -> (workloads prepared) -> boot (+ workloads) -> gates -> reports

Each stage package (apply/, build/, boot/, workloads/) implements the Stage contract
(stage.py). Every finished unit's record goes to the run directory's step cache and
results.json is rewritten atomically, so a killed run started again with the same spec
and --out redoes only the unit in flight and those whose inputs changed. A run that
dies on bad input before any unit finished leaves the previous results in --out untouched.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError

from kpatchtest import __version__
from kpatchtest.apply.stage import ApplyStage
from kpatchtest.boot.stage import BootStage
from kpatchtest.build.stage import BuildStage, recipe_for
from kpatchtest.compare.stage import CompareStage, needs_reruns
from kpatchtest.errors import EXIT_GATE, EXIT_INPUT, EXIT_OK, InputError
from kpatchtest.fetch.stage import FetchOptions, fetch_series
from kpatchtest.gates import evaluate_gates
from kpatchtest.kernelrepo import KernelCache
from kpatchtest.patchset import Series
from kpatchtest.progress import Progress
from kpatchtest.report import REPORT_FILES, write_all
from kpatchtest.rawtext import encode
from kpatchtest.results import KernelSource, RunResult, SeriesInfo, SeriesPatchInfo
from kpatchtest.rundir import CacheDir, RunDir
from kpatchtest.spec import BranchSpec, LoadedSpec
from kpatchtest.stage import RunContext, Stage
from kpatchtest.tarball import is_tarball
from kpatchtest.urls import is_url, scheme
from kpatchtest.util import sha256_file, sha256_text, user_path, utcnow, write_atomic
from kpatchtest.workloads.stage import WorkloadsStage

STAGES = ("fetch", "apply", "build", "boot", "workloads", "compare")
# The order stages run in: the workloads are prepared before the boots that carry them.
_ORDER = (ApplyStage, BuildStage, WorkloadsStage, BootStage, CompareStage)
# The spec section a stage needs; without it the stage is left out (or, asked for explicitly, an error).
NEEDS = {"build": ("configs", "configs: {base: tinyconfig, fragments: [x86_64-base.config, kvm.config]}"),
         "boot": ("lab", "lab: {name: local}"),
         "workloads": ("workloads", "workloads: {smm_boot: {reads: 200}}"),
         "compare": ("workloads", "workloads: {rounds: 3, smm_boot: {reads: 200}}")}


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
    jobs: int = 1                      # units of one stage at a time (branches; boots are per host)
    force: tuple[str, ...] = ()        # stages whose stored unit records are not reused
    log_url_base: str | None = None    # public URL of --out, recorded for reports (KCIDB log URLs)

    def __post_init__(self) -> None:
        # git runs in the cache repo and b4 in a scratch cwd: never hand them a relative path
        self.out = user_path(self.out)
        self.cache_dir = user_path(self.cache_dir)


def parse_stages(text: str | None, flag: str = "--stages") -> tuple[str, ...]:
    if not text:
        return STAGES
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in stages:
        if s not in STAGES:
            raise InputError(f"{flag}: unknown stage {s!r}", hint=f"available: {', '.join(STAGES)}")
    return stages


@dataclass
class Outcome:
    result: RunResult
    exit_code: int
    reports: list[Path] = field(default_factory=list)


def series_info(series: Series) -> SeriesInfo:
    return SeriesInfo(
        title=series.title, title_note=series.title_note, sources=list(series.sources), version=series.version,
        base_commit=series.base_commit, link=series.link, msgid=series.msgids[0] if series.msgids else None,
        prerequisite_patch_ids=list(series.prerequisite_patch_ids),
        # each patch's sha256 is of its part of series.mbox (Series.as_mbox): the bytes git am applied
        patches=[SeriesPatchInfo(index=p.index, subject=p.subject, msgid=p.msgid, author=p.author,
                                 attestation=p.attestation, attestation_detail=p.attestation_detail,
                                 sha256=sha256_text(encode(p.as_mbox() + "\n")))
                 for p in series.patches])


def kernel_source(repo: str | None, branch: BranchSpec) -> KernelSource:
    """Where a branch's code came from, as a URL a report can show: never a credential
    (an https token in the URL), and a tarball import says it is one, not a git repository."""
    tarball = branch.tarball or (repo if repo and is_tarball(repo) else None)
    where = tarball or repo
    assert where, "KernelSpec requires kernel.repo for a branch without a tarball"
    if not is_url(where):
        url = Path(where).as_uri()      # the spec's paths are absolute by now
    elif (parts := urlsplit(where)).password or (parts.username and scheme(where) in ("http", "https")):
        url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    else:
        url = where
    return KernelSource(kind="tarball", url=url) if tarball else KernelSource(kind="git", url=url, ref=branch.git_ref)


def _run_id(rundir: RunDir) -> str:
    """The run directory's uuid: the record's there (a resumed run is the same run), else a new one."""
    try:
        return str(uuid.UUID(json.loads(rundir.results.read_text())["run_id"]))
    except (OSError, ValueError, TypeError, KeyError):
        return str(uuid.uuid4())


class _Saver:
    """results.json after every unit, atomically, with `finished` unset until the end; the
    reports (rendering them takes seconds) once at the end, by report.write_all. The first
    save removes the previous run's reports, which describe a record no longer there
    (`kpatchtest report out/results.json` renders the partial one). Nothing is written
    before a unit finished: a run that fails on input keeps the previous record."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.lock = threading.Lock()
        self._started = False

    def save(self) -> None:
        out = self.ctx.rundir.path
        if not self._started:
            for name in REPORT_FILES:
                (out / name).unlink(missing_ok=True)
            # series.mbox goes ahead of the first record that refers to it
            write_atomic(out / "series.mbox", self.ctx.series.as_mbox())
            self._started = True
        write_atomic(self.ctx.rundir.results, self.ctx.result.model_dump_json(indent=2) + "\n")

    def finish(self) -> list[Path]:
        return write_all(self.ctx.result, self.ctx.rundir.path, extra={"series.mbox": self.ctx.series.as_mbox()})


def _reuse(stage: Stage, ctx: RunContext, unit, key: str | None):
    if key is None or stage.name in ctx.opts.force:
        return None
    data = ctx.rundir.cached(stage.name, key)
    if data is None:
        return None
    try:
        record = stage.record_type.model_validate(data)
    except ValidationError:          # written by another kpatchtest version: run again
        return None
    return record if stage.reusable(unit, record) else None


def run_stage(stage: Stage, ctx: RunContext, saver: _Saver) -> None:
    """Prepare the stage, run its units (reusing stored records), record and save each."""
    try:
        stage.prepare()
        units = list(stage.units())
        if not units and isinstance(stage, WorkloadsStage):
            return
        with ctx.progress.stage(stage.name, len(units)):
            def one(unit) -> None:
                key = stage.key(unit)
                record = _reuse(stage, ctx, unit, key)
                reused = record is not None
                if record is None:
                    record = stage.run(unit)
                    if key is not None:
                        ctx.rundir.store(stage.name, key, record.model_dump_json())
                with saver.lock:
                    stage.record(unit, record)
                    saver.save()
                    ctx.progress.step(stage.label(unit), stage.describe(unit, record)
                                      + (" (unchanged inputs, reused)" if reused else ""))

            resource = getattr(stage, "resource", None)
            groups: dict[object, list] = {}
            for i, u in enumerate(units):      # units sharing a resource (a lab host) run in order
                groups.setdefault(resource(u) if resource else i, []).append(u)
            workers = len(groups) if resource else min(ctx.opts.jobs, len(groups))
            if not stage.parallel or workers <= 1:
                for u in units:
                    one(u)
                return
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=stage.name) as pool:
                futures = [pool.submit(lambda us=us: [one(u) for u in us]) for us in groups.values()]
                for f in futures:
                    f.result()
    finally:
        stage.finish()


def _confirm_regressions(ctx: RunContext, saver: _Saver) -> None:
    """A test that passed on baseline and failed on patched in every round is booted again on
    both kernels compare.reruns times before it is called a regression (else: flaky)."""
    for _ in range(2):          # the second pass only if the first pass's reruns changed what is needed
        needs = {b.name: n for b in ctx.result.branches if (n := needs_reruns(b, ctx.spec))}
        if not needs:
            return
        ctx.progress.log("confirming " + "; ".join(f"{b}: {', '.join(t for n in ns for t in n.tests)}"
                                                   for b, ns in needs.items()))
        run_stage(BootStage(ctx, reruns=needs), ctx, saver)
        run_stage(CompareStage(ctx), ctx, saver)


def plan(loaded: LoadedSpec, opts: RunOptions) -> None:
    """Leave out the stages the spec has no section for (an error if asked for by --stages)."""
    spec = loaded.spec
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
    if "compare" in opts.stages and "workloads" not in opts.stages:
        raise InputError("--stages compare needs the workloads stage too (it compares their results)",
                         hint="use --stages fetch,apply,build,boot,workloads,compare")
    # workloads run inside the boot stage's units: forcing them is forcing the boots
    opts.force = tuple(dict.fromkeys("boot" if s == "workloads" else s for s in opts.force))
    for s in opts.force:
        if s in ("fetch", "build"):
            raise InputError(f"--force {s}: its results are reused by content, not by run "
                             f"({'the series cache is keyed by the mails' if s == 'fetch' else 'an identical tree, config and toolchain gives the same kernel'})",
                             hint="--force apply, boot (with its workloads) or compare")


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
    plan(loaded, opts)
    result = RunResult(tool_version=__version__, name=spec.name, spec=str(loaded.path), started=utcnow(),
                       spec_sha256=sha256_file(loaded.path) if loaded.path.is_file() else None,
                       log_url_base=opts.log_url_base)
    shared = {"branches": branches}
    if "build" in opts.stages:
        shared["recipe"] = recipe_for(spec)        # bad fragments: exit 2 now, before anything slow
    if "apply" in opts.stages:
        KernelCache(opts.cache_dir, spec.kernel.repo).preflight(branches)
    result.stages = list(opts.stages)
    fetch_opts = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask or spec.fetch.midmask,
                              offline=opts.offline, attestation=spec.fetch.attestation)
    with progress.stage("fetch", 1):
        series = fetch_series(spec.sources, fetch_opts, title=None)
        progress.step(series.title, f"{len(series.patches)} patch(es)")
        if series.title_note:
            progress.log(f"note: {series.title_note}")
    result.series = series_info(series)
    for b in branches:                 # the record lists branches in the spec's order
        result.branch(b.name).source = kernel_source(spec.kernel.repo, b)

    with RunDir(opts.out) as rundir:
        result.run_id = _run_id(rundir)
        rundir.capture_library_logs()
        ctx = RunContext(loaded=loaded, opts=opts, rundir=rundir, cache=CacheDir(opts.cache_dir), result=result,
                         progress=progress, series=series, shared=shared)
        saver = _Saver(ctx)
        if "apply" in opts.stages:
            for stage_cls in _ORDER:
                if stage_cls.name in opts.stages:
                    run_stage(stage_cls(ctx), ctx, saver)
            if "compare" in opts.stages:
                _confirm_regressions(ctx, saver)
        result.finished = utcnow()
        evaluate_gates(loaded, result)
        if _produced_nothing(result) and rundir.results.exists():
            # a run whose branches all failed on input (or --stages fetch) must not replace a good record
            progress.log(f"no branch produced a result: kept the previous {rundir.results} and its reports")
            reports = []
        else:
            reports = saver.finish()
    code = EXIT_OK
    if any(b.error for b in result.branches):
        code = EXIT_INPUT
    elif result.gates_failed():
        code = EXIT_GATE
    return Outcome(result=result, exit_code=code, reports=reports)


def _produced_nothing(result: RunResult) -> bool:
    return not any(b.apply or b.build or b.boot or b.workloads for b in result.branches)
