"""The typed patch series that the fetch stage hands to every later stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from kpatchtest import rawtext


@dataclass(frozen=True)
class Patch:
    """One patch of a series, as git-am would see it."""

    index: int                  # 1-based position in the series
    subject: str                # without the "[PATCH v3 1/3]" prefix
    author: str                 # "Name <email>"
    date: str                   # RFC 2822 date of the mail/commit
    message: str                # commit message body including trailers
    diff: str                   # everything from the first "diff --git" on
    msgid: str | None = None
    upstream_commit: str | None = None   # known for `commits:` sources
    attestation: str = "none"   # pass | fail | none (no signature found)
    attestation_detail: str = ""

    def files(self) -> list[str]:
        """Paths this patch touches (pre- and post-image names)."""
        from kpatchtest.diffparse import parse_diff
        out: list[str] = []
        for f in parse_diff(self.diff):
            for p in (f.old_path, f.new_path):
                if p and p not in out:
                    out.append(p)
        return out

    def as_mbox(self) -> str:
        """A git-am/format-patch style mail of this patch; its diff may hold raw bytes
        (see rawtext), so write it with `rawtext.encode` (`Series.as_mbox` does).

        8bit UTF-8, as format-patch writes it: git am converts the message from the
        declared charset and applies the diff's bytes as they are.
        """
        return (
            f"From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
            f"From: {self.author}\nDate: {self.date}\nSubject: [PATCH] {self.subject}\n"
            f"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
            f"Content-Transfer-Encoding: 8bit\n\n"
            f"{self.message.rstrip()}\n---\n{self.diff}"
        )


@dataclass(frozen=True)
class Series:
    """A whole series: what b4 fetched (or a local mbox / commit range produced)."""

    title: str
    sources: tuple[str, ...]            # e.g. ("msgid:<id>", "mbox:/path")
    patches: tuple[Patch, ...]
    version: int | None = None
    cover: str | None = None            # cover letter text, if any
    base_commit: str | None = None      # from "base-commit:" in the cover/patches
    prerequisite_patch_ids: tuple[str, ...] = ()
    link: str | None = None             # lore link of the thread
    msgids: tuple[str, ...] = field(default=())
    title_note: str | None = None       # why the title is not the cover's subject, for the run to show

    def as_mbox(self) -> bytes:
        """The series as one mbox for git am, with the diffs' bytes as they are applied."""
        return rawtext.encode("".join(p.as_mbox() + "\n" for p in self.patches))
