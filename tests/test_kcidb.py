"""KCIDB output: a real run's results.json (fetch + apply through the CLI, with real b4 and
git), given the build, boot and workload records later stages write, rendered by
`kpatchtest report --kcidb` and checked with kcidb-io's own v5 validator."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path

import jsonschema
import pytest
from kcidb_io.schema import V5_3

from kpatchtest.cli import main
from kpatchtest.errors import EXIT_INTERNAL
from kpatchtest.pipeline import kernel_source
from kpatchtest.report import kcidb
from kpatchtest.results import (BootResult, BranchBuild, BuildResult, KernelSource, RunResult, SplatInfo,
                                WorkloadRun, load, save)
from kpatchtest.workloads.record import Metric, WorkloadRecord
from kpatchtest.spec import BranchSpec
from tests.kernelhist import build
from tests.test_reports import _run

BASE = "https://ci.example.org/job/kpt/7/artifact/out"


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kcidb") / "linux")


def _spec(tmp: Path, hist) -> Path:
    """Three mailed patches (git format-patch mboxes: mails with a Message-Id) on the stable
    branch (partial: one conflicts) and on master (already applied)."""
    sources = ""
    for k in ("P_clean", "P_conflict", "P_dep"):
        (tmp / f"{k}.mbox").write_text(hist.git("format-patch", "--stdout", "--thread", "-1", hist.shas[k]) + "\n")
        sources += f"  - mbox: {tmp / f'{k}.mbox'}\n"
    spec = tmp / "spec.yaml"
    spec.write_text(f"name: k\nseries:\n{sources}kernel:\n  repo: {hist.path}\n  upstream: master\n"
                    f"  branches: [linux-1.0.y, master]\n")
    return spec


def _cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def real_run(hist, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    spec = _spec(tmp, hist)
    out = tmp / "out"
    assert _cli("run", str(spec), "--out", str(out), "--cache-dir", str(tmp / "cache"), "-q",
                "--log-url-base", BASE + "/") == 0
    return spec, out, tmp


def _build(branch: str, kind: str, status: str = "pass") -> BuildResult:
    arts = {n: f"artifacts/{branch}/{kind}/{f}" for n, f in
            (("build.log", "build.log"), ("config", "config"), ("bzImage", "bzImage"), ("modules", "modules.tar.gz"))}
    return BuildResult(status=status, commit="c" * 40, duration_s=12.5, config_hash="ab" * 32, arch="x86_64",
                       compiler="gcc (Debian 12.2.0-14) 12.2.0", artifacts=arts, kernelrelease=f"1.0.0-kpt{kind[0]}",
                       error_excerpt="mm/x.c:3: error: boom" if status == "fail" else None,
                       reason="mm/x.c:3: error: boom" if status == "fail" else "")


@pytest.fixture(scope="module")
def full(real_run):
    """The real record plus what build, boot and workloads write (two rounds, a failed boot,
    a boot whose workloads could not run), saved as results.json of its run directory."""
    spec, out, tmp = real_run
    r = load(out / "results.json")
    stable, master = r.branches
    stable.build = BranchBuild(baseline=_build("linux-1.0.y", "baseline"), patched=_build("linux-1.0.y", "patched"))
    master.build = BranchBuild(baseline=_build("master", "baseline"), patched=_build("master", "patched", "fail"))
    d = "workloads/linux-1.0.y"
    stable.boot = [BootResult(build=x, status="booted", round=n, host="lab1", method="kexec", duration_s=30,
                              console_log=f"boot/linux-1.0.y/{x}-r{n}/lab1/console.log",
                              dmesg=f"boot/linux-1.0.y/{x}-r{n}/lab1/dmesg.txt",
                              splats=[SplatInfo(kind="warning", first_lines=["WARNING: at x.c:1"])] if x == "patched" else [])
                   for n in (1, 2) for x in ("baseline", "patched")]
    stable.workloads = [
        _run("baseline", 1, "pass", "pass", 1200.0, [811.0, 811.0, 812.0], [100.0, 101.0, 102.0], f"{d}/baseline-r1"),
        _run("patched", 1, "fail", "timeout", 1250.0, [3.0, 3.0, 3.0], [100.0, None, 102.0], f"{d}/patched-r1"),
        _run("baseline", 2, "pass", "pass", 1210.0, [811.0, 811.0, 811.0], [100.0, 101.0, 102.0], f"{d}/baseline-r2"),
        _run("patched", 2, "pass", "timeout", 1260.0, [3.0, 3.0, 3.0], [None, None, 102.0], f"{d}/patched-r2"),
    ]
    master.boot = [BootResult(build="baseline", status="boot-failed", host="lab1", reason="no SSH after 300 s",
                              console_excerpt="Kernel panic - not syncing\n" * 2000)]
    master.workloads = [WorkloadRun(build="baseline", host="lab1", error="kvm-unit-tests: no x86/ tests on the host")]
    save(r, out / "results.json")
    return r, out


def _walk(node, key=""):
    """Every (key, value) pair in nested data."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _chunks(mbox: bytes) -> list[bytes]:
    """series.mbox cut at each patch's From line, the way `git am` splits it."""
    starts = [m.start() for m in re.finditer(rb"^From 0{40} ", mbox, re.M)]
    return [mbox[a:b] for a, b in zip(starts, starts[1:] + [len(mbox)])]


def test_run_records_what_kcidb_needs(real_run, hist):
    spec, out, tmp = real_run
    r = load(out / "results.json")
    assert uuid.UUID(r.run_id).version == 4
    assert r.spec_sha256 == hashlib.sha256(spec.read_bytes()).hexdigest()
    assert r.log_url_base == BASE                     # validated, the trailing slash dropped
    chunks = _chunks((out / "series.mbox").read_bytes())
    assert [p.sha256 for p in r.series.patches] == [hashlib.sha256(c).hexdigest() for c in chunks]
    assert len(chunks) == 3 and r.series.msgid == r.series.patches[0].msgid
    for b in r.branches:
        assert b.source.kind == "git" and b.source.url == hist.path.as_uri() and b.source.ref == b.name
    # a resumed run (same --out) is the same run; another directory is another run
    ids = []
    for d in ("again", "again", "other"):
        assert _cli("run", str(spec), "--out", str(tmp / d), "--cache-dir", str(tmp / "cache"), "-q") == 0
        ids.append(load(tmp / d / "results.json").run_id)
    assert ids[0] == ids[1] != ids[2] and r.run_id not in ids
    assert load(tmp / "other" / "results.json").log_url_base is None


def test_kernel_source_names_no_credentials_and_says_tarball():
    def src(repo, branch):
        return kernel_source(repo, BranchSpec.model_validate(branch))
    assert src("https://user:s3cret@git.example.org/linux.git", "v6.1").url == "https://git.example.org/linux.git"
    assert src("https://TOKEN@git.example.org/linux.git", "v6.1").url == "https://git.example.org/linux.git"
    assert src("ssh://git@host/linux.git", "v6.1").url == "ssh://git@host/linux.git"   # a user name, no secret
    t = src(None, {"name": "debian-6.1", "tarball": "/usr/src/linux-source-6.1.tar.xz"})
    assert (t.kind, t.url, t.ref) == ("tarball", "file:///usr/src/linux-source-6.1.tar.xz", None)
    assert src("/srv/linux-6.1.tar.gz", "6.1").kind == "tarball"


def test_kcidb_validates_with_kcidbio_and_maps_the_run(full, tmp_path, capsys):
    r, out = full
    path = tmp_path / "kcidb.json"
    assert _cli("report", str(out / "results.json"), "--out", str(tmp_path / "rep"), "--kcidb", str(path)) == 0
    assert str(path) in capsys.readouterr().out
    data = json.loads(path.read_text())
    V5_3.validate(data)                                # the library's schema, not ours
    assert data["version"] == {"major": 5, "minor": 3}
    stable, master = r.branches

    co = {c["id"].split(":", 2)[2].replace(":", "/"): c for c in data["checkouts"]}   # <branch>/<build>
    assert set(co) == {"linux-1.0.y/baseline", "linux-1.0.y/patched", "master/baseline", "master/patched"}
    hashes = [p.sha256 for p in r.series.patches]
    for c in data["checkouts"]:
        assert c["git_commit_hash"] == (stable if "linux-1.0.y" in c["id"] else master).apply.branch_commit
        assert "git_repository_url" not in c and c["misc"]["repository_url"].startswith("file://")
    # KCIDB's patchset hash, computed as its docs say: sha256sum *.patch | cut -c-64 | sha256sum
    expect = hashlib.sha256("".join(h + "\n" for h in hashes).encode()).hexdigest()
    assert co["linux-1.0.y/patched"]["patchset_hash"] == expect == co["master/patched"]["patchset_hash"]
    assert co["linux-1.0.y/baseline"]["patchset_hash"] == ""
    assert (co["linux-1.0.y/patched"]["valid"], co["master/patched"]["valid"]) == (False, True)  # partial, already-applied
    assert co["linux-1.0.y/patched"]["message_id"] == r.series.msgid
    assert [p["status"] for p in co["linux-1.0.y/patched"]["misc"]["patches"]] == ["applied", "conflict", "skipped"]

    builds = {b["id"]: b for b in data["builds"]}
    assert set(builds) == set(co[k]["id"] for k in co)             # one build per checkout
    failed = builds[co["master/patched"]["id"]]
    assert (failed["status"], failed["architecture"], failed["duration"]) == ("FAIL", "x86_64", 12.5)
    assert failed["log_excerpt"] == "mm/x.c:3: error: boom" and failed["config_name"] == "ab" * 32

    tests = data["tests"]
    n_records = sum(len(w.records) for b in r.branches for w in b.workloads)
    n_metrics = sum(len(rec.metrics) for b in r.branches for w in b.workloads for rec in w.records)
    n_boots = sum(len(b.boot) for b in r.branches)
    assert len(tests) == n_boots + n_records + n_metrics + 1       # + the boot whose workloads did not run
    assert {t["build_id"] for t in tests} <= set(builds)

    def one(build, rnd, path):
        found = [t for t in tests if t["path"] == path and t["misc"]["round"] == rnd
                 and t["build_id"] == co[f"linux-1.0.y/{build}"]["id"]]
        assert len(found) == 1, (build, rnd, path, found)
        return found[0]
    assert one("patched", 1, "kvm-unit-tests.smptest")["status"] == "FAIL"
    assert one("patched", 1, "kvm-unit-tests.vmx")["status"] == "ERROR"          # timeout: verdict unknown
    assert one("patched", 1, "kvm-unit-tests.hyperv_synic")["status"] == "SKIP"
    assert one("baseline", 1, "boot")["status"] == "PASS"
    assert one("patched", 2, "boot")["misc"]["splats"][0]["kind"] == "warning"
    m = one("patched", 1, "smm-boot.smm_transitions")
    assert (m["status"], m["number"]) == ("DONE", {"value": 806.0, "unit": "events"})
    pages = one("patched", 1, "smm-boot.tdp_pages_allocated")
    assert pages["number"]["value"] == 101.0 and pages["misc"]["values"] == [100.0, None, 102.0]
    puts = one("patched", 1, "smm-boot.root_puts")
    assert puts["status"] == "SKIP" and "number" not in puts and "no probe" in puts["comment"]
    assert one("baseline", 1, "kvm-unit-tests.vmexit_cpuid.cycles")["number"]["value"] == 1200.0
    panic = next(t for t in tests if t["path"] == "boot" and t["build_id"] == co["master/baseline"]["id"])
    assert panic["status"] == "FAIL" and len(panic["log_excerpt"]) == kcidb.EXCERPT_MAX
    miss = next(t for t in tests if t["path"] == "workloads")
    assert miss["status"] == "MISS" and "no x86/ tests" in miss["comment"]


def test_a_broken_record_fails_the_validation(full):
    r, _ = full
    good = kcidb.render(r)
    for i, broken in enumerate(({**good, "builds": [{**good["builds"][0], "status": "OK"}]},
                   {**good, "tests": [{**good["tests"][0], "number": {"unit": "s"}}]},
                   {**good, "checkouts": [{**good["checkouts"][0], "id": "no-origin-prefix"}]},
                   {**good, "checkouts": [{**good["checkouts"][0], "git_repository_url": "git://x/linux"}]})):
        with pytest.raises(jsonschema.exceptions.ValidationError):
            V5_3.validate(broken)
        with pytest.raises(kcidb.KcidbInvalid) as e:     # what the writer raises before writing: our bug
            kcidb.validate(broken)
        assert e.value.exit_code == EXIT_INTERNAL and "\n" not in str(e.value)
        if i == 0:
            assert "at builds[0].status: 'OK' is not one of" in str(e.value)


def test_ids_are_stable_across_renders_and_unique(full, tmp_path):
    r, out = full
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for p in (a, b):
        assert _cli("report", str(out / "results.json"), "--out", str(tmp_path / "rep"), "--kcidb", str(p),
                    "--kcidb-origin", "kpt_lab") == 0
    assert a.read_bytes() == b.read_bytes()
    data = json.loads(a.read_text())
    for kind in ("checkouts", "builds", "tests"):
        ids = [o["id"] for o in data[kind]]
        assert len(ids) == len(set(ids)), kind
        assert all(i.startswith(f"kpt_lab:{r.run_id}:") for i in ids)
        assert all(o["origin"] == "kpt_lab" for o in data[kind])
    # a record from before schema 7 (no run id) still gets ids that a re-render keeps
    old = json.loads((out / "results.json").read_text())
    old["schema_version"] = 6
    for k in ("run_id", "spec_sha256", "log_url_base"):
        old.pop(k)
    for br in old["branches"]:
        br.pop("source")
    (tmp_path / "old.json").write_text(json.dumps(old))
    first, second = (kcidb.render(load(tmp_path / "old.json")) for _ in range(2))
    assert first == second and first["checkouts"][0]["id"].startswith("kpatchtest:") and V5_3.is_valid(first)
    assert r.run_id not in json.dumps(first)


def test_log_urls_only_under_a_public_base(full, tmp_path):
    r, out = full
    bare = r.model_copy(update={"log_url_base": None})
    urls = {k for k, _ in _walk(kcidb.render(bare))
            if k in ("log_url", "config_url", "output_files", "input_files", "patchset_files", "url")}
    assert urls == set()
    # the base the run recorded (run --log-url-base), or report's own
    for base, data in ((BASE, kcidb.render(r)), ("http://mirror.example/run-7", kcidb.render(bare, log_url_base="http://mirror.example/run-7/"))):
        boot = next(t for t in data["tests"] if t["path"] == "boot")
        assert boot["log_url"] == f"{base}/{r.branches[0].boot[0].console_log}"
        assert boot["output_files"] == [{"name": "dmesg.txt", "url": f"{base}/{r.branches[0].boot[0].dmesg}"}]
        build = data["builds"][0]
        assert build["config_url"] == f"{base}/artifacts/linux-1.0.y/baseline/config"
        assert {f["name"] for f in build["output_files"]} == {"bzImage", "modules.tar.gz"}
    # a path that leaves the run directory gets no URL
    escaped = r.model_copy(deep=True)
    escaped.branches[0].boot[0].console_log = "../../etc/passwd"
    assert "log_url" not in next(t for t in kcidb.render(escaped)["tests"] if t["path"] == "boot")


@pytest.mark.parametrize("extra, message", [
    (("--kcidb", "{file}/sub/kcidb.json"), "cannot write {file}/sub/kcidb.json: Not a directory"),
    (("--kcidb", "{file}/kcidb.json"), "cannot write {file}/kcidb.json: {file} is a file, not a directory"),
    (("--kcidb", "{tmp}/k.json", "--kcidb-origin", "Bad Origin"), "--kcidb-origin 'Bad Origin'"),
    (("--kcidb", "{tmp}/k.json", "--log-url-base", "/srv/www/out"), "--log-url-base '/srv/www/out'"),
])
def test_bad_kcidb_flags_are_one_line_exit_2(full, tmp_path, capsys, extra, message):
    r, out = full
    file = tmp_path / "a-file"
    file.write_text("not a directory\n")
    fmt = dict(file=file, tmp=tmp_path)
    code = _cli("report", str(out / "results.json"), "--out", str(tmp_path / "rep"), *(a.format(**fmt) for a in extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"kpatchtest: error: {message.format(**fmt)}"), err
    assert not (tmp_path / "rep").exists() and not (tmp_path / "k.json").exists()   # nothing written


def test_run_refuses_a_log_url_base_that_is_no_url(real_run, tmp_path, capsys):
    spec, _, tmp = real_run
    assert _cli("run", str(spec), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp / "cache"),
                "--log-url-base", "ftp://x/y") == 2
    assert "--log-url-base 'ftp://x/y'" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_odd_records_still_give_valid_kcidb():
    """What KCIDB's patterns refuse (NUL, dots and spaces in test names, a non-https
    repository, a start time that is no date, a message-id without @, NaN) is cleaned or
    moved to misc, and two records of one name on one boot keep distinct ids."""
    rec = WorkloadRecord(name="odd name.v2 \u00e9", status="fail", detail="bad\0byte",
                         metrics=[Metric(name="wall time", unit="s", values=[float("nan"), 2.0])])
    r = RunResult(tool_version="x", name="odd", started="s", run_id=str(uuid.uuid4()))
    b = r.branch("stable/6.1")
    b.source = KernelSource(kind="git", url="git://git.example.org/linux.git", ref="stable/6.1")
    b.build = BranchBuild(baseline=_build("stable/6.1", "baseline"), patched=_build("stable/6.1", "patched"))
    b.workloads = [WorkloadRun(build="patched", host="10.0.0.7:2222", records=[rec, rec])]
    r.series = None
    data = kcidb.render(r)
    assert V5_3.is_valid(data)
    tests = data["tests"]
    assert [t["path"] for t in tests] == ["odd_name_v2", "odd_name_v2.wall_time"] * 2
    assert len({t["id"] for t in tests}) == 4 and tests[0]["comment"] == "badbyte"
    assert tests[1]["number"]["value"] == 2.0 and tests[1]["misc"]["values"] == [None, 2.0]
    co = data["checkouts"][0]
    assert "start_time" not in co and co["misc"]["repository_url"] == "git://git.example.org/linux.git"
