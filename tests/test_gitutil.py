"""The git adapter keeps every byte of what it hands git and reads back (see rawtext)."""

from __future__ import annotations

import hashlib
import subprocess

from kpatchtest import rawtext
from kpatchtest.gitutil import Git

RAW = b"/* Copyright (C) 1996 Ren\xe9 Lef\xe8vre */\r\nint a;\n"


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_str_with_raw_bytes_round_trips_through_git(tmp_path):
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "r.git")], check=True)
    git = Git(tmp_path / "r.git")
    text = rawtext.decode(RAW)
    assert "\udce9" in text
    sha = git.out("hash-object", "-w", "--stdin", input=text)
    assert sha == _blob_sha(RAW)                     # the bytes git got are the file's
    assert git.run("cat-file", "blob", sha).stdout == text       # and they come back, CR too
    assert git.run("cat-file", "blob", sha, text=False).stdout == RAW
    # stderr is display text: undecodable bytes shown, not kept
    p = git.run("cat-file", "-t", "Ren\udce9", check=False)
    assert p.returncode != 0 and "Ren\ufffd" in p.stderr


def test_display_shows_raw_bytes_as_replacement_characters():
    assert rawtext.display(rawtext.decode(RAW)) == RAW.decode("utf-8", "replace")
    assert rawtext.display("Zo\u00eb") == "Zo\u00eb"
