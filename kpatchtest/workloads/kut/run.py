"""kvm-unit-tests on a lab host: deploy a built tree, run run_tests.sh, one record per test
(what run_tests.sh prints, and how it is read: see kut.parse)."""

from __future__ import annotations

import base64
import io
import os
import posixpath
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kpatchtest.lab.ssh.connection import HostConnection, LabError, RunResult
from kpatchtest.workloads.dmesgwatch import DmesgWatch
from kpatchtest.workloads.kut.parse import (
    TestOutcome,
    _finished,
    _join,
    parse_log,
    parse_plain,
    parse_tap,
    resolve,
    vmexit_metrics,
)
from kpatchtest.workloads.kut.source import KutError, _config_mak
from kpatchtest.workloads.record import Metric, WorkloadRecord

GROUP = "kvm-unit-tests"
KILL_GRACE_S = 10          # timeout -k: SIGKILL this long after SIGTERM
SSH_SLACK_S = 30           # the SSH command limit is the run's timeout plus this
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TEST_NAME = re.compile(r"[A-Za-z0-9_.+-]+\Z")


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



_DEPLOY_SKIP = re.compile(r"(^|/)(\.git|logs|logs\.old)(/|$)|\.(o|d|a)$|(^|/)\.[^/]*\.d$|^build\.log$")


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
