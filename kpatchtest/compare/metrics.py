"""Every metric's unit and direction: which way is better, or none for counts that only
describe the workload (a different count there means a different workload, not a better
kernel). The compare stage judges a metric only through this table."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kpatchtest.compare.model import Direction


@dataclass(frozen=True)
class MetricInfo:
    unit: str
    direction: Direction
    time: bool = False          # a duration: changes read faster/slower, else less/more
    description: str = ""


METRICS: dict[str, MetricInfo] = {
    "wall_time": MetricInfo("s", "lower", True, "the nested QEMU command, SSH round trip included"),
    "guest_time": MetricInfo("s", "lower", True, "QEMU start to exit on the lab host"),
    "cycles": MetricInfo("cycles", "lower", True, "kvm-unit-tests vmexit: TSC cycles per iteration"),
    "smm_transitions": MetricInfo("events", "none", description="SMM entries plus exits: the workload"),
    "root_lookups": MetricInfo("calls", "none", description="vCPU root loads: one per MMU reload"),
    "root_allocs": MetricInfo("roots", "lower", description="TDP MMU roots created"),
    "roots_freed": MetricInfo("roots", "lower", description="TDP MMU roots torn down"),
    "root_puts": MetricInfo("calls", "none", description="root references dropped"),
    "tdp_pages_allocated": MetricInfo("pages", "lower", description="TDP MMU page-table pages allocated"),
    "tdp_pages_freed": MetricInfo("pages", "lower", description="TDP MMU page-table pages freed"),
    "fast_zaps": MetricInfo("events", "none", description="kvm_mmu_zap_all_fast: memslot changes"),
    # KVM debugfs counters (kvm.<name>): work the MMU did is lower-better; exits and page
    # sizes follow from what the guest does.
    **{f"kvm.{n}": MetricInfo("count", "lower") for n in (
        "remote_tlb_flush", "remote_tlb_flush_requests", "mmu_shadow_zapped", "mmu_cache_miss",
        "mmu_recycled", "tlb_flush", "pf_taken", "pf_fixed", "nx_lpage_splits")},
    **{f"kvm.{n}": MetricInfo("count", "none") for n in (
        "exits", "io_exits", "mmio_exits", "pages_4k", "pages_2m", "pages_1g")},
}

# kvm-unit-tests vmexit names per-test variants "cycles:<test>" and "<kind>_cycles[:<test>]".
_CYCLES = re.compile(r"^(?:\w+_)?cycles(?::.+)?$")
_KVM = re.compile(r"^kvm\.\w+$")


def metric_info(name: str, unit: str | None = None) -> MetricInfo | None:
    """The table's entry for a metric name, None if the name is not one kpatchtest knows.

    An unknown kvm.* counter describes only (direction none): we do not know which way is
    better. `unit` (the record's) wins over the table's for a known-but-variant name."""
    info = METRICS.get(name)
    if info is None and _CYCLES.match(name):
        info = METRICS["cycles"]
    if info is None and _KVM.match(name):
        info = MetricInfo("count", "none")
    if info is not None and unit and unit != info.unit:
        info = MetricInfo(unit, info.direction, info.time, info.description)
    return info


def known_names() -> list[str]:
    return sorted(METRICS)
