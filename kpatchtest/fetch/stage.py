"""Fetch stage: turn the `series:` sources of a spec into one typed ``Series``.

Every source goes through the real b4 CLI (``b4 am``, see b4.py), so a lore thread, a
local mbox and a commit range all yield patches the same way (trailers collected,
Link: added, git-am ready):

- ``MsgidSource``: ``b4 -c b4.midmask=... am -M -l [-v N] MSGID`` against lore (or any
  public-inbox given by ``FetchOptions.midmask``); mails whose diff is not pure ASCII
  are fetched again as sent (``/raw``), since b4 re-encodes them (see mail.py).
- ``MboxSource``: ``b4 --offline-mode am -M -l -m FILE``.
- ``CommitsSource``: ``git format-patch --thread`` of the range, handed to b4 as a
  maildir (``--offline-mode``); each patch records its source commit.

Cache (cache.py): message-id sources are keyed by message-id + requested version,
mboxes by content hash; commit ranges are not cached. Online, a message-id is always
fetched again (new trailers, new versions) and the cache entry replaced;
``offline=True`` serves only from the cache and never runs b4 for a message-id.
"""

from __future__ import annotations

import email
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from kpatchtest.errors import FetchError, GitError
from kpatchtest.fetch import b4, cache, mail
from kpatchtest.fetch.mail import Fetched
from kpatchtest.fetch.sources import CommitsSource, MboxSource, MsgidSource, Source
from kpatchtest.gitutil import Git
from kpatchtest.patchset import Patch, Series
from kpatchtest.util import sha256_text
from kpatchtest.rundir import CacheDir

RAW_TIMEOUT = 60            # seconds to fetch one mail as sent from the archive


@dataclass(frozen=True)
class FetchOptions:
    """How the stage fetches: from where, whether online, under which attestation policy."""

    cache_dir: Path                 # cache root; fetched series go under cache_dir/"series"/<key>
    midmask: str | None = None      # b4 -c b4.midmask=...; e.g. "http://127.0.0.1:PORT/INBOX/%s"
    offline: bool = False           # never touch the network: serve from cache or fail
    attestation: str = "softfail"   # "off" | "softfail" | "hardfail" (refuses unattested series)
    keyring: Path | None = None     # patatt keyring dir for b4 (b4.keyringsrc); None: b4's default

    def b4_runner(self) -> b4.B4:
        """b4 as these options run it, its scratch dirs under cache_dir/b4."""
        return b4.B4(scratch=CacheDir(Path(self.cache_dir)).b4, attestation=self.attestation,
                     midmask=self.midmask, keyring=self.keyring)


def fetch_series(sources: Sequence[Source], opts: FetchOptions, title: str | None = None) -> Series:
    """Fetch every source (in order) and concatenate them into one Series.

    Raises FetchError (one line: what, where, what to do) on any failure; nothing is
    cached for a source that failed.
    """
    if opts.attestation not in b4.ATTESTATION_POLICIES:
        raise FetchError(f"unknown attestation policy {opts.attestation!r}",
                         hint="use one of: " + ", ".join(b4.ATTESTATION_POLICIES))
    if not sources:
        raise FetchError("no series sources given", hint="add a msgid:, mbox: or commits: entry under series:")

    parts: list[Fetched] = []
    for src in sources:
        if isinstance(src, MsgidSource):
            parts.append(_fetch_msgid(src, opts))
        elif isinstance(src, MboxSource):
            parts.append(_fetch_mbox(src, opts))
        elif isinstance(src, CommitsSource):
            parts.append(_fetch_commits(src, opts))
        else:  # pragma: no cover - the Source union is closed
            raise FetchError(f"unsupported series source {src!r}")

    patches: list[Patch] = []
    for part in parts:
        for p in part.patches:
            patches.append(replace(p, index=len(patches) + 1))

    def first(attr):
        return next((getattr(p, attr) for p in parts if getattr(p, attr)), None)

    titled = next((p for p in parts if p.title), None)

    prereqs: list[str] = []
    msgids: list[str] = []
    for part in parts:
        prereqs += [x for x in part.prerequisite_patch_ids if x not in prereqs]
        msgids += [x for x in part.msgids if x not in msgids]
    return Series(
        title=title or first("title") or patches[0].subject,     # cover subject, else 1st patch
        sources=tuple(s.label() for s in sources),
        patches=tuple(patches),
        version=first("version"),
        cover=first("cover"),
        base_commit=first("base_commit"),
        prerequisite_patch_ids=tuple(prereqs),
        link=first("link"),
        msgids=tuple(msgids),
        title_note=None if title or titled is None else titled.title_note,
    )


def _policy_check(opts: FetchOptions, what: str) -> Callable[[Fetched], None]:
    """attestation=hardfail: every mailed patch must carry a passing signature."""
    def check(fetched: Fetched) -> None:
        if opts.attestation != "hardfail":
            return
        bad = [p for p in fetched.patches if p.attestation != "pass"]
        if bad:
            kinds = sorted({p.attestation for p in bad})
            raise FetchError(
                f"{what}: {len(bad)} of {len(fetched.patches)} patches are not attested "
                f"({'/'.join(kinds)}: e.g. {bad[0].subject!r}: {bad[0].attestation_detail})",
                hint="attestation: hardfail needs DKIM or patatt signatures on every patch; use softfail to accept")
    return check


# ---- the three sources

def _fetch_msgid(src: MsgidSource, opts: FetchOptions) -> Fetched:
    msgid = mail.clean_msgid(src.msgid)
    what = f"message-id <{msgid}>" + (f" v{src.version}" if src.version else "")
    if not msgid or " " in msgid:
        raise FetchError(f"invalid message-id {src.msgid!r}",
                         hint="give it as in the Message-Id header, e.g. 20230426220323.3079789-1-seanjc@google.com")
    key = cache.key("msgid", msgid, src.version, opts.attestation, opts.keyring)
    check = _policy_check(opts, what)
    if opts.offline:
        return cache.fetch(opts.cache_dir, key, what, None, use_cache=True, check=check)

    def produce(tmp: Path) -> None:
        args = ["-l"] + (["-v", str(src.version)] if src.version else []) + ["--", msgid]
        log = opts.b4_runner().am(tmp, *args, what=what, offline=False)
        _fetch_sent(tmp, opts, what)
        cache.write_meta(tmp, b4.summary(log, opts.attestation), kind="msgid", msgid=msgid,
                         version=src.version, midmask=opts.midmask)

    return cache.fetch(opts.cache_dir, key, what, produce, use_cache=False, check=check)


def _fetch_sent(entry: Path, opts: FetchOptions, what: str) -> None:
    """Fetch from the archive, as sent, the mails whose diff b4 may have re-encoded."""
    mask = opts.midmask or b4.LORE_MIDMASK
    for f in b4.patch_files(entry):
        msg = mail.read_mail(f)
        mid = mail.msgid(msg)
        if not mid or mail.split_body(mail.body_text(msg))[1].isascii():
            continue
        url = mask.replace("%s", urllib.parse.quote_plus(mid)).rstrip("/") + "/raw"
        try:
            with urllib.request.urlopen(url, timeout=RAW_TIMEOUT) as resp:
                data = resp.read()
        except (OSError, ValueError) as ex:
            raise FetchError(f"{what}: cannot fetch <{mid}> as sent from {url} ({ex}); its diff "
                             f"has bytes beyond ASCII that b4 re-encodes",
                             hint="retry later; kpatchtest needs the mail's own bytes to apply it as git am would") from None
        mail.keep_sent(entry, mid, mail.split_mboxrd(data))


def _fetch_mbox(src: MboxSource, opts: FetchOptions) -> Fetched:
    path = Path(src.mbox).expanduser()
    what = f"mbox {path}"
    if not path.exists():
        raise FetchError(f"{what}: file does not exist", hint="check the mbox path in the spec")
    if not path.is_file():
        raise FetchError(f"{what}: not a regular file", hint="give an mbox file (e.g. from b4 mbox or git format-patch --stdout)")
    try:
        data = path.read_bytes()
    except OSError as ex:
        raise FetchError(f"{what}: cannot read it ({ex.strerror})", hint="check its permissions") from None
    if not data.strip():
        raise FetchError(f"{what}: file is empty", hint="write the series into it (b4 mbox MSGID, or git format-patch --stdout)")
    digest = sha256_text(data)
    key = cache.key("mbox", digest, None, opts.attestation, opts.keyring)
    path = path.resolve()

    def produce(tmp: Path) -> None:
        mbox = mail.with_message_ids(path, data, tmp)
        log = opts.b4_runner().am(tmp, "-l", "-m", str(mbox), what=what, offline=True)
        cache.write_meta(tmp, b4.summary(log, opts.attestation), kind="mbox", mbox=str(path), sha256=digest)

    return cache.fetch(opts.cache_dir, key, what, produce, use_cache=True, check=_policy_check(opts, what))


def _fetch_commits(src: CommitsSource, opts: FetchOptions) -> Fetched:
    rng = src.commits.strip()
    what = f"commits {rng}"
    if not src.repo:
        raise FetchError(f"{what}: no git repo to take them from",
                         hint="set repo: on the commits entry (or kernel.repo in the spec)")
    repo = Path(src.repo).expanduser()
    what = f"commits {rng} in {repo}"
    if not repo.exists():
        raise FetchError(f"{what}: repo does not exist", hint="check the repo path")
    if not rng or rng.startswith("-") or "..." in rng:
        raise FetchError(f"{what}: not a commit range",
                         hint="use A..B (commits in B not in A) or a single commit")
    git = Git(repo)
    try:
        if not git.ok("rev-parse", "--git-dir"):
            raise FetchError(f"{what}: not a git repository", hint="check the repo path")
        if ".." in rng:
            left, right = rng.split("..", 1)
            left, right = left or "HEAD", right or "HEAD"
        else:
            left, right = rng + "^", rng
        shas = {}
        for rev in (left, right):
            sha = git.rev_parse(rev)
            if not sha:
                raise FetchError(f"{what}: unknown revision {rev!r}", hint="fetch it into the repo or fix the range")
            shas[rev] = sha
        revs = git.out("rev-list", "--reverse", "--no-merges", f"{shas[left]}..{shas[right]}").split()
        if not revs:
            raise FetchError(f"{what}: the range has no commits", hint="check the order: A..B lists commits in B not in A")
        base = git.out("merge-base", shas[left], shas[right]) if git.ok("merge-base", shas[left], shas[right]) else ""
    except GitError as ex:
        raise FetchError(f"{what}: {ex.message}", hint="check the repo and the range") from None

    def produce(tmp: Path) -> dict[str, str]:
        fp = tmp / "format-patch"
        args = ["-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false",
                "format-patch", "--thread", "--no-cover-letter", "--no-signature",
                "--numbered" if len(revs) > 1 else "--no-numbered", "-o", str(fp)]
        p = git.run(*args, *( [f"--base={base}"] if base else []), f"{shas[left]}..{shas[right]}", check=False)
        if p.returncode != 0 and base:     # --base refuses some histories: do without it
            shutil.rmtree(fp, ignore_errors=True)
            p = git.run(*args, f"{shas[left]}..{shas[right]}", check=False)
        if p.returncode != 0:
            err = (p.stderr or "").strip().splitlines()
            raise FetchError(f"{what}: git format-patch failed: {err[-1] if err else p.returncode}",
                             hint="check the repo and the range")
        # a maildir for b4: no "From " ambiguity in commit messages
        md = tmp / "input.maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        upstream: dict[str, str] = {}
        sent: dict[str, bytes] = {}
        for n, f in enumerate(sorted(fp.glob("*.patch"))):
            raw = f.read_bytes()
            first, _, rest = raw.partition(b"\n")
            m = re.match(rb"^From ([0-9a-f]{40,64}) ", first)
            if m:
                raw = rest
                mid = mail.msgid(email.message_from_bytes(raw, policy=mail.POLICY))  # type: ignore[arg-type]
                if mid:
                    upstream[mid] = m.group(1).decode()
                    sent[mid] = raw
            (md / "new" / f"{n:04d}.eml").write_bytes(raw)
        out = tmp / "out"
        log = opts.b4_runner().am(out, "-m", str(md), what=what, offline=True)
        for mid, raw in sent.items():
            mail.keep_sent(out, mid, [raw])
        cache.write_meta(out, b4.summary(log, opts.attestation), kind="commits", commits=rng, repo=str(repo))
        return upstream

    with tempfile.TemporaryDirectory(prefix="kpatchtest-commits-") as t:
        upstream = produce(Path(t))
        fetched = cache.load(Path(t) / "out", what, with_msgids=False, upstream=upstream)
    missing = [p.subject for p in fetched.patches if not p.upstream_commit]
    if missing:
        raise FetchError(f"{what}: could not map patch {missing[0]!r} back to its commit",
                         hint="this is a bug in kpatchtest; please report it")
    # Local commits are not mails: nothing to attest, and hardfail does not apply.
    fetched.patches = [replace(p, attestation="none",
                               attestation_detail="local commit (not mailed; attestation does not apply)")
                       for p in fetched.patches]
    return fetched
