#!/usr/bin/env python3
"""The local lab's noise for the SMM-heavy boot, and what the compare stage can detect.

    .venv/bin/python benchmarks/compare_power.py [--rounds 10] [--repetitions 5] [--spread-mb 0]
                                                 [--artifact DIR] [--from-json aa.json]

An A/A run: each round boots the same (baseline) kernel twice, as "baseline" and as
"patched" in the order the workloads stage would (--order, default random), each boot
running the SMM boot `repetitions` times, exactly as the workloads stage does (kexec from
the known-good kernel, the power cycle back). Then:

- A/A: the compare stage's own comparison (compare.stage.compare_branch, the default
  compare: settings) over every metric must say "no significant change" (or n/a for the
  counts that only describe the workload);
- power: for N = 3, 5, 10 rounds, draws of N paired rounds (with replacement) from the
  A/A data with the "patched" side scaled by 1+d; the smallest d whose CI (compare.stats)
  lies above 1, and above 1 + threshold (the verdict "slower"), in 95% of draws.

The measured rounds are written to --save (JSON), and --from-json re-runs the statistics
on them without the lab. Cost: 2 boots per round, ~20-40 s each with 5 repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.boot_local_lab import latest_artifact  # noqa: E402
from kpatchtest.compare import stats  # noqa: E402
from kpatchtest.compare.stage import compare_branch, round_orders  # noqa: E402
from kpatchtest.kernelrepo import default_cache_dir  # noqa: E402
from kpatchtest.lab.local.lab import local_lab  # noqa: E402
from kpatchtest.lab.ssh.boot import Booter, KernelToBoot  # noqa: E402
from kpatchtest.lab.ssh.connection import HostConnection  # noqa: E402
from kpatchtest.results import BranchResult, WorkloadRun  # noqa: E402
from kpatchtest.spec import CompareSpec, SmmBootSpec, WorkloadsSpec  # noqa: E402
from kpatchtest.workloads.smm_boot import image_for, run_smm_boot  # noqa: E402

BUILDS = ("baseline", "patched")


def measure(bz: Path, release: str, cache_dir: Path, rounds: int, repetitions: int,
            spec: SmmBootSpec, boot: str = "kexec", save: Path | None = None, order: str = "random") -> list[WorkloadRun]:
    """`rounds` x 2 boots of one kernel on a local lab of its own (see measure_on)."""
    work = Path(tempfile.mkdtemp(prefix="kpt-aa-"))
    with local_lab(bz, cache_dir, work / "lab", nested=True) as host:
        return measure_on(host, bz, release, rounds, repetitions, spec, work, boot, save, order)


def measure_on(host, bz: Path, release: str, rounds: int, repetitions: int, spec: SmmBootSpec,
               work: Path, boot: str = "kexec", save: Path | None = None, order: str = "random") -> list[WorkloadRun]:
    """`rounds` x 2 boots of one kernel on `host` (a lab host on its known-good kernel),
    the SMM boot on each, "baseline" and "patched" in each round in the order the workloads
    stage would boot them (compare.stage.round_orders, `order` as workloads.order).

    boot "kexec": as the workloads stage does (deploy, kexec, power cycle back); "reset":
    the kernel is the lab's known-good one and each boot is one power cycle into it (half
    the boot time, the same boot-to-boot variation of that kernel). The host is back on
    its known-good kernel at the end."""
    image = image_for(spec, work / "images")
    runs: list[WorkloadRun] = []
    t_all = time.monotonic()
    booter = Booter(host, work)
    orders = round_orders(WorkloadsSpec(rounds=rounds, order=order, smm_boot=spec))
    for r, pair in enumerate(orders, 1):
        for build in pair:
            t = time.monotonic()
            rel = f"{build}-r{r}"
            if boot == "kexec":
                res = booter.boot(KernelToBoot(build=build, bzimage=bz, kernelrelease=release), f"boot/{rel}")
                if res.status != "booted":
                    raise SystemExit(f"round {r} {build}: boot failed: {res.reason}")
            conn = HostConnection(host)
            conn.open()
            try:
                rec, used = run_smm_boot(conn, spec, image, repetitions, work / "workloads" / rel, work)
            finally:
                conn.close()
            if not booter.return_to_known_good():     # after kexec: back; reset: the next boot
                raise SystemExit(f"round {r} {build}: the power cycle did not bring the host back")
            runs.append(WorkloadRun(build=build, host=host.name, round=r, kernelrelease=release,
                                    repetitions=repetitions, records=[rec], probes=used))
            if save:        # after every boot: an interrupted run still gives --from-json its rounds
                save.write_text(json.dumps([w.model_dump(mode="json") for w in runs], indent=1) + "\n")
            wall = next(m.values for m in rec.metrics if m.name == "wall_time")
            print(f"round {r:2} {build:8}: {rec.status}, wall_time {', '.join(f'{v:.2f}' for v in wall if v)} s; "
                  f"cycle {time.monotonic() - t:.1f} s", flush=True)
    print(f"{rounds} rounds x 2 boots x {repetitions} repetitions in {time.monotonic() - t_all:.0f} s")
    return runs


def wall_times(runs: list[WorkloadRun]) -> dict[str, list[list[float]]]:
    """build -> per round the wall_time repetitions, rounds in order."""
    out: dict[str, dict[int, list[float]]] = {b: {} for b in BUILDS}
    for w in runs:
        m = next(m for rec in w.records for m in rec.metrics if m.name == "wall_time")
        out[w.build][w.round] = [v for v in m.values if v is not None]
    paired = sorted(set(out["baseline"]) & set(out["patched"]))
    return {b: [out[b][r] for r in paired] for b in BUILDS}


def noise(walls: dict[str, list[list[float]]]) -> None:
    for b in BUILDS:
        meds = [statistics.median(r) for r in walls[b]]
        within = statistics.median(statistics.pstdev(r) / statistics.mean(r) for r in walls[b] if len(r) > 1)
        print(f"{b:8} wall_time: median {statistics.median([v for r in walls[b] for v in r]):.2f} s; "
              f"round medians CV {statistics.pstdev(meds) / statistics.mean(meds):.1%}; "
              f"within-round CV (median) {within:.1%}")


def aa_check(runs: list[WorkloadRun], cfg: CompareSpec) -> bool:
    """The compare stage over the A/A runs: True when nothing is judged changed."""
    from kpatchtest.spec import Spec
    spec = Spec.model_construct(compare=cfg, workloads=None)
    comp = compare_branch(BranchResult(name="aa", workloads=runs), spec)
    ok = True
    rounds = {w.round for w in runs if w.build == "baseline"} & {w.round for w in runs if w.build == "patched"}
    print(f"A/A, {len(rounds)} paired rounds, every metric (compare stage, seed {cfg.seed}, "
          f"{cfg.bootstrap} resamples, threshold {cfg.threshold:.0%}):")
    for m in comp.metrics:
        judged = m.verdict not in ("no significant change", "n/a", "not enough data")
        ok &= not judged
        ci = f"[{m.ci_low:.3f}, {m.ci_high:.3f}]" if m.ci_low is not None and m.ci_high is not None else "[-]"
        ratio = f"{m.ratio:.3f}" if m.ratio is not None else "-"
        p = f"{m.p_value:.2f}" if m.p_value is not None else "-"
        print(f"  {m.name:28} {ratio:>6} {ci:17} p {p:5} {m.verdict}{'  <-- FALSE POSITIVE' if judged else ''}")
    print(f"A/A: {'no significant change for every metric' if ok else 'FALSE POSITIVES (see above)'}")
    return ok


def ci_lows(walls: dict[str, list[list[float]]], draws: np.ndarray, cfg: CompareSpec, resamples: int) -> np.ndarray:
    """Per draw (a row of round indices): the lower CI bound of patched/baseline, unscaled."""
    out = np.empty(len(draws))
    for i, idx in enumerate(draws):
        est = stats.compare([walls["baseline"][k] for k in idx], [walls["patched"][k] for k in idx],
                            direction="lower", time=True, threshold=cfg.threshold, resamples=resamples,
                            seed=cfg.seed + i)
        out[i] = est.ci_low if est.ci_low is not None else np.nan
    return out


def smallest_detectable(lows: np.ndarray, above: float, power: float = 0.95) -> float:
    """The smallest d for which (1+d) x lower bound > `above` in a `power` share of draws.

    Scaling the patched side by 1+d scales every bootstrap replicate of the ratio of
    medians by 1+d (same seed, same resamples), so the CI of the scaled data is the
    unscaled CI times 1+d: a draw detects d exactly when d > above/low - 1."""
    need = above / lows - 1
    return float(np.quantile(np.nan_to_num(need, nan=np.inf), power, method="higher"))


def check_scaling(walls: dict[str, list[list[float]]], idx: np.ndarray, d: float, cfg: CompareSpec,
                  resamples: int, low: float) -> None:
    """The shortcut above, checked on one draw against the data really scaled."""
    est = stats.compare([walls["baseline"][k] for k in idx], [[v * (1 + d) for v in walls["patched"][k]] for k in idx],
                        direction="lower", time=True, threshold=cfg.threshold, resamples=resamples, seed=cfg.seed)
    assert est.ci_low is not None and abs(est.ci_low - low * (1 + d)) < 1e-9 * max(1.0, est.ci_low), (est.ci_low, low)


def bootstrap_speed(walls: dict[str, list[list[float]]], resamples: int = 10_000) -> None:
    """The compare stage's vectorised bootstrap against the textbook loop, on these rounds."""
    import random
    b, p = walls["baseline"], walls["patched"]
    t = time.perf_counter()
    stats.bootstrap_ratios(b, p, resamples, seed=1)
    fast = time.perf_counter() - t
    rnd = random.Random(1)
    t = time.perf_counter()
    for _ in range(resamples):
        idx = [rnd.randrange(len(b)) for _ in b]
        statistics.median(statistics.median(rnd.choice(p[i]) for _ in p[i]) /
                          statistics.median(rnd.choice(b[i]) for _ in b[i]) for i in idx)
    slow = time.perf_counter() - t
    print(f"bootstrap, {resamples} resamples of {len(b)} rounds: {fast * 1000:.0f} ms vectorised, "
          f"{slow * 1000:.0f} ms as a plain loop ({slow / fast:.0f}x)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, help="a build cache directory with bzImage and meta.json "
                                                   "(default: the newest)")
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--spread-mb", type=int, default=0)
    ap.add_argument("--boot", choices=("kexec", "reset"), default="kexec",
                    help="kexec each boot as the workloads stage does, or power cycle into the known-good kernel")
    ap.add_argument("--order", choices=("random", "alternate"), default="random",
                    help="each round's B/P order, as workloads.order")
    ap.add_argument("--draws", type=int, default=400, help="simulated experiments per N and d")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per simulated experiment")
    ap.add_argument("--save", type=Path, default=Path("/tmp/kpt-aa.json"))
    ap.add_argument("--from-json", type=Path, help="statistics only, on rounds saved by an earlier --save")
    args = ap.parse_args()
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)   # its SSH polls of a VM still booting
    cfg = CompareSpec()
    if args.from_json:
        runs = [WorkloadRun.model_validate(w) for w in json.loads(args.from_json.read_text())]
    else:
        art = args.artifact or latest_artifact(args.cache_dir)
        release = json.loads((art / "meta.json").read_text())["kernelrelease"]
        print(f"kernel {release} ({art})")
        spec = SmmBootSpec(reads=args.reads, spread_mb=args.spread_mb, timeout_s=180)
        runs = measure(art / "bzImage", release, args.cache_dir, args.rounds, args.repetitions, spec, args.boot, args.save,
                       args.order)
        print(f"rounds saved to {args.save}")
    walls = wall_times(runs)
    noise(walls)
    bootstrap_speed(walls)
    ok = aa_check(runs, cfg)
    rng = np.random.default_rng(cfg.seed)
    print(f"smallest slowdown of SMM-boot wall_time detected in 95% of {args.draws} simulated experiments "
          f"(N paired rounds drawn from the {len(walls['baseline'])} A/A rounds, "
          f"{max(map(len, walls['baseline']))} repetitions each, the patched side scaled by 1+d; "
          f"{args.resamples} bootstrap resamples each):")
    for n in (3, 5, 10):
        t = time.monotonic()
        draws = rng.integers(0, len(walls["baseline"]), size=(args.draws, n))
        lows = ci_lows(walls, draws, cfg, args.resamples)
        check_scaling(walls, draws[0], 0.1, cfg, args.resamples, lows[0])
        ci, verdict = smallest_detectable(lows, 1.0), smallest_detectable(lows, 1 + cfg.threshold)
        print(f"  N = {n:2}: CI excludes 1 from +{ci:.1%}; verdict 'slower' (CI above {1 + cfg.threshold:g}) "
              f"from +{verdict:.1%}  ({time.monotonic() - t:.0f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
