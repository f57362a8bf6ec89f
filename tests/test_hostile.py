"""Hostile specs: a spec, a branch name or a URL from someone else runs no command, and a
YAML bomb ends in one line, not gigabytes or a traceback. Real git, real CLI, no mocks."""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from kpatchtest.cli import main
from kpatchtest.errors import EXIT_INPUT, InputError
from kpatchtest.spec import MAX_YAML_DEPTH, parse_spec
from kpatchtest.tarball import import_tarball
from kpatchtest.workloads.kut import KutError, kut_source
from tests.kernelhist import build
from tests.test_tarball import bare, kernel_members, ls_tree, write_tar

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hostile") / "linux")


def write_spec(tmp_path: Path, hist, *, repo, branches=("linux-1.0.y",), upstream=None, commits=None) -> Path:
    """A spec with the given kernel keys; strings as JSON, so any of them is valid YAML."""
    kernel = {"repo": repo, "branches": list(branches), **({"upstream": upstream} if upstream else {})}
    doc = {"name": "t", "series": [{"commits": commits or hist.shas["P_clean"], "repo": str(hist.path)}],
           "kernel": kernel}
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(doc, indent=1))
    return spec


def run_cli(tmp_path: Path, spec: Path, *extra: str) -> int:
    return main(["run", str(spec), "--stages", "fetch,apply", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), *extra])


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


HOSTILE = {   # id: (kernel keys, given the marker path and the good repo; the key the error names)
    "upload-pack-repo": (lambda m, r: dict(repo=f"--upload-pack=touch {m}; false ://x", branches=["linux-1.0.y/x"]),
                         "kernel.repo: must not start with '-'"),
    "ext-repo": (lambda m, r: dict(repo=f"ext::sh -c touch% {m}"), "kernel.repo: git remote helpers (ext::) are not allowed"),
    "ssh-proxycommand": (lambda m, r: dict(repo=f"ssh://-oProxyCommand=touch% {m}/linux"),
                         "kernel.repo: the host of a URL must not start with '-'"),
    "scheme-not-allowed": (lambda m, r: dict(repo="fd::3"), "kernel.repo: git remote helpers (fd::)"),
    "output-branch": (lambda m, r: dict(repo=r, branches=[f"--output={m}"]), "kernel.branches[0].name: must not start"),
    "output-ref": (lambda m, r: dict(repo=r, branches=[{"name": "b", "ref": f"--output={m}"}]),
                   "kernel.branches[0].ref: must not start"),
    "output-upstream": (lambda m, r: dict(repo=r, upstream=f"--output={m}"), "kernel.upstream: must not start"),
    "output-commits": (lambda m, r: dict(repo=r, commits=f"--output={m}"), "series[0]: must not start"),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_spec_strings_are_refused_before_anything_runs(tmp_path, hist, capsys, case):
    keys, expected = HOSTILE[case]
    marker = tmp_path / "PWNED"
    spec = write_spec(tmp_path, hist, **keys(marker, str(hist.path)))
    assert run_cli(tmp_path, spec) == EXIT_INPUT
    assert not marker.exists()
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"kpatchtest: error: {spec}:") and expected in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.fixture
def ext_rewriting_gitconfig(tmp_path, monkeypatch) -> Path:
    """A user git config that rewrites an allowed https:// URL to ext:: and allows ext:
    only kpatchtest's own allow-list stands between the spec and the command."""
    marker = tmp_path / "PWNED"
    cfg = tmp_path / "gitconfig"
    cfg.write_text(f'[protocol "ext"]\n\tallow = always\n'
                   f'[url "ext::sh -c touch% {marker} #"]\n\tinsteadOf = https://evil.example/\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    return marker


def test_url_rewritten_to_ext_reaches_no_transport(tmp_path, hist, capsys, ext_rewriting_gitconfig):
    marker = ext_rewriting_gitconfig
    probe = subprocess.run(["git", "ls-remote", "https://evil.example/x"], capture_output=True, cwd=tmp_path)
    assert marker.exists(), probe.stderr    # the config is as dangerous as it looks
    marker.unlink()
    spec = write_spec(tmp_path, hist, repo="https://evil.example/linux.git")
    assert run_cli(tmp_path, spec, "-q") == EXIT_INPUT
    line = one_line(capsys.readouterr().err)
    assert "branch linux-1.0.y: cannot fetch" in line and "transport 'ext' not allowed" in line, line
    assert not marker.exists()


def test_kut_source_url_rewritten_to_ext_reaches_no_transport(tmp_path, ext_rewriting_gitconfig):
    with pytest.raises(KutError, match="transport 'ext' not allowed"):
        kut_source("https://evil.example/kvm-unit-tests.git", None, tmp_path / "cache")
    assert not ext_rewriting_gitconfig.exists()


@pytest.mark.parametrize("source, ref, expected", [
    ("ext::sh -c touch% PWNED", None, "git remote helpers (ext::)"),
    ("--upload-pack=touch PWNED", None, "must not start with '-'"),
    ("https://gitlab.com/kvm-unit-tests/kvm-unit-tests.git", "--output=PWNED", "must not start with '-'"),
])
def test_kut_spec_keys_are_checked(tmp_path, source, ref, expected):
    text = ("name: t\nseries: [{msgid: a@b}]\nkernel: {repo: /x, branches: [b]}\n"
            f"workloads:\n  kvm_unit_tests:\n    source: {json.dumps(source)}\n"
            + (f"    ref: {json.dumps(ref)}\n" if ref else ""))
    with pytest.raises(InputError) as e:
        parse_spec(text, tmp_path / "s.yaml")
    key = "workloads.kvm_unit_tests.ref" if ref else "workloads.kvm_unit_tests.source"
    assert f"s.yaml:{7 if ref else 6}: {key}: " in str(e.value) and expected in str(e.value)
    with pytest.raises(KutError, match=re.escape(expected)):
        kut_source(source, ref, tmp_path / "cache")     # the same check for callers without a spec
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("extra, expected", [
    ("build:\n  make_vars: {'--eval=$(shell touch PWNED)': ''}\n", "s.yaml:5: build.make_vars: string should match"),
    ("workloads:\n  kvm_unit_tests: {tests: [-v]}\n", "s.yaml:5: workloads.kvm_unit_tests.tests[0]: string should match"),
    ("workloads:\n  kvm_unit_tests: {groups: [-j99]}\n", "s.yaml:5: workloads.kvm_unit_tests.groups[0]"),
])
def test_make_and_run_tests_sh_get_no_options_from_the_spec(tmp_path, extra, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        parse_spec("name: t\nseries: [{msgid: a@b}]\nkernel: {repo: /x, branches: [b]}\n" + extra, tmp_path / "s.yaml")


@pytest.mark.parametrize("repo, local", [
    ("https://git.kernel.org/pub/scm/linux/kernel/git/stable/linux.git", False),
    ("git://git.kernel.org/linux.git", False),
    ("ssh://git@example.org:2222/linux.git", False),
    ("git@github.com:torvalds/linux.git", False),
    ("example.org:linux.git", False),
    ("file:///srv/linux.git", False),
    ("../linux", True),
])
def test_ordinary_repos_are_accepted(tmp_path, repo, local):
    text = f"name: t\nseries: [{{msgid: a@b}}]\nkernel: {{repo: {json.dumps(repo)}, branches: [linux-6.1.y]}}\n"
    got = parse_spec(text, tmp_path / "s.yaml").spec.kernel.repo
    assert got == (str((tmp_path / repo).resolve()) if local else repo)


def test_tarred_checkout_imports_without_its_git_dir(tmp_path):
    """A .git in the tree would make git refuse the build stage's checkout (exit 3, far from
    the cause); it is not source, so the import leaves it out."""
    hook = b"#!/bin/sh\ntouch PWNED\n"
    members = kernel_members() + [("linux-source-6.1/.git/hooks/post-checkout", "file", hook, 0o755),
                                  ("linux-source-6.1/sub/.GIT/config", "file", b"[core]\n", 0o644)]
    git = bare(tmp_path / "cache.git")
    commit = import_tarball(git, write_tar(tmp_path / "linux.tar.xz", members)).commit
    assert not [p for p in ls_tree(git, commit) if ".git/" in p.lower()]
    git.run("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), commit)
    assert (tmp_path / "wt" / "Makefile").is_file()


# -- YAML bombs ---------------------------------------------------------------------------

def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    """`kpatchtest validate` in its own process: 1 GiB of address space, 20 s."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(text)
    return subprocess.run([sys.executable, "-m", "kpatchtest", "validate", str(spec)], cwd=ROOT,
                          capture_output=True, text=True, timeout=20, preexec_fn=_limits)


LAUGHS = "name: t\nl0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("text, expected", [
    (LAUGHS, "bomb.yaml:6: YAML expands to more than 10000 nodes"),
    ("name: t\na: &a [x, *a]\n", "bomb.yaml:2: YAML alias *a refers to a node that contains it"),
    ("name: t\na: " + "[" * 5000 + "]" * 5000 + "\n", f"bomb.yaml:2: YAML nested deeper than {MAX_YAML_DEPTH} levels"),
    ("name: t\na: " + "{a: " * 5000 + "x" + "}" * 5000 + "\n", "YAML nested deeper than"),
    ("name: t\na: " + "".join(f"\n{' ' * i}a:" for i in range(1, 3000)) + " x\n", "YAML nested deeper than"),
], ids=["billion-laughs", "self-alias", "deep-flow-seq", "deep-flow-map", "deep-block-map"])
def test_yaml_bombs_are_one_line_within_limits(tmp_path, text, expected):
    assert len(LAUGHS) < 700
    p = validate(tmp_path, text)
    assert p.returncode == EXIT_INPUT, p.stderr[-2000:]
    line = one_line(p.stderr)
    assert line.startswith("kpatchtest: error: ") and expected in line, line


def test_ordinary_aliases_still_work(tmp_path):
    text = ("name: t\nseries: [{msgid: a@b}]\n"
            "kernel: {repo: /x, branches: [&one linux-6.1.y, {name: again, ref: *one}]}\n")
    spec = parse_spec(text, tmp_path / "s.yaml").spec
    assert [b.git_ref for b in spec.kernel.branches] == ["linux-6.1.y", "linux-6.1.y"]


def test_control_characters_are_one_line(tmp_path):
    p = validate(tmp_path, "name: t\x00\n")
    assert p.returncode == EXIT_INPUT and "malformed YAML" in one_line(p.stderr), p.stderr


@pytest.mark.parametrize("name", ["../../escape", "a,path=/tmp/x", "..", "-rf", "a b"])
def test_spec_name_is_a_plain_name(tmp_path, name):
    """The default --out is out/<name> and the local lab names files after it."""
    with pytest.raises(InputError, match="name"):
        parse_spec(f"name: {json.dumps(name)}\nseries: [{{msgid: a@b}}]\nkernel: {{repo: /x, branches: [b]}}\n",
                   tmp_path / "s.yaml")
