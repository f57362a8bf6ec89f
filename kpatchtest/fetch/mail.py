"""Mails into patches: what b4 wrote (and the mails as sent) parsed into `Patch` objects.

A patch mail splits as git mailinfo splits it: the commit message up to "---", the
diff from "diff --git" to its last hunk (the "-- " signature and base-commit: lines
cut). The cover letter gives the title (unless it is format-patch's unedited
template), base-commit: and prerequisite-patch-id: lines. Mails are parsed with the
``email`` package; a header it cannot parse is taken raw.

The mails as sent: b4 rewrites every body as UTF-8, so a latin-1 mail's bytes come out
transcoded and bytes not valid in the declared charset as U+FFFD, while git am converts
only the commit message (i18n.commitEncoding) and applies the diff's bytes as mailed.
So an entry keeps the mails as sent (``sent/``, by Message-Id) and a diff that is not
pure ASCII in b4's copy is taken from there, byte for byte (see rawtext).
"""

from __future__ import annotations

import email
import email.errors
import email.policy
import email.utils
import mailbox
import re
import urllib.parse
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Sequence

from kpatchtest import rawtext, urls
from kpatchtest.errors import FetchError
from kpatchtest.fetch import b4
from kpatchtest.patchset import Patch
from kpatchtest.util import sha256_text

POLICY = email.policy.default.clone(max_line_length=0)
_PREFIX_RE = re.compile(r"^(?:\s*(?:\[[^\]]*\]|(?:re|fwd?|aw)\s*:))+\s*", re.I)
_BASE_RE = re.compile(r"^base-commit:\s*([0-9a-f]{7,64})\s*$", re.M)
_PREREQ_RE = re.compile(r"^prerequisite-patch-id:\s*([0-9a-f]{40,64})\s*$", re.M)


@dataclass
class Fetched:
    """One source's result, before the stage concatenates the sources into a Series."""

    patches: list[Patch]
    title: str | None = None
    title_note: str | None = None
    version: int | None = None
    cover: str | None = None
    base_commit: str | None = None
    prerequisite_patch_ids: list[str] = field(default_factory=list)
    link: str | None = None
    msgids: list[str] = field(default_factory=list)


def parse_output(outdir: Path, meta: dict, what: str, with_msgids: bool = True,
                 upstream: dict[str, str] | None = None) -> Fetched:
    """The patches of a b4 output dir (series.maildir, series.cover, sent/), with the
    patch count and attestation b4 reported (`meta`, see b4.summary)."""
    files = b4.patch_files(outdir)
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
        msg = read_mail(f)
        raw_subject = " ".join(header(msg, "Subject").split())
        version = version or subject_version(raw_subject)
        body = body_text(msg)
        texts.append(body)
        message, diff = split_body(body)
        if not diff:
            raise FetchError(f"{what}: patch {i + 1} ({strip_prefix(raw_subject)!r}) has no diff",
                             hint="check the mails of the series")
        mid = msgid(msg)
        if not diff.isascii():
            diff = diff_as_sent(outdir, mid, diff, f"{what}: patch {i + 1} ({strip_prefix(raw_subject)!r})")
        if len(att) == len(files):
            a = att[i]
        else:       # b4 listed a different number of patches: match them by subject
            cands = att_by_subject.get(raw_subject) or []
            a = cands.pop(0) if cands else [raw_subject, "none", "attestation not reported by b4"]
        patches.append(Patch(
            index=i + 1,
            subject=strip_prefix(raw_subject),
            author=author(msg),
            date=header(msg, "Date"),
            message=message,
            diff=diff,
            msgid=mid if with_msgids else None,
            upstream_commit=(upstream or {}).get(mid or ""),
            attestation=a[1],
            attestation_detail=a[2],
        ))

    cover_text = title = title_note = None
    cover_msgid = None
    cover = b4.cover_file(outdir)
    if cover.is_file():
        cmsg = read_mail(cover)
        title = strip_prefix(header(cmsg, "Subject")) or None
        cover_text = cut_cover_signature(body_text(cmsg))
        cover_msgid = msgid(cmsg)
        title, title_note = cover_title(title, cover_text, patches[0].subject)
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
    return Fetched(
        patches=patches, title=title, title_note=title_note, version=version if with_msgids else None,
        cover=cover_text, base_commit=base.group(1) if base else None,
        prerequisite_patch_ids=prereqs, link=meta.get("link") if with_msgids else None,
        msgids=msgids,
    )


# ---- message-ids, headers, subjects

def clean_msgid(raw: str) -> str:
    """A message-id as the spec may give it (``id:``, ``<...>``, a lore URL), bare."""
    s = raw.strip()
    if s.lower().startswith("id:"):
        s = s[3:]
    if urls.is_web_url(s):
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


def read_mail(path: Path) -> EmailMessage:
    with open(path, "rb") as fh:
        return email.message_from_binary_file(fh, policy=POLICY)  # type: ignore[return-value]


def header(msg: EmailMessage, name: str) -> str:
    """A header's value; the raw one where Python's header parser fails on it (it raises
    IndexError on "Message-Id: <", HeaderParseError on others)."""
    try:
        return str(msg.get(name, "") or "")
    except (LookupError, ValueError, AttributeError, TypeError, email.errors.MessageError):
        return " ".join(next((v for k, v in msg.raw_items() if k.lower() == name.lower()), "").split())


def author(msg: EmailMessage) -> str:
    name, addr = email.utils.parseaddr(header(msg, "From"))
    name = " ".join(name.split())
    return f"{name} <{addr}>" if name else addr


def msgid(msg: EmailMessage) -> str | None:
    v = header(msg, "Message-Id").strip().strip("<>").strip()
    return v or None


def strip_prefix(subject: str) -> str:
    return _PREFIX_RE.sub("", " ".join(subject.split())).strip()


def subject_version(subject: str) -> int | None:
    m = re.match(r"^\s*\[([^\]]*)\]", subject)
    if not m:
        return None
    vs = re.findall(r"\bv([0-9]{1,9})\b", m.group(1), re.I)    # int() refuses 4300+ digits
    return int(vs[-1]) if vs else 1


# ---- bodies and diffs

def body_text(msg: EmailMessage) -> str:
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


def split_body(body: str) -> tuple[str, str]:
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
    return message, cut_signature(lines[start:])


_DIFF_HEADER_RE = re.compile(
    r"^(diff --git |index |--- |\+\+\+ |old mode |new mode |deleted file mode |new file mode |"
    r"similarity index |dissimilarity index |rename (from|to) |copy (from|to) |Binary files |"
    r"GIT binary patch|@@ |\\ )")
_HUNK_RE = re.compile(r"^@@ -[0-9]{1,18}(?:,([0-9]{1,18}))? \+[0-9]{1,18}(?:,([0-9]{1,18}))? @@")   # as diffparse's
# git's binary hunks: "literal N" / "delta N", base85 lines led by a length letter, an
# empty line closing each hunk.
_BINARY_RE = re.compile(r"^(?:(?:literal|delta) \d+|[A-Za-z][0-9A-Za-z!#$%&()*+;<=>?@^_`{|}~-]+|)$")


def cut_signature(lines: list[str]) -> str:
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


# ---- cover letters

_TEMPLATE_SUBJECT = "*** SUBJECT HERE ***"     # git format-patch --cover-letter's placeholders
_TEMPLATE_BLURB = "*** BLURB HERE ***"


def cover_title(subject: str | None, text: str, first_patch: str) -> tuple[str | None, str | None]:
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


def cut_cover_signature(text: str) -> str:
    lines = text.rstrip("\n").split("\n")
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] in ("-- ", "--") and len(lines) - i <= 4:
            lines = lines[:i]
            break
    return "\n".join(lines).rstrip() + "\n"


# ---- mboxes and the mails as sent

def _sent_stem(mid: str) -> str:
    return sha256_text(mid)[:32]


def keep_sent(outdir: Path, mid: str, raws: Sequence[bytes]) -> None:
    """Keep the mail(s) sent with this Message-Id (an archive may hold duplicates)."""
    d = outdir / "sent"
    d.mkdir(exist_ok=True)
    for n, raw in enumerate(raws):
        (d / f"{_sent_stem(mid)}-{n}.eml").write_bytes(raw)


def split_mboxrd(data: bytes) -> list[bytes]:
    """Mails of an mboxrd (public-inbox /raw): "From " lines cut, ">From" unquoted."""
    mails: list[list[bytes]] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From ") or not mails:
            mails.append([])
            if line.startswith(b"From "):
                continue
        mails[-1].append(re.sub(rb"^>(>*From )", rb"\1", line))
    return [b"".join(m) for m in mails if b"".join(m).strip()]


def with_message_ids(path: Path, data: bytes, tmp: Path) -> Path:
    """b4 threads by Message-Id; plain `git format-patch --stdout` has none. Give such
    mails deterministic ids, threaded under the first one, in a copy of the mbox. Every
    mail is also kept as sent, under the id b4 will see."""
    box = mailbox.mbox(str(path), create=False)
    try:
        mails = [(box.get_message(k), box.get_bytes(k)) for k in box.keys()]
    finally:
        box.close()
    digest = sha256_text(data)[:16]
    ids = [m.get("Message-Id") or f"<kpatchtest-{digest}-{i}@localhost>" for i, (m, _) in enumerate(mails)]
    sent: dict[str, list[bytes]] = {}
    for mid, (_, raw) in zip(ids, mails):
        sent.setdefault(clean_msgid(str(mid)), []).append(raw)
    for mid, raws in sent.items():
        keep_sent(tmp, mid, raws)
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


def _as_b4_decodes(diff: str, charset: str | None) -> str:
    """What b4 makes of these bytes: decoded with the mail's charset, errors replaced."""
    try:
        return rawtext.encode(diff).decode(charset or "utf-8", "replace")
    except (LookupError, UnicodeError):
        return rawtext.encode(diff).decode("utf-8", "replace")


def diff_as_sent(outdir: Path, mid: str | None, b4_diff: str, what: str) -> str:
    """The diff with the bytes of the mail as sent: the one text part whose diff, read the
    way b4 reads it, is b4's diff. Anything else is an error, never a silent rewrite."""
    sent = sorted((outdir / "sent").glob(f"{_sent_stem(mid)}-*.eml")) if mid else []
    if not sent:
        raise FetchError(f"{what}: its diff has bytes beyond ASCII and the mail as sent is not at hand, "
                         f"so they cannot be kept as mailed",
                         hint="this is a bug in kpatchtest; please report it")
    for f in sent:
        msg = email.message_from_bytes(f.read_bytes(), policy=POLICY)
        for part in msg.walk():
            ctype = part.get_content_type()
            payload = part.get_payload(decode=True)
            if not ctype.endswith(("/plain", "/x-patch")) or not isinstance(payload, bytes):
                continue
            _, diff = split_body(rawtext.decode(payload).replace("\r\n", "\n"))
            charset = part.get_content_charset() or msg.get_content_charset()
            if diff and _as_b4_decodes(diff, charset) == b4_diff:
                return diff
    raise FetchError(f"{what}: the diff b4 extracted does not match the mail as sent, so its bytes "
                     f"cannot be kept as mailed",
                     hint="check the mail's charset and transfer encoding (git am it by hand to compare)")
