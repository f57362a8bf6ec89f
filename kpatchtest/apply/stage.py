"""The apply stage: the series on every branch, one unit per branch, in parallel.

Prepared once: the branches resolved in the cache repo (fetched or imported from a
tarball) and the run's ApplyContext. A unit's key covers the branch commit, the
series' patches and every setting that changes a verdict, so a resumed run reuses
verdicts whose inputs did not change.
"""

from __future__ import annotations

from kpatchtest import __version__, rawtext
from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series
from kpatchtest.kernelrepo import KernelCache, ResolvedKernel
from kpatchtest.results import SCHEMA_VERSION, ApplyResult
from kpatchtest.rundir import input_key
from kpatchtest.stage import Stage


def base_for(series, kernel: ResolvedKernel) -> str | None:
    """Prerequisites are searched against the series' base-commit, else kernel.upstream."""
    if series.base_commit:
        sha = kernel.git.rev_parse(series.base_commit)
        if sha:
            return sha
    return kernel.upstream


class ApplyStage(Stage[BranchTarget, ApplyResult]):
    name = "apply"
    record_type = ApplyResult
    parallel = True

    def prepare(self) -> None:
        ctx = self.ctx
        spec = ctx.spec
        cache = KernelCache(ctx.opts.cache_dir, spec.kernel.repo)
        kernel = cache.resolve(ctx.shared["branches"], spec.kernel.upstream, ctx.opts.offline,
                               on_branch=lambda name, msg: ctx.progress.log(f"{name}: {msg}"))
        for name, err in kernel.errors.items():
            if name.startswith("upstream "):
                ctx.progress.log(f"warning: {err}; prerequisite hints need it")
            else:
                ctx.result.branch(name).error = err
                ctx.progress.log(f"{name}: error: {err}")
        ctx.kernel = kernel
        self.apply_ctx = ApplyContext(git=kernel.git, scratch=ctx.rundir.scratch, base=base_for(ctx.series, kernel),
                                      upstream=kernel.upstream, ref_prefix=ctx.rundir.ref_prefix, hints=ctx.opts.hints,
                                      branches=tuple(t.commit for t in kernel.targets),
                                      prerequisite_budget_s=spec.apply.prerequisite_budget_s)

    def units(self) -> list[BranchTarget]:
        targets = {t.name: t for t in self.ctx.kernel.targets}
        return [targets[b.name] for b in self.ctx.shared["branches"] if b.name in targets]

    def label(self, unit: BranchTarget) -> str:
        return unit.name

    def key(self, unit: BranchTarget) -> str:
        c = self.apply_ctx
        return input_key(__version__, SCHEMA_VERSION, unit.commit, c.base or "", c.upstream or "", c.hints,
                         c.prerequisite_budget_s, *c.branches,
                         *(rawtext.encode(f"{p.index}\0{p.subject}\0{p.upstream_commit}\0{p.diff}")
                           for p in self.ctx.series.patches))

    def reusable(self, unit: BranchTarget, record: ApplyResult) -> bool:
        return not record.patched_commit or bool(self.ctx.kernel.git.rev_parse(record.patched_commit))

    def run(self, unit: BranchTarget) -> ApplyResult:
        return rawtext.displayable(apply_series(self.apply_ctx, self.ctx.series, unit))

    def record(self, unit: BranchTarget, record: ApplyResult) -> None:
        b = self.ctx.result.branch(unit.name)
        b.commit = unit.commit
        b.apply = record

    def describe(self, unit: BranchTarget, record: ApplyResult) -> str:
        return f"{record.verdict} in {record.duration_s:.2f} s"
