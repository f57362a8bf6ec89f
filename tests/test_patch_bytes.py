"""Patches as they really are, through the real fetch path (b4) and the apply engine.

A binary patch and a patch carrying latin-1 bytes (a comment in an old kernel file) are
made by real `git format-patch` in a real repo, fetched through b4, applied, and the
patched tree is compared blob by blob with the source commit, and with what plain
`git am` makes of the same mails. A cover letter format-patch left as its template
names no series: the title comes from the first patch.
"""

from __future__ import annotations

import base64
import os
import quopri
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kpatchtest import rawtext
from kpatchtest.apply.engine import ApplyContext, BranchTarget, apply_series
from kpatchtest.errors import FetchError
from kpatchtest.fetch.sources import MboxSource, MsgidSource
from kpatchtest.fetch.stage import FetchOptions, fetch_series
from kpatchtest.gitutil import Git
from kpatchtest.report import write_all
from kpatchtest.results import BranchResult, RunResult
from tests.conftest_lore import Lore

LEGACY_C = b"/*\n * legacy.c: an old driver\n *\n * Copyright (C) 1996 Ren\xe9 Lef\xe8vre\n */\n\nint legacy;\n"


def _blob(seed: int, n: int) -> bytes:
    """Deterministic bytes that do not compress away (so git writes real base85 data)."""
    out, x = bytearray(), seed
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        out.append(x >> 16 & 0xFF)
    return bytes(out)


@dataclass
class Src:
    path: Path
    env: dict[str, str]
    shas: dict[str, str]

    def git(self, *args: str, input: bytes | None = None, cwd: Path | None = None) -> bytes:
        return subprocess.run(["git", "-C", str(cwd or self.path), *args], input=input, env=self.env,
                              capture_output=True, check=True).stdout

    def commit(self, name: str, message: str, files: dict[str, bytes]) -> None:
        for rel, data in files.items():
            (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.path / rel).write_bytes(data)
        self.git("add", "-A")
        self.git("commit", "-q", "-F", "-", input=message.encode())
        self.shas[name] = self.git("rev-parse", "HEAD").decode().strip()

    def format_patch(self, rng: str, *extra: str) -> bytes:
        return self.git("format-patch", "--stdout", "--thread", "--binary", *extra, rng)

    def tree(self, rev: str) -> dict[str, str]:
        """path -> blob sha of every file at rev."""
        out = self.git("ls-tree", "-r", "-z", rev).split(b"\0")
        return {e.split(b"\t", 1)[1].decode(): e.split()[2].decode() for e in out if e}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Src:
    root = tmp_path_factory.mktemp("bytes")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(root), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C",
               GIT_AUTHOR_NAME="Ren\u00e9 Lef\u00e8vre", GIT_AUTHOR_EMAIL="rene@example.org",
               GIT_COMMITTER_NAME="Ren\u00e9 Lef\u00e8vre", GIT_COMMITTER_EMAIL="rene@example.org",
               GIT_AUTHOR_DATE="2024-01-01T10:00:00+00:00", GIT_COMMITTER_DATE="2024-01-01T10:00:00+00:00")
    s = Src(root / "repo", env, {})
    subprocess.run(["git", "init", "-q", "-b", "master", str(s.path)], env=env, check=True)
    s.commit("base", "base\n", {"drivers/old/legacy.c": LEGACY_C, "firmware/logo.bin": _blob(1, 3000)})
    logo = bytearray(_blob(1, 3000))
    logo[100:110] = b"\0" * 10
    s.commit("bin1", "firmware: update the logo, add a table\n\nSigned-off-by: R <rene@example.org>\n",
             {"firmware/logo.bin": bytes(logo), "firmware/table.bin": _blob(2, 500),
              "firmware/notes.txt": b"logo v2\n"})
    s.commit("bin2", "firmware: grow the table\n\nSigned-off-by: R <rene@example.org>\n",
             {"firmware/table.bin": _blob(2, 500) + b"\0\xff" * 20})
    # latin-1 bytes in the context, in an added line, and a new file that is all latin-1;
    # a UTF-8 trailer in the message makes format-patch declare charset=UTF-8, 8bit.
    s.commit("lat1", "drivers/old: document the maintainer\n\nReported-by: Zo\u00eb <zoe@example.org>\n",
             {"drivers/old/legacy.c": LEGACY_C.replace(b" */\n", b" * Maintenu par Fran\xe7ois\n */\n", 1)})
    s.commit("lat2", "drivers/old: add a header\n\nSigned-off-by: R <rene@example.org>\n",
             {"drivers/old/legacy.h": b"/* d\xe9finitions pour legacy.c */\nextern int legacy;\n"})
    # a branch where the latin-1 comment was reworded: the series' first hunk conflicts
    s.git("checkout", "-q", "-b", "reworded", s.shas["bin2"])
    s.commit("reworded", "drivers/old: reword\n", {"drivers/old/legacy.c": LEGACY_C.replace(b"1996", b"1996-1999")})
    s.git("checkout", "-q", "master")
    return s


def fetch_mbox(tmp_path: Path, data: bytes, name: str = "series.mbox", **kw):
    mbox = tmp_path / name
    mbox.write_bytes(data)
    return fetch_series([MboxSource(mbox=str(mbox))], FetchOptions(cache_dir=tmp_path / "cache", **kw))


def apply_on(src: Src, series, onto: str, tmp_path: Path):
    ctx = ApplyContext(git=Git(src.path), scratch=tmp_path, base=None, upstream=None,
                       ref_prefix="refs/kpatchtest/test")
    return apply_series(ctx, series, BranchTarget("stable", src.shas[onto]))


def git_am_tree(src: Src, onto: str, mbox: bytes, tmp_path: Path) -> dict[str, str]:
    """What plain `git am` makes of these mails on `onto`: the reference the run must match."""
    wt = tmp_path / f"am-{onto}-{len(os.listdir(tmp_path))}"
    src.git("worktree", "add", "-q", "--detach", str(wt), src.shas[onto])
    try:
        src.git("am", "-q", input=mbox, cwd=wt)
        return src.tree(src.git("rev-parse", "HEAD", cwd=wt).decode().strip())
    finally:
        src.git("worktree", "remove", "--force", str(wt))


def assert_patched_like(src: Src, res, want: str, files: list[str]) -> None:
    assert [p.status for p in res.patches] == ["applied"] * len(res.patches), [
        (p.status, p.detail, [c.reason for c in p.conflicts]) for p in res.patches]
    got, expect = src.tree(res.patched_commit), src.tree(src.shas[want])
    for f in files:
        assert got[f] == expect[f], f
    assert got == expect


# ------------------------------------------------------------------ binary

def test_binary_patches_fetched_by_b4_apply_with_identical_blobs(src, tmp_path):
    mbox = src.format_patch(f"{src.shas['base']}..{src.shas['bin2']}", f"--base={src.shas['base']}")
    assert mbox.count(b"GIT binary patch") == 3
    s = fetch_mbox(tmp_path, mbox)
    p1, p2 = s.patches
    # the last hunk of a diff ending in binary data keeps its closing empty line, and
    # what follows it (base-commit:, the signature) is not binary data
    assert p2.diff.endswith("\n\n") and "GIT binary patch" in p2.diff
    assert "-- \n" not in p2.diff and "base-commit" not in p2.diff and s.base_commit == src.shas["base"]
    assert p1.diff.index("firmware/notes.txt") > p1.diff.index("firmware/logo.bin")    # text after binary
    res = apply_on(src, s, "base", tmp_path)
    assert res.verdict == "clean"
    assert_patched_like(src, res, "bin2", ["firmware/logo.bin", "firmware/table.bin", "firmware/notes.txt"])
    # the mbox a run writes (series.mbox) replays with git am to the same tree
    assert git_am_tree(src, "base", s.as_mbox(), tmp_path) == src.tree(src.shas["bin2"])


# ------------------------------------------------------------------ latin-1

LATIN1_FILES = ["drivers/old/legacy.c", "drivers/old/legacy.h"]


def latin1_mbox(src: Src) -> bytes:
    return src.format_patch(f"{src.shas['bin2']}..{src.shas['lat2']}")


def test_latin1_patch_8bit_keeps_its_bytes_into_the_tree(src, tmp_path):
    mbox = latin1_mbox(src)
    assert b"Content-Type: text/plain; charset=UTF-8" in mbox and b"Fran\xe7ois" in mbox
    s = fetch_mbox(tmp_path, mbox)
    assert "Zo\u00eb" in s.patches[0].message       # the message is text, decoded as declared
    assert b"Ren\xe9 Lef\xe8vre" in rawtext.encode(s.patches[0].diff)     # the diff keeps the bytes
    assert "\ufffd" not in s.patches[0].diff + s.patches[1].diff
    res = apply_on(src, s, "bin2", tmp_path)
    assert res.verdict == "clean"
    assert_patched_like(src, res, "lat2", LATIN1_FILES)
    assert git_am_tree(src, "bin2", mbox, tmp_path) == src.tree(src.shas["lat2"])
    assert git_am_tree(src, "bin2", s.as_mbox(), tmp_path) == src.tree(src.shas["lat2"])
    # served again from the cache: the same bytes
    assert fetch_mbox(tmp_path, mbox).patches == s.patches


def as_mua_sends(mbox: bytes, cte: str) -> bytes:
    """The mails as a mail client would send them in iso-8859-1 with this transfer
    encoding: the message transcoded, the diff's bytes (already latin-1) as they are."""
    out = []
    for mail in re.split(rb"(?m)^(?=From [0-9a-f]{40} )", mbox):
        if not mail:
            continue
        head, _, body = mail.partition(b"\n\n")
        message, sep, diff = body.partition(b"\n---\n")
        body = message.decode("utf-8").encode("iso-8859-1") + sep + diff
        body = quopri.encodestring(body) if cte == "quoted-printable" else base64.encodebytes(body)
        head = re.sub(rb"(?m)^(MIME-Version|Content-Type|Content-Transfer-Encoding): .*\n?", b"", head)
        head = head.rstrip(b"\n") + (b"\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
                 b"Content-Transfer-Encoding: " + cte.encode())
        out.append(head + b"\n\n" + body)
    return b"".join(out)


@pytest.mark.parametrize("cte", ["quoted-printable", "base64"])
def test_latin1_mail_in_iso8859_1_applies_as_git_am_does(src, tmp_path, cte):
    mbox = as_mua_sends(latin1_mbox(src), cte)
    assert b"Fran\xe7ois" not in mbox and b"charset=iso-8859-1" in mbox
    s = fetch_mbox(tmp_path, mbox)
    assert "Reported-by: Zo\u00eb <zoe@example.org>" in s.patches[0].message
    res = apply_on(src, s, "bin2", tmp_path)
    assert_patched_like(src, res, "lat2", LATIN1_FILES)
    assert git_am_tree(src, "bin2", mbox, tmp_path) == src.tree(src.shas["lat2"])


@pytest.fixture(scope="module")
def latin1_lore(src, tmp_path_factory):
    """An inbox holding the latin-1 series as a quoted-printable iso-8859-1 thread."""
    lo = Lore(tmp_path_factory.mktemp("lore-latin1"))
    lo.init()
    mails = [m for m in re.split(rb"(?m)^From [0-9a-f]{40} .*\n", as_mua_sends(latin1_mbox(src), "quoted-printable")) if m]
    for raw in mails:
        lo.add_mail(raw)
    lo.msgids["first"] = re.search(rb"(?m)^Message-I[dD]: <(.*)>", mails[0]).group(1).decode()
    lo.server.start()
    try:
        yield lo
    finally:
        lo.server.stop()


def test_msgid_fetch_takes_the_diff_from_the_mail_as_sent(src, latin1_lore, tmp_path):
    opts = FetchOptions(cache_dir=tmp_path / "cache", midmask=latin1_lore.midmask)
    s = fetch_series([MsgidSource(msgid=latin1_lore.msgids["first"])], opts)
    res = apply_on(src, s, "bin2", tmp_path)
    assert_patched_like(src, res, "lat2", LATIN1_FILES)
    offline = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask, offline=True)
    assert fetch_series([MsgidSource(msgid=latin1_lore.msgids["first"])], offline).patches == s.patches
    # without the mails as sent the bytes cannot be kept: an error, never b4's rewrite
    for d in (opts.cache_dir / "series").glob("*/sent"):
        shutil.rmtree(d)
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=latin1_lore.msgids["first"])], offline)
    assert "cannot be kept" in str(ex.value) and "patch 1" in str(ex.value)


def test_conflicting_latin1_patch_reports_its_hunk_as_display_text(src, tmp_path):
    """A rejected hunk quotes the patch's raw bytes: results.json and the reports show
    them as U+FFFD (display text) instead of failing to encode them."""
    s = fetch_mbox(tmp_path, latin1_mbox(src))
    res = apply_on(src, s, "reworded", tmp_path)
    assert [p.status for p in res.patches] == ["conflict", "applied"]
    assert "Ren\udce9" in res.patches[0].conflicts[0].rejected[0]
    shown = rawtext.displayable(res)
    assert "Ren\ufffd Lef\ufffdvre" in shown.patches[0].conflicts[0].rejected[0]
    assert shown.patches[1] == res.patches[1]
    result = RunResult(tool_version="test", name="latin-1", started="now",
                       branches=[BranchResult(name="stable", apply=shown)])
    paths = write_all(result, tmp_path / "out")
    assert "Ren\ufffd" in paths[0].read_text(encoding="utf-8")
    assert rawtext.displayable(shown) is shown         # nothing left to replace


# ------------------------------------------------------------------ titles

def test_template_cover_letter_takes_the_title_from_the_first_patch(src, tmp_path):
    mbox = src.format_patch(f"{src.shas['base']}..{src.shas['bin2']}", "--cover-letter")
    assert b"*** SUBJECT HERE ***" in mbox and b"*** BLURB HERE ***" in mbox
    s = fetch_mbox(tmp_path, mbox)
    assert s.title == "firmware: update the logo, add a table" == s.patches[0].subject
    assert "template" in s.title_note and "patch 1" in s.title_note
    assert len(s.patches) == 2 and "*** BLURB HERE ***" in s.cover

    edited = fetch_mbox(tmp_path, mbox.replace(b"*** SUBJECT HERE ***", b"firmware: logo and table"), "edited.mbox")
    assert edited.title == "firmware: logo and table"
    assert "BLURB HERE" in edited.title_note
    # a title given by the caller needs no note
    named = fetch_series([MboxSource(mbox=str(tmp_path / "series.mbox"))],
                         FetchOptions(cache_dir=tmp_path / "cache"), title="Mine")
    assert named.title == "Mine" and named.title_note is None
    # the note reaches the record and the mail summary
    from kpatchtest.pipeline import series_info
    from kpatchtest.report import summary
    info = series_info(s)
    assert info.title_note == s.title_note
    text = summary.render(RunResult(tool_version="test", name="t", started="now", series=info))
    assert f"Note: {s.title_note}" in text and "kpatchtest: firmware: update the logo, add a table" in text
