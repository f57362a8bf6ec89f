"""The apply engine on a real git history shaped like a stable branch (tests/kernelhist.py)."""

from __future__ import annotations

import pytest

from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series, builds_on, verdict
from kpatchtest.diffparse import parse_diff
from kpatchtest.gitutil import Git
from tests.kernelhist import GONE, MMU, NEW, OLD, SMM, X86, build


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


def test_offset_only_is_applied_with_the_offsets_in_detail(hist, tmp_path):
    """git am takes hunks that moved without -3: that is applied, not a 3-way merge."""
    res = run(hist, ["P_clean", "P_offset"], tmp_path)
    assert statuses(res) == [("applied", None), ("applied", "offset")]
    assert "offset +3 lines" in res.patches[1].detail
    assert res.verdict == "clean"


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


# -- verdicts that need real history (tests/histories.py); every verified claim is replayed --

from dataclasses import replace  # noqa: E402

from kpatchtest.patchset import Series  # noqa: E402
from kpatchtest.results import ApplyResult  # noqa: E402
from tests import histories  # noqa: E402
from tests.replay import am3, check_claims  # noqa: E402

MERGED_BRANCHES = ("linux-1.0.y", "linux-1.0.y-a0", "linux-1.1.y")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    return histories.merged_series(tmp_path_factory.mktemp("merged") / "linux")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return histories.prereq_chain(tmp_path_factory.mktemp("chain") / "linux")


def apply_on(repo, series, branch, tmp_path, base="master", branches=(), budget=30.0) -> ApplyResult:
    """The pipeline's way: one context for the run, all branches named, base = upstream."""
    git = Git(repo.path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = ApplyContext(git=git, scratch=tmp_path, base=git.rev_parse(base) if base else None, upstream="master",
                       ref_prefix="refs/kpatchtest/test", branches=tuple(git.rev_parse(b) for b in branches),
                       prerequisite_budget_s=budget)
    res = apply_series(ctx, series, BranchTarget(branch, git.rev_parse(branch)))
    check_claims(repo.path, branch, series, res)
    return res


@pytest.mark.parametrize("source", ["commits", "posted"])
def test_tag_after_the_series_merged_is_already_applied(merged, tmp_path, source):
    """linux-1.1.y was tagged after the merge: every patch is an ancestor, none skipped,
    although none applies or reverse-applies there (L changed the lines again)."""
    series = merged.series(["P1", "P2", "P3"]) if source == "commits" else histories.posted(merged)
    res = apply_on(merged, series, "linux-1.1.y", tmp_path, branches=MERGED_BRANCHES)
    assert [(p.status, p.present_by, p.present_as) for p in res.patches] == [
        ("already-present", "ancestor", merged.shas[k]) for k in ("P1", "P2", "P3")]
    assert res.verdict == "already-applied" and res.patched_commit is None


def test_posted_series_found_by_the_oldest_fork_point_only(merged, tmp_path):
    """The upstream scan is bounded by the oldest branch's fork point: from linux-1.1.y's
    own fork point (v1.1) the posted patches' upstream commits are out of reach."""
    alone = apply_on(merged, histories.posted(merged), "linux-1.1.y", tmp_path / "alone", branches=("linux-1.1.y",))
    assert "already-applied" != alone.verdict
    res = apply_on(merged, histories.posted(merged), "linux-1.1.y", tmp_path / "all", branches=MERGED_BRANCHES)
    assert res.verdict == "already-applied"


@pytest.mark.parametrize("source", ["commits", "posted"])
def test_series_own_patches_are_never_prerequisites(merged, tmp_path, source):
    """P1 conflicts on linux-1.0.y (it lacks A0); P2 rewrites P1's line. The search runs
    against master, which has P2, P3 and L on those lines: only A0 is P1's prerequisite."""
    series = merged.series(["P1", "P2", "P3"]) if source == "commits" else histories.posted(merged)
    res = apply_on(merged, series, "linux-1.0.y", tmp_path, branches=MERGED_BRANCHES)
    assert [p.status for p in res.patches] == ["conflict", "skipped", "applied"]
    assert res.patches[1].depends_on == [1]
    p1 = res.patches[0]
    assert [(q.commit, q.verified) for q in p1.prerequisites] == [(merged.shas["A0"], True)]
    own = {merged.shas[k] for k in ("P1", "P2", "P3", "L", "M")}
    assert not own & {q.commit for q in res.prerequisites}
    assert res.prerequisites[0].for_patches == [1]


def test_later_patch_on_the_same_lines_applies_on_top(merged, tmp_path):
    res = apply_on(merged, merged.series(["P1", "P2", "P3"]), "linux-1.0.y-a0", tmp_path, branches=MERGED_BRANCHES)
    assert [p.status for p in res.patches] == ["applied"] * 3
    assert res.verdict == "clean" and res.prerequisites == []


def test_prerequisite_chain_found_transitively(chain, tmp_path):
    """P's rejected line was last changed by C3 alone; C3 needs C2, C2 needs C1."""
    series = chain.series(["Q", "P"])
    res = apply_on(chain, series, "linux-1.0.y", tmp_path)
    q, p = res.patches
    assert q.status == "applied" and p.status == "conflict"
    c1, c2, c3 = (chain.shas[k] for k in ("C1", "C2", "C3"))
    verified = [x for x in p.prerequisites if x.verified]
    assert [x.commit for x in verified] == [c1, c2, c3]
    assert [x.needs for x in verified] == [[], [c1], [c2]]
    assert sum(x.size for x in verified) == 2 + 4 + 4
    assert {f for x in verified for f in x.files} == {MMU, X86, SMM}
    assert chain.shas["U0"] not in {x.commit for x in res.prerequisites}   # backported, adjusted
    # and none of the three alone, nor the direct candidate's pair, is enough
    assert not am3(chain.path, "linux-1.0.y", series, res, 2, [c3])
    assert not am3(chain.path, "linux-1.0.y", series, res, 2, [c2, c3])


def test_prerequisites_from_the_files_history_when_the_lines_point_elsewhere(chain, tmp_path):
    """W was posted against C3 without a base-commit, and master moved its lines (SHIFT):
    no commit changed the lines W names there, so the file's commits since the fork are
    tried in order (D1 and P_bad do not apply on the branch and stay out; C3 brings in C2
    and C1 from other files); P rewrote W's line, so the part before P is pared."""
    w = replace(chain.patch_of(chain.shas["W"], 1, upstream=False), msgid="<w-v1@example.org>")
    series = Series(title="W", sources=("mbox",), patches=(w,))
    res = apply_on(chain, series, "linux-1.0.y", tmp_path)
    assert res.patches[0].status == "conflict"
    c1, c2, c3 = (chain.shas[k] for k in ("C1", "C2", "C3"))
    assert [(q.commit, q.needs) for q in res.patches[0].prerequisites if q.verified] == [
        (c1, []), (c2, [c1]), (c3, [c2])]


def test_prerequisite_no_set_helps_is_unverified_with_why(chain, tmp_path):
    """D1 changed P_bad's line, but the stable branch changed it differently."""
    res = apply_on(chain, chain.series(["P_bad"]), "linux-1.0.y", tmp_path)
    p = res.patches[0]
    assert p.status == "conflict"
    assert [(q.commit, q.verified) for q in p.prerequisites] == [(chain.shas["D1"], False)]
    assert "still fails" in p.prerequisites[0].why and chain.shas["D1"][:12] in p.prerequisites[0].why


def test_prerequisite_budget_ends_the_search_unverified(chain, tmp_path):
    res = apply_on(chain, chain.series(["P"]), "linux-1.0.y", tmp_path, budget=0)
    p = res.patches[0]
    assert p.prerequisites and not any(q.verified for q in p.prerequisites)
    assert "budget" in p.prerequisites[0].why


def test_stable_dep_of_backport_is_present_and_names_nothing_else(chain, tmp_path):
    """BP_DEP cites DEP ("[ Upstream commit ]") and carries "Stable-dep-of: FIX": DEP is
    present, FIX (whose backport was dropped) is not."""
    res = apply_on(chain, chain.series(["DEP", "FIX"]), "linux-1.0.y", tmp_path)
    dep, fix = res.patches
    assert (dep.status, dep.present_by, dep.present_as) == ("already-present", "upstream-ref", chain.shas["BP_DEP"])
    assert (fix.status, fix.method) == ("applied", "offset") and "offset +1 line" in fix.detail
    assert res.verdict == "clean"


def test_spec_apply_budget(tmp_path):
    from kpatchtest.errors import InputError
    from kpatchtest.spec import parse_spec
    text = "name: x\nseries: [{mbox: a.mbox}]\nkernel: {repo: /r, branches: [b]}\n"
    assert parse_spec(text, tmp_path / "s.yaml").spec.apply.prerequisite_budget_s == 30
    spec = parse_spec(text + "apply: {prerequisite_budget_s: 5}\n", tmp_path / "s.yaml").spec
    assert spec.apply.prerequisite_budget_s == 5
    with pytest.raises(InputError, match="prerequisite_budget_s"):
        parse_spec(text + "apply: {prerequisite_budget_s: -1}\n", tmp_path / "s.yaml")
