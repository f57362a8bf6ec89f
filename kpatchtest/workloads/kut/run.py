"""kvm-unit-tests on a lab host: build once, deploy, run run_tests.sh, parse every verdict.

What upstream run_tests.sh prints (run_tests.sh + scripts/runtime.bash, checked against
real runs under QEMU TCG; the stand-in in tests/kut_standin reproduces it):

- Default ("plain") output: one line per selected test, in unittests.cfg order, made by
  print_result with an ANSI colour around the verdict word:
    PASS access (1 tests)                        exit 0; "(...)" is the SUMMARY line
    PASS vmexit_cr0_wp                           (trailing space) no SUMMARY line printed
    FAIL hypercall (4 tests, 2 unexpected failures)
    FAIL msr                                     no SUMMARY: guest reset / QEMU exit 1 / abort()
    FAIL debug (timeout; duration=90s)           timeout(1) killed QEMU (exit 124)
    FAIL svm (terminated on SIGSEGV)             QEMU died of a signal (exit > 128)
    SKIP tsc_adjust (1 tests, 1 skipped)         the test skipped itself (exit 77)
    SKIP cmpxchg8b (i386 only)                   run_tests.sh skipped it (arch, accel,
                                                 machine, check, nodefault, missing file)
    SKIP hyperv_synic (qemu-system-x86_64: CPU model 'host' requires KVM or HVF)
                                                 QEMU could not start: the last error line
- With -t (TAP 13): "TAP version 13", then one "ok N - TEST: MSG" / "not ok N - TEST: MSG"
  / "ok N - TEST: MSG # skip" per PASS:/FAIL:/SKIP: line the *test* prints, plus
  "not ok N - TEST: timeout; duration=T", "... terminated on SIGx" or "... aborted"
  (abort(), exit 127), and "1..N" at the end. Everything print_result prints goes to
  /dev/null there: a test that prints no report lines (every vmexit_* test), a QEMU that
  exits 1 or a guest that resets leave no TAP line, and run_tests.sh's own SKIPs vanish.
  So the plain output is the one that has a verdict for every test; run_kut uses it by
  default and reads the per-check lines from the logs, which hold the same PASS:/FAIL:
  lines in both modes. `tap=True` is supported and falls back on the logs.
- logs/<test>.log: the QEMU command line, the guest's serial output (CR LF in plain mode,
  CRs stripped with -t) and QEMU's stderr, then an empty line. Report lines are
  "PASS: ...", "FAIL: ...", "SKIP: ...", "XFAIL: ...", "XPASS: ...", "KFAIL: ..." (prefixes
  pushed with report_prefix_push are part of the message) and the last one is
  "SUMMARY: N tests[, M unexpected failures][, K known failures][, X expected failures]
  [, S skipped]". logs/ is moved to logs.old/ at the start of every run.
- The exit status of run_tests.sh is that of its final `wait`: 0 whatever the tests did
  (1 or 2 only for setup errors: no config.mak, bad option, no logs dir). Never used.
- x86/vmexit.c prints "<name> <TSC cycles per iteration>" for each micro-benchmark it runs
  (vmexit_cr0_wp runs `toggle_cr0_wp`: "toggle_cr0_wp 1592"), "  ipi <name> <n>" /
  "  eoi <name> <n>" extras for IPI tests, "<name> (skipped)" when unsupported.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kpatchtest.errors import KpatchtestError
from kpatchtest.lab.ssh.connection import HostConnection, LabError, RunResult
from kpatchtest.locks import exclusive
from kpatchtest.urls import GIT_PROTOCOL_ENV, is_url, ref_problem, repo_problem
from kpatchtest.workloads.dmesgwatch import DmesgWatch
from kpatchtest.workloads.record import Metric, WorkloadRecord, WorkloadStatus

GROUP = "kvm-unit-tests"
KILL_GRACE_S = 10          # timeout -k: SIGKILL this long after SIGTERM
SSH_SLACK_S = 30           # the SSH command limit is the run's timeout plus this
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TEST_NAME = re.compile(r"[A-Za-z0-9_.+-]+\Z")


class KutError(KpatchtestError):
    """kvm-unit-tests cannot be built or deployed as asked."""


# -- parsing ---------------------------------------------------------------------------

@dataclass
class TestOutcome:
    """One test's verdict as run_tests.sh (or a log) gives it.

    counts: from TAP, "pass"/"fail"/"skip"/"todo" lines; from a SUMMARY line, "tests",
    "failures" (unexpected), "known_failures", "expected_failures", "skipped"; from a log,
    the report lines by kind ("pass", "fail", "skip", "xfail", "xpass", "kfail", "abort").
    """

    __test__ = False    # not a pytest class

    name: str
    status: WorkloadStatus
    detail: str = ""
    counts: dict[str, int] = field(default_factory=dict)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PLAIN = re.compile(r"(PASS|FAIL|SKIP) (\S+)(?: (.*))?\Z")
_TIMEOUT = re.compile(r"timeout; duration=(\S*)\Z")
_SIGNAL = re.compile(r"terminated on (SIG\w+)\Z")
_SUMMARY_BODY = re.compile(r"(\d+) tests((?:, \d+ [a-z ]+)*)\Z")
_SUMMARY_KEYS = {"unexpected failures": "failures", "known failures": "known_failures",
                 "expected failures": "expected_failures", "skipped": "skipped"}
_TAP = re.compile(r"(not ok|ok)\b(?:\s+(\d+))?(?:\s+-)?\s*(.*)\Z")
_TAP_DIRECTIVE = re.compile(r"\s*#\s*(skip|todo)\b:?\s*(.*)\Z", re.IGNORECASE)
_REPORT = re.compile(r"(PASS|FAIL|SKIP|XFAIL|XPASS|KFAIL|ABORT): ?(.*)\Z")
_ABORTED = re.compile(r"Unhandled exception \d+|\S+:\d+: assert failed: ")   # lib: then abort()
_QEMU_MSG = re.compile(r"(?:qemu-system-\S+|qemu-kvm|qemu): (.*)\Z")
_VMEXIT = re.compile(r"(\s*)(?:(ipi|eoi) )?([A-Za-z0-9_.-]+) (?:(\d+)|\(skipped\))\Z")


def _clean(line: str) -> str:
    return _ANSI.sub("", line).replace("\r", "").rstrip("\n")


def parse_summary(text: str) -> dict[str, int]:
    """'4 tests, 2 unexpected failures, 1 skipped' (the SUMMARY line's body) -> counts."""
    m = _SUMMARY_BODY.match(text.strip())
    if not m:
        return {}
    counts = {"tests": int(m[1])}
    for part in filter(None, (p.strip() for p in m[2].split(","))):
        n, _, what = part.partition(" ")
        counts[_SUMMARY_KEYS.get(what, what.replace(" ", "_"))] = int(n)
    return counts


def _reason_status(reason: str) -> WorkloadStatus:
    return "timeout" if _TIMEOUT.match(reason) else "fail"


def parse_plain(text: str) -> list[TestOutcome]:
    """run_tests.sh's default output: one PASS/FAIL/SKIP line per test."""
    outcomes = []
    for raw in text.splitlines():
        m = _PLAIN.match(_clean(raw).strip(" ") if raw.startswith(" ") else _clean(raw))
        if not m:
            continue
        word, name, rest = m[1], m[2], (m[3] or "").strip()
        inner = rest[1:-1] if rest.startswith("(") and rest.endswith(")") else rest
        counts = parse_summary(inner)
        if word == "PASS":
            outcomes.append(TestOutcome(name, "pass", inner, counts))
        elif word == "SKIP":
            outcomes.append(TestOutcome(name, "skip", inner, counts))
        else:
            status = "fail" if counts else _reason_status(inner)
            sig = _SIGNAL.match(inner)
            detail = f"QEMU {inner}" if sig else inner
            outcomes.append(TestOutcome(name, status, detail, counts))
    return outcomes


def parse_tap(text: str) -> list[TestOutcome]:
    """run_tests.sh -t output (TAP 13): per-check lines, folded into one outcome per test.

    A test's name is the description up to the first ": " (run_tests.sh writes
    "TEST: MESSAGE"); plain TAP ("ok 1 - access", "ok 3 - smap # SKIP why") works too.
    Tests without any TAP line do not appear (see the module docstring).
    """
    tests: dict[str, dict[str, object]] = {}

    def entry(name: str) -> dict[str, object]:
        return tests.setdefault(name, {"pass": 0, "fail": 0, "skip": 0, "todo": 0,
                                       "failures": [], "skips": [], "end": None})

    bailed = None
    for raw in text.splitlines():
        line = _clean(raw)
        if line.startswith("Bail out!"):
            bailed = line
            continue
        m = _TAP.match(line)
        if not m:
            continue
        ok = m[1] == "ok"
        desc = m[3]
        directive = None
        d = _TAP_DIRECTIVE.search(desc)
        if d:
            directive, desc = d[1].lower(), desc[: d.start()]
            why = d[2]
        name, sep, msg = desc.partition(": ")
        name = name.strip()
        e = entry(name)
        if directive == "todo":
            e["todo"] += 1                                  # type: ignore[operator]
        elif directive == "skip":
            e["skip"] += 1                                  # type: ignore[operator]
            e["skips"].append(msg or why)                   # type: ignore[attr-defined]
        elif ok:
            e["pass"] += 1                                  # type: ignore[operator]
        else:
            e["fail"] += 1                                  # type: ignore[operator]
            if _TIMEOUT.match(msg) or _SIGNAL.match(msg) or msg == "aborted":
                e["end"] = msg
            else:
                e["failures"].append(msg)                   # type: ignore[attr-defined]

    outcomes = []
    for name, e in tests.items():
        counts = {k: int(e[k]) for k in ("pass", "fail", "skip", "todo")}  # type: ignore[call-overload]
        failures: list[str] = e["failures"]                 # type: ignore[assignment]
        end: str | None = e["end"]                          # type: ignore[assignment]
        if end and _TIMEOUT.match(end):
            status: WorkloadStatus = "timeout"
            detail = _join([end, *failures])
        elif end or failures:
            status = "fail"
            detail = _join([f"QEMU {end}" if end and _SIGNAL.match(end) else end or "", *failures])
        elif counts["skip"] and not counts["pass"]:
            status, detail = "skip", _join(e["skips"])     # type: ignore[arg-type]
        else:
            status, detail = "pass", f"{counts['pass']} checks passed"
            if counts["skip"]:
                detail += f", {counts['skip']} skipped"
        outcomes.append(TestOutcome(name, status, detail, counts))
    if bailed:
        outcomes.append(TestOutcome("TAP", "error", bailed))
    return outcomes


def tap_plan(text: str) -> int | None:
    """N from the TAP plan line "1..N" (None when the run ended before printing it)."""
    for raw in text.splitlines():
        m = re.fullmatch(r"1\.\.(\d+)(?:\s*#.*)?", _clean(raw).strip())
        if m:
            return int(m[1])
    return None


@dataclass
class LogSummary:
    """What one logs/<test>.log says."""

    counts: dict[str, int] = field(default_factory=dict)   # report lines by kind + SUMMARY counts
    summary: dict[str, int] | None = None                  # the SUMMARY line, if any
    failures: list[str] = field(default_factory=list)      # FAIL: messages
    skips: list[str] = field(default_factory=list)         # SKIP: messages
    qemu_errors: list[str] = field(default_factory=list)   # QEMU's own non-warning messages
    aborted: bool = False                                  # "QEMU Aborted" / "ABORT:" / abort()
    command: str = ""                                      # first line: the QEMU command line
    vmexit: dict[str, int | None] = field(default_factory=dict)   # vmexit.c results (see parse_vmexit)


def parse_log(text: str) -> LogSummary:
    """Count the report lines of one logs/<test>.log and read its SUMMARY line."""
    out = LogSummary()
    lines = [_clean(raw) for raw in text.splitlines()]
    if lines:
        out.command = lines[0]
    for line in lines:
        m = _REPORT.match(line)
        if m:
            kind = m[1].lower()
            out.counts[kind] = out.counts.get(kind, 0) + 1
            if kind == "fail":
                out.failures.append(m[2])
            elif kind == "skip":
                out.skips.append(m[2])
            elif kind == "abort":
                out.aborted = True
            continue
        if line.startswith("SUMMARY: "):
            out.summary = parse_summary(line[len("SUMMARY: "):])
            continue
        if line == "QEMU Aborted" or _ABORTED.match(line):
            out.aborted = True
            continue
        q = _QEMU_MSG.match(line)
        if q and not q[1].lower().startswith("warning"):
            out.qemu_errors.append(line)
    if out.summary:
        out.counts.update(out.summary)
    if "vmexit" in out.command:
        out.vmexit = parse_vmexit(text)
    return out


def parse_vmexit(text: str) -> dict[str, int | None]:
    """x86/vmexit.c results: {"toggle_cr0_wp": 1592, "ipi:ipi": 4100, "ipi_halt": None (skipped)}.

    Main lines are "<name> <cycles>"; the IPI extras "  ipi <name> <n>" / "  eoi <name> <n>"
    become "ipi:<name>" / "eoi:<name>"; "<name> (skipped)" gives None.
    """
    results: dict[str, int | None] = {}
    for raw in text.splitlines():
        line = _clean(raw)
        m = _VMEXIT.fullmatch(line)
        if not m or (m[1] and not m[2]) or (m[2] and not m[1]):
            continue
        name = f"{m[2]}:{m[3]}" if m[2] else m[3]
        results[name] = int(m[4]) if m[4] is not None else None
    return results


def _join(parts: Sequence[str], limit: int = 3) -> str:
    parts = [p for p in parts if p]
    text = "; ".join(parts[:limit])
    if len(parts) > limit:
        text += f"; +{len(parts) - limit} more"
    return text


# -- verdicts ---------------------------------------------------------------------------

def _no_summary_reason(log: LogSummary) -> str:
    if log.aborted:
        return "the test called abort()"
    if log.qemu_errors:
        return f"QEMU failed: {log.qemu_errors[-1]}"
    return "no SUMMARY line: the guest reset or QEMU exited without the test's exit code"


def resolve(name: str, verdict: TestOutcome | None, log: LogSummary | None, *, tap: bool) -> TestOutcome:
    """One test's final outcome from run_tests.sh's verdict, cross-checked with its log.

    verdict None: run_tests.sh printed nothing for the test (with -t: no report lines);
    the log then decides as far as it can.
    """
    counts = dict(log.counts) if log else {}
    if verdict is not None:
        counts = {**verdict.counts, **counts}
    if verdict is None:
        if log is None:
            return TestOutcome(name, "skip" if tap else "error",
                               "run_tests.sh skipped it (with -t it does not say why)" if tap
                               else "run_tests.sh printed no result for it", counts)
        return _from_log_only(name, log, counts)

    status, detail = verdict.status, verdict.detail
    if log is None:
        return TestOutcome(name, status, detail, counts)
    unexpected = (log.summary or {}).get("failures", 0)
    if status == "pass":
        if unexpected:
            return TestOutcome(name, "fail", f"run_tests.sh said pass, but the log's SUMMARY has "
                               f"{unexpected} unexpected failures: {_join(log.failures)}", counts)
        if log.failures and not log.summary:
            return TestOutcome(name, "fail", f"run_tests.sh said pass, but the log has FAIL lines: "
                               f"{_join(log.failures)}", counts)
        if tap and log.summary is None and counts.get("pass"):
            # TAP lines only show the checks; the test's own end is not in them
            return TestOutcome(name, "fail", _no_summary_reason(log), counts)
    elif status == "fail":
        parts = [detail]
        if tap:
            if log.summary is None and not _finished(verdict):
                parts.append(_no_summary_reason(log))
        else:
            if not detail and log.summary is None:
                parts.append(_no_summary_reason(log))
            parts.extend(log.failures)
        detail = _join(parts, limit=4)
    elif status == "skip" and not detail and log.skips:
        detail = _join(log.skips)
    return TestOutcome(name, status, detail, counts)


def _from_log_only(name: str, log: LogSummary, counts: dict[str, int]) -> TestOutcome:
    """With -t, a test that printed no PASS/FAIL/SKIP line: judge by its log."""
    if "_NO_FILE_4Uhere_" in log.command:
        # run_tests.sh's probe: QEMU could not start, so it skipped the test (plain: SKIP)
        return TestOutcome(name, "skip", (log.qemu_errors or ["QEMU could not start"])[-1], counts)
    s = log.summary
    if s is not None:
        if s.get("failures"):
            return TestOutcome(name, "fail", _join(log.failures) or f"{s['failures']} unexpected failures", counts)
        if s.get("tests", 0) and s.get("skipped", 0) == s.get("tests"):
            return TestOutcome(name, "skip", _join(log.skips), counts)
        return TestOutcome(name, "pass", f"{s.get('tests', 0)} tests", counts)
    if log.aborted or log.qemu_errors:
        return TestOutcome(name, "fail", _no_summary_reason(log), counts)
    if log.vmexit and all(v is not None for v in log.vmexit.values()):
        return TestOutcome(name, "pass", "inferred from the log: the benchmark printed its results "
                           "(run_tests.sh -t prints no verdict for it)", counts)
    return TestOutcome(name, "error", "no verdict: run_tests.sh -t prints none for a test without "
                       "report lines; run without TAP", counts)


def vmexit_metrics(log: LogSummary | None, note: str = "") -> list[Metric]:
    """The cycle counts of a vmexit_* test as metrics (None when it printed none)."""
    results = log.vmexit if log else {}
    main = {k: v for k, v in results.items() if ":" not in k}
    metrics = []
    if not main:
        return [Metric(name="cycles", unit="cycles", values=[None], available=False,
                       note=note or "vmexit printed no result")]
    for name, value in main.items():
        mname = "cycles" if len(main) == 1 else f"cycles:{name}"
        metrics.append(Metric(name=mname, unit="cycles", values=[float(value) if value is not None else None],
                              available=value is not None,
                              note=f"x86/vmexit.c {name}: TSC cycles per iteration"
                                   + ("" if value is not None else " (skipped: unsupported here)")))
    for name, value in results.items():
        if ":" in name:
            kind, test = name.split(":", 1)
            metrics.append(Metric(name=f"{kind}_cycles" if len(main) == 1 else f"{kind}_cycles:{test}",
                                  unit="cycles", values=[float(value) if value is not None else None],
                                  available=value is not None, note=f"x86/vmexit.c {test}: {kind} cycles"))
    return metrics


# -- running -----------------------------------------------------------------------------

# coreutils timeout where there is one: it signals its whole process group, so QEMU and
# the rest of run_tests.sh's children go too. Busybox's only signals run_tests.sh and
# leaves the tests running (and busybox sh runs its own applet for a bare `timeout`,
# whatever PATH says: hence the explicit paths).
_RUN_SCRIPT = r'''
cd "$1" || exit 97
t=$2
shift 2
to=timeout
for c in /usr/bin/timeout /bin/timeout; do
    if [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then to=$c; break; fi
done
echo "kpatchtest-start $(date +%s)" >&2
exec "$to" -k "$KPT_KILL" "$t" "$@"
'''

# logs/*.log, each cut to its first and last max/2 bytes when larger than max (a test that
# fails in a loop can write 100 MB; the SUMMARY line is at the end), as base64 of a tar.gz
# (RunResult.stdout is text). mtimes are kept: they date each test's end.
_LOGS_SCRIPT = r'''
cd "$1" || exit 97
[ -d logs ] || exit 98
max=$2
tmp=$(mktemp -d) || exit 99
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/logs"
for f in logs/*.log; do
    [ -f "$f" ] || continue
    size=$(wc -c < "$f")
    if [ "$size" -gt "$max" ]; then
        { head -c $((max / 2)) "$f"
          printf '\n[... kpatchtest cut %s bytes of %s ...]\n' $((size - max)) "$size"
          tail -c $((max / 2)) "$f"; } > "$tmp/$f"
        touch -r "$f" "$tmp/$f"
    else
        cp -p "$f" "$tmp/$f"
    fi
done
tar -C "$tmp" -czf - logs | base64
'''
LOG_MAX_BYTES = 4 << 20


@dataclass
class _Invocation:
    label: str
    selectors: list[str]            # ["-g", group] or test names or []
    expected: list[str] | None      # tests it should report on, if known


def _list_tests(conn: HostConnection, remote_dir: str, env: dict[str, str], group: str | None,
                timeout: float) -> list[str] | None:
    """`run_tests.sh -l [-g group]` (kvm-unit-tests since 2023); None when unsupported."""
    argv = ["./run_tests.sh", "-l", *(["-g", group] if group else [])]
    try:
        r = conn.run_script('cd "$1" && shift && exec "$@"', remote_dir, *argv,
                            env=env or None, check=False, timeout=timeout)
    except LabError:
        return None
    names = r.stdout.split()
    if r.exit_code != 0 or not all(_TEST_NAME.match(n) for n in names):
        return None
    return names


def _fetch_logs(conn: HostConnection, remote_dir: str, dest: Path, timeout: float,
                keep: set[str]) -> tuple[dict[str, float], str]:
    """Copy logs/*.log into dest (names in `keep` are not overwritten); -> ({test: mtime}, note)."""
    try:
        r = conn.run_script(_LOGS_SCRIPT, remote_dir, str(LOG_MAX_BYTES), check=False, timeout=timeout)
    except LabError as e:
        return {}, f"logs not fetched: {e.message}"
    if r.exit_code != 0:
        return {}, "no logs directory" if r.exit_code == 98 else f"logs not fetched: exit {r.exit_code} {r.stderr.strip()[-200:]}"
    mtimes: dict[str, float] = {}
    try:
        data = base64.b64decode("".join(r.stdout.split()))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if not member.isfile() or posixpath.dirname(member.name) != "logs" or not base.endswith(".log"):
                    continue
                test = base[:-4]
                if not _TEST_NAME.match(test):
                    continue
                mtimes[test] = float(member.mtime)
                if test in keep:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    (dest / base).write_bytes(f.read())
    except (ValueError, tarfile.TarError, OSError, EOFError) as e:
        return mtimes, f"logs not fetched: bad archive ({e})"
    return mtimes, ""


def _durations(order: list[str], mtimes: dict[str, float], start: float | None) -> dict[str, float]:
    """Approximate per-test durations: tests run one after another, each log is last
    written when its test ends (1-second resolution)."""
    out: dict[str, float] = {}
    prev = start
    for name in sorted((n for n in order if n in mtimes), key=lambda n: mtimes[n]):
        if prev is not None:
            out[name] = max(0.0, mtimes[name] - prev)
        prev = mtimes[name]
    return out


def _finished(verdict: TestOutcome | None) -> bool:
    """With -t: did the test's TAP lines include run_tests.sh's own end line?"""
    return verdict is not None and (verdict.status == "timeout" or verdict.detail.startswith(
        ("QEMU terminated on", "aborted")))


def run_kut(conn: HostConnection, remote_dir: str, tests: list[str], groups: list[str],
            env: dict[str, str], timeout_s: float, local_log_dir: Path, *,
            tap: bool = False, run_dir: Path | None = None,
            dmesg_argv: Sequence[str] = ("dmesg",),
            log: Callable[[str], None] | None = None) -> list[WorkloadRecord]:
    """Run kvm-unit-tests deployed at remote_dir on the host; one WorkloadRecord per test.

    - tests and groups select as a union: one run_tests.sh per group (`-g` takes one
      group) and one for the named tests; nothing selected runs the default set.
    - env (ACCEL, QEMU, TIMEOUT, MACHINE, ...) is passed with `env`; the whole call gets
      timeout_s: run_tests.sh is stopped with timeout(1) on the host, and tests that had
      not finished are "timeout" records.
    - Verdicts come from the plain output (tap=False, the default: it has one for every
      test) or from TAP (tap=True), cross-checked with logs/<test>.log, which are copied
      to local_log_dir. The exit status of run_tests.sh is never trusted.
    - dmesg (dmesg_argv) is read before and after each run_tests.sh; a new kernel splat
      turns that run's passing records into "fail" and is named in every record's detail.
    - Record logs are paths relative to run_dir (default: local_log_dir's parent).
    """
    say = log or (lambda line: None)
    for k in env:
        if not _ENV_NAME.match(k):
            raise ValueError(f"bad environment variable name {k!r}")
    for t in tests:
        if not _TEST_NAME.match(t):
            raise ValueError(f"bad kvm-unit-tests test name {t!r}")
    local_log_dir.mkdir(parents=True, exist_ok=True)
    base = run_dir if run_dir is not None else local_log_dir.parent

    def rel(p: Path) -> str:
        return os.path.relpath(p, base)

    deadline = time.monotonic() + timeout_s
    short = conn.host.timeouts.command_s
    invocations: list[_Invocation] = []
    for g in groups:
        invocations.append(_Invocation(f"group {g}", ["-g", g], None))
    if tests:
        invocations.append(_Invocation("tests", list(tests), list(tests)))
    if not invocations:
        invocations.append(_Invocation("default", [], None))

    records: dict[str, WorkloadRecord] = {}
    for n, inv in enumerate(invocations, 1):
        listed = _list_tests(conn, remote_dir, env, inv.selectors[1] if inv.selectors[:1] == ["-g"] else None,
                             min(short, max(1.0, deadline - time.monotonic())))
        if inv.expected is None:
            inv.expected = listed
        unknown = [t for t in (inv.expected or []) if listed is not None and t not in listed]
        out_file = local_log_dir / ("run_tests.out" if len(invocations) == 1 else f"run_tests-{n}.out")
        left = deadline - time.monotonic()
        if left <= 1:
            for t in inv.expected or [f"run_tests.sh ({inv.label})"]:
                records.setdefault(t, WorkloadRecord(
                    name=t, status="timeout", group=GROUP,
                    detail=f"not started: the {timeout_s:g} s for kvm-unit-tests were used up"))
            continue

        watch = DmesgWatch(conn, tuple(dmesg_argv))
        argv = ["./run_tests.sh", *(["-t"] if tap else []), *inv.selectors]
        say(f"kvm-unit-tests: {' '.join(argv)} in {remote_dir} ({inv.label}, up to {left:.0f} s)")
        started = time.monotonic()
        run_env = {**env, "KPT_KILL": str(KILL_GRACE_S)}
        result: RunResult | None = None
        failure = ""
        whole_timeout = False
        try:
            result = conn.run_script(_RUN_SCRIPT, remote_dir, f"{max(1, int(left))}", *argv, env=run_env,
                                     check=False, timeout=left + KILL_GRACE_S + SSH_SLACK_S)
        except LabError as e:
            failure = e.message
            whole_timeout = "no answer within" in e.message
        elapsed = time.monotonic() - started
        stdout = result.stdout if result else ""
        stderr = result.stderr if result else ""
        remote_start = None
        m = re.search(r"^kpatchtest-start (\d+)$", stderr, re.M)
        if m:
            remote_start = float(m[1])
            stderr = stderr.replace(m[0] + "\n", "", 1)
        out_file.write_text(f"$ {' '.join(argv)}\n{stdout}"
                            + (f"\n--- stderr ---\n{stderr}" if stderr.strip() else "")
                            + (f"\n--- exit {result.exit_code} ---\n" if result else f"\n--- {failure} ---\n"))
        if result is not None and result.exit_code in (124, 137):
            whole_timeout = True

        mtimes, logs_note = ({}, "") if failure and not whole_timeout else \
            _fetch_logs(conn, remote_dir, local_log_dir, max(5.0, short), set(records))
        verdicts = parse_tap(stdout) if tap else parse_plain(stdout)
        by_name: dict[str, TestOutcome] = {}
        for v in verdicts:
            by_name.setdefault(v.name, v)
        order = [v.name for v in verdicts if v.name != "TAP"]
        order += [t for t in sorted(mtimes, key=lambda t: mtimes[t]) if t not in order]
        order += [t for t in (inv.expected or []) if t not in order]
        durations = _durations(order, mtimes, remote_start)
        in_flight = None
        if whole_timeout and mtimes:
            last = max(mtimes.values())
            in_flight = [t for t in order if mtimes.get(t) == last][-1]

        setup_error = ""
        if failure and not whole_timeout:
            setup_error = failure
        elif result is not None and not whole_timeout and not verdicts and not mtimes:
            if result.exit_code == 97:
                setup_error = f"{remote_dir} does not exist on the host"
            elif result.exit_code != 0:
                text = (stdout.strip() or stderr.strip() or "no output").splitlines()[-1]
                setup_error = f"run_tests.sh failed with exit {result.exit_code}: {text}"
            elif inv.expected is None or inv.expected:
                setup_error = "run_tests.sh ran no test: " + (
                    (stdout.strip() or stderr.strip()).splitlines() or ["no output"])[-1]

        new_records: list[WorkloadRecord] = []
        for name in order:
            if name in records:
                continue
            verdict = by_name.get(name)
            log_path = local_log_dir / f"{name}.log"
            has_log = name in mtimes and log_path.exists()
            lsum = parse_log(log_path.read_text(errors="replace")) if has_log else None
            stopped = (f"{failure}" if failure else f"run_tests.sh stopped after {timeout_s:g} s")
            if setup_error:
                outcome = TestOutcome(name, "error", setup_error)
            elif name in unknown:
                outcome = TestOutcome(name, "error", f"no test {name} in unittests.cfg")
            elif whole_timeout and (name == in_flight and not _finished(verdict) if tap
                                    else verdict is None and has_log):
                outcome = TestOutcome(name, "timeout", f"{stopped} while the test was running",
                                      dict(lsum.counts) if lsum else {})
            elif whole_timeout and verdict is None and lsum is None:
                outcome = TestOutcome(name, "timeout", f"{stopped} before the test started")
            else:
                outcome = resolve(name, verdict, lsum, tap=tap)
            logs = [rel(log_path)] if has_log else []
            logs.append(rel(out_file))
            metrics: list[Metric] = []
            if name.startswith("vmexit") or (lsum is not None and lsum.vmexit):
                metrics = vmexit_metrics(lsum, note=f"test {outcome.status}: {outcome.detail}"
                                         if outcome.status != "pass" else "")
            new_records.append(WorkloadRecord(
                name=name, status=outcome.status, detail=outcome.detail, metrics=metrics, logs=logs,
                duration_s=round(durations.get(name, 0.0), 3), group=GROUP))
        if not new_records and (setup_error or whole_timeout):
            new_records.append(WorkloadRecord(
                name=f"run_tests.sh ({inv.label})", status="error" if setup_error else "timeout",
                detail=setup_error or f"run_tests.sh stopped after {timeout_s:g} s before any test ended",
                logs=[rel(out_file)], duration_s=round(elapsed, 3), group=GROUP))

        notes = [x for x in (logs_note if logs_note != "no logs directory" or setup_error else "",) if x]
        dm_file = local_log_dir / ("dmesg-new.txt" if len(invocations) == 1 else f"dmesg-new-{n}.txt")
        splat = watch.check(dm_file)
        if splat:
            say(f"kvm-unit-tests: {splat}")
            for r in new_records:
                if r.status == "skip":
                    continue
                if r.status == "pass":
                    r.status = "fail"
                r.detail = _join([splat, r.detail], limit=2)
                r.logs.append(rel(dm_file))
        if watch.note:
            notes.append(watch.note)
        for r in new_records:
            if notes:
                r.detail = _join([r.detail, *notes], limit=4)
            records[r.name] = r
        say(f"kvm-unit-tests ({inv.label}): " + ", ".join(
            f"{s} {sum(1 for r in new_records if r.status == s)}"
            for s in ("pass", "fail", "skip", "timeout", "error")
            if any(r.status == s for r in new_records)) + f" in {elapsed:.0f} s")
    return list(records.values())


# -- source --------------------------------------------------------------------------------

SOURCE_MARKER = ".kpatchtest-source.json"      # in a tree kut_source exported: {source, ref, commit}
FETCH_TIMEOUT_S = 900
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes", "LC_ALL": "C",
            **GIT_PROTOCOL_ENV}


def _git_cmd(args: Sequence[str], *, timeout: float = 120, binary: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    env.update(_GIT_ENV)
    try:
        return subprocess.run(["git", *args], capture_output=True, text=not binary, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        what = next((a for a in (args[2:] if args[:1] == ["-C"] else args) if not a.startswith("-")), "")
        raise KutError(f"git {what} gave no answer within {timeout:g} s") from None
    except OSError as e:
        raise KutError(f"cannot run git: {e}", hint="install git") from None


def _git_message(text: str, default: str) -> str:
    """git's own message: its first fatal:/error: line (the lines after it are advice)."""
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line
    return lines[-1] if lines else default


def _is_bare_repo(path: Path) -> bool:
    r = _git_cmd(["-C", str(path), "rev-parse", "--is-bare-repository"], timeout=30)
    return r.returncode == 0 and r.stdout.strip() == "true"


def _is_checkout_top(path: Path) -> bool:
    r = _git_cmd(["-C", str(path), "rev-parse", "--show-toplevel"], timeout=30)
    return r.returncode == 0 and Path(r.stdout.strip()).resolve() == path.resolve()


def _resolve(git_dir: Path, ref: str) -> str | None:
    r = _git_cmd(["-C", str(git_dir), "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
                 timeout=30)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _export(git_dir: Path, commit: str, cache_dir: Path, meta: dict[str, str]) -> Path:
    """The tree of `commit` as plain files in cache_dir/kut-src/trees/<commit> (made once)."""
    trees = cache_dir / "kut-src" / "trees"
    dest = trees / commit
    if (dest / SOURCE_MARKER).is_file():
        return dest
    trees.mkdir(parents=True, exist_ok=True)
    with exclusive(trees / f".{commit}.lock"):
        if (dest / SOURCE_MARKER).is_file():
            return dest
        r = _git_cmd(["-C", str(git_dir), "archive", "--format=tar", commit], timeout=300, binary=True)
        if r.returncode != 0:
            raise KutError(f"cannot export kvm-unit-tests {commit[:12]}: "
                           f"{_git_message(r.stderr.decode(errors='replace'), f'git archive exited {r.returncode}')}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}-", dir=trees))
        try:
            with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:") as tar:
                if hasattr(tarfile, "tar_filter"):          # Python >= 3.11.4
                    tar.extractall(tmp, filter="tar")
                else:
                    tar.extractall(tmp)
            (tmp / SOURCE_MARKER).write_text(json.dumps({**meta, "commit": commit}, indent=1) + "\n")
            shutil.rmtree(dest, ignore_errors=True)        # a half-made tree from a crash
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _ref_name(ref: str) -> str:
    """Where a fetched ref is kept in the cache repo (so an offline run finds it again)."""
    return "refs/kpatchtest/" + hashlib.sha256(ref.encode()).hexdigest()[:16]


def kut_source(source: str | Path, ref: str | None, cache_dir: Path, offline: bool = False, *,
               log: Callable[[str], None] | None = None) -> Path:
    """A kvm-unit-tests source tree for build_kut, from a local directory or a git URL.

    - a local directory (not a bare repository) without ref: returned as is (its working
      tree, uncommitted changes included);
    - a local checkout with ref: that ref's tree, exported into the cache;
    - a URL (https://, http://, git://, ssh://, file://, user@host:path) or a path to a
      bare repository: fetched (`git fetch URL +REF`, default HEAD) into a bare cache
      repository cache_dir/kut-src/<hash of the URL>.git, then the commit's tree exported
      into cache_dir/kut-src/trees/<commit>. A full commit id already in the cache is not
      fetched again; a branch or tag is, unless offline, which uses what was fetched last.

    Errors (KutError, one line): no such directory, unreachable URL, unknown ref, offline
    with nothing cached.
    """
    say = log or (lambda m: None)
    cache_dir = Path(cache_dir)
    text = str(source)
    if ref is not None:
        why = ref_problem(ref) or ("must not contain spaces" if any(c.isspace() for c in ref) else None)
        if why:
            raise KutError(f"bad kvm-unit-tests ref {ref!r}: {why}")
    if why := repo_problem(text):
        raise KutError(f"bad kvm-unit-tests source {text!r}: {why}")
    local = None if is_url(text) else Path(text).expanduser()
    if local is not None:
        if not local.exists():
            raise KutError(f"kvm-unit-tests source {text} does not exist",
                           hint="give a kvm-unit-tests checkout or a git URL")
        if not local.is_dir():
            raise KutError(f"kvm-unit-tests source {text} is not a directory")
        local = local.resolve()
        if not _is_bare_repo(local):
            if ref is None:
                return local
            if not _is_checkout_top(local):
                raise KutError(f"kvm-unit-tests source {local} is not a git checkout, so ref {ref} means nothing",
                               hint="drop the ref to build the directory as it is")
            commit = _resolve(local, ref)
            if commit is None:
                raise KutError(f"unknown ref {ref} in {local}")
            return _export(local, commit, cache_dir, {"source": str(local), "ref": ref})
        url = str(local)
    else:
        url = text

    want = ref or "HEAD"
    repo = cache_dir / "kut-src" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")
    repo.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(repo.parent / f".{repo.name}.lock"):
        created = not (repo / "HEAD").is_file()
        if created:
            r = _git_cmd(["init", "--bare", "--quiet", str(repo)], timeout=60)
            if r.returncode != 0:
                raise KutError(f"cannot create {repo}: {_git_message(r.stderr, 'git init failed')}")
            _git_cmd(["-C", str(repo), "config", "kpatchtest.url", url], timeout=30)
        keep = _ref_name(want)
        commit_id = re.fullmatch(r"[0-9a-f]{7,64}", want) is not None
        commit = _resolve(repo, want) if commit_id else None     # a commit id fetched before
        if commit is None and offline:
            commit = _resolve(repo, keep)
            if commit is None:
                raise KutError(f"kvm-unit-tests {url} ({want}) is not in the cache and the run is offline",
                               hint="run once without --offline, or give a local checkout as the source")
            say(f"kvm-unit-tests: offline, using {want} = {commit[:12]} fetched earlier from {url}")
        elif commit is None:
            say(f"kvm-unit-tests: fetching {want} from {url}")
            r = _git_cmd(["-C", str(repo), "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--",
                          url, f"+{want}:{keep}"], timeout=FETCH_TIMEOUT_S)
            if r.returncode != 0:
                # reachable at all? then the ref is what is wrong
                probe = _git_cmd(["-C", str(repo), "ls-remote", "--", url, "HEAD"], timeout=120)
                if probe.returncode != 0:
                    if created:
                        shutil.rmtree(repo, ignore_errors=True)     # nothing to keep for a bad URL
                    raise KutError(f"cannot reach kvm-unit-tests at {url}: "
                                   f"{_git_message(probe.stderr or r.stderr, f'git fetch exited {r.returncode}')}")
                if commit_id and len(want) < 40:
                    # servers hand out full commit ids only: an abbreviated one needs the history
                    r2 = _git_cmd(["-C", str(repo), "fetch", "--quiet", "--no-tags", "--no-write-fetch-head",
                                   "--", url, "+refs/heads/*:refs/kpatchtest/heads/*",
                                   "+refs/tags/*:refs/kpatchtest/tags/*"], timeout=FETCH_TIMEOUT_S)
                    commit = _resolve(repo, want) if r2.returncode == 0 else None
                    if commit is not None:
                        _git_cmd(["-C", str(repo), "update-ref", keep, commit], timeout=30)
                if commit is None:
                    raise KutError(f"unknown ref {want} in {url}",
                                   hint=_git_message(r.stderr, f"git fetch exited {r.returncode}"))
            commit = commit or _resolve(repo, keep)
            if commit is None:
                raise KutError(f"{want} in {url} is not a commit")
    return _export(repo, commit, cache_dir, {"source": url, "ref": want})


# -- build and deploy --------------------------------------------------------------------

_BUILD_IGNORE = shutil.ignore_patterns(".git", "logs", "logs.old", "*.o", "*.d", ".*.d", "*.a")


def _git(source: Path, *args: str) -> str | None:
    """git's answer about `source`, or None when git fails (the caller then goes by content)."""
    try:
        r = _git_cmd(["-C", str(source), *args], timeout=60)
    except KutError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _content_hash(source: Path) -> str:
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "logs", "logs.old"))
        for f in sorted(files):
            p = Path(root, f)
            if p.suffix in (".o", ".d", ".a", ".elf", ".flat", ".efi") or p.is_symlink():
                continue
            h.update(str(p.relative_to(source)).encode() + b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _source_id(source: Path) -> tuple[str, str | None]:
    """(cache identity, git HEAD or None): the commit of a tree kut_source exported, HEAD
    for a clean checkout, else a content hash. A directory that is not the top of its own
    checkout (a plain tree somewhere inside another repository) goes by content."""
    marker = source / SOURCE_MARKER
    if marker.is_file():
        try:
            commit = json.loads(marker.read_text())["commit"]
        except (ValueError, KeyError, TypeError):
            commit = None
        if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
            return f"git:{commit}", commit
    top = _git(source, "rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != source:
        return f"content:{_content_hash(source)}", None
    head = _git(source, "rev-parse", "--verify", "HEAD")
    if head and _git(source, "status", "--porcelain", "--untracked-files=no") == "":
        return f"git:{head}", head
    return f"content:{_content_hash(source)}", head


def _toolchain() -> str:
    cc = os.environ.get("CC", "gcc")
    try:
        r = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return (r.stdout.splitlines() or [cc])[0]
    except (OSError, subprocess.TimeoutExpired):
        return cc


def build_kut(source: Path, cache_dir: Path, *, arch: str | None = None, jobs: int = 2,
              configure_args: Sequence[str] = ()) -> Path:
    """Configure and make kvm-unit-tests from `source` with the host toolchain, once per
    (source revision or content, arch, compiler, configure args); returns the built tree."""
    source = Path(source).resolve()
    if not (source / "run_tests.sh").is_file() or not (source / "configure").is_file():
        raise KutError(f"{source} is not a kvm-unit-tests tree (no run_tests.sh / configure)")
    ident, head = _source_id(source)
    host_arch = arch or platform.machine()
    args = [*([f"--arch={arch}"] if arch else []), *configure_args]
    key = hashlib.sha256("\0".join([ident, host_arch, _toolchain(), *args]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    dest = cache_dir / f"kvm-unit-tests-{host_arch}-{key}"
    if (dest / ".kpatchtest-built").is_file():
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
    tree = tmp / "tree"
    shutil.copytree(source, tree, ignore=_BUILD_IGNORE, symlinks=True)
    log_path = tree / "build.log"
    try:
        with open(log_path, "wb") as logf:
            for cmd in (["./configure", *args], ["make", f"-j{max(1, jobs)}"]):
                logf.write(f"$ {' '.join(cmd)}\n".encode())
                logf.flush()
                r = subprocess.run(cmd, cwd=tree, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                if r.returncode != 0:
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                    raise KutError(f"kvm-unit-tests build failed: `{' '.join(cmd)}` exited {r.returncode}",
                                   hint=" | ".join(tail))
        if head:
            (tree / "build-head").write_text(head[:8] + "\n")
        # configure recorded the temporary directory: point the tree at where it will live
        mak = tree / "config.mak"
        if mak.is_file():
            mak.write_text(_config_mak(mak.read_text(), str(dest), pretty_stacks=True))
        (tree / ".kpatchtest-built").write_text(json.dumps(
            {"source": str(source), "id": ident, "arch": host_arch, "toolchain": _toolchain(),
             "configure_args": args}, indent=1) + "\n")
        try:
            os.replace(tree, dest)
        except OSError:
            if not (dest / ".kpatchtest-built").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


_DEPLOY_SKIP = re.compile(r"(^|/)(\.git|logs|logs\.old)(/|$)|\.(o|d|a)$|(^|/)\.[^/]*\.d$|^build\.log$")


def _config_mak(text: str, remote_dir: str, pretty_stacks: bool) -> str:
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "SRCDIR":
            line = f"SRCDIR={remote_dir}"
        elif sep and key == "ERRATATXT" and value:
            line = f"ERRATATXT={remote_dir}/{posixpath.basename(value)}"
        elif sep and key == "PRETTY_PRINT_STACKS" and not pretty_stacks:
            line = "PRETTY_PRINT_STACKS=no"
        out.append(line)
    return "\n".join(out) + "\n"


def deploy_kut(conn: HostConnection, built: Path, remote_dir: str, *, pretty_stacks: bool = False) -> None:
    """Copy a built tree to remote_dir (replacing what is there): one tarball over SFTP.

    config.mak's SRCDIR and ERRATATXT are pointed at remote_dir (run_tests.sh fails every
    test when ERRATATXT does not exist); PRETTY_PRINT_STACKS is turned off unless asked
    for, since it needs python3 and addr2line on the host (the .elf files then go along).
    """
    built = Path(built)
    norm = posixpath.normpath(remote_dir)
    if not remote_dir.startswith("/") or norm != remote_dir.rstrip("/") or norm.count("/") < 2:
        raise KutError(f"remote kvm-unit-tests directory {remote_dir!r} must be an absolute path "
                       "at least two levels deep (it is replaced)")
    if not (built / "run_tests.sh").is_file() or not (built / "config.mak").is_file():
        raise KutError(f"{built} is not a built kvm-unit-tests tree (no run_tests.sh / config.mak)")
    with tempfile.TemporaryDirectory(prefix="kpt-kut-") as td:
        tarball = Path(td) / "kvm-unit-tests.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for root, dirs, files in os.walk(built):
                rel_root = os.path.relpath(root, built)
                dirs[:] = sorted(d for d in dirs if not _DEPLOY_SKIP.search(
                    posixpath.normpath(posixpath.join(rel_root, d))))
                for f in sorted(files):
                    rel = posixpath.normpath(posixpath.join(rel_root.replace(os.sep, "/"), f))
                    if _DEPLOY_SKIP.search(rel) or (f.endswith(".elf") and not pretty_stacks):
                        continue
                    path = Path(root, f)
                    if rel == "config.mak":
                        data = _config_mak(path.read_text(), norm, pretty_stacks).encode()
                        info = tar.gettarinfo(str(path), arcname=rel)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    else:
                        tar.add(str(path), arcname=rel, recursive=False)
        remote_tar = f"{norm}.kpatchtest.tar.gz"
        conn.run(["mkdir", "-p", posixpath.dirname(norm)])
        conn.put(tarball, remote_tar)
        conn.run_script('rm -rf "$1" && mkdir -p "$1" && tar -xzf "$2" -C "$1"; s=$?; rm -f "$2"; exit $s',
                        norm, remote_tar)
