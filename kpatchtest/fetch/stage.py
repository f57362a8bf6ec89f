"""Fetch stage: turn the `series:` sources of a spec into one typed ``Series``.

Every source goes through the real b4 CLI (``b4 am``), so a lore thread, a local mbox
and a commit range all yield patches the same way (trailers collected, Link: added,
git-am ready):

- ``MsgidSource``: ``b4 -c b4.midmask=... am -M -l [-v N] MSGID`` against lore (or any
  public-inbox given by ``FetchOptions.midmask``).
- ``MboxSource``: ``b4 --offline-mode am -M -l -m FILE``.
- ``CommitsSource``: ``git format-patch --thread`` of the range, handed to b4 as a
  maildir (``--offline-mode``); each patch records its source commit.

b4 writes a maildir (``-M``: no mbox "From " ambiguity) plus a ``.cover`` file into a
scratch directory; we parse them with the ``email`` package. What b4 prints about
attestation (``-c b4.attestation-checkmarks=plain``: "v"/"x" marks, "Signed:",
"BADSIG:", "No key:" lines) becomes ``Patch.attestation``.

Cache: ``cache_dir/series/<key>/`` holds b4's maildir, the cover and ``meta.json``.
Message-id sources are keyed by message-id + requested version, mboxes by content
hash. Online, a message-id is always fetched again (new trailers, new versions) and the
cache entry replaced; ``offline=True`` serves only from the cache and never runs b4
for a message-id. Entries are written to a temp dir and renamed into place; failures
are never cached.
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Sequence

from kpatchtest import rawtext
from kpatchtest.errors import FetchError, GitError
from kpatchtest.fetch.sources import CommitsSource, MboxSource, MsgidSource, Source
from kpatchtest.gitutil import Git
from kpatchtest.patchset import Patch, Series

ATTESTATION_POLICIES = ("off", "softfail", "hardfail")
CACHE_FORMAT = 2             # 2: entries keep the mails as sent (sent/) for byte-faithful diffs
B4_TIMEOUT = 300            # seconds for one b4 run (liblore has its own HTTP timeouts)
RAW_TIMEOUT = 60            # seconds to fetch one mail as sent from the archive
LORE_MIDMASK = "https://lore.kernel.org/all/%s"   # b4's default
_NAME = "series"            # b4 am -n: output is series.maildir + series.cover


@dataclass(frozen=True)
class FetchOptions:
    cache_dir: Path                 # cache root; fetched series go under cache_dir/"series"/<key>
    midmask: str | None = None      # b4 -c b4.midmask=...; e.g. "http://127.0.0.1:PORT/INBOX/%s"
    offline: bool = False           # never touch the network: serve from cache or fail
    attestation: str = "softfail"   # "off" | "softfail" | "hardfail" (refuses unattested series)
    keyring: Path | None = None     # patatt keyring dir for b4 (b4.keyringsrc); None: b4's default


# ---------------------------------------------------------------------------- public API

def fetch_series(sources: Sequence[Source], opts: FetchOptions, title: str | None = None) -> Series:
    """Fetch every source (in order) and concatenate them into one Series.

    Raises FetchError (one line: what, where, what to do) on any failure; nothing is
    cached for a source that failed.
    """
    if opts.attestation not in ATTESTATION_POLICIES:
        raise FetchError(f"unknown attestation policy {opts.attestation!r}",
                         hint="use one of: " + ", ".join(ATTESTATION_POLICIES))
    if not sources:
        raise FetchError("no series sources given", hint="add a msgid:, mbox: or commits: entry under series:")

    parts: list[_Fetched] = []
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
            patches.append(_replace(p, index=len(patches) + 1))

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


def find_b4() -> str:
    """The b4 next to the running interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "b4"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("b4")
    if found:
        return found
    raise FetchError("b4 is not installed (looked next to %s and on PATH)" % sys.executable,
                     hint="pip install 'b4>=0.16' into this environment")


# ---------------------------------------------------------------------------- internals

@dataclass
class _Fetched:
    """One source's result, before concatenation."""

    patches: list[Patch]
    title: str | None = None
    title_note: str | None = None
    version: int | None = None
    cover: str | None = None
    base_commit: str | None = None
    prerequisite_patch_ids: list[str] = field(default_factory=list)
    link: str | None = None
    msgids: list[str] = field(default_factory=list)


def _replace(p: Patch, **kw) -> Patch:
    from dataclasses import replace
    return replace(p, **kw)


def _clean_msgid(raw: str) -> str:
    s = raw.strip()
    if s.lower().startswith("id:"):
        s = s[3:]
    if re.match(r"(?i)^https?://", s):
        # a lore URL: https://lore.kernel.org/all/<msgid>/ (optionally /T/, /raw, ...)
        try:
            path = urllib.parse.urlparse(s).path
        except ValueError:      # "https://[x@y": an unclosed IPv6 bracket; take it apart by hand
            path = s
        for seg in path.split("/"):
            seg = urllib.parse.unquote(seg)
            if "@" in seg:
                s = seg
                break
    return s.strip().strip("<>").strip()


def _series_root(opts: FetchOptions) -> Path:
    return Path(opts.cache_dir) / "series"


def _key(kind: str, ident: str, version: int | None, opts: FetchOptions) -> str:
    """Cache directory name: readable prefix + hash of everything that shapes the result."""
    att = "off" if opts.attestation == "off" else "on"
    keyring = str(opts.keyring) if opts.keyring and att == "on" else ""
    h = hashlib.sha256(f"{CACHE_FORMAT}\0{kind}\0{ident}\0{version}\0{att}\0{keyring}".encode())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ident)[:60] if kind == "msgid" else ident[:16]
    return f"{kind}-{slug}-v{version or 'latest'}-{h.hexdigest()[:16]}"


# ---- b4

def _b4_base_cmd(opts: FetchOptions, offline: bool) -> list[str]:
    cmd = [find_b4(), "-n", "--no-stdin"]
    if offline:
        cmd.append("--offline-mode")
    cmd += ["-c", "b4.attestation-checkmarks=plain",
            "-c", f"b4.attestation-policy={opts.attestation}"]
    if opts.midmask:
        cmd += ["-c", f"b4.midmask={opts.midmask}"]
    if opts.keyring:
        cmd += ["-c", f"b4.keyringsrc={opts.keyring}"]
    return cmd


def _b4_env(scratch: Path) -> dict[str, str]:
    """b4's environment: everything it writes lands in scratch, nothing under $HOME.

    b4 and liblore cache threads in XDG_CACHE_HOME; b4 records every `am` (a .am file
    for `b4 ty`) in XDG_DATA_HOME/b4, where it also reads the keyring `b4 kr` keeps: that
    keyring is linked in, read-only use. The user's global git config still applies (its
    b4.midmask, b4.keyringsrc, gpg.program are theirs to set), read through an include
    from a private GIT_CONFIG_GLOBAL, so a `git config --global` would write the private
    file. gpg verifies with the user's keys if they have a GnuPG home; without one it
    gets a private one instead of creating ~/.gnupg.
    """
    env = dict(os.environ)
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)
    env["XDG_CACHE_HOME"] = str(scratch / "cache")
    env["XDG_DATA_HOME"] = str(scratch / "data")
    env["XDG_CONFIG_HOME"] = str(scratch / "config")
    env["XDG_STATE_HOME"] = str(scratch / "state")
    keyring = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "b4" / "keyring"
    if keyring.is_dir():
        (scratch / "data" / "b4").mkdir(parents=True)
        (scratch / "data" / "b4" / "keyring").symlink_to(keyring)
    xdg_config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    globals_ = ([os.environ["GIT_CONFIG_GLOBAL"]] if os.environ.get("GIT_CONFIG_GLOBAL")
                else [str(xdg_config / "git" / "config"), str(Path.home() / ".gitconfig")])  # git's order
    gitconfig = scratch / "gitconfig"
    gitconfig.write_text("[include]\n" + "".join(f"\tpath = {_git_quote(g)}\n" for g in globals_))
    env["GIT_CONFIG_GLOBAL"] = str(gitconfig)
    gnupg = Path(os.environ.get("GNUPGHOME") or Path.home() / ".gnupg")
    if not gnupg.is_dir():
        (scratch / "gnupg").mkdir(mode=0o700)
        env["GNUPGHOME"] = str(scratch / "gnupg")
    env.setdefault("LC_ALL", "C.UTF-8")
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _git_quote(value: str) -> str:
    """A git config value that reads back as exactly this string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _run_b4(cmd: list[str], outdir: Path, what: str, opts: FetchOptions) -> str:
    """Run b4 in a non-git cwd, its files in a scratch dir under the cache (removed
    afterwards); return its log (stdout+stderr)."""
    parent = Path(opts.cache_dir) / "b4"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=parent) as scratch:
        env = _b4_env(Path(scratch))
        try:
            p = subprocess.run(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=B4_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise FetchError(f"b4 took longer than {B4_TIMEOUT}s fetching {what}",
                             hint="check the lore mirror (midmask) or retry later") from None
        except OSError as ex:
            raise FetchError(f"cannot run b4 ({cmd[0]}): {ex.strerror}",
                             hint="pip install 'b4>=0.16' into this environment") from None
    log = (p.stdout + p.stderr).decode("utf-8", "replace")
    _check_b4_result(p.returncode, log, outdir, what)
    return log


_ATT_RE = r"(Signed|BADSIG|No key): (.*)"


def _b4_error(log: str) -> str | None:
    """b4's most telling complaint in its log, or None. When b4 crashed (it does on
    some malformed mails), the exception its traceback ends with, never a line of it."""
    specific = ("Could not retrieve thread", "No messages found", "No patches found",
                "Unable to find revision", "does not exist", "Exiting due to attestation",
                "suspicious unicode", "Could not find")
    head, _, tb = log.partition("Traceback (most recent call last)")
    lines = [ln.strip() for ln in head.splitlines() if ln.strip()]
    for w in specific:
        for ln in lines:
            if w in ln:
                return ln
    if tb.strip():
        return f"b4 crashed on it ({tb.strip().splitlines()[-1].strip()})"
    for w in ("ERROR", "CRITICAL", "Error", "error"):
        for ln in lines:
            if w in ln:
                return ln
    return None


def _check_b4_result(rc: int, log: str, outdir: Path, what: str) -> None:
    """Turn what b4 said and wrote into one FetchError line, or return if it is usable.

    b4 exits 0 on "No patches found" and on a missing revision: never trust the exit
    code alone, look at what it wrote.
    """
    maildir = outdir / f"{_NAME}.maildir"
    wrote = (maildir / "new").is_dir() and any((maildir / "new").iterdir())
    complaint = _b4_error(log) or ""

    if "Exiting due to attestation-policy: hardfail" in log:
        bad = [m.group(1) for m in re.finditer(r"\bx ((?:BADSIG|No key): \S+)", log)]
        raise FetchError(f"{what}: attestation failed ({'; '.join(bad) or 'bad signature'})",
                         hint="attestation: hardfail refuses it; use softfail to fetch anyway")
    m = re.search(r"Could not retrieve thread: (.*)", log)
    if m:
        detail = m.group(1)
        code = re.search(r"Server returned an error: (\d+)", detail)
        if code and code.group(1) in ("404", "410"):
            raise FetchError(f"{what}: message-id not found on the lore mirror (HTTP {code.group(1)})",
                             hint="check the message-id and the midmask")
        if code:
            raise FetchError(f"{what}: the lore mirror answered HTTP {code.group(1)}",
                             hint="retry later, or use a cached copy with --offline")
        reason = "connection refused" if "refused" in detail.lower() else (
            "timed out" if "timed out" in detail.lower() or "timeout" in detail.lower() else
            "unreachable")
        host = re.search(r"https?://[^/\s:]+(:\d+)?", detail)
        raise FetchError(f"{what}: cannot reach the lore mirror {host.group(0) if host else ''}"
                         f" ({reason})".replace("  ", " "),
                         hint="check the network or midmask; with a cached copy, run with --offline")
    if "No messages found for that query" in log:
        raise FetchError(f"{what}: the lore mirror has no messages for this message-id",
                         hint="check the message-id and the midmask")
    m = re.search(r"Unable to find revision (\d+)", log)
    if m:
        raise FetchError(f"{what}: version {m.group(1)} is not in the thread",
                         hint="drop 'version:' to get the newest, or pick one of the versions posted")
    if "No patches found" in log or "Could not find any patches" in log:
        raise FetchError(f"{what}: no patches in it", hint="point it at a patch series (mails with diffs)")
    if re.search(r"Mailbox .* does not exist", log):
        raise FetchError(f"{what}: file does not exist", hint="check the mbox path")
    if "Cannot retrieve threads from remote in offline mode" in log:
        raise FetchError(f"{what}: b4 refused to go online in offline mode", hint="run without --offline")
    if rc != 0 or not wrote:
        # b4 says nothing useful for empty / unparseable mailboxes (exit 1, no message)
        why = complaint if complaint and "OFFLINE" not in complaint else "no patch series found in it"
        if rc not in (0, 1):
            why = f"b4 exited {rc}: {why}"
        raise FetchError(f"{what}: {why}", hint="check that it is a patch series (git format-patch / lore mbox)")
    if "WARNING: Thread incomplete!" in log:
        missing = re.findall(r"missing \[(\d+/\d+)\]", log)
        raise FetchError(f"{what}: series incomplete (missing {', '.join(missing) or 'patches'})",
                         hint="fetch the complete thread, or pick another version")


def _parse_attestation(log: str, policy: str) -> list[tuple[str, str, str]]:
    """(am subject, attestation, detail) per patch, from b4's "plain" checkmark log.

    b4 prints, between "---" lines, one line per patch ("  [v|x ][PATCH ...] subj"),
    followed by that patch's attestation lines ("    v Signed: ed25519/who") when they
    differ between patches; when all patches share them, they come once at the end
    after "  ---". No mark and no lines: the patch carries no signature.
    """
    lines = log.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Checking attestation")
                     or ln.startswith("Analyzing"))
    except StopIteration:
        start = 0
    entries: list[list] = []        # [subject, mark, [trailers]]
    common: list[str] = []
    in_block = in_common = False
    for ln in lines[start:]:
        if ln == "---":
            if in_block:
                break
            in_block = True
            continue
        if not in_block:
            continue
        if ln == "  ---":
            in_common = True
            continue
        m = re.match(r"^  ([vx]) " + _ATT_RE + "$", ln)
        if in_common and m:
            common.append(f"{m.group(2)}: {m.group(3)}")
            continue
        m = re.match(r"^    ([vx]) " + _ATT_RE + "$", ln)
        if m and entries:
            entries[-1][2].append(f"{m.group(2)}: {m.group(3)}")
            continue
        m = re.match(r"^  (?:([vx]) )?(\[.*)$", ln)
        if m and not in_common:
            entries.append([m.group(2), m.group(1), []])
    out = []
    for subject, mark, trailers in entries:
        trailers = trailers or list(common)
        if policy == "off":
            out.append((subject, "none", "attestation not checked (policy off)"))
        elif any(t.startswith("Signed:") for t in trailers):
            out.append((subject, "pass", "; ".join(trailers)))
        elif trailers:
            out.append((subject, "fail", "; ".join(trailers)))
        elif mark == "x":
            out.append((subject, "fail", "attestation failed"))
        else:
            out.append((subject, "none", "no signature (no DKIM or patatt attestation)"))
    return out


def _b4_meta(log: str, opts: FetchOptions, **extra) -> dict:
    link = re.search(r"^ Link: (\S+)", log, re.M)
    total = re.search(r"^Total patches: ([0-9]{1,9})$", log, re.M)
    return {
        "format": CACHE_FORMAT,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "attestation_policy": opts.attestation,
        "link": link.group(1) if link else None,
        "total": int(total.group(1)) if total else None,
        "attestation": [list(x) for x in _parse_attestation(log, opts.attestation)],
        "b4_log": log[-20000:],
        **extra,
    }


# ---- parsing b4's output

_POLICY = email.policy.default.clone(max_line_length=0)
_PREFIX_RE = re.compile(r"^(?:\s*(?:\[[^\]]*\]|(?:re|fwd?|aw)\s*:))+\s*", re.I)


def _strip_prefix(subject: str) -> str:
    return _PREFIX_RE.sub("", " ".join(subject.split())).strip()


def _subject_version(subject: str) -> int | None:
    m = re.match(r"^\s*\[([^\]]*)\]", subject)
    if not m:
        return None
    vs = re.findall(r"\bv([0-9]{1,9})\b", m.group(1), re.I)    # int() refuses 4300+ digits
    return int(vs[-1]) if vs else 1


def _body_text(msg: EmailMessage) -> str:
    part = msg
    if msg.is_multipart():
        part = next((p for p in msg.walk() if p.get_content_type() == "text/plain"), None)
        if part is None:
            return ""
    try:
        text = part.get_content()
    except (LookupError, UnicodeError):     # an unknown charset; or one like idna that cannot "replace"
        text = (part.get_payload(decode=True) or b"").decode("utf-8", "replace")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _split_body(body: str) -> tuple[str, str]:
    """(commit message, diff) as git mailinfo splits them; diff without the signature."""
    lines = body.split("\n")
    msg_end = len(lines)
    for i, ln in enumerate(lines):
        if ln.rstrip() == "---" or ln.startswith("diff -") or ln.startswith("Index: "):
            msg_end = i
            break
    message = "\n".join(lines[:msg_end]).strip("\n")
    message = message + "\n" if message else ""

    start = next((i for i, ln in enumerate(lines) if ln.startswith("diff --git ")), None)
    if start is None:
        start = next((i for i in range(msg_end, len(lines) - 1)
                      if lines[i].startswith("--- ") and lines[i + 1].startswith("+++ ")), None)
    if start is None:
        return message, ""
    return message, _cut_signature(lines[start:])


_DIFF_HEADER_RE = re.compile(
    r"^(diff --git |index |--- |\+\+\+ |old mode |new mode |deleted file mode |new file mode |"
    r"similarity index |dissimilarity index |rename (from|to) |copy (from|to) |Binary files |"
    r"GIT binary patch|@@ |\\ )")
_HUNK_RE = re.compile(r"^@@ -[0-9]{1,18}(?:,([0-9]{1,18}))? \+[0-9]{1,18}(?:,([0-9]{1,18}))? @@")   # as diffparse's
# git's binary hunks: "literal N" / "delta N", base85 lines led by a length letter, an
# empty line closing each hunk.
_BINARY_RE = re.compile(r"^(?:(?:literal|delta) \d+|[A-Za-z][0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]+|)$")


def _cut_signature(lines: list[str]) -> str:
    """Keep the diff; drop what follows it (the "-- \n2.x" signature, base-commit: lines).

    Walks hunks by their line counts, so a removed line that reads "- " (i.e. "-- ")
    inside a hunk is not mistaken for the signature separator; outside hunks only diff
    header lines and binary patch data belong to the diff. A diff ending in a binary
    patch keeps the empty line that closes its last hunk: without it git apply calls
    the patch corrupt.
    """
    out: list[str] = []
    old_left = new_left = 0
    in_binary = ends_binary = False
    for i, ln in enumerate(lines):
        if old_left > 0 or new_left > 0:
            out.append(ln)
            tag = ln[:1]
            if tag in (" ", ""):
                old_left -= 1
                new_left -= 1
            elif tag == "-":
                old_left -= 1
            elif tag == "+":
                new_left -= 1
            continue
        if ln in ("-- ", "--"):
            break
        if in_binary and _BINARY_RE.match(ln):
            out.append(ln)
            continue
        in_binary = False
        if ln == "":
            nxt = next((x for x in lines[i + 1:] if x != ""), "")
            if _DIFF_HEADER_RE.match(nxt):
                out.append(ln)
                continue
            break
        if not _DIFF_HEADER_RE.match(ln):
            break
        if ln.startswith("diff --git "):
            ends_binary = False
        if ln.startswith("GIT binary patch"):
            in_binary = ends_binary = True
        m = _HUNK_RE.match(ln)
        if m:
            old_left = int(m.group(1)) if m.group(1) is not None else 1
            new_left = int(m.group(2)) if m.group(2) is not None else 1
        out.append(ln)
    while out and out[-1] == "":
        out.pop()
    if ends_binary:
        out.append("")
    return "\n".join(out) + "\n" if out else ""


# ---- the mails as sent
#
# b4 rewrites every body as UTF-8: a latin-1 mail's bytes come out transcoded, bytes that
# are not valid in the declared charset as U+FFFD. git am converts only the commit
# message (i18n.commitEncoding) and applies the diff's bytes as they were mailed. So a
# cache entry keeps the mails as sent (sent/, by Message-Id) and a diff that is not pure
# ASCII in b4's copy is taken from there, byte for byte (see rawtext).

def _sent_stem(msgid: str) -> str:
    return hashlib.sha256(msgid.encode()).hexdigest()[:32]


def _keep_sent(entry: Path, msgid: str, raws: Sequence[bytes]) -> None:
    """Keep the mail(s) sent with this Message-Id (an archive may hold duplicates)."""
    d = entry / "sent"
    d.mkdir(exist_ok=True)
    for n, raw in enumerate(raws):
        (d / f"{_sent_stem(msgid)}-{n}.eml").write_bytes(raw)


def _split_mboxrd(data: bytes) -> list[bytes]:
    """Mails of an mboxrd (public-inbox /raw): "From " lines cut, ">From" unquoted."""
    mails: list[list[bytes]] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From ") or not mails:
            mails.append([])
            if line.startswith(b"From "):
                continue
        mails[-1].append(re.sub(rb"^>(>*From )", rb"\1", line))
    return [b"".join(m) for m in mails if b"".join(m).strip()]


def _fetch_sent(entry: Path, opts: FetchOptions, what: str) -> None:
    """Fetch from the archive, as sent, the mails whose diff b4 may have re-encoded."""
    mask = opts.midmask or LORE_MIDMASK
    for f in _patch_files(entry):
        msg = _read_mail(f)
        mid = _msgid(msg)
        if not mid or _split_body(_body_text(msg))[1].isascii():
            continue
        url = mask.replace("%s", urllib.parse.quote_plus(mid)).rstrip("/") + "/raw"
        try:
            with urllib.request.urlopen(url, timeout=RAW_TIMEOUT) as resp:
                data = resp.read()
        except (OSError, ValueError) as ex:
            raise FetchError(f"{what}: cannot fetch <{mid}> as sent from {url} ({ex}); its diff "
                             f"has bytes beyond ASCII that b4 re-encodes",
                             hint="retry later; kpatchtest needs the mail's own bytes to apply it as git am would") from None
        _keep_sent(entry, mid, _split_mboxrd(data))


def _as_b4_decodes(diff: str, charset: str | None) -> str:
    """What b4 makes of these bytes: decoded with the mail's charset, errors replaced."""
    try:
        return rawtext.encode(diff).decode(charset or "utf-8", "replace")
    except (LookupError, UnicodeError):
        return rawtext.encode(diff).decode("utf-8", "replace")


def _diff_as_sent(entry: Path, msgid: str | None, b4_diff: str, what: str) -> str:
    """The diff with the bytes of the mail as sent: the one text part whose diff, read the
    way b4 reads it, is b4's diff. Anything else is an error, never a silent rewrite."""
    sent = sorted((entry / "sent").glob(f"{_sent_stem(msgid)}-*.eml")) if msgid else []
    if not sent:
        raise FetchError(f"{what}: its diff has bytes beyond ASCII and the mail as sent is not at hand, "
                         f"so they cannot be kept as mailed",
                         hint="this is a bug in kpatchtest; please report it")
    for f in sent:
        msg = email.message_from_bytes(f.read_bytes(), policy=_POLICY)
        for part in msg.walk():
            ctype = part.get_content_type()
            payload = part.get_payload(decode=True)
            if not ctype.endswith(("/plain", "/x-patch")) or not isinstance(payload, bytes):
                continue
            _, diff = _split_body(rawtext.decode(payload).replace("\r\n", "\n"))
            charset = part.get_content_charset() or msg.get_content_charset()
            if diff and _as_b4_decodes(diff, charset) == b4_diff:
                return diff
    raise FetchError(f"{what}: the diff b4 extracted does not match the mail as sent, so its bytes "
                     f"cannot be kept as mailed",
                     hint="check the mail's charset and transfer encoding (git am it by hand to compare)")


def _header(msg: EmailMessage, name: str) -> str:
    """A header's value; the raw one where Python's header parser fails on it (it raises
    IndexError on "Message-Id: <", HeaderParseError on others)."""
    try:
        return str(msg.get(name, "") or "")
    except (LookupError, ValueError, AttributeError, TypeError, email.errors.MessageError):
        return " ".join(next((v for k, v in msg.raw_items() if k.lower() == name.lower()), "").split())


def _author(msg: EmailMessage) -> str:
    name, addr = email.utils.parseaddr(_header(msg, "From"))
    name = " ".join(name.split())
    return f"{name} <{addr}>" if name else addr


def _msgid(msg: EmailMessage) -> str | None:
    v = _header(msg, "Message-Id").strip().strip("<>").strip()
    return v or None


def _read_mail(path: Path) -> EmailMessage:
    with open(path, "rb") as fh:
        return email.message_from_binary_file(fh, policy=_POLICY)  # type: ignore[return-value]


_BASE_RE = re.compile(r"^base-commit:\s*([0-9a-f]{7,64})\s*$", re.M)
_PREREQ_RE = re.compile(r"^prerequisite-patch-id:\s*([0-9a-f]{40,64})\s*$", re.M)


def _patch_files(entry: Path) -> list[Path]:
    maildir = entry / f"{_NAME}.maildir"
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file())


def _load_entry(entry: Path, what: str, with_msgids: bool = True,
                upstream: dict[str, str] | None = None) -> _Fetched:
    """Parse a b4 output dir (series.maildir, series.cover, meta.json) into patches."""
    meta = json.loads((entry / "meta.json").read_text())
    files = _patch_files(entry)
    if not files:
        raise FetchError(f"{what}: no patch series found in it",
                         hint="check that it is a patch series (git format-patch / lore mbox)")
    if meta.get("total") is not None and meta["total"] != len(files):
        raise FetchError(f"{what}: b4 reported {meta['total']} patches but wrote {len(files)}",
                         hint="rerun; if it persists, fetch the thread with b4 by hand")
    att = meta.get("attestation") or []
    att_by_subject: dict[str, list] = {}
    for a in att:
        att_by_subject.setdefault(a[0], []).append(a)

    patches: list[Patch] = []
    texts: list[str] = []
    version = None
    for i, f in enumerate(files):
        msg = _read_mail(f)
        raw_subject = " ".join(_header(msg, "Subject").split())
        version = version or _subject_version(raw_subject)
        body = _body_text(msg)
        texts.append(body)
        message, diff = _split_body(body)
        if not diff:
            raise FetchError(f"{what}: patch {i + 1} ({_strip_prefix(raw_subject)!r}) has no diff",
                             hint="check the mails of the series")
        mid = _msgid(msg)
        if not diff.isascii():
            diff = _diff_as_sent(entry, mid, diff, f"{what}: patch {i + 1} ({_strip_prefix(raw_subject)!r})")
        if len(att) == len(files):
            a = att[i]
        else:       # b4 listed a different number of patches: match them by subject
            cands = att_by_subject.get(raw_subject) or []
            a = cands.pop(0) if cands else [raw_subject, "none", "attestation not reported by b4"]
        patches.append(Patch(
            index=i + 1,
            subject=_strip_prefix(raw_subject),
            author=_author(msg),
            date=_header(msg, "Date"),
            message=message,
            diff=diff,
            msgid=mid if with_msgids else None,
            upstream_commit=(upstream or {}).get(mid or ""),
            attestation=a[1],
            attestation_detail=a[2],
        ))

    cover_text = title = title_note = None
    cover_msgid = None
    cover_file = entry / f"{_NAME}.cover"
    if cover_file.is_file():
        cmsg = _read_mail(cover_file)
        title = _strip_prefix(_header(cmsg, "Subject")) or None
        cover_text = _cut_cover_signature(_body_text(cmsg))
        cover_msgid = _msgid(cmsg)
        title, title_note = _cover_title(title, cover_text, patches[0].subject)
        texts.insert(0, cover_text)
    everything = "\n".join(texts)
    base = _BASE_RE.search(everything)
    prereqs: list[str] = []
    for pid in _PREREQ_RE.findall(everything):
        if pid not in prereqs:
            prereqs.append(pid)
    msgids = []
    if with_msgids:
        msgids = [m for m in [cover_msgid] + [p.msgid for p in patches] if m]
    return _Fetched(
        patches=patches, title=title, title_note=title_note, version=version if with_msgids else None,
        cover=cover_text, base_commit=base.group(1) if base else None,
        prerequisite_patch_ids=prereqs, link=meta.get("link") if with_msgids else None,
        msgids=msgids,
    )


_TEMPLATE_SUBJECT = "*** SUBJECT HERE ***"     # git format-patch --cover-letter's placeholders
_TEMPLATE_BLURB = "*** BLURB HERE ***"


def _cover_title(subject: str | None, text: str, first_patch: str) -> tuple[str | None, str | None]:
    """(title, note) for a cover letter. One still holding format-patch's placeholder
    subject names nothing: the title comes from the first patch, as b4 names a series
    without a cover, and the note says so. An edited subject over the placeholder blurb
    stays the title, with a note."""
    if subject and _TEMPLATE_SUBJECT in subject:
        return first_patch, (f"the cover letter is git format-patch's unedited template "
                             f"({_TEMPLATE_SUBJECT}): title taken from patch 1")
    if _TEMPLATE_BLURB in text:
        return subject, f"the cover letter's text is git format-patch's unedited template ({_TEMPLATE_BLURB})"
    return subject, None


def _cut_cover_signature(text: str) -> str:
    lines = text.rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] in ("-- ", "--") and len(lines) - i <= 4:
            lines = lines[:i]
            break
    return "\n".join(lines).rstrip() + "\n"


def _enforce_policy(fetched: _Fetched, opts: FetchOptions, what: str) -> None:
    """attestation=hardfail: every mailed patch must carry a passing signature."""
    if opts.attestation != "hardfail":
        return
    bad = [p for p in fetched.patches if p.attestation != "pass"]
    if bad:
        kinds = sorted({p.attestation for p in bad})
        raise FetchError(
            f"{what}: {len(bad)} of {len(fetched.patches)} patches are not attested "
            f"({'/'.join(kinds)}: e.g. {bad[0].subject!r}: {bad[0].attestation_detail})",
            hint="attestation: hardfail needs DKIM or patatt signatures on every patch; use softfail to accept")


# ---- cache

def _read_cache(entry: Path, what: str, opts: FetchOptions) -> _Fetched | None:
    if not (entry / "meta.json").is_file():
        return None
    try:
        fetched = _load_entry(entry, what)
    except (ValueError, OSError, KeyError):
        return None         # unreadable entry: treat as a miss
    _enforce_policy(fetched, opts, what)
    return fetched


def _commit_cache(tmp: Path, entry: Path) -> None:
    """Move a complete temp dir into place atomically (replacing an older entry)."""
    old = None
    if entry.exists():
        old = entry.with_name(f".old-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(entry, old)
    try:
        os.rename(tmp, entry)
    except OSError:
        if old is not None and not entry.exists():
            os.rename(old, entry)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fetch_cached(key: str, what: str, opts: FetchOptions, produce, use_cache: bool) -> _Fetched:
    """Serve from cache_dir/series/<key> if allowed, else produce into a temp dir and cache it."""
    root = _series_root(opts)
    entry = root / key
    if use_cache:
        hit = _read_cache(entry, what, opts)
        if hit is not None:
            return hit
    if opts.offline and produce is None:
        raise FetchError(f"{what}: not in the cache ({root}) and --offline forbids fetching it",
                         hint="run once without --offline to fetch and cache it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:40]}-", dir=root))
    try:
        produce(tmp)
        fetched = _load_entry(tmp, what)
        _enforce_policy(fetched, opts, what)
        _commit_cache(tmp, entry)
        return fetched
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- the three sources

def _fetch_msgid(src: MsgidSource, opts: FetchOptions) -> _Fetched:
    msgid = _clean_msgid(src.msgid)
    what = f"message-id <{msgid}>" + (f" v{src.version}" if src.version else "")
    if not msgid or " " in msgid:
        raise FetchError(f"invalid message-id {src.msgid!r}",
                         hint="give it as in the Message-Id header, e.g. 20230426220323.3079789-1-seanjc@google.com")
    key = _key("msgid", msgid, src.version, opts)
    if opts.offline:
        return _fetch_cached(key, what, opts, None, use_cache=True)

    def produce(tmp: Path) -> None:
        cmd = _b4_base_cmd(opts, offline=False) + ["am", "-M", "-n", _NAME, "-o", str(tmp), "-l"]
        if src.version:
            cmd += ["-v", str(src.version)]
        cmd += ["--", msgid]
        log = _run_b4(cmd, tmp, what, opts)
        _fetch_sent(tmp, opts, what)
        _write_meta(tmp, _b4_meta(log, opts, kind="msgid", msgid=msgid, version=src.version,
                                  midmask=opts.midmask))

    return _fetch_cached(key, what, opts, produce, use_cache=False)


def _write_meta(tmp: Path, meta: dict) -> None:
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _fetch_mbox(src: MboxSource, opts: FetchOptions) -> _Fetched:
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
    key = _key("mbox", hashlib.sha256(data).hexdigest(), None, opts)
    path = path.resolve()

    def produce(tmp: Path) -> None:
        mbox = _with_message_ids(path, data, tmp)
        cmd = _b4_base_cmd(opts, offline=True) + ["am", "-M", "-n", _NAME, "-o", str(tmp), "-l",
                                                  "-m", str(mbox)]
        log = _run_b4(cmd, tmp, what, opts)
        _write_meta(tmp, _b4_meta(log, opts, kind="mbox", mbox=str(path),
                                  sha256=hashlib.sha256(data).hexdigest()))

    return _fetch_cached(key, what, opts, produce, use_cache=True)


def _with_message_ids(path: Path, data: bytes, tmp: Path) -> Path:
    """b4 threads by Message-Id; plain `git format-patch --stdout` has none. Give such
    mails deterministic ids, threaded under the first one, in a copy of the mbox. Every
    mail is also kept as sent, under the id b4 will see."""
    import mailbox

    box = mailbox.mbox(str(path), create=False)
    try:
        mails = [(box.get_message(k), box.get_bytes(k)) for k in box.keys()]
    finally:
        box.close()
    digest = hashlib.sha256(data).hexdigest()[:16]
    ids = [m.get("Message-Id") or f"<kpatchtest-{digest}-{i}@localhost>" for i, (m, _) in enumerate(mails)]
    sent: dict[str, list[bytes]] = {}
    for mid, (_, raw) in zip(ids, mails):
        sent.setdefault(_clean_msgid(str(mid)), []).append(raw)
    for mid, raws in sent.items():
        _keep_sent(tmp, mid, raws)
    if all(m.get("Message-Id") for m, _ in mails):
        return path
    out = mailbox.mbox(str(tmp / "with-message-ids.mbox"))
    for i, (m, _) in enumerate(mails):
        if not m.get("Message-Id"):
            m["Message-Id"] = ids[i]
        if i and not m.get("In-Reply-To"):
            m["In-Reply-To"] = ids[0]
            m["References"] = ids[0]
        out.add(m)
    out.flush()
    out.close()
    return tmp / "with-message-ids.mbox"


def _fetch_commits(src: CommitsSource, opts: FetchOptions) -> _Fetched:
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
                mid = _msgid(email.message_from_bytes(raw, policy=_POLICY))  # type: ignore[arg-type]
                if mid:
                    upstream[mid] = m.group(1).decode()
                    sent[mid] = raw
            (md / "new" / f"{n:04d}.eml").write_bytes(raw)
        cmd = _b4_base_cmd(opts, offline=True) + ["am", "-M", "-n", _NAME, "-o", str(tmp / "out"),
                                                  "-m", str(md)]
        log = _run_b4(cmd, tmp / "out", what, opts)
        for mid, raw in sent.items():
            _keep_sent(tmp / "out", mid, [raw])
        _write_meta(tmp / "out", _b4_meta(log, opts, kind="commits", commits=rng, repo=str(repo)))
        return upstream

    with tempfile.TemporaryDirectory(prefix="kpatchtest-commits-") as t:
        upstream = produce(Path(t))
        fetched = _load_entry(Path(t) / "out", what, with_msgids=False, upstream=upstream)
    missing = [p.subject for p in fetched.patches if not p.upstream_commit]
    if missing:
        raise FetchError(f"{what}: could not map patch {missing[0]!r} back to its commit",
                         hint="this is a bug in kpatchtest; please report it")
    # Local commits are not mails: nothing to attest, and hardfail does not apply.
    fetched.patches = [_replace(p, attestation="none",
                                attestation_detail="local commit (not mailed; attestation does not apply)")
                       for p in fetched.patches]
    return fetched
