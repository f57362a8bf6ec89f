"""The one record shape every workload returns (kvm-unit-tests, SMM-heavy boot, selftests).

A workload is run on a lab host against the booted kernel under test and gives one or
more WorkloadRecords. Metrics carry one value per repetition; a value that could not be
measured is None (and `available` False when the whole metric is missing), never 0.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kpatchtest.util import StrictModel

WorkloadStatus = Literal["pass", "fail", "skip", "error", "timeout"]


class Metric(StrictModel):
    name: str                       # e.g. "cycles", "smm_transitions", "wall_time"
    unit: str                       # e.g. "cycles", "events", "s"
    values: list[float | None] = Field(default_factory=list)   # one per repetition; None = unavailable
    available: bool = True          # False: the probe / counter does not exist on this kernel
    note: str = ""                  # e.g. "probe kvm_tdp_mmu_get_vcpu_root_hpa not found"


class WorkloadRecord(StrictModel):
    name: str
    status: WorkloadStatus
    metrics: list[Metric] = Field(default_factory=list)
    logs: list[str] = Field(default_factory=list)   # paths relative to the run directory
    detail: str = ""
    duration_s: float = 0.0
    group: str | None = None        # e.g. "kvm-unit-tests"


_SEVERITY = {"pass": 0, "skip": 1, "fail": 2, "timeout": 3, "error": 4}


def worst_status(statuses: list[WorkloadStatus] | list[str]) -> WorkloadStatus:
    """The status of a set of runs: any error > timeout > fail > skip > pass; nothing ran -> skip."""
    return max(statuses, key=lambda s: _SEVERITY[s], default="skip")  # type: ignore[return-value]
