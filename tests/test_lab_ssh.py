"""HostConnection against a real OpenSSH sshd on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from kpatchtest.errors import EXIT_INPUT, KpatchtestError
from kpatchtest.lab.ssh.connection import (
    HostConnection,
    HostKeyRejected,
    HostUnreachable,
    LabError,
    RemoteCommandFailed,
    parse_jump,
)
from kpatchtest.lab.ssh.inventory import Timeouts
from tests.conftest_sshd import Sshd, free_port, sshd, sshd_keys  # noqa: F401  (fixtures)

NASTY = ["two words", "semi;colon", "$(touch /tmp/kpt-pwned)", "`id`", "it's", 'say "hi"',
         "new\nline", "*", "-n", "", "back\\slash", "tab\there", "ünïcödé", "a && b || c", "> out"]


class Log(list[str]):
    def __call__(self, line: str) -> None:
        self.append(line)


@pytest.fixture
def conn(sshd: Sshd) -> HostConnection:
    c = HostConnection(sshd.host_spec(), log=Log())
    yield c
    c.close()


def test_run_passes_every_argument_unharmed(conn: HostConnection) -> None:
    r = conn.run(["printf", "%s\\0", *NASTY])
    assert r.exit_code == 0
    assert r.stdout.split("\0")[:-1] == NASTY
    assert not Path("/tmp/kpt-pwned").exists()


def test_run_script_gets_values_as_positional_parameters(conn: HostConnection) -> None:
    r = conn.run_script('for a; do printf "%s\\0" "$a"; done; echo "$#" >&2', *NASTY)
    assert r.stdout.split("\0")[:-1] == NASTY
    assert r.stderr.strip() == str(len(NASTY))


def test_env_values_are_quoted(conn: HostConnection) -> None:
    r = conn.run(["sh", "-c", 'printf %s "$KPT_VALUE"'], env={"KPT_VALUE": "a b; $(id) 'q'"})
    assert r.stdout == "a b; $(id) 'q'"
    with pytest.raises(ValueError):
        conn.run(["true"], env={"X; id": "1"})


def test_exit_codes_and_check(conn: HostConnection) -> None:
    assert conn.run(["sh", "-c", "echo oops >&2; exit 3"], check=False).exit_code == 3
    with pytest.raises(RemoteCommandFailed) as e:
        conn.run(["sh", "-c", "echo oops >&2; exit 3"])
    assert e.value.result.exit_code == 3
    assert "exited 3: oops" in str(e.value)
    assert conn.run(["sh", "-c", "kill -9 $$"], check=False).exit_code == -1   # killed by a signal


def test_big_output_on_both_streams_and_background_children(conn: HostConnection) -> None:
    r = conn.run(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' o; head -c 2000000 /dev/zero | tr '\\0' e >&2"])
    assert (len(r.stdout), len(r.stderr)) == (3000000, 2000000)
    assert set(r.stdout) == {"o"} and set(r.stderr) == {"e"}
    t = time.monotonic()
    assert conn.run(["sh", "-c", "sleep 5 & echo started"]).stdout == "started\n"
    assert time.monotonic() - t < 3      # the exit status counts, not the pipe's EOF


def test_unknown_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    c = HostConnection(sshd.host_spec(known_hosts=str(empty)), log=Log())
    with pytest.raises(HostKeyRejected) as e:
        c.run(["true"])
    msg = str(e.value)
    assert f"[127.0.0.1]:{sshd.port}" in msg and "not in known_hosts" in msg and str(empty) in msg
    assert "ssh-keyscan -p" in msg and "insecure_host_keys: true" in msg
    assert "SHA256:" in msg
    assert empty.read_text() == ""          # nothing was added behind our back
    missing = HostConnection(sshd.host_spec(known_hosts=str(tmp_path / "nope")), log=Log())
    with pytest.raises(HostKeyRejected, match="does not exist"):
        missing.open()


def test_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line(sshd.keys.other_host_key))
    c = HostConnection(sshd.host_spec(known_hosts=str(kh)), log=Log())
    with pytest.raises(HostKeyRejected, match="CHANGED") as e:
        c.open()
    assert e.value.exit_code == EXIT_INPUT


def test_insecure_host_keys_accepts_and_logs(sshd: Sshd, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line(sshd.keys.other_host_key))   # even a wrong key on file
    log = Log()
    with HostConnection(sshd.host_spec(known_hosts=str(kh), insecure_host_keys=True), log=log) as c:
        assert c.run(["echo", "hi"]).stdout == "hi\n"
    warnings = [line for line in log if line.startswith("WARNING")]
    assert len(warnings) == 1 and "insecure_host_keys" in warnings[0] and "SHA256:" in warnings[0]
    assert kh.read_text() == sshd.known_hosts_line(sshd.keys.other_host_key)


def test_logs_name_the_key_file_never_its_content(sshd: Sshd, sshd_keys, caplog) -> None:  # noqa: F811
    """The route line (printed once per host by the boot stage, logged to run.log at
    every connection) names the key file, never its content."""
    caplog.set_level("INFO", logger="kpatchtest.lab.ssh.connection")
    with HostConnection(sshd.host_spec(), log=Log()) as c:
        c.run(["true"])
        route = c.route()
    text = route + "\n" + caplog.text
    assert caplog.text.count(route) == 1
    assert str(sshd_keys.client_key) in text
    secret_lines = [ln for ln in sshd_keys.client_key.read_text().splitlines() if "PRIVATE KEY" not in ln]
    assert secret_lines and not any(ln in text for ln in secret_lines)
    assert sshd.keys.pub(sshd_keys.client_key).split()[1] not in text


def test_put_and_get_text(conn: HostConnection, tmp_path: Path) -> None:
    local = tmp_path / "vmlinuz test"
    local.write_bytes(b"kernel \xff bytes\n" * 1000)
    local.chmod(0o640)
    remote_dir = conn.run(["mktemp", "-d"]).stdout.strip()
    remote = f"{remote_dir}/it's a $(file)"
    conn.put(local, remote)
    assert conn.run(["stat", "-c", "%s %a", remote]).stdout.split() == [str(15 * 1000), "640"]
    assert conn.get_text(remote).startswith("kernel \ufffd bytes\n")
    assert conn.get_text("/proc/sys/kernel/ostype") == "Linux\n"
    with pytest.raises(FileNotFoundError):
        conn.get_text(f"{remote_dir}/missing")
    conn.run(["rm", "-rf", remote_dir])


def test_a_hung_command_ends_at_the_timeout(sshd: Sshd) -> None:
    c = HostConnection(sshd.host_spec(timeouts=Timeouts(connect_s=5, command_s=1)), log=Log())
    t = time.monotonic()
    with pytest.raises(HostUnreachable, match="no answer within 1 s"):
        c.run(["sleep", "15"])
    assert time.monotonic() - t < 5
    with pytest.raises(HostUnreachable, match="no answer within 0.5 s"):
        c.run(["sleep", "15"], timeout=0.5)
    assert c.run(["echo", "still fine"]).stdout == "still fine\n"    # reconnects
    c.close()


def test_dead_port_fails_fast(sshd: Sshd) -> None:
    c = HostConnection(sshd.host_spec(port=free_port()), log=Log())
    t = time.monotonic()
    with pytest.raises(HostUnreachable, match="cannot connect") as e:
        c.run(["true"])
    assert time.monotonic() - t < 3
    assert isinstance(e.value, KpatchtestError) and e.value.exit_code == EXIT_INPUT


def test_silent_host_ends_at_the_connect_timeout(sshd: Sshd) -> None:
    """A host that accepts TCP but never speaks SSH (hung box, dead forwarder)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        c = HostConnection(sshd.host_spec(port=port, timeouts=Timeouts(connect_s=1)), log=Log())
        t = time.monotonic()
        with pytest.raises(HostUnreachable, match="cannot connect"):
            c.open()
        assert time.monotonic() - t < 4


def test_wait_until_up_across_an_sshd_restart(sshd: Sshd) -> None:
    c = HostConnection(sshd.host_spec(), log=Log())
    before = c.boot_id()
    sshd.stop()
    c.close()
    restart = threading.Timer(1.5, sshd.start)
    restart.start()
    t = time.monotonic()
    c.wait_until_up(deadline_s=20, poll_s=0.3)
    restart.join()
    assert 1.0 < time.monotonic() - t < 10
    assert c.boot_id() == before          # same machine: sshd restarted, not the kernel
    c.close()


def test_wait_until_up_gives_up_at_the_deadline(sshd: Sshd) -> None:
    sshd.stop()
    c = HostConnection(sshd.host_spec(), log=Log())
    t = time.monotonic()
    with pytest.raises(HostUnreachable, match="not answering SSH within 2 s"):
        c.wait_until_up(deadline_s=2, poll_s=0.3)
    assert time.monotonic() - t < 5


def test_wait_until_up_does_not_retry_a_rejected_key(sshd: Sshd, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    c = HostConnection(sshd.host_spec(known_hosts=str(kh)), log=Log())
    t = time.monotonic()
    with pytest.raises(HostKeyRejected):
        c.wait_until_up(deadline_s=20)
    assert time.monotonic() - t < 3


def test_start_detached_returns_at_once_and_outlives_the_session(conn: HostConnection,
                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "rebooted; really"
    t = time.monotonic()
    conn.start_detached(["sh", "-c", 'sleep 1; touch "$1"', "sh", str(marker)], delay_s=1)
    conn.close()                         # as before a reboot: the session is gone
    assert time.monotonic() - t < 1.5
    assert not marker.exists()
    end = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < end:
        time.sleep(0.1)
    assert marker.exists()


def test_jump_host(sshd: Sshd) -> None:
    with HostConnection(sshd.host_spec(jump=f"root@127.0.0.1:{sshd.port}"), log=Log()) as c:
        assert c.run(["echo", "via jump"]).stdout == "via jump\n"
        assert f"via root@[127.0.0.1]:{sshd.port}" in c.route()


def test_missing_key_file_is_a_clear_error(sshd: Sshd, tmp_path: Path) -> None:
    c = HostConnection(sshd.host_spec(key=str(tmp_path / "id_missing")), log=Log())
    with pytest.raises(LabError, match="key file .*id_missing does not exist"):
        c.wait_until_up(deadline_s=20)


def test_parse_jump() -> None:
    assert parse_jump("bastion", "root") == ("root", "bastion", 22)
    assert parse_jump("ops@bastion:2222", "root") == ("ops", "bastion", 2222)
    assert parse_jump("[fe80::1]:2200", "root") == ("root", "fe80::1", 2200)
    assert parse_jump("ops@fe80::1", "root") == ("ops", "fe80::1", 22)
