"""The cache repository: where branches, imports and patched results live.

The user's own checkout is only ever read. A local repository is borrowed
through git alternates (no copy of its objects), a URL is fetched into a
private refs namespace, a source tarball is imported as a commit. All of it
sits in one bare repository per kernel.repo under the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kpatchtest.apply.engine import BranchTarget, slug
from kpatchtest.errors import InputError
from kpatchtest.gitutil import Git
from kpatchtest.locks import exclusive as locked
from kpatchtest.spec import BranchSpec
from kpatchtest.urls import is_url, ref_problem, repo_problem
from kpatchtest.util import user_path
from kpatchtest.rundir import CacheDir

REMOTES = "refs/kpatchtest/remotes"
IMPORTS = "refs/kpatchtest/imports"


def default_cache_dir() -> Path:
    """$KPATCHTEST_CACHE, else $XDG_CACHE_HOME/kpatchtest; always absolute (a relative
    value is taken from the current directory, once)."""
    env = os.environ.get("KPATCHTEST_CACHE")
    if env:
        return user_path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return user_path(xdg) / "kpatchtest"


@dataclass
class ResolvedKernel:
    git: Git
    targets: list[BranchTarget] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)   # branch name -> one-line error
    upstream: str | None = None


class KernelCache:
    def __init__(self, cache_dir: Path, repo: str | None):
        self.repo = repo
        key = repo or "imports"
        name = slug(Path(key.rstrip("/")).name or "repo") + "-" + hashlib.sha1(key.encode()).hexdigest()[:10]
        self.path = CacheDir(cache_dir).repos / f"{name}.git"
        self.git = Git(self.path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")   # exists before the repo does

    def preflight(self, branches: list[BranchSpec]) -> None:
        """Cheap local checks, before anything slow or networked runs."""
        if self.repo and (why := repo_problem(self.repo)):     # the spec refuses it too; this is for other callers
            raise InputError(f"kernel.repo {self.repo!r}: {why}")
        for b in branches:
            if not b.tarball and (why := ref_problem(b.git_ref)):
                raise InputError(f"branch {b.git_ref!r}: {why}")
        if self.repo and not is_url(self.repo) and not Path(self.repo).exists():
            raise InputError(f"kernel.repo {self.repo}: no such directory",
                             hint="give a path to a kernel git repository, a URL, or a source tarball")
        if (self.repo and not is_url(self.repo) and not _is_tarball(self.repo)
                and not Git(Path(self.repo)).ok("rev-parse", "--git-dir")):
            raise InputError(f"kernel.repo {self.repo}: not a git repository",
                             hint="give a path to a kernel git repository, a URL, or a source tarball")
        for b in branches:
            if b.tarball and not Path(b.tarball).is_file():
                raise InputError(f"branch {b.name}: tarball {b.tarball} not found",
                                 hint="install it (e.g. apt-get install linux-source-6.1) or fix the path")

    def open(self) -> Git:
        with locked(self.lock_path):    # two runs may create the same cache repo at once
            if not (self.path / "HEAD").exists():
                Git(self.path.parent).run("init", "-q", "--bare", str(self.path))
                self.git.run("config", "gc.auto", "0")
            if self.repo and not is_url(self.repo) and not _is_tarball(self.repo):
                self._borrow(Path(self.repo))
        return self.git

    def _borrow(self, repo: Path) -> None:
        """Point alternates at a local repository: its objects without copying them."""
        if not repo.exists():
            raise InputError(f"kernel.repo {repo}: no such directory",
                             hint="give a path to a kernel git repository, a URL, or a source tarball")
        p = Git(repo).run("rev-parse", "--path-format=absolute", "--git-common-dir", check=False)
        if p.returncode != 0:
            raise InputError(f"kernel.repo {repo}: not a git repository",
                             hint="give a path to a kernel git repository, a URL, or a source tarball")
        objects = Path(p.stdout.strip()) / "objects"
        alt = self.path / "objects" / "info" / "alternates"
        alt.parent.mkdir(parents=True, exist_ok=True)
        if not alt.exists() or str(objects) not in alt.read_text().split("\n"):
            alt.write_text(f"{objects}\n")

    # -- resolving refs -----------------------------------------------------
    def _local_ref(self, ref: str) -> str | None:
        for cand in (ref, f"{REMOTES}/{slug(ref)}", f"{IMPORTS}/{ref}"):
            sha = self.git.rev_parse(cand)
            if sha:
                return sha
        return None

    def _resolve(self, ref: str, offline: bool) -> str:
        assert self.repo is not None
        if _is_tarball(self.repo):
            sha = self._local_ref(ref)
            if not sha:
                raise InputError(f"branch {ref!r} not found in the imported tarball {self.repo}",
                                 hint="name the branch by the tarball's kernel version")
            return sha
        if not is_url(self.repo):
            p = Git(Path(self.repo)).run("rev-parse", "--verify", "--quiet", "--end-of-options",
                                         ref + "^{commit}", check=False)
            if p.returncode != 0:
                raise InputError(f"branch {ref!r} not found in {self.repo}",
                                 hint=f"check the name with: git -C {self.repo} branch -a")
            sha = p.stdout.strip()
            self.git.run("update-ref", f"{REMOTES}/{slug(ref)}", sha)
            return sha
        local = f"{REMOTES}/{slug(ref)}"
        if not offline:
            p = self.git.run("fetch", "--no-tags", "--quiet", "--", self.repo, f"+{ref}:{local}",
                             check=False)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["git fetch failed"])[-1]
                if "couldn't find remote ref" in p.stderr:
                    raise InputError(f"branch {ref!r} not found in {self.repo}",
                                     hint="check the name with: git ls-remote --heads -- " + shlex.quote(self.repo))
                raise InputError(f"cannot fetch {ref!r} from {self.repo}: {last}",
                                 hint="check the URL and network, or use --offline with a filled cache")
        sha = self.git.rev_parse(local)
        if not sha:
            raise InputError(f"branch {ref!r} of {self.repo} is not in the cache",
                             hint="run once without --offline")
        return sha

    def resolve(self, branches: list[BranchSpec], upstream: str | None, offline: bool,
                on_branch=lambda name, msg: None) -> ResolvedKernel:
        from kpatchtest.tarball import import_tarball

        git = self.open()
        out = ResolvedKernel(git=git)
        if self.repo and _is_tarball(self.repo):
            import_tarball(git, Path(self.repo))
        for b in branches:
            try:
                if b.tarball:
                    on_branch(b.name, f"importing {b.tarball}")
                    # any branch name: the ref is a slug of it
                    sha = import_tarball(git, Path(b.tarball), name=slug(b.name)).commit  # locks itself
                else:
                    on_branch(b.name, "resolving")
                    with locked(self.lock_path):    # ref updates and fetches, one run at a time
                        sha = self._resolve(b.git_ref, offline)
                out.targets.append(BranchTarget(name=b.name, commit=sha))
            except InputError as e:      # the user's branch; a git failure is ours (exit 3)
                out.errors[b.name] = str(e)
        if upstream:
            try:
                with locked(self.lock_path):
                    out.upstream = self._resolve(upstream, offline) if self.repo else self._local_ref(upstream)
            except InputError as e:      # the user's branch; a git failure is ours (exit 3)
                out.errors[f"upstream {upstream}"] = str(e)
        return out


def _is_tarball(path: str) -> bool:
    from kpatchtest.tarball import is_tarball
    return is_tarball(path)
