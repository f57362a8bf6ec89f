"""The Stage contract: what the pipeline needs from every stage package.

A stage names the spec section it needs, is prepared once per run, then splits
its work into units (a branch, a BootJob). Each unit has a key, the hash of
everything its record depends on; the pipeline reuses a stored record whose key
matches (that is how a killed run resumes) and saves results.json after every
unit. `run` must not touch the RunResult: `record` puts a unit's record in place,
in the pipeline's thread, so parallel units never race on the shared result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Sequence, TypeVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from kpatchtest.fetch.stage import Series
    from kpatchtest.kernelrepo import ResolvedKernel
    from kpatchtest.pipeline import RunOptions
    from kpatchtest.progress import Progress
    from kpatchtest.results import RunResult
    from kpatchtest.rundir import CacheDir, RunDir
    from kpatchtest.spec import LoadedSpec

U = TypeVar("U")
R = TypeVar("R", bound=BaseModel)


@dataclass
class RunContext:
    """What stages share: the spec, the options, the run and cache directories, the result,
    and what earlier stages produced for later ones (the series, the resolved kernel)."""

    loaded: "LoadedSpec"
    opts: "RunOptions"
    rundir: "RunDir"
    cache: "CacheDir"
    result: "RunResult"
    progress: "Progress"
    series: "Series | None" = None
    kernel: "ResolvedKernel | None" = None
    shared: dict[str, Any] = field(default_factory=dict)   # a stage's prepared state, by stage name

    @property
    def spec(self):
        return self.loaded.spec


class Stage(Generic[U, R]):
    """One pipeline stage. Subclasses set `name`, `record_type` and implement the methods."""

    name: ClassVar[str]
    record_type: ClassVar[type[BaseModel]]
    parallel: ClassVar[bool] = False     # units may run concurrently (bounded by --jobs)

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def prepare(self) -> None:
        """Once per run, before any unit (resolve branches, build kvm-unit-tests, start a lab)."""

    def units(self) -> Sequence[U]:
        raise NotImplementedError

    def label(self, unit: U) -> str:
        raise NotImplementedError

    def key(self, unit: U) -> str | None:
        """The hash of the unit's inputs, or None: never reuse (the unit itself caches)."""
        return None

    def reusable(self, unit: U, record: R) -> bool:
        """A stored record is reused only if what it points at still exists."""
        return True

    def run(self, unit: U) -> R:
        raise NotImplementedError

    def record(self, unit: U, record: R) -> None:
        """Put the unit's record into ctx.result (called in the pipeline's thread)."""
        raise NotImplementedError

    def describe(self, unit: U, record: R) -> str:
        """The progress line for a finished unit."""
        return ""

    def finish(self) -> None:
        """Once per run, after the last unit (stop a lab); also on failure."""
