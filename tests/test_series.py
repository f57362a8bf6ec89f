"""The fetch stage against a real public-inbox on loopback and the real b4 CLI."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from kpatchtest.errors import FetchError
from kpatchtest.fetch import cache, mail
from kpatchtest.fetch.sources import CommitsSource, MboxSource, MsgidSource
from kpatchtest.fetch.stage import FetchOptions, fetch_series


@pytest.fixture
def opts(lore, tmp_path) -> FetchOptions:
    return FetchOptions(cache_dir=tmp_path / "cache", midmask=lore.midmask)


def cache_entries(opts: FetchOptions) -> list[str]:
    root = Path(opts.cache_dir) / "series"
    return sorted(os.listdir(root)) if root.exists() else []


def assert_nothing_cached(opts: FetchOptions) -> None:
    assert cache_entries(opts) == []


def one_line(ex: pytest.ExceptionInfo) -> str:
    text = str(ex.value)
    assert "\n" not in text and text.strip() == text and text
    return text


# ------------------------------------------------------------------ msgid

def test_msgid_fetches_newest_version_with_collected_trailers(lore, lore_repo, opts):
    s = fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], opts)
    assert s.version == 2
    assert s.title == lore.series_title
    assert s.sources == (f"msgid:{lore.msgids['v1_cover']}",)
    assert [p.index for p in s.patches] == [1, 2, 3]
    assert [p.msgid for p in s.patches] == [lore.msgids[f"v2_{i}"] for i in (1, 2, 3)]
    assert s.patches[0].subject == "KVM: x86/mmu: Assert that the TDP MMU root is invalid when it is freed"
    p2 = s.patches[1]
    assert p2.author == "Sean Christopherson <seanjc@example.org>"
    assert "Reviewed-by: Paolo Bonzini <pbonzini@example.org>" in p2.message
    assert "Reviewed-by" not in s.patches[0].message
    for p in s.patches:
        assert "Link: " in p.message and p.msgid in p.message
        assert "Signed-off-by: Sean Christopherson <seanjc@example.org>" in p.message
        assert p.diff.startswith("diff --git a/arch/x86/kvm/mmu/tdp_mmu.c b/arch/x86/kvm/mmu/tdp_mmu.c\n")
        assert "\n-- \n" not in p.diff and not p.diff.rstrip().endswith("2.39.5")
        assert p.diff.endswith("\n") and "insertion" not in p.diff      # no diffstat
        assert "---" not in p.message.splitlines() and "diff --git" not in p.message
        assert p.attestation == "none" and "no signature" in p.attestation_detail
        assert p.date.endswith("+0000")
    assert "+\t\t    is_tdp_mmu_root_valid(root) &&\n" in p2.diff
    # the diff applies as git would commit it: identical to the v2 commit in the repo
    want = lore_repo.git("show", "--format=", lore_repo.v2[1])
    assert p2.diff.split("\n", 1)[1] == want.split("\n", 1)[1]
    assert s.link and lore.msgids["v2_cover"] in s.link
    assert s.msgids[0] == lore.msgids["v2_cover"]
    # cached for offline use
    assert len(cache_entries(opts)) == 1


def test_msgid_version_1_and_cover_base_commit(lore, lore_repo, opts):
    s = fetch_series([MsgidSource(msgid=lore.msgids["v2_2"], version=1)], opts)
    assert s.version == 1
    assert [p.msgid for p in s.patches] == [lore.msgids[f"v1_{i}"] for i in (1, 2, 3)]
    assert all("Reviewed-by" not in p.message for p in s.patches)
    assert "!root->role.invalid &&" in s.patches[1].diff
    assert s.base_commit == lore_repo.prereq
    assert s.prerequisite_patch_ids == ()
    assert "Fix a performance problem with SMM-heavy guests." in s.cover
    assert f"base-commit: {lore_repo.prereq}" in s.cover
    assert not s.cover.rstrip().endswith("2.39.5")
    assert s.title == lore.series_title and s.title_note is None     # a written cover letter


def test_v2_cover_base_commit_and_prerequisite(lore, lore_repo, opts):
    s = fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], opts, title="My title")
    assert s.title == "My title"
    assert s.version == 2
    assert s.base_commit == lore_repo.base
    pid = subprocess.run(["git", "patch-id", "--stable"], input=lore_repo.git(
        "show", lore_repo.prereq).encode(), capture_output=True, check=True).stdout.split()[0].decode()
    assert s.prerequisite_patch_ids == (pid,)
    assert "v2: use is_tdp_mmu_root_valid() (Paolo)" in s.cover


# ------------------------------------------------------------------ mbox / commits

def test_mbox_of_the_thread_equals_msgid_fetch(lore, opts, tmp_path):
    via_msgid = fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], opts)
    mbox = tmp_path / "thread.mbox"
    mbox.write_bytes(lore.thread_mbox(lore.msgids["v1_cover"]))
    via_mbox = fetch_series([MboxSource(mbox=str(mbox))], opts)
    assert via_mbox.version == 2
    assert [p.subject for p in via_mbox.patches] == [p.subject for p in via_msgid.patches]
    assert [p.diff for p in via_mbox.patches] == [p.diff for p in via_msgid.patches]
    assert [p.message for p in via_mbox.patches] == [p.message for p in via_msgid.patches]
    assert via_mbox.patches == via_msgid.patches
    assert via_mbox.base_commit == via_msgid.base_commit
    assert via_mbox.cover == via_msgid.cover
    assert via_mbox.sources == (f"mbox:{mbox}",)


def test_commits_set_upstream_commit(lore, lore_repo, opts):
    via_msgid = fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], opts)
    s = fetch_series([CommitsSource(commits="prereq..v2", repo=str(lore_repo.path))], opts)
    assert [p.upstream_commit for p in s.patches] == lore_repo.v2
    assert [p.diff for p in s.patches] == [p.diff for p in via_msgid.patches]
    assert [p.subject for p in s.patches] == [p.subject for p in via_msgid.patches]
    assert s.base_commit == lore_repo.prereq
    assert all(p.msgid is None and "Link:" not in p.message for p in s.patches)
    assert all(p.message.startswith("Don't reuse") or p.index != 2 for p in s.patches)
    # a single commit, too
    one = fetch_series([CommitsSource(commits=lore_repo.v1[2], repo=str(lore_repo.path))], opts)
    assert [p.upstream_commit for p in one.patches] == [lore_repo.v1[2]]


def test_sources_concatenate_and_renumber(lore, lore_repo, opts):
    s = fetch_series([CommitsSource(commits=f"{lore_repo.base}..prereq", repo=str(lore_repo.path)),
                      MsgidSource(msgid=lore.msgids["v2_cover"])], opts)
    assert [p.index for p in s.patches] == [1, 2, 3, 4]
    assert s.patches[0].subject == "KVM: x86/mmu: Add is_tdp_mmu_root_valid() helper"
    assert s.patches[0].upstream_commit == lore_repo.prereq
    assert s.patches[3].msgid == lore.msgids["v2_3"]
    assert s.version == 2


# ------------------------------------------------------------------ cache / offline

def test_offline_serves_from_cache_with_server_stopped(lore, tmp_path):
    with lore.serve() as srv:
        opts = FetchOptions(cache_dir=tmp_path / "cache", midmask=srv.midmask)
        online = fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], opts)
    # the server is gone: online now fails, offline serves the cache
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], opts)
    assert "cannot reach" in one_line(ex)
    offline = FetchOptions(cache_dir=opts.cache_dir, midmask=srv.midmask, offline=True)
    cached = fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"])], offline)
    assert cached == online
    # a different requested version is a different cache entry
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v1_cover"], version=1)], offline)
    assert "without --offline" in one_line(ex)


def test_offline_without_cache_fails(lore, opts):
    off = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask, offline=True)
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], off)
    assert "without --offline" in one_line(ex) and ex.value.exit_code == 2
    assert_nothing_cached(off)


def test_online_refetch_replaces_cache_entry(lore, opts):
    a = fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], opts)
    b = fetch_series([MsgidSource(msgid=f"<{lore.msgids['v2_cover']}>")], opts)
    assert a == _with_sources(b, a.sources)
    assert len(cache_entries(opts)) == 1


def test_cache_keys_and_entries_keep_their_format(lore, opts):
    """A changed key or entry format turns every cached series into a miss, and an
    --offline run then fails: these are the keys earlier versions wrote (change them
    only together with CACHE_FORMAT)."""
    mid = "20230426220323.3079789-1-seanjc@google.com"
    assert cache.key("msgid", mid, None, "softfail", None) == \
        "msgid-20230426220323.3079789-1-seanjc_google.com-vlatest-41a2750f331c3233"
    assert cache.key("msgid", mid, 2, "off", Path("/k")) == \
        "msgid-20230426220323.3079789-1-seanjc_google.com-v2-421b7c6ea9b181c1"
    assert cache.key("mbox", "0" * 64, None, "hardfail", Path("/k")) == "mbox-0000000000000000-vlatest-ac1c7cd03cdddada"
    # softfail and hardfail fetch the same mails; the policy is applied on reading
    assert cache.key("mbox", "0" * 64, None, "softfail", Path("/k")) == cache.key("mbox", "0" * 64, None, "hardfail", Path("/k"))

    fetch_series([MsgidSource(msgid=f"https://lore.kernel.org/all/{lore.msgids['v2_cover']}/T/")], opts)
    [entry] = cache_entries(opts)
    assert entry == cache.key("msgid", lore.msgids["v2_cover"], None, opts.attestation, None)
    meta = json.loads((Path(opts.cache_dir) / "series" / entry / "meta.json").read_text())
    assert meta["format"] == cache.CACHE_FORMAT == 2 and meta["msgid"] == lore.msgids["v2_cover"]
    assert {"attestation", "attestation_policy", "b4_log", "link", "total", "kind", "midmask"} <= set(meta)
    fetched = datetime.fromisoformat(meta["fetched_at"])
    assert fetched.tzinfo == timezone.utc and abs(datetime.now(timezone.utc) - fetched) < timedelta(minutes=5)


def test_msgid_spellings():
    """A message-id as people paste it: bare, <...>, id:, a lore URL (any case of scheme)."""
    for raw in ("x.1@y.org", " <x.1@y.org> ", "id:x.1@y.org", "https://lore.kernel.org/all/x.1@y.org/",
                "HTTP://127.0.0.1:8080/INBOX/x.1%40y.org/T/#u", "https://lore.kernel.org/r/x.1@y.org/raw"):
        assert mail.clean_msgid(raw) == "x.1@y.org", raw
    assert mail.clean_msgid("ftp://host/x.1@y.org") == "ftp://host/x.1@y.org"    # not a web link: as given


def _with_sources(s, sources):
    from dataclasses import replace
    return replace(s, sources=sources)


# ------------------------------------------------------------------ errors

def test_unknown_msgid(lore, opts):
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid="no-such-thread@example.org")], opts)
    assert "not found" in one_line(ex) and "404" in str(ex.value)
    assert_nothing_cached(opts)


def test_mirror_down(lore, tmp_path):
    opts = FetchOptions(cache_dir=tmp_path / "c", midmask=lore.dead_midmask())
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], opts)
    assert "cannot reach the lore mirror http://127.0.0.1:" in one_line(ex)
    assert "connection refused" in str(ex.value)
    assert_nothing_cached(opts)


def test_version_not_in_thread(lore, opts):
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"], version=5)], opts)
    assert "version 5 is not in the thread" in one_line(ex)
    assert_nothing_cached(opts)


def test_thread_without_patches(lore, opts):
    # b4 says "No patches found." and exits 0
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["chat"])], opts)
    assert "no patches" in one_line(ex)
    assert_nothing_cached(opts)


def test_mbox_errors(lore, opts, tmp_path):
    cases = {
        "missing": (None, "does not exist"),
        "empty": (b"", "empty"),
        "garbage": (os.urandom(4096), "no patch series"),
        "text": (b"just some text\nwith no mail headers at all\n", "no patch series"),
        "chat": (b"From x@y Thu Jan  1 00:00:00 1970\n" + lore.mails["chat"], "no patches"),
    }
    for name, (data, expect) in cases.items():
        path = tmp_path / f"{name}.mbox"
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(FetchError) as ex:
            fetch_series([MboxSource(mbox=str(path))], opts)
        assert expect in one_line(ex), (name, str(ex.value))
        assert str(path) in str(ex.value)
        assert_nothing_cached(opts)


def test_incomplete_series_refused(lore, opts, tmp_path):
    mbox = tmp_path / "partial.mbox"
    mbox.write_bytes(b"".join(b"From x@y Thu Jan  1 00:00:00 1970\n" + lore.mails[k] + b"\n"
                              for k in ("v1_cover", "v1_1", "v1_3")))
    with pytest.raises(FetchError) as ex:
        fetch_series([MboxSource(mbox=str(mbox))], opts)
    assert "incomplete (missing 2/3)" in one_line(ex)
    assert_nothing_cached(opts)


def test_bad_commit_ranges(lore_repo, opts, tmp_path):
    for commits, repo, expect in (
        ("v2..prereq", lore_repo.path, "no commits"),
        ("nosuch..v2", lore_repo.path, "unknown revision"),
        ("prereq..v2", None, "no git repo"),
        ("prereq..v2", tmp_path / "nope", "does not exist"),
    ):
        with pytest.raises(FetchError) as ex:
            fetch_series([CommitsSource(commits=commits, repo=str(repo) if repo else None)], opts)
        assert expect in one_line(ex)
    assert_nothing_cached(opts)


# ------------------------------------------------------------------ attestation

def test_hardfail_refuses_unsigned_series(lore, opts):
    hard = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask, attestation="hardfail")
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], hard)
    assert "3 of 3 patches are not attested" in one_line(ex)
    assert_nothing_cached(hard)
    # a softfail fetch caches it; hardfail offline still refuses the cached copy
    fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], opts)
    with pytest.raises(FetchError):
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])],
                     FetchOptions(cache_dir=opts.cache_dir, offline=True, attestation="hardfail"))


def test_attestation_off(lore, opts):
    off = FetchOptions(cache_dir=opts.cache_dir, midmask=opts.midmask, attestation="off")
    s = fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], off)
    assert all(p.attestation == "none" and "not checked" in p.attestation_detail for p in s.patches)
    with pytest.raises(FetchError) as ex:
        fetch_series([MsgidSource(msgid=lore.msgids["v2_cover"])], FetchOptions(
            cache_dir=opts.cache_dir, midmask=opts.midmask, attestation="sometimes"))
    assert "unknown attestation policy" in one_line(ex)


@pytest.fixture(scope="module")
def patatt_key(tmp_path_factory):
    """An ed25519 patatt key for seanjc@example.org (patatt ships with b4)."""
    import shutil
    import sys
    patatt = Path(sys.executable).parent / "patatt"
    if not patatt.exists() and not shutil.which("patatt"):
        pytest.skip("patatt not installed")
    root = tmp_path_factory.mktemp("patatt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(root), XDG_DATA_HOME=str(root / "data"), GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_GLOBAL=str(root / "gitconfig"))
    subprocess.run(["git", "config", "--global", "user.email", "seanjc@example.org"], env=env, check=True)
    subprocess.run(["git", "config", "--global", "patatt.signingkey", "ed25519:default"], env=env, check=True)
    subprocess.run(["git", "config", "--global", "patatt.selector", "default"], env=env, check=True)
    subprocess.run([str(patatt) if patatt.exists() else "patatt", "genkey", "-n", "default"],
                   env=env, check=True, capture_output=True, cwd=root)

    def sign(raw: bytes) -> bytes:
        # b4 marks signatures more than 30 days away from the mail's Date as bad
        # (attestation-staleness-days): sign "now", as a sender would.
        import email.utils
        import re
        now = email.utils.formatdate(usegmt=True).encode()
        f = root / "msg.eml"
        f.write_bytes(re.sub(rb"(?m)^Date: .*$", b"Date: " + now, raw, count=1))
        subprocess.run([str(patatt) if patatt.exists() else "patatt", "sign", str(f)],
                       env=env, check=True, capture_output=True, cwd=root)
        return f.read_bytes()

    return root / "data" / "patatt" / "public", sign


def test_patatt_signed_series_passes_and_tampered_fails(lore, opts, tmp_path, patatt_key):
    keyring, sign = patatt_key
    keys = ("v2_cover", "v2_1", "v2_2", "v2_3")
    signed = {k: sign(lore.mails[k]) for k in keys}
    mbox = tmp_path / "signed.mbox"
    mbox.write_bytes(b"".join(b"From x@y Thu Jan  1 00:00:00 1970\n" + signed[k] + b"\n" for k in keys))
    hard = FetchOptions(cache_dir=opts.cache_dir, attestation="hardfail", keyring=keyring)
    s = fetch_series([MboxSource(mbox=str(mbox))], hard)
    assert [p.attestation for p in s.patches] == ["pass"] * 3
    assert all(p.attestation_detail == "Signed: ed25519/seanjc@example.org" for p in s.patches)

    tampered = tmp_path / "tampered.mbox"
    tampered.write_bytes(mbox.read_bytes().replace(b"drops its reference.  Use", b"drops its reference. Use"))
    soft = FetchOptions(cache_dir=opts.cache_dir, keyring=keyring)
    t = fetch_series([MboxSource(mbox=str(tampered))], soft)
    assert [p.attestation for p in t.patches] == ["pass", "fail", "pass"]
    assert t.patches[1].attestation_detail == "BADSIG: ed25519/seanjc@example.org"
    before = cache_entries(opts)
    with pytest.raises(FetchError) as ex:
        fetch_series([MboxSource(mbox=str(tampered))],
                     FetchOptions(cache_dir=tmp_path / "other", attestation="hardfail", keyring=keyring))
    assert "BADSIG" in one_line(ex)
    assert cache_entries(FetchOptions(cache_dir=tmp_path / "other")) == []
    assert cache_entries(opts) == before


def test_plain_format_patch_mbox_without_message_ids(lore_repo, opts, tmp_path):
    """`git format-patch --stdout` without --thread writes no Message-Id; b4 needs them."""
    mbox = tmp_path / "plain.mbox"
    mbox.write_text(lore_repo.git("format-patch", "--stdout", f"{lore_repo.v2[0]}~1..{lore_repo.v2[-1]}"))
    assert "Message-Id" not in mbox.read_text()
    s = fetch_series([MboxSource(mbox=str(mbox))], opts)
    subjects = [lore_repo.git("log", "-1", "--format=%s", c).strip() for c in lore_repo.v2]
    assert [p.subject for p in s.patches] == subjects
    assert all(p.msgid and p.msgid.startswith("kpatchtest-") for p in s.patches)
