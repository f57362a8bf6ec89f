"""The b4 adapter: how kpatchtest runs the real b4 CLI (``b4 am``) and reads what it says.

``b4 am -M -n series -o DIR`` writes a maildir (``-M``: no mbox "From " ambiguity),
``series.maildir``, plus ``series.cover`` into DIR. What b4 prints about attestation
(``-c b4.attestation-checkmarks=plain``: "v"/"x" marks, "Signed:", "BADSIG:", "No key:"
lines) and about failures is parsed here; b4 exits 0 on "No patches found", so what it
wrote and logged decides, never its exit code alone. Each run gets a scratch directory
of its own for everything b4 writes (see `b4_env`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kpatchtest import urls
from kpatchtest.errors import FetchError
from kpatchtest.rawtext import display

ATTESTATION_POLICIES = ("off", "softfail", "hardfail")
B4_TIMEOUT = 300            # seconds for one b4 run (liblore has its own HTTP timeouts)
LORE_MIDMASK = "https://lore.kernel.org/all/%s"   # b4's default
NAME = "series"             # b4 am -n: output is series.maildir + series.cover


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


@dataclass(frozen=True)
class B4:
    """How b4 runs for one fetch: its -c settings, and where its scratch dirs go."""

    scratch: Path                   # each run gets a fresh directory under it, removed afterwards
    attestation: str = "softfail"   # b4.attestation-policy
    midmask: str | None = None      # b4.midmask; None: b4's default (LORE_MIDMASK)
    keyring: Path | None = None     # b4.keyringsrc; None: b4's default

    def am(self, outdir: Path, *args: str, what: str, offline: bool) -> str:
        """``b4 am -M -n series -o OUTDIR ARGS...``: its log (stdout+stderr), or FetchError
        (one line) when it wrote no usable series."""
        cmd = self._base_cmd(offline) + ["am", "-M", "-n", NAME, "-o", str(outdir), *args]
        return _run(cmd, outdir, what, self.scratch)

    def _base_cmd(self, offline: bool) -> list[str]:
        cmd = [find_b4(), "-n", "--no-stdin"]
        if offline:
            cmd.append("--offline-mode")
        cmd += ["-c", "b4.attestation-checkmarks=plain",
                "-c", f"b4.attestation-policy={self.attestation}"]
        if self.midmask:
            cmd += ["-c", f"b4.midmask={self.midmask}"]
        if self.keyring:
            cmd += ["-c", f"b4.keyringsrc={self.keyring}"]
        return cmd


def patch_files(outdir: Path) -> list[Path]:
    """The patch mails b4 wrote into `outdir`, in series order."""
    maildir = outdir / f"{NAME}.maildir"
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file())


def cover_file(outdir: Path) -> Path:
    """Where b4 writes the cover letter (absent when the series has none)."""
    return outdir / f"{NAME}.cover"


def b4_env(scratch: Path) -> dict[str, str]:
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


def _run(cmd: list[str], outdir: Path, what: str, scratch_parent: Path) -> str:
    """Run b4 in a non-git cwd, its files in a scratch dir under `scratch_parent` (removed
    afterwards); return its log (stdout+stderr)."""
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="run-", dir=scratch_parent) as scratch:
        env = b4_env(Path(scratch))
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
    check_result(p.returncode, log, outdir, what)
    return log


_ATT_RE = r"(Signed|BADSIG|No key): (.*)"


def b4_error(log: str) -> str | None:
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
        # the exception line: the last one that is not traceback framing (a log may hold two)
        ends = [ln.strip() for ln in tb.splitlines()
                if ln.strip() and not ln.startswith(" ") and "Traceback" not in ln and ln.strip() != ":"]
        return f"b4 crashed on it ({ends[-1]})" if ends else "b4 crashed on it"
    for w in ("ERROR", "CRITICAL", "Error", "error"):
        for ln in lines:
            if w in ln:
                return ln
    return None


def check_result(rc: int, log: str, outdir: Path, what: str) -> None:
    """Turn what b4 said and wrote into one FetchError line, or return if it is usable.

    b4 exits 0 on "No patches found" and on a missing revision: never trust the exit
    code alone, look at what it wrote.
    """
    log = display(log)      # undecodable bytes as U+FFFD: whatever we quote from it can be printed
    maildir = outdir / f"{NAME}.maildir"
    wrote = (maildir / "new").is_dir() and any((maildir / "new").iterdir())
    complaint = b4_error(log) or ""

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
        raise FetchError(f"{what}: cannot reach the lore mirror {urls.find_origin(detail) or ''}"
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


def parse_attestation(log: str, policy: str) -> list[tuple[str, str, str]]:
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


def summary(log: str, policy: str) -> dict:
    """What a cache entry keeps of b4's log: the thread's link, the patch count b4
    announced, the attestation per patch, and the log's tail for a reader."""
    link = re.search(r"^ Link: (\S+)", log, re.M)
    total = re.search(r"^Total patches: ([0-9]{1,9})$", log, re.M)
    return {
        "attestation_policy": policy,
        "link": link.group(1) if link else None,
        "total": int(total.group(1)) if total else None,
        "attestation": [list(x) for x in parse_attestation(log, policy)],
        "b4_log": log[-20000:],
    }
