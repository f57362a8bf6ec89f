"""The compare stage: statistics against known answers, test classification, the whole stage."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest

from kpatchtest.compare import stats
from kpatchtest.compare.metrics import metric_info
from kpatchtest.compare.stage import compare_branch, compare_run, needs_reruns, round_orders
from kpatchtest.compare.tests import classify, new_splats
from kpatchtest.results import BootResult, BranchResult, RunResult, SplatInfo, WorkloadRun, load, save
from kpatchtest.spec import parse_spec
from kpatchtest.workloads.record import Metric, WorkloadRecord

SPEC = """name: c
series: [{mbox: x.mbox}]
kernel: {repo: /r, branches: [b]}
"""


def spec(extra: str = ""):
    return parse_spec(SPEC + extra, Path("/tmp/s.yaml")).spec


def rounds(rng: np.random.Generator, n: int, reps: int, mean: float, round_sd: float, rep_sd: float) -> list[list[float]]:
    """Boot-to-boot noise (one factor per round) times repetition noise."""
    return [list(mean * (1 + rng.normal(0, round_sd)) * (1 + rng.normal(0, rep_sd, reps))) for _ in range(n)]


def judge(b, p, threshold=0.02, resamples=2000, seed=1, direction="lower", time_=True, paired=True):
    return stats.compare(b, p, direction=direction, time=time_, threshold=threshold, resamples=resamples, seed=seed,
                         paired=paired)


# -- statistics -------------------------------------------------------------------------

def test_medians_pool_every_repetition_and_the_ratio_pairs_rounds():
    b = [[10.0, 11.0, 12.0], [13.0, 9.0, 10.5], [10.2, 10.1, 10.0]]
    p = [[12.0, 12.5, 11.0], [14.0, 13.0, 12.2], [11.9, 12.1, 12.0]]
    e = judge(b, p)
    flat_b, flat_p = sorted(itertools.chain(*b)), sorted(itertools.chain(*p))
    assert e.baseline_median == flat_b[4] and e.patched_median == flat_p[4]
    # per round: 12/11, 13/10.5, 12/10.1; their median
    assert e.ratio == pytest.approx(sorted([12 / 11, 13 / 10.5, 12 / 10.1])[1])
    assert (e.rounds, e.repetitions, e.baseline_n, e.patched_n) == (3, 3, 9, 9)


def plain_bootstrap(b, p, resamples, seed):
    """The textbook loop: pick rounds with replacement (paired), then repetitions inside each;
    each picked round's ratio of medians, and their median."""
    rnd = random.Random(seed)
    out = []
    for _ in range(resamples):
        idx = [rnd.randrange(len(b)) for _ in b]
        per_round = [float(np.median([rnd.choice(p[i]) for _ in p[i]])) / float(np.median([rnd.choice(b[i]) for _ in b[i]]))
                     for i in idx]
        out.append(float(np.median(per_round)))
    return np.quantile(out, [0.025, 0.975])


def test_vectorised_bootstrap_matches_the_plain_loop():
    rng = np.random.default_rng(7)
    b = rounds(rng, 6, 4, 10.0, 0.03, 0.02)
    p = rounds(rng, 6, 4, 10.5, 0.03, 0.02)
    p[2] = p[2][:2]                     # a short round: draws only its own two values
    lo, hi = plain_bootstrap(b, p, 6000, seed=3)
    e = judge(b, p, resamples=20000)
    assert e.ci_low == pytest.approx(lo, abs=0.006) and e.ci_high == pytest.approx(hi, abs=0.006)


def exact_signed_rank_p(diffs: list[float]) -> float:
    """Two-sided exact p of the signed-rank statistic by enumerating every sign assignment."""
    ranks = np.argsort(np.argsort(np.abs(diffs))) + 1
    observed = sum(r for r, d in zip(ranks, diffs) if d > 0)
    n_total = len(diffs) * (len(diffs) + 1) / 2
    extreme = abs(observed - n_total / 2)
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - n_total / 2) >= extreme
               for signs in itertools.product([0, 1], repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def test_p_value_is_the_exact_paired_signed_rank_test_over_round_medians():
    b = [[10.0, 10.4, 9.6], [10.1], [9.9, 10.0], [10.3, 10.2, 10.1], [10.0], [9.8]]
    p = [[10.9, 11.0, 10.8], [10.0], [10.6, 10.7], [10.9, 11.1, 11.0], [10.45], [10.1]]
    diffs = [float(np.median(x) - np.median(y)) for x, y in zip(p, b)]
    assert judge(b, p).p_value == pytest.approx(exact_signed_rank_p(diffs))
    assert exact_signed_rank_p([1, 2, 3, 4, 5]) == pytest.approx(0.0625)    # the textbook value


def test_ten_percent_slowdown_is_found_in_at_least_95_percent_of_seeds():
    verdicts, covered = [], 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        b = rounds(rng, 10, 5, 10.0, 0.03, 0.02)
        p = rounds(rng, 10, 5, 11.0, 0.03, 0.02)
        e = judge(b, p)
        verdicts.append(e.verdict)
        covered += e.ci_low <= 1.10 <= e.ci_high
    assert verdicts.count("slower") >= 95
    assert covered >= 90                # the interval holds the true ratio (nominal 95%)


def test_a_speed_up_reads_faster_and_a_count_less():
    rng = np.random.default_rng(5)
    b, p = rounds(rng, 8, 5, 10.0, 0.01, 0.01), rounds(rng, 8, 5, 8.0, 0.01, 0.01)
    assert judge(b, p).verdict == "faster"
    assert judge(b, p, time_=False).verdict == "less"
    assert judge(p, b, time_=False).verdict == "more"


def test_a_a_gives_no_significant_change_in_at_least_95_percent_of_seeds():
    verdicts = []
    for seed in range(100):
        rng = np.random.default_rng(10_000 + seed)
        verdicts.append(judge(rounds(rng, 10, 5, 10.0, 0.03, 0.02), rounds(rng, 10, 5, 10.0, 0.03, 0.02)).verdict)
    assert verdicts.count("no significant change") >= 95


def test_boot_to_boot_noise_widens_the_interval():
    """Most noise between boots, little within: treating repetitions as independent would
    exclude 1 most of the time on an A/A; resampling rounds first keeps the CI honest."""
    holds = 0
    for seed in range(100):
        rng = np.random.default_rng(20_000 + seed)
        e = judge(rounds(rng, 10, 5, 10.0, 0.05, 0.002), rounds(rng, 10, 5, 10.0, 0.05, 0.002), threshold=0)
        holds += e.ci_low <= 1 <= e.ci_high
    assert holds >= 88


def test_a_change_inside_the_threshold_is_no_significant_change_even_if_it_excludes_one():
    b = [[10.0, 10.0, 10.0]] * 6
    p = [[10.1, 10.1, 10.1]] * 6
    e = judge(b, p)
    assert e.ci_low == pytest.approx(1.01) and e.verdict == "no significant change"
    assert "excludes 1" in e.why
    assert judge(b, p, threshold=0.005).verdict == "slower"


def test_fewer_than_three_rounds_is_not_enough_data():
    e = judge([[10.0, 10.1, 9.9]] * 2, [[20.0, 20.0, 20.0]] * 2)
    assert e.verdict == "not enough data" and e.ci_low is None and e.p_value is None
    assert e.ratio == pytest.approx(2.0)


def test_direction_none_only_describes():
    e = judge([[100.0, 101.0]] * 4, [[200.0, 201.0]] * 4, direction="none", time_=False)
    assert e.verdict == "n/a" and "describes the workload" in e.why
    assert e.ratio == pytest.approx(200.5 / 100.5) and e.ci_low is not None


def test_zero_counts():
    both = judge([[0.0, 0.0]] * 4, [[0.0, 0.0]] * 4, time_=False)
    assert (both.verdict, both.ratio, both.ci_low, both.ci_high) == ("no significant change", 1.0, 1.0, 1.0)
    up = judge([[0.0, 0.0]] * 4, [[3.0, 4.0]] * 4, time_=False)
    assert up.verdict == "more" and up.ratio is None and "unbounded" in up.why


def test_same_seed_same_numbers_other_seed_other_numbers():
    rng = np.random.default_rng(1)
    # 4 repetitions: a resampled round's median is a mean of two, so the quantiles are not
    # pinned to the few values a median of 3 can take whatever the seed
    b, p = rounds(rng, 6, 4, 10, 0.03, 0.02), rounds(rng, 6, 4, 10, 0.03, 0.02)
    one, again, other = judge(b, p, seed=1), judge(b, p, seed=1), judge(b, p, seed=2)
    assert (one.ci_low, one.ci_high) == (again.ci_low, again.ci_high)
    assert (one.ci_low, one.ci_high) != (other.ci_low, other.ci_high)


def test_metric_table():
    assert (metric_info("wall_time").direction, metric_info("wall_time").time) == ("lower", True)
    assert metric_info("smm_transitions").direction == "none"
    assert metric_info("root_allocs").direction == "lower" and not metric_info("root_allocs").time
    assert metric_info("cycles:vmcall").direction == "lower"
    assert metric_info("kvm.some_new_counter").direction == "none"
    assert metric_info("bogus") is None


# -- synthetic runs ---------------------------------------------------------------------

def run(build: str, rnd: int, records: list[WorkloadRecord], host: str = "local", rerun: int = 0) -> WorkloadRun:
    return WorkloadRun(build=build, host=host, round=rnd, rerun=rerun, records=records, repetitions=3)


def kut(statuses: dict[str, str], detail: str = "") -> list[WorkloadRecord]:
    return [WorkloadRecord(name=n, status=s, group="kvm-unit-tests", detail=detail) for n, s in statuses.items()]


def branch_of(baseline: list[dict[str, str]], patched: list[dict[str, str]], reruns=()) -> BranchResult:
    """Rounds alternate B1 P1 B2 P2 ...; reruns: (build, k, statuses)."""
    b = BranchResult(name="debian-6.1")
    for i, (bs, ps) in enumerate(itertools.zip_longest(baseline, patched), 1):
        if bs is not None:
            b.workloads.append(run("baseline", i, kut(bs)))
        if ps is not None:
            b.workloads.append(run("patched", i, kut(ps)))
    for build, k, statuses in reruns:
        b.workloads.append(run(build, 1, kut(statuses), rerun=k))
    return b


def verdicts(branch: BranchResult, reruns: int = 2) -> dict[str, str]:
    return {t.name: t.verdict for t in classify(branch, reruns)}


def test_transitions():
    B = [{"same": "pass", "broke": "pass", "healed": "fail", "stuck": "fail", "gone": "pass", "skipped": "skip"}] * 3
    P = [{"same": "pass", "broke": "fail", "healed": "pass", "stuck": "timeout", "added": "pass", "skipped": "skip"}] * 3
    assert verdicts(branch_of(B, P), reruns=0) == {
        "same": "unchanged-pass", "broke": "regression", "healed": "fixed", "stuck": "unchanged-fail",
        "gone": "removed", "added": "new", "skipped": "unchanged-pass"}


def test_flaky_when_rounds_differ_on_one_kernel():
    b = branch_of([{"t": "pass"}] * 3, [{"t": "fail"}, {"t": "pass"}, {"t": "fail"}])
    (t,) = classify(b, 2)
    assert t.verdict == "flaky" and (t.patched.passed, t.patched.failed) == (1, 2)
    assert "patched passed 1 of 3" in t.detail and t.reruns_wanted == 0


def test_regression_only_after_reruns_confirm_it():
    B, P = [{"t": "pass"}] * 3, [{"t": "fail"}] * 3
    unconfirmed = branch_of(B, P)
    (t,) = classify(unconfirmed, 2)
    assert t.verdict == "regression" and "0 of 2 reruns" in t.detail
    (need,) = needs_reruns(unconfirmed, spec())
    assert (need.host, need.tests, need.times, need.first_rerun) == ("local", ("t",), 2, 1)

    reruns = [("baseline", 1, {"t": "pass"}), ("patched", 1, {"t": "fail"}),
              ("baseline", 2, {"t": "pass"}), ("patched", 2, {"t": "fail"})]
    confirmed = branch_of(B, P, reruns)
    (t,) = classify(confirmed, 2)
    assert t.verdict == "regression" and (t.rerun_patched.failed, t.rerun_baseline.passed) == (2, 2)
    assert needs_reruns(confirmed, spec()) == []

    half = branch_of(B, P, reruns[:2])
    assert needs_reruns(half, spec())[0].times == 1 and needs_reruns(half, spec())[0].first_rerun == 2

    passes_once = branch_of(B, P, reruns[:3] + [("patched", 2, {"t": "pass"})])
    (t,) = classify(passes_once, 2)
    assert t.verdict == "flaky" and "patched failed 1 of 2" in t.detail
    baseline_fails = branch_of(B, P, [("baseline", 1, {"t": "fail"}), ("patched", 1, {"t": "fail"})])
    assert verdicts(baseline_fails) == {"t": "flaky"}


def test_tests_are_per_host():
    b = BranchResult(name="x", workloads=[run("baseline", 1, kut({"t": "pass"}), host="a"),
                                          run("patched", 1, kut({"t": "pass"}), host="a"),
                                          run("baseline", 1, kut({"t": "pass"}), host="b"),
                                          run("patched", 1, kut({"t": "fail"}), host="b")])
    assert [(t.host, t.verdict) for t in classify(b, 0)] == [("a", "unchanged-pass"), ("b", "regression")]


def test_a_splat_first_seen_on_patched_is_new_and_a_shared_one_is_not():
    shared_b = SplatInfo(kind="warning", first_lines=["WARNING: CPU: 0 PID: 12 at arch/x86/kvm/x86.c:100 f+0x1/0x2"])
    shared_p = SplatInfo(kind="warning", first_lines=["WARNING: CPU: 1 PID: 99 at arch/x86/kvm/x86.c:104 f+0x1/0x2"])
    fresh = SplatInfo(kind="bug", first_lines=["BUG: kernel NULL pointer dereference, address: 0000000000000008"])
    b = BranchResult(name="x", boot=[BootResult(build="baseline", status="booted", host="local", splats=[shared_b]),
                                     BootResult(build="patched", status="booted", host="local", round=2,
                                                splats=[shared_p, fresh])])
    b.workloads = [run("patched", 1, kut({"t": "fail"}, detail="kernel oops in dmesg during the run: "
                                          "Oops: 0000 [#1] SMP (+1 more splats); other")),
                   run("patched", 2, kut({"t": "fail"}, detail="kernel oops in dmesg during the run: Oops: 0000 [#1] SMP"))]
    found = new_splats(b)
    assert [(s.kind, s.where, s.round) for s in found] == [("oops", "t", 1), ("bug", "boot", 2)]
    assert found[0].first_lines == ["Oops: 0000 [#1] SMP"]


def smm_record(wall: list[float | None], allocs: list[float] | None, note: str = "") -> WorkloadRecord:
    metrics = [Metric(name="wall_time", unit="s", values=wall),
               Metric(name="smm_transitions", unit="events", values=[400.0] * len(wall))]
    if allocs is None:
        metrics.append(Metric(name="root_allocs", unit="roots", values=[None] * len(wall), available=False, note=note))
    else:
        metrics.append(Metric(name="root_allocs", unit="roots", values=allocs))
    return WorkloadRecord(name="smm-boot", status="pass", group="smm-boot", metrics=metrics)


def smm_result(n_rounds: int, slow: float, seed: int = 0, baseline_probe: bool = True) -> RunResult:
    rng = np.random.default_rng(seed)
    r = RunResult(tool_version="t", name="c", started="now", stages=["workloads"])
    b = r.branch("debian-6.1")
    for i in range(1, n_rounds + 1):
        for build, factor, allocs in (("baseline", 1.0, 4.0), ("patched", slow, 200.0)):
            boot = 2.0 * factor * (1 + rng.normal(0, 0.02))
            wall = [boot * (1 + rng.normal(0, 0.01)) for _ in range(3)]
            probe = baseline_probe or build == "patched"
            b.workloads.append(run(build, i, [smm_record(wall, [allocs] * 3 if probe else None,
                                                         note="probe tdp_mmu_init_sp not found")]))
    r.branch("no-workloads")
    return r


def test_compare_run_fills_each_branch_and_survives_results_json(tmp_path):
    r = smm_result(6, slow=1.25)
    compare_run(r, spec("compare: {threshold: 2%, bootstrap: 2000, seed: 4}\n"))
    c = r.branches[0].compare
    assert r.branches[1].compare is None
    m = {x.name: x for x in c.metrics}
    assert m["wall_time"].verdict == "slower" and m["wall_time"].ci_low > 1.1
    assert (m["wall_time"].rounds, m["wall_time"].repetitions, m["wall_time"].seed) == (6, 3, 4)
    assert m["root_allocs"].verdict == "more" and m["root_allocs"].ratio == pytest.approx(50.0)
    assert m["smm_transitions"].verdict == "n/a" and m["smm_transitions"].ratio == 1.0
    assert [t.verdict for t in c.tests] == ["unchanged-pass"] and (c.seed, c.bootstrap) == (4, 2000)
    save(r, tmp_path / "results.json")
    again = load(tmp_path / "results.json")
    assert again.branches[0].compare == c
    compare_run(again, spec("compare: {threshold: 2%, bootstrap: 2000, seed: 4}\n"))
    assert again.branches[0].compare == c          # a re-run of the stage gives the same numbers


def test_unavailable_metric_is_n_a_with_the_probe_note():
    r = smm_result(4, slow=1.0, baseline_probe=False)
    c = compare_branch(r.branches[0], spec())
    (allocs,) = [m for m in c.metrics if m.name == "root_allocs"]
    assert allocs.verdict == "n/a" and allocs.ratio is None and allocs.ci_low is None
    assert allocs.why == "unavailable on baseline: probe tdp_mmu_init_sp not found"


def test_reruns_do_not_enter_metrics_and_unpaired_rounds_are_dropped():
    r = smm_result(4, slow=1.0)
    b = r.branches[0]
    b.workloads.append(run("patched", 1, [smm_record([99.0] * 3, [1.0] * 3)], rerun=1))
    b.workloads.append(run("baseline", 5, [smm_record([2.0] * 3, [4.0] * 3)]))
    (wall,) = [m for m in compare_branch(b, spec()).metrics if m.name == "wall_time"]
    assert wall.rounds == 4 and wall.patched_n == 12 and wall.verdict == "no significant change"


def test_order_is_recorded():
    r = smm_result(3, slow=1.0)
    s = spec("workloads: {smm_boot: {}, order: random, seed: 9}\n")
    compare_run(r, s)
    assert r.branches[0].compare.order == "random"


def test_round_orders():
    alt = spec("workloads: {smm_boot: {}, rounds: 4, order: alternate}\n").workloads
    assert round_orders(alt) == [("baseline", "patched")] * 4
    rnd = spec("workloads: {smm_boot: {}, rounds: 20, seed: 5}\n").workloads     # random: the default
    orders = round_orders(rnd)
    assert orders == round_orders(rnd) and len(orders) == 20            # seeded: the same every time
    assert orders.count(("baseline", "patched")) == orders.count(("patched", "baseline")) == 10   # balanced
    other = spec("workloads: {smm_boot: {}, rounds: 20, seed: 6}\n").workloads
    assert round_orders(other) != orders
    for n in (1, 3, 7):     # odd: one more of one kind, never more
        o = round_orders(spec(f"workloads: {{smm_boot: {{}}, rounds: {n}}}\n").workloads)
        assert len(o) == n and abs(o.count(("baseline", "patched")) * 2 - n) == 1


def test_boot_keys_follow_each_boot_not_the_design_of_the_run(tmp_path):
    """More rounds keep the boots already made (same round, same slot in its pair, same
    settings); what a boot runs (repetitions, the workload) or its slot changes its key."""
    from types import SimpleNamespace

    from kpatchtest.boot.stage import BootStage
    from kpatchtest.lab.backend import BootJob
    from kpatchtest.lab.ssh.boot import KernelToBoot
    from kpatchtest.lab.ssh.inventory import HostSpec

    bz = tmp_path / "bzImage"
    bz.write_bytes(b"kernel")

    def keys(extra: str) -> dict[tuple[int, str], str]:
        s = spec("lab: {name: local}\n" + extra)
        stage = object.__new__(BootStage)
        stage.ctx, stage.workloads, stage.orders = SimpleNamespace(spec=s), object(), round_orders(s.workloads)
        host = HostSpec(name="h", address="127.0.0.1")
        return {(n, b): stage.key(BootJob(branch="b", build=b, round=n, host=host, boot_dir="x", workloads_dir="y",
                                          kernel=KernelToBoot(build=b, bzimage=bz, kernelrelease="6.1")))
                for n in range(1, s.workloads.rounds + 1) for b in ("baseline", "patched")}

    three = keys("workloads: {smm_boot: {}, rounds: 3, order: alternate}\n")
    five = keys("workloads: {smm_boot: {}, rounds: 5, order: alternate}\n")
    assert all(five[k] == v for k, v in three.items()) and len(set(five.values())) == 10
    reps = keys("workloads: {smm_boot: {}, rounds: 3, order: alternate, repetitions: 4}\n")
    assert not set(reps.values()) & set(three.values())
    rnd = keys("workloads: {smm_boot: {}, rounds: 3, order: random, seed: 3}\n")
    first = {n: pair[0] for n, pair in enumerate(round_orders(spec("workloads: {smm_boot: {}, rounds: 3, seed: 3}\n").workloads), 1)}
    # a round that boots baseline first keeps the alternate run's boots; one that boots patched first does not
    assert {n for n in first if rnd[(n, "baseline")] == three[(n, "baseline")]} == {n for n in first if first[n] == "baseline"}
    assert set(first.values()) == {"baseline", "patched"}


def test_unpaired_is_the_ratio_of_pooled_medians_with_each_side_resampled_alone():
    b = [[10.0], [10.4], [9.6], [10.1], [9.9]]
    p = [[12.0], [12.5], [11.0], [11.6], [12.2], [11.9]]        # unequal counts: fine when unpaired
    e = judge(b, p, paired=False)
    assert e.ratio == pytest.approx(float(np.median(p)) / float(np.median(b)))
    rnd = random.Random(4)
    plain = [float(np.median([rnd.choice(p)[0] for _ in p])) / float(np.median([rnd.choice(b)[0] for _ in b]))
             for _ in range(8000)]
    lo, hi = np.quantile(plain, [0.025, 0.975])
    assert e.ci_low == pytest.approx(lo, abs=0.01) and e.ci_high == pytest.approx(hi, abs=0.01)
    assert e.verdict == "slower" and 0 < e.p_value < 0.01
