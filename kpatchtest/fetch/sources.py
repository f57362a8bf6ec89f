"""Where a series comes from: the `series:` entries of a spec (and of `kpatchtest apply`)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from kpatchtest.util import StrictModel


class _Source(StrictModel):
    model_config = ConfigDict(frozen=True)      # a loaded spec's sources do not change under a run


class MsgidSource(_Source):
    """A lore thread by message-id; b4 picks the newest version unless `version` is set."""

    msgid: str = Field(min_length=3)
    version: int | None = Field(default=None, ge=1)

    def label(self) -> str:
        return f"msgid:{self.msgid}" + (f" v{self.version}" if self.version else "")


class MboxSource(_Source):
    """A local mbox file (absolute, or made absolute by the spec loader)."""

    mbox: str

    def label(self) -> str:
        return f"mbox:{self.mbox}"


class CommitsSource(_Source):
    """A commit range (e.g. ``v6.3..kvm-fix``) in a git repo, turned into patches."""

    commits: str
    repo: str | None = None     # default: the spec's kernel.repo

    def label(self) -> str:
        return f"commits:{self.commits}"


Source = MsgidSource | MboxSource | CommitsSource
