"""The LAVA lab backend.

Fast tests: the job definition of a BootJob; the whole LavaLab.run against a small
XML-RPC server (the standard library's) that answers with what the real LAVA 2023.01 of
tests/lava/bringup.sh answered for real jobs (tests/data/lava/, see its README); an
infrastructure error; the cancel on an interrupt.

Opt-in (KPATCHTEST_LAVA=1): bring LAVA up with tests/lava/bringup.sh and run the demo's
first branch through the pipeline with lab: {name: lava}; its records must have the shape
of the local lab's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
import xmlrpc.client
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest
import yaml

from kpatchtest.errors import InputError
from kpatchtest.lab.backend import BootJob, LabSetup, open_lab
from kpatchtest.lab.lava import definition as D
from kpatchtest.lab.lava import records as R
from kpatchtest.lab.lava.client import Credentials, LavaClient, credentials
from kpatchtest.lab.lava.lab import LavaLab
from kpatchtest.lab.ssh.boot import KernelToBoot
from kpatchtest.results import BootResult, WorkloadRun
from kpatchtest.spec import LabRef, LavaRef, SmmBootSpec, WorkloadsSpec
from kpatchtest.workloads import script as S
from kpatchtest.workloads.stage import Workloads

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "lava"
RELEASE = "6.1.192-kpt032768e1"             # the kernel job 2 booted (debian-6.1 baseline)
# job 2's workload: the demo's SMM boot (cheap boot sector), 2 repetitions
JOB2_WORKLOADS = WorkloadsSpec(repetitions=2, smm_boot=SmmBootSpec(reads=200, timeout_s=180))


# -- a LAVA server that replays recorded answers ------------------------------------------

class FakeLava:
    """scheduler.jobs.* and results.* over real XML-RPC, from recorded files."""

    def __init__(self, log_text: str, results_text: str, health: str = "Complete", running_polls: int = 1):
        self.log = yaml.load(log_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        self.results_text = results_text
        self.health = health
        self.running_polls = running_polls
        self.submitted: list[str] = []
        self.cancelled: list[int] = []
        self.shows = 0
        self.server = SimpleXMLRPCServer(("127.0.0.1", 0), requestHandler=SimpleXMLRPCRequestHandler,
                                         allow_none=True, logRequests=False)
        for name, fn in {"system.version": lambda: "2023.01", "scheduler.jobs.submit": self.submit,
                         "scheduler.jobs.show": self.show, "scheduler.jobs.logs": self.logs,
                         "scheduler.jobs.cancel": self.cancel,
                         "results.get_testjob_results_yaml": lambda job: self.results_text}.items():
            self.server.register_function(fn, name)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def submit(self, text):
        self.submitted.append(text)
        return 42

    def _done(self) -> bool:
        return self.shows > self.running_polls

    def show(self, job):
        self.shows += 1
        return {"id": job, "state": "Finished" if self._done() else "Running",
                "health": self.health if self._done() else "Unknown"}

    def logs(self, job, line):
        # half the log while "running", the rest once finished: the backend must stream
        part = self.log if self._done() else self.log[: len(self.log) // 2]
        text = yaml.safe_dump(part[line:], width=10_000) if part[line:] else ""
        return [self._done(), xmlrpc.client.Binary(text.encode())]

    def cancel(self, job):
        self.cancelled.append(job)
        return True

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lava_lab(tmp_path, lab_image_cache):
    """A LavaLab on a FakeLava (started per test with its answers), its run dir and BootJob."""
    made = []

    def make(log: str, results: str, health: str = "Complete", workloads: WorkloadsSpec | None = JOB2_WORKLOADS,
             running_polls: int = 1):
        fake = FakeLava(log, results, health, running_polls)
        made.append(fake)
        run_dir = tmp_path / "run"
        ref = LabRef(name="lava", lava=LavaRef(url=fake.url, artifact_url=f"http://127.0.0.1:{_free_port()}"))
        setup = LabSetup(run_dir=run_dir, cache_dir=lab_image_cache, run_name="t", nested=workloads is not None)
        client = LavaClient(Credentials(fake.url, "u", "secret-token"))
        lab = LavaLab(ref, setup, client=client)
        w = None
        if workloads is not None:
            w = Workloads(workloads, run_dir, lab_image_cache)
            w.prepare()
        bz = tmp_path / "bzImage"
        bz.write_bytes(b"not really a kernel")
        job = BootJob(branch="debian-6.1", build="baseline", round=1, host=lab.hosts()[0],
                      kernel=KernelToBoot(build="baseline", bzimage=bz, kernelrelease=RELEASE),
                      boot_dir="boot/debian-6.1/baseline/1", workloads_dir="workloads/debian-6.1/baseline/1",
                      workloads=w)
        return fake, lab, job, run_dir

    yield make
    for f in made:
        f.close()


@pytest.fixture(scope="module")
def lab_image_cache(tmp_path_factory):
    """A cache dir with the nested lab image (built from this machine's packages: seconds)."""
    return tmp_path_factory.mktemp("cache")


# -- the job definition ---------------------------------------------------------------------

def test_definition_of_a_boot_job_deploys_boots_and_tests(lava_lab):
    fake, lab, job, run_dir = lava_lab((DATA / "job2-log.yaml").read_text(), (DATA / "job2-results.yaml").read_text())
    with lab:
        lab.run(job)
    text = (run_dir / job.boot_dir / "lava-job.yaml").read_text()
    assert fake.submitted == [text]                     # what was submitted is what the run dir keeps
    d = yaml.safe_load(text)
    assert d["device_type"] == "qemu" and d["context"] == {"arch": "amd64"}
    deploy, boot, test = (next(iter(a.values())) for a in d["actions"])
    assert [next(iter(a)) for a in d["actions"]] == ["deploy", "boot", "test"]
    assert deploy["to"] == "tmpfs"
    kernel, initrd = deploy["images"]["kernel"], deploy["images"]["initrd"]
    assert kernel["image_arg"].startswith("-kernel {kernel} -append \"console=ttyS0,115200")
    assert "tsc_early_khz=" in kernel["image_arg"]       # tcg: the TSC rate is pinned
    assert initrd["format"] == "cpio.newc" and initrd["compression"] == "gz"
    assert set(initrd["overlays"]) == {"lava", "kpatchtest"}  # no modules tarball for this kernel
    assert boot == {"method": "qemu", "media": "tmpfs", "timeout": {"minutes": 10}, "prompts": ["root@kpatchtest-lab"]}
    steps = test["definitions"][0]["repository"]["run"]["steps"]
    assert steps == [f'lava-test-case kernelrelease --shell test "$(uname -r)" = "{RELEASE}"', "sh /kpatchtest/workload.sh"]
    # every URL is under the artifact URL, and the artifact server serves what it names
    prefix = f"{lab.lava.artifact_url}/t/{job.boot_dir}/"
    urls = [kernel["url"], initrd["url"], initrd["overlays"]["kpatchtest"]["url"]]
    assert all(u.startswith(prefix) for u in urls)
    with lab:
        for u in urls:
            assert urllib.request.urlopen(u, timeout=10).status == 200


def test_the_bundle_runs_the_script_the_workload_would(lava_lab, tmp_path):
    """The device's /kpatchtest: workload.sh (the SSH lab's commands) and the boot image."""
    import tarfile
    fake, lab, job, run_dir = lava_lab((DATA / "job2-log.yaml").read_text(), (DATA / "job2-results.yaml").read_text())
    with lab:
        lab.run(job)
    bundle = lab._root / "t" / job.boot_dir / "kpatchtest.tar.gz"
    with tarfile.open(bundle) as t:
        names = t.getnames()
        script = t.extractfile("kpatchtest/workload.sh").read().decode()
    assert names == ["kpatchtest/smm-boot-200x8-0mb.img", "kpatchtest/workload.sh"]
    assert script.count("kpt_boot ") == 2 and "lava-test-case" in script
    assert script.count("kpt_put ") == 1 and "/kpatchtest/smm-boot-200x8-0mb.img /tmp/kpatchtest/smm-boot.img" in script


def test_modules_travel_as_a_tar_overlay():
    d = D.definition(name="n", device_type="qemu", base_url="http://a/b", files=D.JobFiles("k", "r", modules="m.tar.gz"),
                     cmdline="console=ttyS0", expected_release="x", prompt="p", timeout_minutes=20)
    assert d["actions"][0]["deploy"]["images"]["initrd"]["overlays"]["modules"] == \
        {"url": "http://a/b/m.tar.gz", "format": "tar", "path": "/"}
    assert d["actions"][2]["test"]["definitions"][0]["repository"]["run"]["steps"][1:] == []   # boot only
    assert yaml.safe_load(D.dump(d)) == d


def test_shell_words_are_quoted():
    """A command line with quotes and $ stays one word in LAVA's QEMU command and test step."""
    d = D.definition(name="n", device_type="qemu", base_url="http://a", files=D.JobFiles("k", "r"),
                     cmdline='console=ttyS0 x="$HOME"', expected_release="6.1`id`", prompt="p", timeout_minutes=20)
    arg = d["actions"][0]["deploy"]["images"]["kernel"]["image_arg"]
    out = subprocess.run(["sh", "-c", f"printf '%s\\n' {arg[len('-kernel {kernel} -append '):]}"],
                         capture_output=True, text=True).stdout
    assert out == 'console=ttyS0 x="$HOME"\n'
    step = d["actions"][2]["test"]["definitions"][0]["repository"]["run"]["steps"][0]
    assert step.endswith('= "6.1\\`id\\`"')


# -- results of the real job 2 -> records ------------------------------------------------------

def test_real_job_maps_to_the_local_labs_records(lava_lab):
    fake, lab, job, run_dir = lava_lab((DATA / "job2-log.yaml").read_text(), (DATA / "job2-results.yaml").read_text())
    with lab:
        rec = lab.run(job)
    b = rec.boot
    assert (b.status, b.kernelrelease, b.method, b.host) == ("booted", RELEASE, "lava", "lava-qemu")
    assert b.boot_id == "5990073b-afa0-4721-976f-ea62f0bbdc70"
    assert 5 < b.duration_s < 60 and b.splats == []
    console = (run_dir / b.console_log).read_text()
    assert "Linux version 6.1.192-kpt032768e1" in console and "kpt-end 9 " in console
    assert (run_dir / job.boot_dir / "lava-results.yaml").read_text() == (DATA / "job2-results.yaml").read_text()
    assert len((run_dir / job.boot_dir / "lava.log").read_text().splitlines()) >= len(fake.log)
    w = rec.workloads
    assert w is not None and w.error is None and w.kernelrelease == RELEASE and w.repetitions == 2
    [smm] = w.records
    assert (smm.name, smm.status, smm.group) == ("smm-boot", "pass", "smm-boot")
    m = {x.name: x for x in smm.metrics}
    # LAVA's own measurements (lava-test-case --measurement) are the replayed guest times
    cases = R.test_cases(R.parse_results((DATA / "job2-results.yaml").read_text()))
    assert m["guest_time"].values == [cases["smm-boot.1"].measurement, cases["smm-boot.2"].measurement]
    # wall_time: the command, timed on the device; LAVA's .wall_time also covers printing its output
    for i, wall in enumerate(m["wall_time"].values, 1):
        assert m["guest_time"].values[i - 1] <= wall <= cases[f"smm-boot.{i}.wall_time"].measurement
    assert m["wall_time"].note == S.WALL_NOTE
    assert all(v and v > 0 for v in m["smm_transitions"].values)     # the probes measured on the device
    assert w.probes["smm_transitions"] and not w.probes["smm_transitions"].startswith("unavailable")
    assert all((run_dir / p).exists() for p in smm.logs)


def test_record_shape_equals_the_ssh_labs(lava_lab, tmp_path):
    """Same metric names, units and order as run_smm_boot gives on an SSH host (its dry run)."""
    fake, lab, job, run_dir = lava_lab((DATA / "job2-log.yaml").read_text(), (DATA / "job2-results.yaml").read_text())
    with lab:
        rec = lab.run(job)
    w = job.workloads
    from kpatchtest.workloads.smm_boot import run_smm_boot
    ssh, _ = run_smm_boot(S._Recorder(), w.spec.smm_boot, w.smm_image, 2, tmp_path / "dry", tmp_path / "dry")
    names = lambda r: [(x.name, x.unit) for x in r.metrics if not x.name.startswith("kvm.")]  # noqa: E731
    assert names(rec.workloads.records[0]) == names(ssh)
    assert set(rec.workloads.model_dump()) == set(WorkloadRun(build="baseline", host="h").model_dump())


@pytest.mark.parametrize("results, reason", [
    # job 1 (real): the dispatcher failed appending a `format: file` overlay to the ramdisk
    ("job1-results.yaml", "LAVA Bug error: [Errno 2] No such file or directory"),
    # job 3 (real): the kernel's URL answered 404 when LAVA validated the job
    ("job3-results.yaml", "LAVA Job error: Invalid job data: [\"Resource unavailable at"),
])
def test_lava_error_is_a_boot_failure_not_a_workload_fail(lava_lab, results, reason):
    fake, lab, job, run_dir = lava_lab("[]", (DATA / results).read_text(), health="Incomplete")
    with lab:
        rec = lab.run(job)
    assert rec.boot.status == "boot-failed" and rec.workloads is None
    assert rec.boot.reason.startswith(reason)


def test_job_failing_after_the_boot_leaves_workload_errors(lava_lab):
    """The log ends in the middle of the workload (job cut off): booted, the rest is error."""
    log = yaml.load((DATA / "job2-log.yaml").read_text(), Loader=yaml.CSafeLoader)
    cut = next(i for i, e in enumerate(log) if str(e.get("msg", "")).startswith("kpt-end 6 "))
    results = [r for r in yaml.safe_load((DATA / "job2-results.yaml").read_text())
               if r["suite"] == "lava" and r["name"] != "job"]
    results.append({"suite": "lava", "name": "job", "result": "fail",
                    "metadata": {"error_type": "Infrastructure", "error_msg": "Connection closed"}})
    fake, lab, job, run_dir = lava_lab(yaml.safe_dump(log[:cut]), yaml.safe_dump(results), health="Incomplete")
    with lab:
        rec = lab.run(job)
    assert rec.boot.status == "booted"
    [smm] = rec.workloads.records
    assert smm.status == "error"
    assert "no output for step" in smm.detail


def test_interrupt_cancels_the_job(lava_lab, monkeypatch):
    fake, lab, job, run_dir = lava_lab((DATA / "job2-log.yaml").read_text(), (DATA / "job2-results.yaml").read_text(),
                                       running_polls=100)
    from kpatchtest.lab.lava import lab as lab_module

    def interrupt(_s):
        raise KeyboardInterrupt
    monkeypatch.setattr(lab_module.time, "sleep", interrupt)
    with lab, pytest.raises(KeyboardInterrupt):
        lab.run(job)
    assert fake.cancelled == [42]
    assert (run_dir / job.boot_dir / "console.log").read_text()    # what had streamed in is kept


def test_unreachable_server_is_a_boot_failure(lava_lab):
    fake, lab, job, run_dir = lava_lab("[]", "[]")
    with lab:
        fake.close()
        rec = lab.run(job)
    assert rec.boot.status == "boot-failed" and "scheduler.jobs.submit" in rec.boot.reason


# -- spec and credentials --------------------------------------------------------------------

def test_lab_lava_needs_its_section_and_credentials(tmp_path):
    with pytest.raises(ValueError, match="needs a lava"):
        LabRef(name="lava")
    ref = LavaRef(url="http://127.0.0.1:1", artifact_url="http://127.0.0.1:2")
    with pytest.raises(InputError, match=r"\$LAVA_TOKEN not set"):
        credentials(ref, env={"LAVA_USER": "u"})
    c = credentials(ref, env={"LAVA_USER": "u", "LAVA_TOKEN": "t/k"})
    assert c.rpc_url() == "http://u:t%2Fk@127.0.0.1:1/RPC2"
    (tmp_path / ".config").mkdir()
    (tmp_path / ".config/lavacli.yaml").write_text("lab: {uri: 'http://lava:80/RPC2', username: me, token: tok}\n")
    ident = credentials(LavaRef(url="http://x", artifact_url="http://y", identity="lab"), env={}, home=tmp_path)
    assert ident == Credentials("http://lava:80/RPC2", "me", "tok") and ident.rpc_url() == "http://me:tok@lava:80/RPC2"
    with pytest.raises(InputError, match="no such identity"):
        credentials(LavaRef(url="http://x", artifact_url="http://y", identity="other"), env={}, home=tmp_path)


def test_open_lab_picks_lava(tmp_path):
    ref = LabRef(name="lava", lava=LavaRef(url="http://127.0.0.1:1", artifact_url="http://127.0.0.1:2"))
    assert isinstance(open_lab(ref, tmp_path, LabSetup(run_dir=tmp_path, cache_dir=tmp_path, run_name="r")), LavaLab)


# -- opt-in: a real LAVA on this machine ----------------------------------------------------------

@pytest.mark.skipif(os.environ.get("KPATCHTEST_LAVA") != "1", reason="opt-in: KPATCHTEST_LAVA=1 (brings up LAVA)")
def test_demo_first_branch_through_a_real_lava(tmp_path):
    """tests/lava/bringup.sh, then `kpatchtest run` of the demo's debian-6.1 with lab: lava
    (one round, one repetition: two LAVA jobs); the records have the local lab's shape."""
    p = subprocess.run([str(REPO / "tests/lava/bringup.sh")], capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    env_vars = dict(kv.split("=", 1) for kv in p.stdout.strip().splitlines()[-1].split())
    demo = yaml.safe_load((REPO / "series/demo.yaml").read_text())
    demo["series"] = [{"mbox": str(REPO / "series" / demo["series"][0]["mbox"])}]
    demo["lab"] = {"name": "lava", "lava": {"url": env_vars["LAVA_URL"], "user": env_vars["LAVA_USER"],
                                            "artifact_url": env_vars["LAVA_ARTIFACT_URL"],
                                            "artifact_dir": env_vars["LAVA_ARTIFACT_DIR"]}}
    demo["workloads"].update(rounds=1, repetitions=1)
    demo["gates"] = {"boot": "booted"}
    spec = tmp_path / "demo-lava.yaml"
    spec.write_text(yaml.safe_dump(demo))
    out = tmp_path / "out"
    env = dict(os.environ, LAVA_TOKEN=env_vars["LAVA_TOKEN"])
    r = subprocess.run([sys.executable, "-m", "kpatchtest", "run", str(spec), "--branch", "debian-6.1", "--out", str(out),
                        "--offline", "--stages", "fetch,apply,build,boot,workloads"],
                       capture_output=True, text=True, env=env, timeout=3600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    [branch] = [b for b in res["branches"] if b["name"] == "debian-6.1"]
    assert [b["status"] for b in branch["boot"]] == ["booted", "booted"]
    for b in branch["boot"]:
        assert set(b) == set(BootResult(build="baseline", status="booted").model_dump())
        assert b["method"] == "lava" and (out / b["console_log"]).exists()
    for w in branch["workloads"]:
        assert set(w) == set(WorkloadRun(build="baseline", host="h").model_dump())
        [smm] = w["records"]
        assert smm["status"] == "pass"
        ssh = _dry_run_record(tmp_path)
        assert [(m["name"], m["unit"]) for m in smm["metrics"] if not m["name"].startswith("kvm.")] == \
            [(m.name, m.unit) for m in ssh.metrics if not m.name.startswith("kvm.")]
        assert all(len(m["values"]) == 1 for m in smm["metrics"])
        assert any(m["name"] == "smm_transitions" and m["values"][0] for m in smm["metrics"])
    shutil.rmtree(Path(env_vars["LAVA_ARTIFACT_DIR"]) / "demo", ignore_errors=True)


def _dry_run_record(tmp_path: Path):
    from kpatchtest.workloads.smm_boot import image_for, run_smm_boot
    spec = SmmBootSpec(reads=200, timeout_s=180)
    img = image_for(spec, tmp_path / "img")
    return run_smm_boot(S._Recorder(), spec, img, 1, tmp_path / "dry", tmp_path / "dry")[0]


def test_bundle_is_reproducible(tmp_path):
    """The same files give the same bytes (the artifact's URL content does not churn)."""
    import time

    from kpatchtest.lab.lava.lab import bundle
    (tmp_path / "img").write_bytes(b"\x55\xaa")
    first = bundle({"workload.sh": b"echo\n", "img": tmp_path / "img"})
    time.sleep(1.1)
    assert bundle({"img": tmp_path / "img", "workload.sh": b"echo\n"}) == first
    assert bundle({"workload.sh": b"echo 2\n", "img": tmp_path / "img"}) != first
