"""Property-based: the spec loader and the mail parser on generated input.

Specs, mails and diffs come from other people; whatever they hold, the answer is a result
or one line (InputError/FetchError, exit 2), never a traceback. Each property runs a
bounded number of examples so the file stays well under a minute.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kpatchtest.cli import main
from kpatchtest.diffparse import diff_size, parse_diff
from kpatchtest.errors import FetchError, InputError
from kpatchtest.fetch import b4, cache, mail
from kpatchtest.fetch.sources import MboxSource
from kpatchtest.fetch.stage import FetchOptions, fetch_series
from kpatchtest.spec import LoadedSpec, parse_spec
from kpatchtest.util import sha256_file, sha256_text

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HUGE = "9" * 5000       # past Python's int-from-string limit (4300 digits)
TEXT = st.text(max_size=30) | st.sampled_from(["", " ", "\x00", "\udcff", "é", "~nobody/x", HUGE,
                                               "-rf", "a\nb", "%s", "..", "/"])


def one_line(e: Exception) -> bool:
    """One printable line a UTF-8 terminal can show."""
    str(e).encode("utf-8")
    return "\n" not in str(e) and bool(str(e).strip())


# ---------------------------------------------------------------------------- specs

SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
ANY = st.recursive(SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(TEXT, c, max_size=3),
                   max_leaves=8)


def either(valid):
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(valid, valid, ANY)


def mapping(required: dict, optional: dict | None = None):
    extra = st.dictionaries(st.sampled_from(["bogus", "Name", "nmae"]), ANY, max_size=1)
    return either(st.builds(lambda d, e: {**d, **e},
                            st.fixed_dictionaries(required, optional=optional or {}), extra))


PATH = st.sampled_from(["/nonexistent/linux", "linux", "./x.mbox", "https://git.kernel.org/x.git",
                        "git@host:linux.git", "file:///tmp/x", "ext::sh", "-x"]) | TEXT
REF = st.sampled_from(["linux-6.1.y", "master", "v6.1..v6.2", "HEAD", "refs/heads/x", "a b"]) | TEXT
SOURCE = st.one_of(mapping({"msgid": TEXT}, {"version": either(st.integers(-1, 5))}),
                   mapping({"mbox": PATH}), mapping({"commits": REF}, {"repo": PATH}))
BRANCH = st.one_of(REF, mapping({"name": REF}, {"ref": REF, "tarball": PATH}))
SPEC = mapping(
    {"name": either(st.sampled_from(["t", "kvm-fix"])), "series": either(st.lists(SOURCE, max_size=3)),
     "kernel": mapping({"branches": either(st.lists(BRANCH, max_size=3))},
                       {"repo": PATH, "upstream": REF})},
    {"fetch": mapping({}, {"midmask": TEXT, "attestation": either(st.sampled_from(["off", "hardfail"]))}),
     "gates": mapping({}, {"apply": either(st.sampled_from(["clean", "any"]) | st.just({"default": "clean"})),
                           "build": TEXT, "boot": TEXT, "workloads": TEXT}),
     "configs": mapping({}, {"base": TEXT, "fragments": either(st.lists(PATH, max_size=2)),
                             "required": ANY}),
     "build": mapping({}, {"when": TEXT, "per_patch": ANY, "jobs": ANY,
                           "make_vars": either(st.dictionaries(TEXT, TEXT, max_size=2))}),
     "apply": mapping({}, {"prerequisite_budget_s": ANY}),
     "lab": mapping({}, {"name": TEXT, "tags": ANY, "memory_mb": ANY, "cpus": ANY}),
     "workloads": mapping({}, {"rounds": ANY, "kvm_unit_tests": mapping({}, {"source": PATH, "ref": REF,
                                                                          "tests": ANY, "env": ANY}),
                               "smm_boot": mapping({}, {"reads": ANY, "disk": TEXT})})})
# Every key where it belongs, mostly plausible values, now and then free text in a path:
# reaches the path handling after validation.
def mostly(*plausible):
    return st.one_of(st.sampled_from(plausible), st.sampled_from(plausible), st.sampled_from(plausible), TEXT)


LOCAL = mostly("/nonexistent/linux", "linux", "./x.mbox", "~/x", "../a/b")
SHAPED = st.builds(
    lambda src, repo, branch, base, frags, kut: {
        "name": "t", "series": [src], "kernel": {"repo": repo, "branches": [branch]},
        "configs": {"base": base, "fragments": frags}, "lab": {},
        "workloads": {"kvm_unit_tests": {"source": kut}}},
    st.one_of(st.builds(lambda m: {"mbox": m}, LOCAL),
              st.builds(lambda c, r: {"commits": c, "repo": r}, mostly("v6.1..v6.2", "HEAD"), LOCAL),
              st.builds(lambda m: {"msgid": m}, mostly("1234@x", "https://lore.kernel.org/all/1@x/"))),
    LOCAL, st.one_of(mostly("linux-6.1.y"), st.builds(lambda t: {"name": "b", "tarball": t}, LOCAL)),
    mostly("tinyconfig", "defconfig", "./my.config", "/x/.config"), st.lists(LOCAL, max_size=2), LOCAL)
YAMLISH = st.text(alphabet=st.sampled_from(list("abk:- []{}&*!|>'\"#%@`,?\n\t 019.~\\")), max_size=120)


def dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def spec_or_one_line(text: str) -> None:
    try:
        assert isinstance(parse_spec(text, Path("/nonexistent/spec.yaml")), LoadedSpec)
    except InputError as e:
        assert one_line(e), str(e)


@MANY
@given(SPEC | SHAPED)
@example({"\n": None})                       # crashes found, kept: a key that breaks the line,
@example({"name": "t", "series": [{"mbox": "a\0b"}], "kernel": {"repo": "/x", "branches": ["b"]}})  # NUL
@example({"name": "t", "series": [{"mbox": "m"}], "kernel": {"repo": "/x", "branches": ["b"]},
          "configs": {"fragments": ["f" * 300]}})                                  # a name past NAME_MAX
@example({"name": "t", "series": [{"mbox": "m"}], "kernel": {"repo": "/x", "branches": ["b"]},
          "configs": {"fragments": ["~0"]}, "workloads": {"kvm_unit_tests": {"source": "~0"}}})  # no such ~user
def test_a_generated_spec_is_a_spec_or_one_line(doc):
    spec_or_one_line(dump(doc))


@MANY
@given(YAMLISH | st.text(max_size=80))
@example("._")                  # ruamel's float pattern, but float() raises ValueError
@example("a: 0x_")              # its int pattern, and IndexError
def test_any_text_is_a_spec_or_one_line(text):
    spec_or_one_line(text)


@FEW
@given(st.one_of((SPEC | SHAPED).map(lambda d: dump(d).encode("utf-8", "surrogatepass")), st.binary(max_size=80)))
def test_validate_exits_0_or_2_with_one_line_on_stderr(data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "spec.yaml"
        f.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["validate", str(f)])
    assert rc in (0, 2), err.getvalue()
    if rc == 2:
        assert err.getvalue().startswith("kpatchtest: error: ") and err.getvalue().count("\n") == 1, err.getvalue()


# ---------------------------------------------------------------------------- diffs and mails

COUNT = st.sampled_from(["0", "1", "3", HUGE]) | st.integers(0, 10**6).map(str)
LEN = st.none() | COUNT
DPATH = st.sampled_from(["a/x.c", "b/x.c", "/dev/null", '"a/sp ace.c"', "x.c", "", "a/", "b/y\tz"])
DIFF_LINE = st.one_of(
    st.builds(lambda a, b: f"diff --git {a} {b}", DPATH, DPATH),
    st.builds(lambda p: f"--- {p}", DPATH), st.builds(lambda p: f"+++ {p}", DPATH),
    st.builds(lambda a, b, c, d: f"@@ -{a}{',' + b if b else ''} +{c}{',' + d if d else ''} @@ f",
              COUNT, LEN, COUNT, LEN),
    st.sampled_from(["index 1234567..89abcde 100644", "new file mode 100644", "deleted file mode 100644",
                     "old mode 100644", "rename from x.c", "rename to y.c", "similarity index 90%",
                     "GIT binary patch", "literal 0", "delta 12", "zcmV-", "Binary files a/x and b/x differ",
                     "\\ No newline at end of file", "-- ", "--", "", "---", "2.43.0",
                     "Signed-off-by: A <a@b>", "base-commit: abc1234",
                     "prerequisite-patch-id: " + "a" * 40, "Index: x.c", "diff -u a b"]),
    st.builds(str.__add__, st.sampled_from([" ", "+", "-"]), TEXT),
    TEXT,
)
DIFF = st.lists(DIFF_LINE, max_size=25).map("\n".join)
CLEAN_DIFF = st.builds(   # a well-formed one-hunk diff, so the generated input reaches deep
    lambda ctx, minus, plus: ("diff --git a/x.c b/x.c\n--- a/x.c\n+++ b/x.c\n"
                              f"@@ -1,{len(ctx) + len(minus)} +1,{len(ctx) + len(plus)} @@\n"
                              + "".join(f" {c}\n" for c in ctx) + "".join(f"-{m}\n" for m in minus)
                              + "".join(f"+{p}\n" for p in plus)),
    st.lists(TEXT, max_size=3), st.lists(TEXT, max_size=3), st.lists(TEXT, max_size=3))


@MANY
@given(DIFF | CLEAN_DIFF)
@example(f"diff --git a/x.c b/x.c\n@@ -1,{HUGE} +1 @@\n")        # int() refuses 4300+ digits
@example("diff --git a/x.c a/x.c\n@@ -0 +0 @@\n--- a/x.c\n+++ a/x.c")  # adds at line 0
def test_parse_diff_gives_files_and_hunks(diff):
    files = parse_diff(diff)
    assert diff_size(diff) >= 0
    for f in files:
        assert isinstance(f.path, str) and isinstance(f.text, str)
        f.with_hunks(f.hunks[:1])
        f.renamed_to("y.c")
        for h in f.hunks:
            lo, hi = h.changed_new_range()
            assert lo <= hi
            assert h.old_range()[0] <= h.old_range()[1]


@MANY
@given(st.lists(DIFF_LINE, max_size=10).map("\n".join), DIFF | CLEAN_DIFF)
@example("", f"--- a/x\n+++ b/x\n@@ -1 +1,{HUGE} @@\n")
def test_a_body_splits_into_message_and_diff(message, diff):
    msg, d = mail.split_body(message + "\n---\n" + diff)
    assert msg == "" or msg.endswith("\n")
    assert d == "" or (d.endswith("\n") and d.startswith(("diff --git ", "--- ")))


CHARSET = st.sampled_from(["utf-8", "us-ascii", "iso-8859-1", "utf-7", "utf-16", "koi8-r", "idna",
                           "x-unknown", "base64", "rot13", '"', ""])
CTE = st.sampled_from(["8bit", "7bit", "base64", "quoted-printable", "x-uuencode", "binary", "bogus"])
HEADER = TEXT | st.sampled_from(["=?utf-8?q?caf=C3=A9?=", "=?x-unknown?b?AAAA?=", "=?utf-8?b?####?=",
                                 '"unterminated', "<>", "<@>", "a <b@c>, d", "[PATCH v3 2/7] x",
                                 f"[PATCH v{HUGE}] x", "[RFC][PATCH] Re: x", "=?utf-8?q?", "(comment",
                                 "https://[x@y/", "id:<a@b>"])


@st.composite
def mails(draw) -> bytes:
    """A mail as b4 might leave it in its maildir: plausible or broken headers, a body
    with a diff or not, in some charset and transfer encoding, maybe multipart."""
    headers = {k: draw(HEADER) for k in draw(st.lists(st.sampled_from(
        ["Subject", "From", "Date", "Message-Id", "In-Reply-To", "MIME-Version"]), unique=True))}
    if draw(st.booleans()):
        headers["Message-Id"] = f"<{draw(st.integers(0, 9))}@x>"
    body = draw(st.lists(DIFF_LINE, max_size=6).map("\n".join)) + "\n---\n" + draw(DIFF | CLEAN_DIFF)
    charset, cte = draw(CHARSET), draw(CTE)
    data = body.encode("utf-8", "surrogatepass")
    if cte == "base64" and draw(st.booleans()):
        data = base64.encodebytes(data)
    part = f"Content-Type: text/plain; charset={charset}\nContent-Transfer-Encoding: {cte}\n\n".encode() + data
    if draw(st.booleans()):
        other = draw(st.sampled_from([b"Content-Type: text/html\n\n<p>x</p>", b"Content-Type: text/x-patch\n\n",
                                      b"", b"Content-Type: message/rfc822\n\nSubject: x\n\n"]))
        parts = [part, other] if draw(st.booleans()) else [other, part]
        head = "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=BB\n"
        part = head.encode() + b"\n" + b"".join(b"--BB\n" + p + b"\n" for p in parts) + b"--BB--\n"
    hdr = "".join(f"{k}: {' '.join(v.splitlines()) or ' '}\n" for k, v in headers.items())
    return hdr.encode("utf-8", "surrogatepass") + part


LOG = st.lists(st.one_of(
    st.sampled_from(["---", "  ---", "Analyzing 3 messages in the thread", "Checking attestation on all messages",
                     "  v [PATCH 1/2] x", "  x [PATCH 2/2] y", "  [PATCH] z", "    v Signed: ed25519/a@b",
                     "    x BADSIG: DKIM/x", "  v No key: openpgp/c", "Total patches: 2", f"Total patches: {HUGE}",
                     " Link: https://x", "WARNING: Thread incomplete!", "missing [2/3]", "No patches found",
                     "Could not retrieve thread: Server returned an error: 404",
                     "Unable to find revision 3", "Exiting due to attestation-policy: hardfail",
                     "ERROR: x", "Mailbox /x does not exist", "Traceback (most recent call last):",
                     '  File "b4/__init__.py", line 9, in x', "    logger.critical('ERROR: %s', x)",
                     "IndexError: list index out of range"]),
    TEXT), max_size=12).map("\n".join)


def one_line_or_ok(fn, *args):
    try:
        return fn(*args)
    except FetchError as e:
        assert one_line(e) and "Traceback" not in str(e), str(e)


@FEW
@given(st.lists(mails(), min_size=1, max_size=3), st.none() | mails(), LOG, st.booleans())
@example([b"Message-Id: <\n\n---\n"], None, "", True)      # Python's header parser: IndexError
@example([b"Content-Type: text/plain; charset=idna\n\n---\n"], None, "", True)   # no "replace" in idna
def test_a_b4_output_dir_is_patches_or_one_line(patches, cover, log, count_right):
    """What cache.load reads is b4's rewrite of mails anyone could have sent."""
    with tempfile.TemporaryDirectory() as d:
        entry = Path(d)
        new = entry / f"{b4.NAME}.maildir" / "new"
        new.mkdir(parents=True)
        for i, raw in enumerate(patches):
            (new / f"{i:04d}").write_bytes(raw)
            mid = mail.msgid(mail.read_mail(new / f"{i:04d}"))
            if mid:
                mail.keep_sent(entry, mid, [raw])
        if cover is not None:
            b4.cover_file(entry).write_bytes(cover)
        meta = b4.summary(log, "softfail")
        meta["total"] = len(patches) if count_right else meta["total"]
        cache.write_meta(entry, meta, kind="mbox")
        got = one_line_or_ok(cache.load, entry, "mbox x")
        if got is not None:
            assert got.patches and all(p.diff for p in got.patches)


@FEW
@given(LOG, st.integers(-1, 3))
@example("Traceback (most recent call last):\n  File \"b4\", line 1\nIndexError: x", 1)   # b4 crashed
@example("Traceback (most recent call last):\nTraceback (most recent call last):", 0)   # found by hypothesis in CI-like run
def test_a_b4_log_is_usable_or_one_line(log, rc):
    with tempfile.TemporaryDirectory() as d:
        one_line_or_ok(b4.check_result, rc, log, Path(d), "mbox x")
    for _subject, status, _detail in b4.parse_attestation(log, "softfail"):
        assert status in ("pass", "fail", "none")


MBOX_LINE = st.sampled_from(["From x Mon Sep 17 00:00:00 2001", "From: A <a@b>", ">From y", "Message-Id: <1@x>",
                             "Message-Id:", "In-Reply-To: <0@x>", "Subject: [PATCH] x", ""]) | DIFF_LINE


@FEW
@given(st.lists(MBOX_LINE, min_size=1, max_size=20).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
       | st.binary(max_size=120))
def test_an_mbox_gets_message_ids_and_splits(data):
    """A local mbox is read by Python's mailbox before b4 sees it; an archive's /raw
    (mboxrd) is split by us."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "in.mbox"
        f.write_bytes(data)
        out = Path(d) / "out"
        out.mkdir()
        assert one_line_or_ok(mail.with_message_ids, f, data, out) is not None
    assert all(isinstance(m, bytes) for m in mail.split_mboxrd(data))


@FEW
@given(st.binary(max_size=64), st.sampled_from([0, (1 << 20) - 1, 1 << 20, (1 << 20) + 1]))
def test_sha256_file_is_the_hash_of_the_file_bytes(head, pad):
    """util.sha256_file reads in 1 MiB chunks: the chunk edges must not show."""
    data = head + b"\x00" * pad
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "f"
        f.write_bytes(data)
        assert sha256_file(f) == hashlib.sha256(data).hexdigest() == sha256_text(data)


@MANY
@given(HEADER, HEADER, TEXT)
@example("https://[x@y/", f"[PATCH v{HUGE}] x", "")    # urlparse: "Invalid IPv6 URL"; int() of 5000 digits
def test_msgids_subjects_and_covers(raw, subject, text):
    assert isinstance(mail.clean_msgid(raw), str)
    assert isinstance(mail.clean_msgid("https://lore.kernel.org/all/" + raw), str)
    assert isinstance(mail.strip_prefix(subject), str)
    v = mail.subject_version(subject)
    assert v is None or v >= 0
    mail.cover_title(subject, text, "first")
    assert mail.cut_cover_signature(text).endswith("\n")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mails(), min_size=1, max_size=3))
def test_an_mbox_through_b4_is_a_series_or_one_line(raws):
    """The whole mbox fetch, real b4 included (so a few examples only)."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "in.mbox"
        f.write_bytes(b"".join(b"From x Mon Sep 17 00:00:00 2001\n" + r + b"\n" for r in raws))
        opts = FetchOptions(cache_dir=Path(d) / "cache", offline=True)
        got = one_line_or_ok(fetch_series, [MboxSource(mbox=str(f))], opts)
        if got is not None:
            assert got.patches
