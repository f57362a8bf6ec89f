"""The LAVA lab backend: each BootJob is one LAVA job, submitted and followed over XML-RPC.

Per BootJob: the kernel, the lab image (the ramdisk), the modules and a tarball of the
workload script with its files are put where `lava.artifact_url` serves them; the job
definition (definition.py) is written to the boot's run directory and submitted; its
log streams into that directory (lava.log: every entry; console.log: what the device
printed) until the job finishes; then records.py maps it to a BootRecord. An interrupt
or any exception while the job is queued or running cancels it on the server.
"""

from __future__ import annotations

import functools
import gzip
import io
import tarfile
import tempfile
import threading
import time
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kpatchtest.errors import InputError
from kpatchtest.lab.backend import BootJob, BootRecord, Lab, LabSetup
from kpatchtest.lab.lava import definition as D
from kpatchtest.lab.lava import records as R
from kpatchtest.lab.lava.client import LavaClient, LavaError, credentials
from kpatchtest.lab.local.image import build_image
from kpatchtest.lab.local.qemu import DEFAULT_CMDLINE, tcg_cmdline
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.results import BootResult, WorkloadRun
from kpatchtest.spec import LabRef
from kpatchtest.util import link_or_copy, write_atomic
from kpatchtest.workloads import script as S
from kpatchtest.workloads.record import WorkloadRecord
from kpatchtest.workloads.smm_boot import NAME as SMM_NAME

POLL_S = 3.0
QUEUE_SLACK_S = 900.0       # beyond the job's own timeout: waiting for a device


class ArtifactServer:
    """A plain HTTP server for `directory` on artifact_url's host and port, while the run lasts."""

    def __init__(self, directory: Path, url: str):
        u = urllib.parse.urlsplit(url)
        handler = functools.partial(_QuietHandler, directory=str(directory))
        try:
            self.httpd = ThreadingHTTPServer((u.hostname or "127.0.0.1", u.port or 80), handler)
        except OSError as e:
            raise InputError(f"lab.lava.artifact_url {url}: cannot serve it here: {e}",
                             hint="free the port, or set lab.lava.artifact_dir to a directory a server of yours serves") from None
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lava-artifacts", daemon=True)

    def __enter__(self) -> "ArtifactServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def bundle(files: dict[str, bytes | Path]) -> bytes:
    """A reproducible tar.gz of DEVICE_FILES: name (under it) -> content or a local file."""
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as t:
        for name in sorted(files):
            src = files[name]
            data = src.read_bytes() if isinstance(src, Path) else src
            info = tarfile.TarInfo(f"{D.DEVICE_FILES.strip('/')}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o755 if name.endswith(".sh") else 0o644, 0
            t.addfile(info, io.BytesIO(data))
    return raw.getvalue()


class LavaLab(Lab):
    kind = "lava"

    def __init__(self, ref: LabRef, setup: LabSetup, client: LavaClient | None = None):
        assert ref.lava is not None
        self.ref, self.lava, self.setup = ref, ref.lava, setup
        self.client = client
        self._server: ArtifactServer | None = None
        self._root = Path(self.lava.artifact_dir).expanduser() if self.lava.artifact_dir else setup.run_dir / "lava-artifacts"
        self._host = HostSpec(name=f"lava-{self.lava.device_type}", address=urllib.parse.urlsplit(self.lava.url).hostname
                              or "lava", tags=["lava", self.lava.device_type, *ref.tags])

    def __enter__(self) -> "LavaLab":
        if self.client is None:
            self.client = LavaClient(credentials(self.lava))
        self.setup.log(f"LAVA {self.lava.url}: version {self.client.version()}, device type {self.lava.device_type}")
        self._root.mkdir(parents=True, exist_ok=True)
        if not self.lava.artifact_dir:
            self._server = ArtifactServer(self._root, self.lava.artifact_url).__enter__()
        self.image = build_image(self.setup.cache_dir, nested=self.setup.nested, log=self.setup.log)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.__exit__(*exc)
            self._server = None

    def hosts(self) -> list[HostSpec]:
        return [self._host]

    # -- one job ----------------------------------------------------------------------
    def run(self, job: BootJob) -> BootRecord:
        out = self.setup.run_dir / job.boot_dir
        out.mkdir(parents=True, exist_ok=True)
        ops, smm = self._workload_ops(job)
        files, base_url = self._stage(job, ops, smm)
        k = job.kernel
        cmdline = " ".join(filter(None, [DEFAULT_CMDLINE, k.extra_cmdline]))
        defn = D.definition(name=f"kpatchtest {self.setup.run_name}: {job.branch} {job.build} round {job.round}"
                            + (f" rerun {job.rerun}" if job.rerun else ""),
                            device_type=self.lava.device_type, base_url=base_url, files=files,
                            cmdline=tcg_cmdline(cmdline) if self.lava.tcg else cmdline,
                            expected_release=k.kernelrelease, prompt=self.lava.prompt,
                            timeout_minutes=self.lava.timeout_minutes)
        text = D.dump(defn)
        write_atomic(out / "lava-job.yaml", text)
        try:
            job_id, health, log = self._submit_and_follow(text, out)
        except LavaError as e:
            return BootRecord(boot=BootResult(build=job.build, status="boot-failed", host=self._host.name, method="lava",
                                              round=job.round, rerun=job.rerun, reason=str(e),
                                              expected_release=k.kernelrelease))
        results = self._results(job_id, out)
        return self._record(job, log, results, health, out, ops, smm)

    def _workload_ops(self, job: BootJob) -> tuple[list[S.Op], Path | None]:
        w = job.workloads
        if w is None or w.spec.smm_boot is None or w.smm_image is None or (job.only and SMM_NAME not in job.only):
            return [], None
        with tempfile.TemporaryDirectory(prefix="kpt-lava-dry-") as scratch:
            return S.record_smm_boot(w.spec.smm_boot, w.smm_image, w.spec.repetitions, Path(scratch)), w.smm_image

    def _stage(self, job: BootJob, ops: list[S.Op], smm: Path | None) -> tuple[D.JobFiles, str]:
        """The job's files under the artifact root; their URL prefix."""
        rel = Path(self.setup.run_name) / job.boot_dir
        where = self._root / rel
        k = job.kernel
        link_or_copy(Path(k.bzimage), where / "bzImage")
        link_or_copy(self.image.initramfs, where / "initramfs.cpio.gz")
        files = D.JobFiles(kernel="bzImage", ramdisk="initramfs.cpio.gz")
        if k.modules and Path(k.modules).exists():
            link_or_copy(Path(k.modules), where / "modules.tar.gz")
            files.modules = "modules.tar.gz"
        if ops:
            assert smm is not None
            script = S.render_script(ops, S.device_path_in(D.DEVICE_FILES), D.REPORT_SHELL)
            write_atomic(where / "kpatchtest.tar.gz", bundle({"workload.sh": script.encode(), smm.name: smm}))
            files.bundle = "kpatchtest.tar.gz"
        return files, f"{self.lava.artifact_url.rstrip('/')}/{rel.as_posix()}"

    def _submit_and_follow(self, text: str, out: Path) -> tuple[int, str, list[dict]]:
        """Submit, stream the log into `out` until the job ends; cancel it if we stop early."""
        assert self.client is not None
        job_id = self.client.submit(text)
        self.setup.log(f"LAVA job {job_id}: {self.lava.url.rstrip('/')}/scheduler/job/{job_id}")
        for p in (out / "lava.log", out / "console.log"):
            p.unlink(missing_ok=True)
        log: list[dict] = []
        limit = self.lava.timeout_minutes * 60 + QUEUE_SLACK_S
        deadline = time.monotonic() + limit
        try:
            while True:
                finished, new = self.client.logs(job_id, len(log))
                if new:
                    log += new
                    R.write_log(out / "lava.log", new)
                    with open(out / "console.log", "a") as f:
                        f.writelines(line + "\n" for _, line in R.target_lines(new))
                state = self.client.show(job_id)
                if finished or state.get("state") == "Finished":
                    _, rest = self.client.logs(job_id, len(log))
                    log += rest
                    R.write_log(out / "lava.log", rest)
                    with open(out / "console.log", "a") as f:
                        f.writelines(line + "\n" for _, line in R.target_lines(rest))
                    return job_id, str(state.get("health", "")), log
                if time.monotonic() > deadline:
                    raise LavaError(f"LAVA job {job_id} did not finish in {limit:.0f} s")
                time.sleep(POLL_S)
        except BaseException:
            try:
                self.client.cancel(job_id)
                self.setup.log(f"LAVA job {job_id}: cancelled")
            except LavaError as e:
                self.setup.log(f"LAVA job {job_id}: could not cancel it: {e}")
            raise

    def _results(self, job_id: int, out: Path) -> list[R.LavaCase]:
        assert self.client is not None
        text = self.client.results_yaml(job_id)
        write_atomic(out / "lava-results.yaml", text)
        return R.parse_results(text)

    def _record(self, job: BootJob, log: list[dict], cases: list[R.LavaCase], health: str, out: Path,
                ops: list[S.Op], smm: Path | None) -> BootRecord:
        lb = R.boot_result(build=job.build, host=self._host.name, expected_release=job.kernel.kernelrelease,
                           log=log, cases=cases, health=health, console_rel=f"{job.boot_dir}/console.log")
        res = lb.result
        res.round, res.rerun = job.round, job.rerun
        if res.status != "booted" or job.workloads is None:
            return BootRecord(boot=res)
        w = job.workloads
        run = WorkloadRun(build=res.build, host=self._host.name, round=res.round, rerun=res.rerun,
                          kernelrelease=res.kernelrelease, repetitions=w.spec.repetitions)
        if w.spec.kvm_unit_tests is not None and (not job.only or any(t != SMM_NAME for t in job.only)):
            run.records.append(WorkloadRecord(name="kvm-unit-tests", status="error", group="kvm-unit-tests",
                                              detail="not run: the LAVA lab runs the SMM boot only (docs/lava.md)"))
        if ops:
            assert w.spec.smm_boot is not None and smm is not None
            framed = S.parse_output(lb.console)
            if not framed:
                run.error = f"{self._host.name}: not run: " + (lb.error or "the device printed none of the workload's output")
                return BootRecord(boot=res, workloads=run)
            record, run.probes = S.replay_smm_boot(w.spec.smm_boot, smm, w.spec.repetitions, ops, framed,
                                                   self.setup.run_dir / job.workloads_dir / "smm-boot",
                                                   self.setup.run_dir, log=lambda m: self.setup.log(f"{job.branch} {job.build}: {m}"))
            ran = len(next((m.values for m in record.metrics if m.name == "guest_time"), []))
            R.check_against_lava(record, R.test_cases(cases), ran)
            if lb.error and record.status == "pass":
                record.detail = "; ".join(filter(None, [record.detail, lb.error]))
            run.records.append(record)
        return BootRecord(boot=res, workloads=run)

