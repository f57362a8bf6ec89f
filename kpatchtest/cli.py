"""kpatchtest command line: verbs and flags in the style of b4 and git.

Exit codes: 0 the run completed, 1 a gate failed, 2 usage or input error,
3 internal error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from kpatchtest import __version__
from kpatchtest.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_OK, InputError, KpatchtestError
from kpatchtest.kernelrepo import default_cache_dir
from kpatchtest.progress import Progress
from kpatchtest.util import user_path
from kpatchtest.rundir import CacheDir


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors are exit 2, one line plus usage
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"kpatchtest: error: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache for fetched series and kernel repos (default: $KPATCHTEST_CACHE or ~/.cache/kpatchtest)")
    p.add_argument("--offline", action="store_true", help="never touch the network; use what the cache holds")
    p.add_argument("--midmask", help="lore mirror, b4 style (e.g. http://127.0.0.1:8080/all/%%s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kpatchtest", description="Test a kernel patch series across stable branches.")
    ap.add_argument("--version", action="version", version=f"kpatchtest {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("run", help="run a spec: fetch, apply, ... and write reports",
                       description="Run the pipeline stages of a series spec and write results.json, "
                                   "junit.xml, summary.md and report.html to --out.")
    p.add_argument("spec", help="series spec YAML (e.g. series/demo.yaml)")
    p.add_argument("--stages", help="comma-separated stages to run (default: all the spec has sections for: fetch,apply,build,boot,workloads)")
    p.add_argument("--branch", "-b", action="append", default=[], help="only this branch (repeatable)")
    p.add_argument("--out", "-o", type=Path, default=None, help="run directory (default: out/<spec name>)")
    p.add_argument("--no-hints", action="store_true", help="skip the prerequisite search")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                   help="branches applied and built at a time (make's -j is shared out among them; default 1)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="redo this stage's units even where their inputs did not change (repeatable)")
    p.add_argument("--log-url-base", metavar="URL",
                   help="public URL of the run directory: KCIDB log URLs are URL + the path in the run directory "
                        "(without it, KCIDB output has no log URLs)")
    _common(p)

    p = sub.add_parser("fetch", help="fetch a spec's series with b4 into the cache",
                       description="Fetch the series a spec names (b4), print its patches and attestation.")
    p.add_argument("spec")
    _common(p)

    p = sub.add_parser("validate", help="check a spec and exit",
                       description="Validate a series spec. The --list flags print one item a line, for CI "
                                   "scripts (the Jenkinsfile) that fan a spec out.")
    p.add_argument("spec")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list-branches", action="store_true", help="print the spec's branches, one a line")
    what.add_argument("--list-stages", action="store_true",
                      help="print the stages a run without --stages runs, one a line")
    what.add_argument("--lab-name", action="store_true",
                      help="print the name of the lab the boots use (nothing without lab:)")

    p = sub.add_parser("apply", help="backport table with no spec file",
                       description="Apply a series to branches of a repo and write the same reports as run.")
    p.add_argument("--repo", required=True, help="kernel repo: path, URL or source tarball")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mbox", "-m", help="local mbox file")
    src.add_argument("--msgid", help="lore message-id")
    p.add_argument("--version", "-v", dest="series_version", type=int, help="series version with --msgid")
    p.add_argument("--branch", "-b", action="append", required=True, help="branch to try (repeatable)")
    p.add_argument("--upstream", help="ref the series was written against (for prerequisite hints)")
    p.add_argument("--out", "-o", type=Path, default=Path("out/apply"), help="run directory")
    p.add_argument("--no-hints", action="store_true", help="skip the prerequisite search")
    _common(p)

    p = sub.add_parser("lab", help="the lab: build the local lab image, clear quarantined hosts",
                       description="Lab maintenance. `lab image` builds (or finds cached) the local QEMU lab "
                                   "image; `lab clear [HOST]` lifts a quarantine.")
    lab = p.add_subparsers(dest="lab_cmd", metavar="ACTION", parser_class=_Parser, required=True)
    q = lab.add_parser("image", help="build the local lab image (cached)")
    q.add_argument("--nested", action="store_true", help="include QEMU + SeaBIOS for nested guests")
    q.add_argument("--cache-dir", type=Path, default=None)
    q = lab.add_parser("clear", help="lift the quarantine of a host (all hosts without HOST)")
    q.add_argument("host", nargs="?")
    q.add_argument("--cache-dir", type=Path, default=None)

    p = sub.add_parser("report", help="re-render reports from a results.json, or merge per-branch runs",
                       description="Render junit.xml, summary.md and report.html from an existing results.json. "
                                   "With --merge: one results.json and its reports from per-branch runs of one "
                                   "spec (exit 1 when a gate of the merged record fails).")
    p.add_argument("results", type=Path, nargs="+", help="results.json (several with --merge)")
    p.add_argument("--merge", action="store_true",
                   help="merge per-branch runs of one spec (kpatchtest run SPEC --branch B --out out/B) into --out")
    p.add_argument("--out", "-o", type=Path, default=None, help="where to write (default: beside results.json)")
    p.add_argument("--kcidb", type=Path, metavar="FILE", help="also write the run as KCIDB v5 JSON (validated) to FILE")
    p.add_argument("--kcidb-origin", default="kpatchtest", metavar="ORIGIN",
                   help="KCIDB origin: the CI system's name, prefix of every id (default: kpatchtest)")
    p.add_argument("--log-url-base", metavar="URL",
                   help="with --kcidb: public URL of the run directory: KCIDB log URLs are URL + the path in the run directory "
                        "(default: the one the run recorded; without any, no log URLs)")
    return ap


def _cache_dir(args) -> Path:
    return user_path(args.cache_dir) if args.cache_dir else default_cache_dir()


def _run_outcome(outcome, quiet: bool) -> int:
    from kpatchtest.report import summary
    if not quiet:
        sys.stdout.write(summary.render(outcome.result))
        if outcome.reports:     # none when the run kept the previous results
            print(f"\nreports: {', '.join(str(p) for p in outcome.reports)}", file=sys.stderr)
    for b in outcome.result.branches:   # -q silences progress, never errors
        if b.error:
            print(f"kpatchtest: error: branch {b.name}: {b.error}", file=sys.stderr)
    return outcome.exit_code


def cmd_run(args) -> int:
    from kpatchtest.pipeline import RunOptions, parse_stages, run
    from kpatchtest.spec import load_spec
    if args.jobs < 1:
        raise InputError(f"--jobs {args.jobs}: must be at least 1", hint="e.g. --jobs 2")
    loaded = load_spec(args.spec)
    opts = RunOptions(out=user_path(args.out or Path("out") / loaded.spec.name), cache_dir=_cache_dir(args),
                      stages=parse_stages(args.stages), branches=tuple(args.branch), offline=args.offline,
                      midmask=args.midmask, hints=not args.no_hints, stages_explicit=bool(args.stages),
                      jobs=args.jobs, force=tuple(s for f in args.force for s in parse_stages(f, "--force")),
                      log_url_base=_log_url_base(args))
    return _run_outcome(run(loaded, opts, Progress(quiet=args.quiet)), args.quiet)


def cmd_apply(args) -> int:
    import yaml

    from kpatchtest.pipeline import RunOptions, run
    from kpatchtest.spec import parse_spec
    source = {"mbox": args.mbox} if args.mbox else {"msgid": args.msgid}
    if args.msgid and args.series_version:
        source["version"] = args.series_version
    doc = {"name": "apply", "series": [source],
           "kernel": {"repo": args.repo, "branches": args.branch, **({"upstream": args.upstream} if args.upstream else {})}}
    loaded = parse_spec(yaml.safe_dump(doc), Path.cwd() / "<command line>")
    opts = RunOptions(out=user_path(args.out), cache_dir=_cache_dir(args), offline=args.offline,
                      midmask=args.midmask, hints=not args.no_hints)
    return _run_outcome(run(loaded, opts, Progress(quiet=args.quiet)), args.quiet)


def cmd_fetch(args) -> int:
    from kpatchtest.fetch.stage import FetchOptions, fetch_series
    from kpatchtest.spec import load_spec
    loaded = load_spec(args.spec)
    spec = loaded.spec
    series = fetch_series(spec.sources, FetchOptions(cache_dir=_cache_dir(args),
                                                     midmask=args.midmask or spec.fetch.midmask,
                                                     offline=args.offline, attestation=spec.fetch.attestation))
    print(f"{series.title}" + (f" (v{series.version})" if series.version else ""))
    if series.base_commit:
        print(f"base-commit: {series.base_commit}")
    for p in series.patches:
        print(f"  [{p.index}/{len(series.patches)}] {p.subject}  attestation: {p.attestation}")
    return EXIT_OK


def cmd_validate(args) -> int:
    from kpatchtest.spec import load_spec
    loaded = load_spec(args.spec)
    s = loaded.spec
    if args.list_branches:
        print("\n".join(b.name for b in s.kernel.branches))
        return EXIT_OK
    if args.list_stages:
        from kpatchtest.pipeline import RunOptions, plan
        opts = RunOptions(out=Path("."), cache_dir=Path("."))
        plan(loaded, opts)              # what `run` plans, its refusals included
        print("\n".join(opts.stages))
        return EXIT_OK
    if args.lab_name:
        if s.lab:
            from kpatchtest.lab.ssh.lab import load_lab
            print("local" if s.lab.name == "local" else load_lab(s.lab, loaded.base_dir).name)
        return EXIT_OK
    print(f"{loaded.path}: ok ({s.name}: {len(s.sources)} source(s), "
          f"{len(s.kernel.branches)} branch(es): {', '.join(b.name for b in s.kernel.branches)})")
    return EXIT_OK


def _log_url_base(args) -> str | None:
    from kpatchtest.report.kcidb import check_log_url_base
    return check_log_url_base(args.log_url_base) if args.log_url_base else None


def _write_kcidb(args, result) -> list[Path]:
    """report --kcidb: the run as validated KCIDB JSON; bad flags are exit 2 before anything is written."""
    if not args.kcidb:
        return []
    from kpatchtest.report import kcidb
    from kpatchtest.util import write_atomic
    path = user_path(args.kcidb)
    write_atomic(path, kcidb.dumps(kcidb.render(result, kcidb.check_origin(args.kcidb_origin), _log_url_base(args))))
    return [path]


def cmd_report(args) -> int:
    from kpatchtest.report import write_all
    from kpatchtest.results import load
    if args.merge:
        return _merge_report(args)
    if len(args.results) > 1:
        raise InputError(f"report: {len(args.results)} results files given, without --merge it renders one",
                         hint="give one results.json, or --merge them into --out")
    results = user_path(args.results[0])
    result = load(results)
    out = user_path(args.out) if args.out else results.parent
    kcidb_paths = _write_kcidb(args, result)
    # in place, results.json is the input: read only, never rewritten
    paths = write_all(result, out, run_dir=results.parent, with_results=out != results.parent)   # log excerpts live beside results.json
    paths += kcidb_paths
    print("\n".join(str(p) for p in paths))
    return EXIT_OK


def _merge_report(args) -> int:
    from kpatchtest.errors import EXIT_GATE
    from kpatchtest.report import write_all
    from kpatchtest.report.merge import merge_files
    if not args.out:
        raise InputError("report --merge needs --out (the merged run directory)", hint="e.g. --out out/all")
    out = user_path(args.out)
    inputs = [user_path(p) for p in args.results]
    merged, notes = merge_files(inputs, out)
    for note in notes:
        print(f"kpatchtest: note: {note}", file=sys.stderr)
    mbox = inputs[0].parent / "series.mbox"     # one series (merge checked): the first run's mails
    extra = {"series.mbox": mbox.read_bytes()} if mbox.is_file() else None
    kcidb_paths = _write_kcidb(args, merged)
    paths = write_all(merged, out, run_dir=out, extra=extra) + kcidb_paths   # paths in the record are rebased onto out
    print("\n".join(str(p) for p in paths))
    return EXIT_GATE if merged.gates_failed() else EXIT_OK


def cmd_lab(args) -> int:
    cache = _cache_dir(args)
    if args.lab_cmd == "image":
        from kpatchtest.lab.local.image import build_image
        image = build_image(cache, nested=args.nested)
        print(f"{image.initramfs} ({image.initramfs.stat().st_size // 1024} KiB)")
        print(f"client key: {image.client_key}")
        print(f"host key: {image.host_public_key}")
        return EXIT_OK
    from kpatchtest.lab.ssh.hostlock import Quarantine
    Quarantine(CacheDir(cache).lab_state / "quarantine.json").clear(args.host)
    print(f"quarantine cleared for {args.host or 'all hosts'}")
    return EXIT_OK


COMMANDS = {"lab": cmd_lab, "run": cmd_run, "apply": cmd_apply, "fetch": cmd_fetch, "validate": cmd_validate, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    # Library records (paramiko, fabric) never reach the terminal through logging's
    # last-resort handler; a run sends them to run.log in its --out directory.
    logging.getLogger().addHandler(logging.NullHandler())
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help(sys.stderr)
        return EXIT_INPUT
    try:
        return COMMANDS[args.cmd](args)
    except KpatchtestError as e:
        if e.exit_code == EXIT_INTERNAL:    # ours, not the user's: the traceback helps the report
            traceback.print_exc()
            print(f"kpatchtest: internal error: {e}", file=sys.stderr)
        else:
            print(f"kpatchtest: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kpatchtest: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: say so, with the traceback
        traceback.print_exc()
        print("kpatchtest: internal error (a bug in kpatchtest, please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
