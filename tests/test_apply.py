"""The apply engine on a real git history shaped like a stable branch (tests/kernelhist.py)."""

from __future__ import annotations

import pytest

from kpatchtest.apply import ApplyContext, BranchTarget, apply_series, builds_on, verdict
from kpatchtest.diffparse import parse_diff
from kpatchtest.gitutil import Git
from tests.kernelhist import GONE, MMU, NEW, OLD, build


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("hist") / "linux")


def run(hist, keys, tmp_path, upstream_known=True, base="REV", hints=True):
    git = Git(hist.path)
    ctx = ApplyContext(git=git, scratch=tmp_path, base=hist.shas[base] if base else None,
                       upstream="master", ref_prefix="refs/kpatchtest/test", hints=hints)
    target = BranchTarget("linux-1.0.y", hist.git("rev-parse", "linux-1.0.y"))
    return apply_series(ctx, hist.series(keys, upstream=upstream_known), target)


def statuses(res):
    return [(p.status, p.method) for p in res.patches]


def test_clean(hist, tmp_path):
    res = run(hist, ["P_clean"], tmp_path)
    assert statuses(res) == [("applied", None)]
    assert res.verdict == "clean"
    # the patched result is a commit under the private namespace, carrying the change
    assert hist.git("rev-parse", "refs/kpatchtest/test/patched/linux-1.0.y") == res.patched_commit
    assert "/* clean */" in hist.git("show", f"{res.patched_commit}:{MMU}")
    assert hist.git("log", "-1", "--format=%s", res.patched_commit) == "KVM: x86/mmu: clean change"


def test_offset_is_three_way_with_method(hist, tmp_path):
    res = run(hist, ["P_clean", "P_offset"], tmp_path)
    assert statuses(res) == [("applied", None), ("applied-3way", "offset")]
    assert "offset +3 lines" in res.patches[1].detail
    assert res.verdict == "three-way"


def test_real_three_way_merge(hist, tmp_path):
    res = run(hist, ["P_3way"], tmp_path)
    assert statuses(res) == [("applied-3way", "3way")]
    assert "/* 3-way */" in hist.git("show", f"{res.patched_commit}:arch/x86/kvm/smm.c")


def test_file_renamed_upstream_applies_to_old_name(hist, tmp_path):
    res = run(hist, ["P_rename"], tmp_path)
    assert statuses(res) == [("applied-3way", "rename")]
    assert f"{NEW} -> {OLD}" in res.patches[0].detail
    assert "/* renamed */" in hist.git("show", f"{res.patched_commit}:{OLD}")


def test_conflict_lists_file_hunks_and_text(hist, tmp_path):
    res = run(hist, ["P_conflict"], tmp_path)
    p = res.patches[0]
    assert p.status == "conflict" and res.verdict == "conflict"
    assert [(c.file, c.hunks) for c in p.conflicts] == [(MMU, 1)]
    assert "+\treturn kvm->arch.v7 << 1; /* conflict */" in p.conflicts[0].rejected[0]
    assert res.patched_commit is None


def test_file_deleted_on_branch(hist, tmp_path):
    res = run(hist, ["P_gone"], tmp_path)
    c = res.patches[0].conflicts[0]
    assert (c.file, c.hunks) == (GONE, 1) and "does not exist" in c.reason


def test_skipped_when_building_on_conflict_but_later_patches_still_tried(hist, tmp_path):
    res = run(hist, ["P_conflict", "P_dep", "P_clean"], tmp_path)
    assert [p.status for p in res.patches] == ["conflict", "skipped", "applied"]
    assert res.patches[1].depends_on == [1]
    assert res.verdict == "partial"


@pytest.mark.parametrize("upstream_known", [True, False], ids=["commits-source", "lore-source"])
def test_already_present_by_patch_id_and_upstream_ref(hist, tmp_path, upstream_known):
    res = run(hist, ["P_pid", "P_ref"], tmp_path, upstream_known=upstream_known)
    assert [(p.status, p.present_by) for p in res.patches] == [
        ("already-present", "patch-id"), ("already-present", "upstream-ref")]
    assert res.patches[0].present_as == hist.shas["CP_pid"]
    assert res.patches[1].present_as == hist.shas["BP_ref"]
    assert res.verdict == "already-applied"


def test_already_present_by_reverse_apply(hist, tmp_path):
    res = run(hist, ["REV"], tmp_path, upstream_known=False)
    assert [(p.status, p.present_by) for p in res.patches] == [("already-present", "reverse-apply")]


def test_prerequisites_two_commits_both_needed(hist, tmp_path):
    res = run(hist, ["P_needs_ab"], tmp_path)
    assert res.patches[0].status == "conflict"
    by_sha = {q.commit: q for q in res.prerequisites}
    assert set(by_sha) == {hist.shas["A"], hist.shas["B"]}
    assert all(q.verified and q.rank == 0 and q.for_patches == [1] for q in by_sha.values())
    assert by_sha[hist.shas["A"]].subject == "KVM: x86/mmu: adjust fn3"
    assert by_sha[hist.shas["A"]].size == 2


def test_prerequisites_skip_commits_the_branch_has_as_backports(hist, tmp_path):
    res = run(hist, ["P_near_u1"], tmp_path)
    assert res.patches[0].status == "conflict"
    assert hist.shas["U1"] not in {q.commit for q in res.prerequisites}


def test_no_hints_without_base(hist, tmp_path):
    res = run(hist, ["P_needs_ab"], tmp_path, base=None)
    assert res.patches[0].status == "conflict" and res.prerequisites == []


def test_verdict_table():
    assert verdict(["applied", "applied"]) == "clean"
    assert verdict(["applied", "already-present"]) == "clean"
    assert verdict(["applied-3way", "applied"]) == "three-way"
    assert verdict(["already-present"] * 2) == "already-applied"
    assert verdict(["already-present", "conflict"]) == "partial"
    assert verdict(["conflict", "skipped"]) == "conflict"


def test_builds_on_uses_lines_the_failed_patch_wrote(hist):
    first = parse_diff(hist.git("diff-tree", "-p", "--no-commit-id", hist.shas["P_conflict"]))
    dep = parse_diff(hist.git("diff-tree", "-p", "--no-commit-id", hist.shas["P_dep"]))
    other = parse_diff(hist.git("diff-tree", "-p", "--no-commit-id", hist.shas["P_clean"]))
    assert builds_on(dep, first)
    assert not builds_on(other, first)


def test_users_repo_untouched(hist, tmp_path):
    before = {cmd: hist.git(*cmd.split()) for cmd in ("rev-parse HEAD", "status --porcelain",
                                                        "for-each-ref --format=%(refname)", "stash list")}
    run(hist, ["P_clean", "P_conflict"], tmp_path)
    after = {cmd: hist.git(*cmd.split()) for cmd in before}
    new_refs = set(after["for-each-ref --format=%(refname)"].split()) - set(before["for-each-ref --format=%(refname)"].split())
    assert all(r.startswith("refs/kpatchtest/") for r in new_refs)
    before.pop("for-each-ref --format=%(refname)"), after.pop("for-each-ref --format=%(refname)")
    assert before == after
