"""One run per host: the lock on the host (over real SSH), the local lock, quarantine."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kpatchtest.lab.ssh.connection import HostConnection, LabError
from kpatchtest.lab.ssh.hostlock import HostBusy, Quarantine, local_host_lock, remote_host_lock
from tests.conftest_sshd import Sshd, sshd, sshd_keys  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def quiet(line: str) -> None:
    pass


@pytest.fixture
def lock_path(tmp_path: Path) -> str:
    # the sshd runs on this machine: keep each test's host lock apart from /run
    return str(tmp_path / "host lock; $(x)")


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """A second kpatchtest process that prints 'held' once it has the lock."""
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line == "held\n", p.stderr.read() if p.stderr else ""
    return p


def _kill(p: subprocess.Popen[str]) -> None:
    """SIGKILL: no cleanup at all, the owner's connections and fds just vanish."""
    p.send_signal(signal.SIGKILL)
    p.wait()
    for stream in (p.stdout, p.stderr):
        if stream is not None:
            stream.close()


REMOTE_HOLDER = """
import sys, time
from kpatchtest.lab.ssh.inventory import HostSpec
from kpatchtest.lab.ssh.connection import HostConnection
from kpatchtest.lab.ssh.hostlock import remote_host_lock
conn = HostConnection(HostSpec.model_validate_json(sys.argv[1]), log=lambda line: None)
with remote_host_lock(conn, 5, "other run", path=sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""

LOCAL_HOLDER = """
import sys, time
from pathlib import Path
from kpatchtest.lab.ssh.hostlock import local_host_lock
with local_host_lock(Path(sys.argv[1]), "box/1", 5, run="run-42"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_remote_lock_serialises_two_holders(sshd: Sshd, lock_path: str) -> None:
    a = HostConnection(sshd.host_spec(), log=quiet)
    b = HostConnection(sshd.host_spec(), log=quiet)
    with remote_host_lock(a, 1, "run A (pid 1 on laptop)", path=lock_path):
        t = time.monotonic()
        with pytest.raises(HostBusy) as e:
            with remote_host_lock(b, 1, "run B", path=lock_path, poll_s=0.2):
                pytest.fail("both hold the lock")
        assert 1 <= time.monotonic() - t < 4
        assert "host testbox is in use by run A (pid 1 on laptop) since 20" in str(e.value)
        assert re.search(r"; waited [123] s$", str(e.value))     # 1 s and the polls' ssh round trips
    t = time.monotonic()
    # free at the first try: a second try would come only after poll_s (an ssh exec on a
    # loaded machine can take a second by itself, so the bound is poll_s, not 1 s)
    with remote_host_lock(b, 10, "run B", path=lock_path, poll_s=5):
        assert time.monotonic() - t < 4.5
    with remote_host_lock(a, 1, "run A again", path=lock_path):   # released cleanly again
        pass
    a.close()
    b.close()


def test_remote_lock_waits_for_the_holder(sshd: Sshd, lock_path: str) -> None:
    a = HostConnection(sshd.host_spec(), log=quiet)
    b = HostConnection(sshd.host_spec(), log=quiet)
    released = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with remote_host_lock(a, 1, "run A", path=lock_path):
            held.set()
            time.sleep(1.5)
        released.set()

    th = threading.Thread(target=hold)
    th.start()
    held.wait(10)
    t = time.monotonic()
    with remote_host_lock(b, 10, "run B", path=lock_path, poll_s=0.2):
        assert released.is_set()
        assert 0.5 < time.monotonic() - t < 5
    th.join()
    a.close()
    b.close()


def test_remote_lock_of_a_killed_owner_is_free(sshd: Sshd, lock_path: str) -> None:
    p = _spawn(REMOTE_HOLDER, sshd.host_spec().model_dump_json(), lock_path)
    b = HostConnection(sshd.host_spec(), log=quiet)
    with pytest.raises(HostBusy, match="in use by other run"):
        with remote_host_lock(b, 0.3, "run B", path=lock_path, poll_s=0.1):
            pass
    _kill(p)                           # the TCP connection just drops
    t = time.monotonic()
    with remote_host_lock(b, 10, "run B", path=lock_path, poll_s=0.2):
        assert time.monotonic() - t < 5
    b.close()


def test_remote_lock_reports_a_lock_it_cannot_take(sshd: Sshd, tmp_path: Path) -> None:
    c = HostConnection(sshd.host_spec(), log=quiet)
    with pytest.raises(LabError, match="cannot take the lock"):
        with remote_host_lock(c, 1, "run", path=str(tmp_path / "no such dir" / "lock")):
            pass
    c.close()


def test_local_lock_across_processes(tmp_path: Path) -> None:
    p = _spawn(LOCAL_HOLDER, str(tmp_path))
    t = time.monotonic()
    with pytest.raises(HostBusy) as e:
        with local_host_lock(tmp_path, "box/1", 0.5):
            pytest.fail("both hold the lock")
    assert 0.5 <= time.monotonic() - t < 2
    msg = str(e.value)
    assert f"host box/1 is in use by pid {p.pid} (run run-42) since 20" in msg and "waited" in msg
    _kill(p)
    t = time.monotonic()
    with local_host_lock(tmp_path, "box/1", 2, run="mine"):   # the kernel dropped the dead owner's lock
        assert time.monotonic() - t < 0.5
        [lock] = (tmp_path / "locks").iterdir()
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["run"] == "mine"
    assert lock.read_text() == ""


def test_local_lock_ignores_a_dead_owners_leftover_info(tmp_path: Path) -> None:
    with local_host_lock(tmp_path, "box", 1):
        pass
    [lock] = (tmp_path / "locks").iterdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock.write_text(json.dumps({"pid": int(dead), "run": "crashed", "since": "then"}))
    with local_host_lock(tmp_path, "box", 1):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_local_lock_names_are_safe_and_distinct(tmp_path: Path) -> None:
    with local_host_lock(tmp_path, "../x", 1), local_host_lock(tmp_path, "._x", 1), \
            local_host_lock(tmp_path, "x", 1):
        names = sorted(p.name for p in (tmp_path / "locks").iterdir())
    assert len(names) == 3 and all("/" not in n and not n.startswith(".") for n in names)
    assert not (tmp_path / "x.lock").exists()


def test_quarantine_after_n_failures_in_a_row(tmp_path: Path) -> None:
    state = tmp_path / "state" / "quarantine.json"
    q = Quarantine(state)
    assert not q.is_quarantined("box1")
    assert q.record("box1", False, 3) is False
    assert q.record("box1", True, 3) is False          # a success resets the count
    assert [q.record("box1", False, 3) for _ in range(3)] == [False, False, True]
    assert q.record("box2", False, 3) is False
    again = Quarantine(state)                          # survives the process: it is a file
    assert again.is_quarantined("box1") and not again.is_quarantined("box2")
    data = json.loads(state.read_text())
    assert data["hosts"]["box1"]["failures"] == 3 and data["hosts"]["box1"]["since"]
    assert sorted(p.name for p in state.parent.iterdir()) == ["quarantine.json", "quarantine.json.lock"]
    again.clear("box1")
    assert not q.is_quarantined("box1") and q.failures("box2") == 1
    q.record("box1", False, 1)
    q.clear()
    assert not q.is_quarantined("box1") and q.failures("box2") == 0


def test_quarantine_updates_from_parallel_runs_are_not_lost(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q.json")
    threads = [threading.Thread(target=lambda h=h: [q.record(h, False, 100) for _ in range(20)])
               for h in ("a", "b", "c", "d")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [q.failures(h) for h in "abcd"] == [20, 20, 20, 20]


def test_corrupt_quarantine_state_is_a_clear_error(tmp_path: Path) -> None:
    state = tmp_path / "q.json"
    state.write_text("{not json")
    with pytest.raises(LabError, match="not JSON"):
        Quarantine(state).is_quarantined("box")
