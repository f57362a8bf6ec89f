"""Build stage: baseline and patched kernels per branch, incremental and verified.

Both builds of a branch happen in one worktree and one O= directory, so the
patched build after its baseline recompiles only what the series touches
(make's own dependency tracking), and ccache shares objects across branches
and runs. A build is identified by tree + config + toolchain + make variables:
the same identity reuses the stored artifacts without running make at all.

Kept as data, tuxmake-style: a ConfigRecipe (base + fragments), a Toolchain, a
BuildPlace (where) and a BuildResult (what came out).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kpatchtest.build import buildlog, kconfig
from kpatchtest.build.toolchain import Toolchain
from kpatchtest.gitutil import Git
from kpatchtest.locks import exclusive as locked
from kpatchtest.results import ApplyResult, BranchBuild, BuildResult, PatchBuild
from kpatchtest.util import link_or_copy, sha256_text, write_atomic
from kpatchtest.rundir import CacheDir, RunDir

# Fixed build identity strings: the same inputs give the same kernel.
_REPRODUCIBLE = {"KBUILD_BUILD_TIMESTAMP": "Thu Jan  1 00:00:00 UTC 1970",
                 "KBUILD_BUILD_USER": "kpatchtest", "KBUILD_BUILD_HOST": "kpatchtest"}
PROGRESS_EVERY_S = 30.0
ARCH = "x86_64"     # the KVM hosts under test; part of the config identity


@dataclass(frozen=True)
class ConfigRecipe:
    """A base config plus fragments, and the symbols that must take."""

    base: kconfig.BaseConfig
    fragments: tuple[kconfig.Fragment, ...]
    required: frozenset[str] = frozenset()

    @classmethod
    def from_spec(cls, base: str, fragments: list[str], required: list[str]) -> "ConfigRecipe":
        return cls(kconfig.BaseConfig.parse(base), tuple(kconfig.parse_fragment(Path(f)) for f in fragments),
                   frozenset(kconfig.normalise_symbol(s) for s in required))

    @property
    def merge(self) -> kconfig.MergeResult:
        return kconfig.merge_fragments(self.fragments)

    def key(self) -> str:
        parts = [self.base.name, self.base.read() if self.base.kind == "file" else ""]
        parts += [f"{s.symbol}={s.value}\n" for s in self.merge.settings.values()]
        parts.append(",".join(sorted(self.required)))
        return sha256_text("".join(parts))[:16]


@dataclass(frozen=True)
class BuildPlace:
    """Where one branch builds: its worktree, O= dir and kconfig scratch dir, under the cache."""

    worktree: Path
    obj: Path
    kcfg: Path
    lock: Path

    @classmethod
    def for_branch(cls, cache_dir: Path, repo_name: str, branch_slug: str) -> "BuildPlace":
        root = CacheDir(cache_dir).build / repo_name / branch_slug
        return cls(worktree=root / "src", obj=root / "obj", kcfg=root / "kconfig", lock=root.with_suffix(".lock"))


@dataclass
class _Config:
    text: str
    hash: str
    missing: list[str]
    errors: list[str]


class BuildError(Exception):
    """A build step failed for a reason to report in the result (not a user input error)."""

    def __init__(self, reason: str, excerpt: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.excerpt = excerpt


@dataclass
class Builder:
    git: Git
    cache_dir: Path
    recipe: ConfigRecipe
    toolchain: Toolchain
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    make_vars: dict[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = lambda msg: None

    # -- checkout and make ----------------------------------------------------
    def _checkout(self, place: BuildPlace, commit: str) -> None:
        """Only files that differ are rewritten, so make sees only what changed."""
        if not (place.worktree / ".git").exists():
            place.worktree.parent.mkdir(parents=True, exist_ok=True)
            self.log(f"checking out {commit[:12]} into {place.worktree} (once per branch)")
            self.git.run("worktree", "add", "--detach", "-f", str(place.worktree), commit)
        else:
            Git(place.worktree).run("checkout", "-q", "--detach", "-f", commit)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, **_REPRODUCIBLE, LC_ALL="C")
        env["CCACHE_DIR"] = str(CacheDir(self.cache_dir).ccache)
        env.setdefault("CCACHE_MAXSIZE", "20G")
        return env

    def _make(self, place: BuildPlace, obj: Path, *targets: str, localversion: str = "",
              logfile: Path | None = None, label: str = "") -> tuple[int, str]:
        # ARCH explicit: x86 tinyconfig would otherwise make a 32-bit kernel (no KVM_AMD).
        cmd = ["make", "-C", str(place.worktree), f"O={obj}", f"-j{self.jobs}", f"ARCH={ARCH}",
               f"CC={self.toolchain.cc_command}", f"HOSTCC={self.toolchain.cc_command}"]
        if localversion:
            cmd.append(f"LOCALVERSION={localversion}")
        cmd += [f"{k}={v}" for k, v in sorted(self.make_vars.items())]
        cmd += list(targets)
        obj.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                             env=self._env(), stdin=subprocess.DEVNULL)
        last = time.monotonic()
        out = open(logfile, "a") if logfile else None
        try:
            assert p.stdout is not None
            for line in p.stdout:
                lines.append(line)
                if out:
                    out.write(line)
                if label and time.monotonic() - last > PROGRESS_EVERY_S:
                    last = time.monotonic()
                    self.log(f"{label}: {buildlog.objects_compiled(''.join(lines))} objects compiled so far")
        finally:
            rc = p.wait()
            if out:
                out.close()
        return rc, "".join(lines)

    # -- config -------------------------------------------------------------
    def _config(self, place: BuildPlace, commit: str, tree: str) -> _Config:
        """The final .config for this tree; cached, so a repeat run runs no make."""
        key = sha256_text(f"{ARCH}\0{tree}\0{self.recipe.key()}\0{self.toolchain.key()}")[:24]
        cache = CacheDir(self.cache_dir).configs / f"{key}.json"
        if cache.exists():
            d = json.loads(cache.read_text())
            return _Config(d["text"], d["hash"], d["missing"], d["errors"])
        self._checkout(place, commit)
        kcfg = place.kcfg
        shutil.rmtree(kcfg, ignore_errors=True)
        if self.recipe.base.kind == "target":
            rc, log = self._make(place, kcfg, self.recipe.base.name)
            if rc != 0:
                raise BuildError(f"base config target {self.recipe.base.name!r} failed on this branch",
                                 buildlog.first_error(log) or log[-2000:])
        else:
            kcfg.mkdir(parents=True)
            (kcfg / ".config").write_text(self.recipe.base.read())
        merge = self.recipe.merge
        (kcfg / ".config").write_text(kconfig.merged_text((kcfg / ".config").read_text(), merge))
        rc, log = self._make(place, kcfg, "olddefconfig")
        if rc != 0:
            raise BuildError("olddefconfig failed", buildlog.first_error(log) or log[-2000:])
        text = (kcfg / ".config").read_text()
        mism = kconfig.verify(merge, text, self.recipe.required)
        cfg = _Config(text, kconfig.config_hash(text), [m.describe() for m in mism if not m.required],
                      [m.describe() for m in mism if m.required])
        write_atomic(cache, json.dumps(cfg.__dict__))
        return cfg

    # -- warnings -----------------------------------------------------------
    def _warnings_so_far(self, place: BuildPlace, log: str, compiled: list[str]) -> list[str]:
        """All warnings of the tree as now built: the O= dir's record, updated with this log.

        An incremental build's log only shows recompiled files, so the record keeps
        every file's latest warnings."""
        record = place.obj / ".kpatchtest-warnings.json"
        by_file: dict[str, list[str]] = json.loads(record.read_text()) if record.exists() else {}
        for obj in compiled:
            for ext in (".c", ".S"):
                by_file.pop(obj[:-2] + ext, None)
        for w in buildlog.warnings(log, trees=[str(place.worktree), str(place.obj)]):
            by_file.setdefault(w.file, [])
            if str(w) not in by_file[w.file]:
                by_file[w.file].append(str(w))
        record.write_text(json.dumps(by_file, indent=1, sort_keys=True))
        return sorted(w for ws in by_file.values() for w in ws)

    # -- one build ------------------------------------------------------------
    def build(self, place: BuildPlace, commit: str, label: str, run_dir: Path,
              rel_dir: str) -> tuple[BuildResult, list[str]]:
        """Build `commit` in `place`; artifacts are linked into run_dir/rel_dir.

        Returns the result and every warning of the tree as built (for the delta)."""
        t0 = time.monotonic()
        tree = self.git.tree_of(commit)
        res = BuildResult(status="fail", commit=commit, tree=tree, compiler=self.toolchain.cc_version, arch=ARCH)
        with locked(place.lock):
            try:
                cfg = self._config(place, commit, tree)
                res.config_hash, res.config_missing, res.config_errors = cfg.hash, cfg.missing, cfg.errors
                ident = sha256_text("\0".join([tree, cfg.hash, self.toolchain.key(),
                                               json.dumps(self.make_vars, sort_keys=True)]))
                store = CacheDir(self.cache_dir).artifacts / ident[:32]
                if (store / "meta.json").exists():
                    meta = json.loads((store / "meta.json").read_text())
                    res.reused = True
                    self.log(f"{label}: identical tree+config+toolchain built before, reusing {store.name}")
                else:
                    meta = self._run_build(place, commit, cfg, ident, store, label)
            except BuildError as e:
                res.reason, res.error_excerpt = e.reason, e.excerpt
                res.duration_s = round(time.monotonic() - t0, 2)
                return res, []
        res.status = "pass" if meta["ok"] else "fail"
        res.reason = meta.get("reason", "")
        res.error_excerpt = meta.get("error_excerpt")
        res.kernelrelease = meta.get("kernelrelease")
        res.warnings_total = len(meta["warnings"])
        res.objects_compiled = 0 if res.reused else meta["objects_compiled"]
        res.cache_hit_rate = None if res.reused else meta.get("cache_hit_rate")
        res.artifacts = self._publish(store, meta, run_dir, rel_dir)
        res.duration_s = round(time.monotonic() - t0, 2)
        if not meta["ok"]:
            shutil.rmtree(store, ignore_errors=True)    # a failed build is retried next time
        return res, meta["warnings"]

    def _run_build(self, place: BuildPlace, commit: str, cfg: _Config, ident: str, store: Path, label: str) -> dict:
        self._checkout(place, commit)
        obj = place.obj
        obj.mkdir(parents=True, exist_ok=True)
        cfg_path = obj / ".config"
        if not cfg_path.exists() or cfg_path.read_text() != cfg.text:
            cfg_path.write_text(cfg.text)      # untouched when equal: no full rebuild
        tmp = store.with_name(store.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        logfile = tmp / "build.log"
        modules = "CONFIG_MODULES=y" in cfg.text
        targets = ["bzImage"] + (["modules"] if modules else [])
        localversion = f"-kpt{ident[:8]}"
        stats0 = self._ccache_stats()
        t0 = time.monotonic()
        rc, log = self._make(place, obj, *targets, localversion=localversion, logfile=logfile, label=label)
        compiled = buildlog.compiled_objects(log)
        meta = {"ok": rc == 0, "commit": commit, "config_hash": cfg.hash, "compiler": self.toolchain.cc_version,
                "make": self.toolchain.make_version, "make_vars": dict(self.make_vars, LOCALVERSION=localversion),
                "targets": targets, "objects_compiled": len(compiled), "build_s": round(time.monotonic() - t0, 2),
                "cache_hit_rate": self._hit_rate(stats0, self._ccache_stats()),
                "warnings": self._warnings_so_far(place, log, compiled), "files": {"build.log": "build.log"}}
        (tmp / "config").write_text(cfg.text)
        meta["files"]["config"] = "config"
        if rc != 0:
            meta["reason"] = "build failed"
            meta["error_excerpt"] = buildlog.first_error(log) or log[-3000:]
        else:
            meta["kernelrelease"] = (obj / "include/config/kernel.release").read_text().strip()
            shutil.copy2(obj / "arch/x86/boot/bzImage", tmp / "bzImage")
            shutil.copy2(obj / "System.map", tmp / "System.map")
            meta["files"].update({"bzImage": "bzImage", "System.map": "System.map"})
            if modules:
                meta["files"]["modules"] = self._modules_tarball(place, localversion, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(store, ignore_errors=True)
        os.replace(tmp, store)
        return meta

    def _modules_tarball(self, place: BuildPlace, localversion: str, dest: Path) -> str:
        staging = dest / "modules-staging"
        rc, log = self._make(place, place.obj, "modules_install", f"INSTALL_MOD_PATH={staging}",
                             "INSTALL_MOD_STRIP=1", localversion=localversion)
        if rc != 0:
            raise BuildError("modules_install failed", buildlog.first_error(log))
        with tarfile.open(dest / "modules.tar.gz", "w:gz") as tf:
            if (staging / "lib").exists():
                tf.add(staging / "lib", arcname="lib")
        shutil.rmtree(staging)
        return "modules.tar.gz"

    def _publish(self, store: Path, meta: dict, run_dir: Path, rel_dir: str) -> dict[str, str]:
        """Hard-link (or copy) the stored artifacts into the run directory."""
        dest = run_dir / rel_dir
        dest.mkdir(parents=True, exist_ok=True)
        out = {}
        for name, fname in meta["files"].items():
            src, dst = store / fname, dest / fname
            if not src.exists():
                continue
            link_or_copy(src, dst)
            out[name] = f"{rel_dir}/{fname}"
        (dest / "meta.json").write_text(json.dumps(meta, indent=1))
        out["metadata"] = f"{rel_dir}/meta.json"
        return out

    # -- ccache ---------------------------------------------------------------
    def _ccache_stats(self) -> dict[str, int] | None:
        if not self.toolchain.ccache:
            return None
        p = subprocess.run(["ccache", "--print-stats"], capture_output=True, text=True, env=self._env())
        if p.returncode != 0:
            return None
        stats = {}
        for line in p.stdout.splitlines():
            k, _, v = line.partition("\t")
            if v.strip().isdigit():
                stats[k] = int(v)
        return stats

    @staticmethod
    def _hit_rate(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
        if before is None or after is None:
            return None
        d = {k: after.get(k, 0) - before.get(k, 0) for k in ("direct_cache_hit", "preprocessed_cache_hit", "cache_miss")}
        total = sum(d.values())
        return round((d["direct_cache_hit"] + d["preprocessed_cache_hit"]) / total, 3) if total else None


def _skipped(reason: str, commit: str | None = None) -> BuildResult:
    return BuildResult(status="skipped", reason=reason, commit=commit)


def build_branch(builder: Builder, place: BuildPlace, apply: ApplyResult, run_dir: Path, branch_slug: str,
                 per_patch: bool = False) -> BranchBuild:
    """Baseline, then (optionally) each patch, then the patched tree, in one place."""
    baseline, base_warnings = builder.build(place, apply.branch_commit, f"{branch_slug} baseline", run_dir,
                                            RunDir.artifacts(branch_slug, "baseline"))
    out = BranchBuild(baseline=baseline, patched=_skipped("nothing of the series applied"))
    if not apply.patched_commit:
        return out
    if per_patch:
        for p in apply.patches:
            if not p.commit:
                continue
            r, _ = builder.build(place, p.commit, f"{branch_slug} patch {p.index}", run_dir, RunDir.artifacts(branch_slug, f"patch-{p.index:02d}"))
            out.per_patch.append(PatchBuild(index=p.index, status=r.status, objects_compiled=r.objects_compiled,
                                            reason=r.reason))
            if r.status == "fail" and out.first_bad_patch is None:
                out.first_bad_patch = p.index
    patched, patched_warnings = builder.build(place, apply.patched_commit, f"{branch_slug} patched", run_dir,
                                              RunDir.artifacts(branch_slug, "patched"))
    if baseline.status == "pass" and patched.status == "pass":
        seen = set(base_warnings)
        patched.warnings_new = [w for w in patched_warnings if w not in seen]
    out.patched = patched
    return out
