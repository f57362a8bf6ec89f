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

import re
from dataclasses import dataclass, field
from typing import Sequence

from kpatchtest.workloads.record import Metric, WorkloadStatus

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


def _finished(verdict: TestOutcome | None) -> bool:
    """With -t: did the test's TAP lines include run_tests.sh's own end line?"""
    return verdict is not None and (verdict.status == "timeout" or verdict.detail.startswith(
        ("QEMU terminated on", "aborted")))
