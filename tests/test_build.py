"""The build stage on a real Debian 6.1 tree: cold build, incremental patched build,
reuse without make, per-patch bisection, config verification, warnings delta."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from kpatchtest.build.builder import Builder, BuildPlace, ConfigRecipe, build_branch
from kpatchtest.build.toolchain import Toolchain
from kpatchtest.gitutil import Git
from kpatchtest.results import ApplyResult, PatchResult
from kpatchtest.spec import CONFIGS_DIR
from tests.conftest_lab import LAB_BASE, LAB_FRAGMENTS

pytestmark = pytest.mark.slow

TDP = "arch/x86/kvm/mmu/tdp_mmu.c"
X86 = "arch/x86/kvm/x86.c"


def commit_change(git: Git, parent: str, path: str, old: str, new: str, msg: str, scratch: Path) -> str:
    """A commit on top of `parent` replacing the first `old` in `path` with `new` (no checkout)."""
    text = git.out("show", f"{parent}:{path}") + "\n"
    assert old in text, old
    blob = git.out("hash-object", "-w", "--stdin", input=text.replace(old, new, 1))
    g = git.with_index(scratch / f"idx-{os.getpid()}")
    g.run("read-tree", parent)
    g.run("update-index", "--cacheinfo", f"100644,{blob},{path}")
    tree = g.out("write-tree")
    return git.out("commit-tree", tree, "-p", parent, "-m", msg)


def harmless_commit(git: Git, parent: str, scratch: Path) -> str:
    """A one-line change to tdp_mmu.c that changes nothing at run time: another kernel release."""
    return commit_change(git, parent, TDP, "void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n",
                         "void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n\tbarrier();\n",
                         "KVM: x86/mmu: a harmless change to boot", scratch)


def pipeline_spec(tmp_path: Path, git: Git, commit: str, name: str, rest: str, branch: str = "debian-6.1") -> Path:
    """A spec whose series is `commit` as an mbox, on the Debian 6.1 tarball as `branch`;
    `rest` is the YAML after the kernel: section (configs, lab, workloads, gates)."""
    mbox = tmp_path / "p.mbox"
    mbox.write_text(git.out("format-patch", "-1", "--stdout", commit) + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: {name}\nseries:\n  - mbox: {mbox}\nkernel:\n  branches:\n"
                    f"    - {{name: {json.dumps(branch)}, tarball: /usr/src/linux-source-6.1.tar.xz}}\n" + rest)
    return spec


@pytest.fixture(scope="session")
def kbuild(debian_trees, kpt_cache, tmp_path_factory):
    """One cold build of Debian 6.1 with the demo's (and the local lab's) recipe plus a fragment
    with a bogus symbol (which changes nothing in the .config, so the lab fixtures and `make
    demo` reuse this build)."""
    git, trees = debian_trees
    tmp = tmp_path_factory.mktemp("kbuild")
    for d in ("artifacts", "configs", "build"):     # a kept cache keeps imports and ccache only
        shutil.rmtree(kpt_cache / d, ignore_errors=True)
    extra = tmp / "extra.config"
    extra.write_text("# a symbol no kernel has\nCONFIG_KPATCHTEST_NO_SUCH_SYMBOL=y\n")
    recipe = ConfigRecipe.from_spec(LAB_BASE, [str(CONFIGS_DIR / f) for f in LAB_FRAGMENTS] + [str(extra)],
                                    ["KVM", "KVM_AMD", "KPATCHTEST_REQUIRED"])
    logs: list[str] = []
    builder = Builder(git=git, cache_dir=kpt_cache, recipe=recipe, toolchain=Toolchain.detect(), log=logs.append)
    # the place `kpatchtest run` uses for a tarball branch named debian-6.1 in this cache
    place = BuildPlace.for_branch(kpt_cache, git.repo.name.removesuffix(".git"), "debian-6.1")
    base = trees["6.1"].commit
    c1 = commit_change(git, base, TDP, "void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n",
                       "void kvm_mmu_uninit_tdp_mmu(struct kvm *kvm)\n{\n\tint kpatchtest_unused;\n",
                       "KVM: x86/mmu: one-line change with a new warning", tmp)
    c2 = commit_change(git, c1, X86, "int kvm_arch_init(void *opaque)\n{\n",
                       "int kvm_arch_init(void *opaque)\n{\n\tthis does not compile;\n",
                       "KVM: x86: break the build", tmp)
    patches = [PatchResult(index=1, subject="one-line change", status="applied", commit=c1),
               PatchResult(index=2, subject="break the build", status="applied", commit=c2)]
    run_dir = tmp / "run"
    first = build_branch(builder, place, ApplyResult(verdict="clean", branch_commit=base, patched_commit=c1,
                                                     patches=patches[:1]), run_dir, "debian-6.1")
    return dict(git=git, builder=builder, place=place, base=base, c1=c1, c2=c2, patches=patches,
                run_dir=run_dir, first=first, logs=logs, tmp=tmp, extra=extra, cache=kpt_cache)


def test_cold_baseline_and_incremental_patched_build(kbuild):
    b = kbuild["first"]
    assert b.baseline.status == "pass", b.baseline.error_excerpt
    assert b.baseline.objects_compiled > 300
    assert b.baseline.kernelrelease.startswith("6.1.") and "-kpt" in b.baseline.kernelrelease
    for name in ("bzImage", "System.map", "config", "build.log", "metadata"):
        assert (kbuild["run_dir"] / b.baseline.artifacts[name]).exists(), name
    p = b.patched
    assert p.status == "pass", p.error_excerpt
    # only what the patch touches, plus the objects that embed the kernel release (the new
    # LOCALVERSION): init/version, kernel/sys, kernel/module, kernel/trace... 14 with this recipe
    assert 1 <= p.objects_compiled <= 20, p.objects_compiled
    log = (kbuild["run_dir"] / p.artifacts["build.log"]).read_text()
    assert "CC      arch/x86/kvm/mmu/tdp_mmu.o" in log
    assert p.kernelrelease != b.baseline.kernelrelease      # the boot stage can tell them apart
    assert b.baseline.config_hash == p.config_hash


def test_config_verification_reports_dropped_and_required_symbols(kbuild):
    base = kbuild["first"].baseline
    assert any("CONFIG_KPATCHTEST_NO_SUCH_SYMBOL=y" in m and "absent" in m for m in base.config_missing)
    assert any("KPATCHTEST_REQUIRED" in m for m in base.config_errors)
    assert not any("CONFIG_KVM=" in m or "CONFIG_KVM_AMD=" in m for m in base.config_missing + base.config_errors)


def test_new_warning_is_reported_once_and_normalised(kbuild):
    new = kbuild["first"].patched.warnings_new
    assert len(new) == 1 and TDP in new[0] and "kpatchtest_unused" in new[0], new
    assert not any(ch.isdigit() for ch in new[0].split("kpatchtest_unused")[0].split(TDP)[1]), new  # no line numbers


def make_shim(tmp_path: Path, monkeypatch) -> Path:
    """Put a `make` on PATH that records its calls; returns the record file."""
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "make-calls"
    (shim / "make").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexec /usr/bin/make \"$@\"\n")
    (shim / "make").chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{shim}:{os.environ['PATH']}")
    return calls


def make_runs(calls: Path) -> list[str]:
    """Recorded make invocations that ran make on a tree (`make --version` is toolchain detection)."""
    return [c for c in (calls.read_text().splitlines() if calls.exists() else []) if c != "--version"]


def test_repeat_runs_no_make(kbuild, tmp_path, monkeypatch):
    calls = make_shim(tmp_path, monkeypatch)
    res, _ = kbuild["builder"].build(kbuild["place"], kbuild["c1"], "repeat", tmp_path / "run", "again")
    assert res.status == "pass" and res.reused and res.objects_compiled == 0
    assert make_runs(calls) == []
    assert (tmp_path / "run" / res.artifacts["bzImage"]).stat().st_size > 100_000


def test_per_patch_build_finds_the_first_breaking_patch(kbuild):
    k = kbuild
    b = build_branch(k["builder"], k["place"], ApplyResult(verdict="clean", branch_commit=k["base"],
                                                           patched_commit=k["c2"], patches=k["patches"]),
                     k["run_dir"], "debian-6.1", per_patch=True)
    assert b.baseline.reused
    assert [(p.index, p.status) for p in b.per_patch] == [(1, "pass"), (2, "fail")]
    assert b.first_bad_patch == 2
    assert b.patched.status == "fail"
    assert "arch/x86/kvm/x86.c" in b.patched.error_excerpt and "error" in b.patched.error_excerpt


def test_base_target_missing_on_branch(kbuild, tmp_path):
    k = kbuild
    recipe = ConfigRecipe.from_spec("kpatchtest_nonexistent_defconfig", [str(CONFIGS_DIR / "kvm.config")], [])
    builder = Builder(git=k["git"], cache_dir=k["builder"].cache_dir, recipe=recipe, toolchain=k["builder"].toolchain)
    res, _ = builder.build(k["place"], k["base"], "bad base", tmp_path, "x")
    assert res.status == "fail"
    assert "base config target 'kpatchtest_nonexistent_defconfig' failed on this branch" in res.reason


def test_pipeline_build_stage_reuses_and_gates_new_warnings(kbuild, tmp_path, monkeypatch):
    """`kpatchtest run` with a configs: section, same cache: the series (c1 as an mbox) gives the
    same trees as the fixture's builds, so nothing is compiled; the new warning fails the gate."""
    from kpatchtest.cli import main
    k = kbuild
    spec = pipeline_spec(tmp_path, k["git"], k["c1"], "build-demo", f"""configs:
  base: {LAB_BASE}
  fragments: [{', '.join(LAB_FRAGMENTS)}, {k['extra']}]
  required: [KVM, KVM_AMD, KPATCHTEST_REQUIRED]
gates:
  build: no-new-warnings
""")
    calls = make_shim(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out), "--cache-dir", str(k["cache"]), "--offline", "-q"]) == 1
    assert make_runs(calls) == []
    res = json.loads((out / "results.json").read_text())
    b = res["branches"][0]
    assert b["apply"]["verdict"] == "clean"
    assert b["build"]["baseline"]["status"] == b["build"]["patched"]["status"] == "pass"
    assert b["build"]["baseline"]["reused"] and b["build"]["patched"]["reused"]
    assert len(b["build"]["patched"]["warnings_new"]) == 1
    assert (out / b["build"]["patched"]["artifacts"]["bzImage"]).exists()
    assert res["gates"][-1] == {"name": "build", "branch": "debian-6.1", "passed": False,
                                "expected": "no-new-warnings", "actual": "1 new warning(s)"}
    summary = (out / "summary.md").read_text()
    assert "build patched" in summary and "1 NEW WARNING(S)" in summary
