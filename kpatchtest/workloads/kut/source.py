"""kvm-unit-tests from source: a directory or git URL+ref into a tree (kut_source), built
once per source revision, arch and toolchain (build_kut)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from kpatchtest.build.toolchain import first_line
from kpatchtest.errors import GitError, KpatchtestError
from kpatchtest.gitutil import Git, GitTimeout
from kpatchtest.locks import exclusive
from kpatchtest.urls import is_url, ref_problem, repo_problem
from kpatchtest.util import sha256_text


class KutError(KpatchtestError):
    """kvm-unit-tests cannot be built or deployed as asked."""


# -- source --------------------------------------------------------------------------------

SOURCE_MARKER = ".kpatchtest-source.json"      # in a tree kut_source exported: {source, ref, commit}
FETCH_TIMEOUT_S = 900
# ssh never asks for a password or a host key: a URL that needs one fails instead of waiting
_SSH_BATCH = {"GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}


def _git_cmd(repo: Path, *args: str, timeout: float = 120, binary: bool = False) -> subprocess.CompletedProcess:
    """git in `repo` through gitutil (check=False: callers read the exit status); a git
    that hangs or is missing is a KutError, which the stage reports as the workload's."""
    try:
        return Git(repo).run(*args, check=False, env=_SSH_BATCH, text=not binary, timeout=timeout)
    except GitTimeout:
        raise KutError(f"git {args[0]} gave no answer within {timeout:g} s") from None
    except GitError as e:
        raise KutError(e.message, hint=e.hint) from None


def _git_message(text: str, default: str) -> str:
    """git's own message: its first fatal:/error: line (the lines after it are advice)."""
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line
    return lines[-1] if lines else default


def _is_bare_repo(path: Path) -> bool:
    r = _git_cmd(path, "rev-parse", "--is-bare-repository", timeout=30)
    return r.returncode == 0 and r.stdout.strip() == "true"


def _is_checkout_top(path: Path) -> bool:
    r = _git_cmd(path, "rev-parse", "--show-toplevel", timeout=30)
    return r.returncode == 0 and Path(r.stdout.strip()).resolve() == path.resolve()


def _resolve(git_dir: Path, ref: str) -> str | None:
    r = _git_cmd(git_dir, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}", timeout=30)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _export(git_dir: Path, commit: str, cache_dir: Path, meta: dict[str, str]) -> Path:
    """The tree of `commit` as plain files in cache_dir/kut-src/trees/<commit> (made once)."""
    trees = cache_dir / "kut-src" / "trees"
    dest = trees / commit
    if (dest / SOURCE_MARKER).is_file():
        return dest
    trees.mkdir(parents=True, exist_ok=True)
    with exclusive(trees / f".{commit}.lock"):
        if (dest / SOURCE_MARKER).is_file():
            return dest
        r = _git_cmd(git_dir, "archive", "--format=tar", commit, timeout=300, binary=True)
        if r.returncode != 0:
            raise KutError(f"cannot export kvm-unit-tests {commit[:12]}: "
                           f"{_git_message(r.stderr.decode(errors='replace'), f'git archive exited {r.returncode}')}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=trees))
        try:
            with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:") as tar:
                if hasattr(tarfile, "tar_filter"):          # Python >= 3.11.4
                    tar.extractall(tmp, filter="tar")
                else:
                    tar.extractall(tmp)
            (tmp / SOURCE_MARKER).write_text(json.dumps({**meta, "commit": commit}, indent=1) + "\n")
            shutil.rmtree(dest, ignore_errors=True)        # a half-made tree from a crash
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _ref_name(ref: str) -> str:
    """Where a fetched ref is kept in the cache repo (so an offline run finds it again)."""
    return "refs/kpatchtest/" + sha256_text(ref)[:16]


def kut_source(source: str | Path, ref: str | None, cache_dir: Path, offline: bool = False, *,
               log: Callable[[str], None] | None = None) -> Path:
    """A kvm-unit-tests source tree for build_kut, from a local directory or a git URL.

    - a local directory (not a bare repository) without ref: returned as is (its working
      tree, uncommitted changes included);
    - a local checkout with ref: that ref's tree, exported into the cache;
    - a URL (https://, http://, git://, ssh://, file://, user@host:path) or a path to a
      bare repository: fetched (`git fetch URL +REF`, default HEAD) into a bare cache
      repository cache_dir/kut-src/<hash of the URL>.git, then the commit's tree exported
      into cache_dir/kut-src/trees/<commit>. A full commit id already in the cache is not
      fetched again; a branch or tag is, unless offline, which uses what was fetched last.

    Errors (KutError, one line): no such directory, unreachable URL, unknown ref, offline
    with nothing cached.
    """
    say = log or (lambda m: None)
    cache_dir = Path(cache_dir)
    text = str(source)
    if ref is not None:
        why = ref_problem(ref) or ("must not contain spaces" if any(c.isspace() for c in ref) else None)
        if why:
            raise KutError(f"bad kvm-unit-tests ref {ref!r}: {why}")
    if why := repo_problem(text):
        raise KutError(f"bad kvm-unit-tests source {text!r}: {why}")
    local = None if is_url(text) else Path(text).expanduser()
    if local is not None:
        if not local.exists():
            raise KutError(f"kvm-unit-tests source {text} does not exist",
                           hint="give a kvm-unit-tests checkout or a git URL")
        if not local.is_dir():
            raise KutError(f"kvm-unit-tests source {text} is not a directory")
        local = local.resolve()
        if not _is_bare_repo(local):
            if ref is None:
                return local
            if not _is_checkout_top(local):
                raise KutError(f"kvm-unit-tests source {local} is not a git checkout, so ref {ref} means nothing",
                               hint="drop the ref to build the directory as it is")
            commit = _resolve(local, ref)
            if commit is None:
                raise KutError(f"unknown ref {ref} in {local}")
            return _export(local, commit, cache_dir, {"source": str(local), "ref": ref})
        url = str(local)
    else:
        url = text

    want = ref or "HEAD"
    repo = cache_dir / "kut-src" / (sha256_text(url)[:16] + ".git")
    repo.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(repo.parent / f".{repo.name}.lock"):
        created = not (repo / "HEAD").is_file()
        if created:
            r = _git_cmd(repo.parent, "init", "--bare", "--quiet", repo.name, timeout=60)
            if r.returncode != 0:
                raise KutError(f"cannot create {repo}: {_git_message(r.stderr, 'git init failed')}")
            _git_cmd(repo, "config", "kpatchtest.url", url, timeout=30)
        keep = _ref_name(want)
        commit_id = re.fullmatch(r"[0-9a-f]{7,64}", want) is not None
        commit = _resolve(repo, want) if commit_id else None     # a commit id fetched before
        if commit is None and offline:
            commit = _resolve(repo, keep)
            if commit is None:
                raise KutError(f"kvm-unit-tests {url} ({want}) is not in the cache and the run is offline",
                               hint="run once without --offline, or give a local checkout as the source")
            say(f"kvm-unit-tests: offline, using {want} = {commit[:12]} fetched earlier from {url}")
        elif commit is None:
            say(f"kvm-unit-tests: fetching {want} from {url}")
            r = _git_cmd(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--",
                         url, f"+{want}:{keep}", timeout=FETCH_TIMEOUT_S)
            if r.returncode != 0:
                # reachable at all? then the ref is what is wrong
                probe = _git_cmd(repo, "ls-remote", "--", url, "HEAD", timeout=120)
                if probe.returncode != 0:
                    if created:
                        shutil.rmtree(repo, ignore_errors=True)     # nothing to keep for a bad URL
                    raise KutError(f"cannot reach kvm-unit-tests at {url}: "
                                   f"{_git_message(probe.stderr or r.stderr, f'git fetch exited {r.returncode}')}")
                if commit_id and len(want) < 40:
                    # servers hand out full commit ids only: an abbreviated one needs the history
                    r2 = _git_cmd(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                                  "--", url, "+refs/heads/*:refs/kpatchtest/heads/*",
                                  "+refs/tags/*:refs/kpatchtest/tags/*", timeout=FETCH_TIMEOUT_S)
                    commit = _resolve(repo, want) if r2.returncode == 0 else None
                    if commit is not None:
                        _git_cmd(repo, "update-ref", keep, commit, timeout=30)
                if commit is None:
                    raise KutError(f"unknown ref {want} in {url}",
                                   hint=_git_message(r.stderr, f"git fetch exited {r.returncode}"))
            commit = commit or _resolve(repo, keep)
            if commit is None:
                raise KutError(f"{want} in {url} is not a commit")
    return _export(repo, commit, cache_dir, {"source": url, "ref": want})


# -- build ---------------------------------------------------------------------------------

_BUILD_IGNORE = shutil.ignore_patterns(".git", "logs", "logs.old", "*.o", "*.d", ".*.d", "*.a")


def _git(source: Path, *args: str) -> str | None:
    """git's answer about `source`, or None when git fails (the caller then goes by content)."""
    try:
        r = _git_cmd(source, *args, timeout=60)
    except KutError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _content_hash(source: Path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "logs", "logs.old"))
        for f in sorted(files):
            p = Path(root, f)
            if p.suffix in (".o", ".d", ".a", ".elf", ".flat", ".efi") or p.is_symlink():
                continue
            h.update(str(p.relative_to(source)).encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _source_id(source: Path) -> tuple[str, str | None]:
    """(cache identity, git HEAD or None): the commit of a tree kut_source exported, HEAD
    for a clean checkout, else a content hash. A directory that is not the top of its own
    checkout (a plain tree somewhere inside another repository) goes by content."""
    marker = source / SOURCE_MARKER
    if marker.is_file():
        try:
            commit = json.loads(marker.read_text())["commit"]
        except (ValueError, KeyError, TypeError):
            commit = None
        if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
            return f"git:{commit}", commit
    top = _git(source, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != source:
        return f"content:{_content_hash(source)}", None
    head = _git(source, "rev-parse", "--verify", "HEAD")
    if head and _git(source, "status", "--porcelain", "--untracked-files=no") == "":
        return f"git:{head}", head
    return f"content:{_content_hash(source)}", head


def _toolchain() -> str:
    """The compiler kvm-unit-tests' configure picks ($CC, else gcc): its --version line,
    else its name."""
    cc = os.environ.get("CC", "gcc")
    return first_line([cc, "--version"]) or cc


def _build_key(ident: str, host_arch: str, args: Sequence[str]) -> str:
    """The cache key of a built tree: source identity, arch, compiler and configure args."""
    return sha256_text("\0".join([ident, host_arch, _toolchain(), *args]))[:16]


def build_kut(source: Path, cache_dir: Path, *, arch: str | None = None, jobs: int = 2,
              configure_args: Sequence[str] = ()) -> Path:
    """Configure and make kvm-unit-tests from `source` with the host toolchain, once per
    (source revision or content, arch, compiler, configure args); returns the built tree."""
    source = Path(source).resolve()
    if not (source / "run_tests.sh").is_file() or not (source / "configure").is_file():
        raise KutError(f"{source} is not a kvm-unit-tests tree (no run_tests.sh / configure)")
    ident, head = _source_id(source)
    host_arch = arch or platform.machine()
    args = [*([f"--arch={arch}"] if arch else []), *configure_args]
    key = _build_key(ident, host_arch, args)
    cache_dir = Path(cache_dir)
    dest = cache_dir / f"kvm-unit-tests-{host_arch}-{key}"
    if (dest / ".kpatchtest-built").is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
    tree = tmp / "tree"
    shutil.copytree(source, tree, ignore=_BUILD_IGNORE, symlinks=True)
    log_path = tree / "build.log"
    try:
        with open(log_path, "wb") as logf:
            for cmd in (["./configure", *args], ["make", f"-j{max(1, jobs)}"]):
                logf.write(f"$ {' '.join(cmd)}\n".encode())
                logf.flush()
                r = subprocess.run(cmd, cwd=tree, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                if r.returncode != 0:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                    raise KutError(f"kvm-unit-tests build failed: `{' '.join(cmd)}` exited {r.returncode}",
                                   hint=" | ".join(tail))
        if head:
            (tree / "build-head").write_text(head[:8] + "\n")
        # configure recorded the temporary directory: point the tree at where it will live
        mak = tree / "config.mak"
        if mak.is_file():
            mak.write_text(_config_mak(mak.read_text(), str(dest), pretty_stacks=True))
        (tree / ".kpatchtest-built").write_text(json.dumps(
            {"source": str(source), "id": ident, "arch": host_arch, "toolchain": _toolchain(),
             "configure_args": args}, indent=1) + "\n")
        try:
            os.replace(tree, dest)
        except OSError:
            if not (dest / ".kpatchtest-built").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _config_mak(text: str, remote_dir: str, pretty_stacks: bool) -> str:
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "SRCDIR":
            line = f"SRCDIR={remote_dir}"
        elif sep and key == "ERRATATXT" and value:
            line = f"ERRATATXT={remote_dir}/{posixpath.basename(value)}"
        elif sep and key == "PRETTY_PRINT_STACKS" and not pretty_stacks:
            line = "PRETTY_PRINT_STACKS=no"
        out.append(line)
    return "\n".join(out) + "\n"
