"""The build stage of the pipeline: which branches to build, and into the result record."""

from __future__ import annotations

from pathlib import Path

from kpatchtest.apply.engine import slug
from kpatchtest.build.builder import Builder, BuildPlace, ConfigRecipe, build_branch
from kpatchtest.build.toolchain import Toolchain
from kpatchtest.kernelrepo import ResolvedKernel
from kpatchtest.progress import Progress
from kpatchtest.results import BranchBuild, BuildResult, RunResult
from kpatchtest.spec import GATE_ACCEPTS, Spec


def recipe_for(spec: Spec) -> ConfigRecipe:
    """Parse the spec's config recipe up front: a bad fragment is an input error (exit 2)."""
    assert spec.configs is not None
    return ConfigRecipe.from_spec(spec.configs.base, spec.configs.fragments, spec.configs.required)


def run(kernel: ResolvedKernel, recipe: ConfigRecipe, spec: Spec, opts, result: RunResult, progress: Progress) -> None:
    todo = [b for b in result.branches if b.apply is not None]
    toolchain = Toolchain.detect()
    builder = Builder(git=kernel.git, cache_dir=opts.cache_dir, recipe=recipe, toolchain=toolchain,
                      make_vars=dict(spec.build.make_vars), log=progress.log,
                      **({"jobs": spec.build.jobs} if spec.build.jobs else {}))
    repo_name = kernel.git.repo.name.removesuffix(".git")
    with progress.stage("build", len(todo)):
        for b in todo:
            verdict = b.apply.verdict
            if verdict not in GATE_ACCEPTS[spec.build.when]:
                reason = f"apply verdict {verdict} does not reach build.when={spec.build.when}"
                b.build = BranchBuild(baseline=BuildResult(status="skipped", reason=reason),
                                      patched=BuildResult(status="skipped", reason=reason))
                progress.step(b.name, f"skipped: {reason}")
                continue
            place = BuildPlace.for_branch(opts.cache_dir, repo_name, slug(b.name))
            b.build = build_branch(builder, place, b.apply, Path(opts.out), slug(b.name), spec.build.per_patch)
            base, pat = b.build.baseline, b.build.patched
            progress.step(b.name, f"baseline {base.status} ({base.objects_compiled} objects, {base.duration_s:.0f} s), "
                                  f"patched {pat.status} ({pat.objects_compiled} objects, {pat.duration_s:.0f} s)"
                                  + (f", {len(pat.warnings_new)} new warning(s)" if pat.warnings_new else ""))
