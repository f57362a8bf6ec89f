"""The build stage: baseline and patched kernels per branch, one unit per branch.

Units run in parallel (--jobs); make's -j is shared out among them, not multiplied.
No step cache of its own: the Builder reuses an identical tree+config+toolchain
build from the cache in seconds, which is what a resumed run needs.
"""

from __future__ import annotations

import os

from kpatchtest.build.builder import Builder, BuildPlace, ConfigRecipe, build_branch
from kpatchtest.build.toolchain import Toolchain
from kpatchtest.results import BranchBuild, BranchResult, BuildResult
from kpatchtest.spec import GATE_ACCEPTS, Spec
from kpatchtest.stage import Stage
from kpatchtest.util import slug


def recipe_for(spec: Spec) -> ConfigRecipe:
    """Parse the spec's config recipe up front: a bad fragment is an input error (exit 2)."""
    assert spec.configs is not None
    return ConfigRecipe.from_spec(spec.configs.base, spec.configs.fragments, spec.configs.required)


def share_jobs(total: int, concurrent: int) -> int:
    """make -j for each of `concurrent` builds so that together they use `total`."""
    return max(1, total // max(1, concurrent))


class BuildStage(Stage[BranchResult, BranchBuild]):
    name = "build"
    record_type = BranchBuild
    parallel = True

    def prepare(self) -> None:
        spec = self.ctx.spec
        self.recipe = self.ctx.shared.get("recipe") or recipe_for(spec)
        self.toolchain = Toolchain.detect()
        todo = self.units()
        total = spec.build.jobs or os.cpu_count() or 1
        self.jobs = share_jobs(total, min(len(todo), self.ctx.opts.jobs))
        if self.jobs != total:
            self.ctx.progress.log(f"{min(len(todo), self.ctx.opts.jobs)} builds at a time, make -j{self.jobs} each")
        self.repo_name = self.ctx.kernel.git.repo.name.removesuffix(".git")

    def units(self) -> list[BranchResult]:
        return [b for b in self.ctx.result.branches if b.apply is not None and not b.error]

    def label(self, unit: BranchResult) -> str:
        return unit.name

    def run(self, unit: BranchResult) -> BranchBuild:
        spec, opts = self.ctx.spec, self.ctx.opts
        verdict = unit.apply.verdict
        if verdict not in GATE_ACCEPTS[spec.build.when]:
            reason = f"apply verdict {verdict} does not reach build.when={spec.build.when}"
            return BranchBuild(baseline=BuildResult(status="skipped", reason=reason),
                               patched=BuildResult(status="skipped", reason=reason))
        builder = Builder(git=self.ctx.kernel.git, cache_dir=opts.cache_dir, recipe=self.recipe,
                          toolchain=self.toolchain, make_vars=dict(spec.build.make_vars), log=self.ctx.progress.log,
                          jobs=self.jobs)
        place = BuildPlace.for_branch(opts.cache_dir, self.repo_name, slug(unit.name))
        return build_branch(builder, place, unit.apply, opts.out, slug(unit.name), spec.build.per_patch)

    def record(self, unit: BranchResult, record: BranchBuild) -> None:
        unit.build = record

    def describe(self, unit: BranchResult, record: BranchBuild) -> str:
        base, pat = record.baseline, record.patched
        if base.status == "skipped" and pat.status == "skipped":
            return f"skipped: {pat.reason}"
        return (f"baseline {base.status} ({base.objects_compiled} objects, {base.duration_s:.0f} s), "
                f"patched {pat.status} ({pat.objects_compiled} objects, {pat.duration_s:.0f} s)"
                + (f", {len(pat.warnings_new)} new warning(s)" if pat.warnings_new else ""))
