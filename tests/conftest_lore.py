"""A real public-inbox ("lore") on 127.0.0.1, filled with real format-patch threads.

Fixtures (import with ``from tests.conftest_lore import *`` in tests/conftest.py, or
``pytest_plugins = ["tests.conftest_lore"]``):

- ``lore_repo`` (session): a small git repo with a KVM TDP MMU series, see ``LoreRepo``.
- ``lore`` (session): the inbox, served by public-inbox-httpd, see ``Lore``. It holds
  the v1 and v2 threads of the series (v2 sent in reply to the v1 cover letter, as on
  lore), a Reviewed-by reply to v2 patch 2, and a plain discussion mail without patches.
  Message-ids are fixed: ``lore.msgids["v1_cover"]``, ``"v1_1"``..``"v1_3"``,
  ``"v2_cover"``, ``"v2_1"``..``"v2_3"``, ``"v2_review"``, ``"chat"``.

No internet is needed: everything runs on loopback with Debian's public-inbox.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Lore", "LoreRepo", "LoreServer", "lore", "lore_repo", "LORE_ADDRESS"]

LORE_NAME = "kvm"
LORE_ADDRESS = "kvm@vger.example.org"
AUTHOR = ("Sean Christopherson", "seanjc@example.org")
REVIEWER = ("Paolo Bonzini", "pbonzini@example.org")

V1_MSGID = "20230413231251.1481410-{i}-seanjc@example.org"
V2_MSGID = "20230426220323.3079789-{i}-seanjc@example.org"
REVIEW_MSGID = "a6b2c1d0-review-v2-2@example.org"
CHAT_MSGID = "chat-20230501.42@example.org"

SERIES_TITLE = "KVM: x86: Preserve TDP MMU roots until they are explicitly invalidated"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} not installed (Debian package public-inbox)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the repo

_TDP_MMU_C = """\
// SPDX-License-Identifier: GPL-2.0

#include "mmu.h"
#include "mmu_internal.h"
#include "tdp_iter.h"
#include "tdp_mmu.h"
#include "spte.h"

#include <asm/cmpxchg.h>
#include <trace/events/kvm.h>

static bool __read_mostly tdp_mmu_enabled = true;
module_param_named(tdp_mmu, tdp_mmu_enabled, bool, 0444);

void kvm_mmu_init_tdp_mmu(struct kvm *kvm)
{
	INIT_LIST_HEAD(&kvm->arch.tdp_mmu_roots);
	spin_lock_init(&kvm->arch.tdp_mmu_pages_lock);
}

void kvm_tdp_mmu_put_root(struct kvm *kvm, struct kvm_mmu_page *root,
			  bool shared)
{
	kvm_lockdep_assert_mmu_lock_held(kvm, shared);

	if (!refcount_dec_and_test(&root->tdp_mmu_root_count))
		return;

	spin_lock(&kvm->arch.tdp_mmu_pages_lock);
	list_del_rcu(&root->link);
	spin_unlock(&kvm->arch.tdp_mmu_pages_lock);
	call_rcu(&root->rcu_head, tdp_mmu_free_sp_rcu_callback);
}

hpa_t kvm_tdp_mmu_get_vcpu_root_hpa(struct kvm_vcpu *vcpu)
{
	union kvm_mmu_page_role role = vcpu->arch.mmu->root_role;
	struct kvm *kvm = vcpu->kvm;
	struct kvm_mmu_page *root;

	lockdep_assert_held_write(&kvm->mmu_lock);

	for_each_tdp_mmu_root(kvm, root, kvm_mmu_role_as_id(role)) {
		if (root->role.word == role.word &&
		    kvm_tdp_mmu_get_root(root))
			goto out;
	}

	root = tdp_mmu_alloc_sp(vcpu);
	tdp_mmu_init_sp(root, NULL, 0, role);

	refcount_set(&root->tdp_mmu_root_count, 1);

	spin_lock(&kvm->arch.tdp_mmu_pages_lock);
	list_add_rcu(&root->link, &kvm->arch.tdp_mmu_roots);
	spin_unlock(&kvm->arch.tdp_mmu_pages_lock);

out:
	return __pa(root->spt);
}

void kvm_tdp_mmu_invalidate_all_roots(struct kvm *kvm)
{
	struct kvm_mmu_page *root;

	lockdep_assert_held_write(&kvm->mmu_lock);
	list_for_each_entry(root, &kvm->arch.tdp_mmu_roots, link) {
		if (!root->role.invalid &&
		    !WARN_ON_ONCE(!kvm_tdp_mmu_get_root(root))) {
			root->role.invalid = true;
		}
	}
}
"""

_TDP_MMU_H = """\
// SPDX-License-Identifier: GPL-2.0

#ifndef __KVM_X86_MMU_TDP_MMU_H
#define __KVM_X86_MMU_TDP_MMU_H

#include <linux/kvm_host.h>

#include "spte.h"

void kvm_mmu_init_tdp_mmu(struct kvm *kvm);
hpa_t kvm_tdp_mmu_get_vcpu_root_hpa(struct kvm_vcpu *vcpu);

__must_check static inline bool kvm_tdp_mmu_get_root(struct kvm_mmu_page *root)
{
	return refcount_inc_not_zero(&root->tdp_mmu_root_count);
}

void kvm_tdp_mmu_put_root(struct kvm *kvm, struct kvm_mmu_page *root,
			  bool shared);
void kvm_tdp_mmu_invalidate_all_roots(struct kvm *kvm);

#endif /* __KVM_X86_MMU_TDP_MMU_H */
"""

_PREREQ_EDIT = (
    "void kvm_tdp_mmu_invalidate_all_roots(struct kvm *kvm);\n",
    "void kvm_tdp_mmu_invalidate_all_roots(struct kvm *kvm);\n"
    "\nstatic inline bool is_tdp_mmu_root_valid(struct kvm_mmu_page *root)\n"
    "{\n\treturn !root->role.invalid;\n}\n",
)

# (subject, body, [(file, old, new)]) per patch; v2 differs in patch 2.
_P1 = ("KVM: x86/mmu: Assert that the TDP MMU root is invalid when it is freed",
       "Assert that a TDP MMU root is invalid when the last reference is put.\n"
       "Roots are only zapped after they are invalidated, so a valid root\n"
       "being freed means a reference was leaked or dropped twice.",
       [("arch/x86/kvm/mmu/tdp_mmu.c",
         "\tif (!refcount_dec_and_test(&root->tdp_mmu_root_count))\n\t\treturn;\n",
         "\tif (!refcount_dec_and_test(&root->tdp_mmu_root_count))\n\t\treturn;\n\n"
         "\tKVM_BUG_ON(!is_tdp_mmu_page(root) || !root->role.invalid, kvm);\n")])
_P2_V1 = ("KVM: x86/mmu: Skip invalid roots when looking up a vCPU root",
          "Don't reuse an invalid root when loading a new root for a vCPU, the\n"
          "root is about to be zapped and will be freed once the last vCPU\n"
          "drops its reference.",
          [("arch/x86/kvm/mmu/tdp_mmu.c",
            "\t\tif (root->role.word == role.word &&\n",
            "\t\tif (root->role.word == role.word && !root->role.invalid &&\n")])
_P2_V2 = ("KVM: x86/mmu: Skip invalid roots when looking up a vCPU root",
          "Don't reuse an invalid root when loading a new root for a vCPU, the\n"
          "root is about to be zapped and will be freed once the last vCPU\n"
          "drops its reference.  Use the is_tdp_mmu_root_valid() helper so that\n"
          "the check stays in sync with the invalidation path.",
          [("arch/x86/kvm/mmu/tdp_mmu.c",
            "\t\tif (root->role.word == role.word &&\n",
            "\t\tif (root->role.word == role.word &&\n"
            "\t\t    is_tdp_mmu_root_valid(root) &&\n")])
_P3 = ("KVM: x86: Preserve TDP MMU roots until they are explicitly invalidated",
       "Preserve TDP MMU roots until they are explicitly invalidated by gifting\n"
       "the TDP MMU itself a reference to a root when it is allocated.  Keeping\n"
       "a reference in the TDP MMU fixes a flaw where the TDP MMU exhibits\n"
       "terrible performance, and can potentially even soft-hang a vCPU, if a\n"
       "vCPU frequently unloads its roots, e.g. when KVM is emulating SMI+RSM.",
       [("arch/x86/kvm/mmu/tdp_mmu.c",
         "\trefcount_set(&root->tdp_mmu_root_count, 1);\n",
         "\t/*\n\t * TDP MMU roots are kept until they are explicitly invalidated, either\n"
         "\t * by a memslot update or by the destruction of the VM.  Initialize the\n"
         "\t * refcount to two; one reference for the vCPU, and one reference for\n"
         "\t * the TDP MMU itself, which is held until the root is invalidated.\n"
         "\t */\n\trefcount_set(&root->tdp_mmu_root_count, 2);\n")])


@dataclass
class LoreRepo:
    """The git repo the lore threads were made from.

    ``base`` is the initial commit, ``prereq`` a helper commit on top of it (the v2
    series declares it as a prerequisite), ``v1``/``v2`` the three commits of each
    version (branches ``v1`` and ``v2``, both on top of ``prereq``).
    """

    path: Path
    base: str
    prereq: str
    v1: list[str]
    v2: list[str]
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def git(self, *args: str, input: bytes | None = None) -> str:
        p = subprocess.run(["git", "-C", str(self.path), *args], input=input,
                           capture_output=True, env=self.env, check=True)
        return p.stdout.decode()


def _git_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C",
               GIT_AUTHOR_NAME=AUTHOR[0], GIT_AUTHOR_EMAIL=AUTHOR[1],
               GIT_COMMITTER_NAME=AUTHOR[0], GIT_COMMITTER_EMAIL=AUTHOR[1])
    return env


def _commit(repo: LoreRepo, message: str, date: str) -> str:
    env = dict(repo.env, GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    subprocess.run(["git", "-C", str(repo.path), "add", "-A"], env=env, check=True)
    subprocess.run(["git", "-C", str(repo.path), "commit", "-q", "-F", "-"],
                   input=message.encode(), env=env, check=True)
    return repo.git("rev-parse", "HEAD").strip()


def _apply_patch_def(repo: LoreRepo, pdef, date: str) -> str:
    subject, body, edits = pdef
    for rel, old, new in edits:
        f = repo.path / rel
        text = f.read_text()
        assert old in text, (rel, old)
        f.write_text(text.replace(old, new, 1))
    msg = f"{subject}\n\n{body}\n\nSigned-off-by: {AUTHOR[0]} <{AUTHOR[1]}>\n"
    return _commit(repo, msg, date)


def make_lore_repo(root: Path) -> LoreRepo:
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    path = root / "linux"
    env = _git_env(home)
    subprocess.run(["git", "init", "-q", "-b", "master", str(path)], env=env, check=True)
    repo = LoreRepo(path=path, base="", prereq="", v1=[], v2=[], env=env)
    mmu = path / "arch/x86/kvm/mmu"
    mmu.mkdir(parents=True)
    (mmu / "tdp_mmu.c").write_text(_TDP_MMU_C)
    (mmu / "tdp_mmu.h").write_text(_TDP_MMU_H)
    repo.base = _commit(repo, "KVM: x86/mmu: Add the TDP MMU\n", "2023-04-01T10:00:00+00:00")
    h = mmu / "tdp_mmu.h"
    h.write_text(h.read_text().replace(*_PREREQ_EDIT))
    repo.prereq = _commit(
        repo, "KVM: x86/mmu: Add is_tdp_mmu_root_valid() helper\n\n"
        f"Signed-off-by: {AUTHOR[0]} <{AUTHOR[1]}>\n", "2023-04-10T10:00:00+00:00")
    repo.git("tag", "prereq")
    for name, defs, day in (("v1", (_P1, _P2_V1, _P3), "2023-04-13"),
                            ("v2", (_P1, _P2_V2, _P3), "2023-04-26")):
        repo.git("checkout", "-q", "-b", name, repo.prereq)
        shas = [_apply_patch_def(repo, d, f"{day}T23:12:5{i}+00:00") for i, d in enumerate(defs)]
        setattr(repo, name, shas)
    repo.git("checkout", "-q", "master")
    return repo


# ------------------------------------------------------------------ threads as mails

def _split_mail(raw: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = raw.partition(b"\n\n")
    lines = head.split(b"\n")
    if lines and lines[0].startswith(b"From "):
        lines = lines[1:]
    return lines, body


def _drop_headers(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    out: list[bytes] = []
    skipping = False
    for ln in lines:
        if ln[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(ln)
            continue
        skipping = ln.split(b":", 1)[0].strip().lower() in names
        if not skipping:
            out.append(ln)
    return out


def _rethread(raw: bytes, msgid: str, parents: list[str], to: str = LORE_ADDRESS,
              replace: dict[bytes, bytes] | None = None) -> bytes:
    """Give a format-patch mail a fixed Message-Id/In-Reply-To/References and a To:."""
    lines, body = _split_mail(raw)
    lines = _drop_headers(lines, {b"message-id", b"in-reply-to", b"references", b"to", b"cc"})
    extra = [f"To: {to}".encode(), f"Message-Id: <{msgid}>".encode()]
    if parents:
        extra.append(f"In-Reply-To: <{parents[-1]}>".encode())
        extra.append(("References: " + " ".join(f"<{p}>" for p in parents)).encode())
    for old, new in (replace or {}).items():
        body = body.replace(old, new)
        lines = [ln.replace(old, new) for ln in lines]
    return b"\n".join(lines + extra) + b"\n\n" + body


def format_thread(repo: LoreRepo, rng: str, version: int, base: str, msgid_tpl: str,
                  cover_subject: str, blurb: str, in_reply_to: list[str]) -> list[bytes]:
    out_dir = Path(repo.path.parent / f"fp-v{version}")
    shutil.rmtree(out_dir, ignore_errors=True)
    args = ["format-patch", "-q", "--thread", "--cover-letter", f"--base={base}",
            "-o", str(out_dir), rng]
    if version > 1:
        args.insert(1, f"-v{version}")
    repo.git(*args)
    files = sorted(out_dir.iterdir())
    cover = msgid_tpl.format(i=0)
    mails = []
    for i, f in enumerate(files):
        raw = f.read_bytes()
        if i == 0:
            mails.append(_rethread(raw, cover, in_reply_to, replace={
                b"*** SUBJECT HERE ***": cover_subject.encode(),
                b"*** BLURB HERE ***": blurb.encode()}))
        else:
            mails.append(_rethread(raw, msgid_tpl.format(i=i), in_reply_to + [cover]))
    return mails


def review_reply(patch_mail: bytes, msgid: str, parents: list[str]) -> bytes:
    """A reply quoting a patch and giving a Reviewed-by, as a reviewer's MUA sends it."""
    lines, body = _split_mail(patch_mail)
    subject = next(ln for ln in lines if ln.lower().startswith(b"subject:")).decode()
    subject = subject.split(":", 1)[1].strip()
    quoted = "\n".join("> " + ln for ln in body.decode().splitlines()[:12])
    return (
        f"From: {REVIEWER[0]} <{REVIEWER[1]}>\n"
        f"To: {AUTHOR[0]} <{AUTHOR[1]}>\nCc: {LORE_ADDRESS}\n"
        f"Subject: Re: {subject}\n"
        "Date: Thu, 27 Apr 2023 09:15:00 +0200\n"
        f"Message-Id: <{msgid}>\n"
        f"In-Reply-To: <{parents[-1]}>\n"
        f"References: {' '.join(f'<{p}>' for p in parents)}\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
        f"On Wed, Apr 26, 2023, {AUTHOR[0]} wrote:\n{quoted}\n\n"
        "Looks good, the is_tdp_mmu_root_valid() check is the right thing here.\n\n"
        f"Reviewed-by: {REVIEWER[0]} <{REVIEWER[1]}>\n\nPaolo\n"
    ).encode()


def chat_mail(msgid: str) -> bytes:
    return (
        f"From: {REVIEWER[0]} <{REVIEWER[1]}>\nTo: {LORE_ADDRESS}\n"
        "Subject: KVM call agenda for May 2nd\n"
        "Date: Mon, 1 May 2023 08:00:00 +0200\n"
        f"Message-Id: <{msgid}>\n\n"
        "Hi all,\n\nno patches here, just the agenda: TDP MMU root lifetime.\n"
    ).encode()


# ------------------------------------------------------------------ public-inbox

class LoreServer:
    """One public-inbox-httpd process serving the inbox on a loopback port."""

    def __init__(self, lore: "Lore", port: int | None = None):
        self.lore = lore
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = lore.root / f"httpd-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.lore.name}"

    @property
    def midmask(self) -> str:
        return self.url + "/%s"

    def start(self) -> "LoreServer":
        httpd = _need("public-inbox-httpd")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [httpd, "-W0", "-l", f"http://127.0.0.1:{self.port}"],
                env=self.lore.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while not _port_answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"public-inbox-httpd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 10
        while _port_answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> "LoreServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class Lore:
    """A public-inbox v2 inbox named ``name`` with its own HOME and PI_CONFIG."""

    def __init__(self, root: Path, name: str = LORE_NAME, address: str = LORE_ADDRESS):
        self.root = root
        self.name = name
        self.address = address
        self.home = root / "pi-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.pi_config = self.home / "pi-config"
        self.inboxdir = root / "inbox"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        self.env.update(HOME=str(self.home), PI_CONFIG=str(self.pi_config), LC_ALL="C",
                        ORIGINAL_RECIPIENT=address, GIT_CONFIG_NOSYSTEM="1")
        self.series_title = SERIES_TITLE
        self.msgids: dict[str, str] = {}
        self.mails: dict[str, bytes] = {}
        self.server = LoreServer(self)

    # The main server's address (what tests pass as FetchOptions.midmask).
    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def midmask(self) -> str:
        return self.server.midmask

    def init(self) -> None:
        subprocess.run([_need("public-inbox-init"), "-V2", self.name, str(self.inboxdir),
                        self.url, self.address], env=self.env, check=True,
                       capture_output=True)
        subprocess.run(["git", "config", "-f", str(self.pi_config),
                        "publicinboxmda.spamcheck", "none"], env=self.env, check=True)

    def add_mail(self, raw: bytes) -> None:
        """Deliver one mail (bytes of an RFC 2822 message) into the inbox."""
        p = subprocess.run([_need("public-inbox-mda"), "--no-precheck"], input=raw,
                           env=self.env, capture_output=True)
        if p.returncode != 0:
            raise RuntimeError(f"public-inbox-mda failed ({p.returncode}): {p.stderr.decode()}")

    def serve(self, port: int | None = None) -> LoreServer:
        """Another, independent httpd on the same inbox (use as a context manager)."""
        return LoreServer(self, port)

    def dead_midmask(self) -> str:
        """A midmask pointing at a loopback port where nothing listens."""
        return f"http://127.0.0.1:{free_port()}/{self.name}/%s"

    def thread_mbox(self, msgid: str) -> bytes:
        """The whole thread as public-inbox serves it (t.mbox.gz, mboxrd)."""
        url = f"{self.url}/{urllib.parse.quote(msgid, safe='@')}/t.mbox.gz"
        with urllib.request.urlopen(url, timeout=10) as r:
            return gzip.decompress(r.read())


@pytest.fixture(scope="session")
def lore_repo(tmp_path_factory) -> LoreRepo:
    return make_lore_repo(tmp_path_factory.mktemp("lore-repo"))


@pytest.fixture(scope="session")
def lore(tmp_path_factory, lore_repo: LoreRepo):
    lo = Lore(tmp_path_factory.mktemp("lore"))
    lo.init()
    v1 = format_thread(lore_repo, f"{lore_repo.prereq}..v1", 1, lore_repo.prereq, V1_MSGID,
                       SERIES_TITLE, "Fix a performance problem with SMM-heavy guests.", [])
    v1_cover = V1_MSGID.format(i=0)
    v2 = format_thread(lore_repo, f"{lore_repo.prereq}..v2", 2, lore_repo.base, V2_MSGID,
                       SERIES_TITLE,
                       "Fix a performance problem with SMM-heavy guests.\n\n"
                       "v2: use is_tdp_mmu_root_valid() (Paolo)", [v1_cover])
    for ver, tpl, mails in (("v1", V1_MSGID, v1), ("v2", V2_MSGID, v2)):
        for i, raw in enumerate(mails):
            key = f"{ver}_cover" if i == 0 else f"{ver}_{i}"
            lo.msgids[key] = tpl.format(i=i)
            lo.mails[key] = raw
    lo.msgids["v2_review"] = REVIEW_MSGID
    lo.mails["v2_review"] = review_reply(
        lo.mails["v2_2"], REVIEW_MSGID, [v1_cover, lo.msgids["v2_cover"], lo.msgids["v2_2"]])
    lo.msgids["chat"] = CHAT_MSGID
    lo.mails["chat"] = chat_mail(CHAT_MSGID)
    for key, raw in lo.mails.items():
        lo.add_mail(raw)
    lo.server.start()
    try:
        yield lo
    finally:
        lo.server.stop()
