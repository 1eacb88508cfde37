"""``zds check ztunnel``'s bench: a ztunnel that cannot start, a socket path that cannot be
bound, the processes it started, and a ztunnel that stops for good while nobody, or a
supervisor, restarts it (``--zds-socket``)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import FAST_CHECK as FAST
from tests.harness import ZDS, CheckRun, ZtunnelProc, wait_until, zds_check
from tests.harness import ZTUNNEL_CMD as ZTUNNEL

pytestmark = pytest.mark.root

#: --timeout and --grace of FAST, without its long --connect-timeout.
QUICK = ["--timeout", "3", "--grace", "1"]


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and waiting for init to reap it, does not)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def check_at(path: str, only: str, *args: str, tmp: pathlib.Path) -> CheckRun:
    """``zds check ztunnel`` of the checks ``only`` against a ztunnel that connects to ``path``."""
    return zds_check("ztunnel", "--zds-socket", path, "--only", only, *args, tmp=tmp)


def check_ztunnel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZDS, "check", "ztunnel", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("false", "the ztunnel command exited with status 1 before it connected"),
        ("no-such-cmd {socket}", "exited with status 127 before it connected"),
    ],
)
def test_a_ztunnel_command_that_exits_at_once_is_said_at_once_in_one_line(command: str, says: str) -> None:
    """Each was 26 ERROR blocks and exit 1, where README says exit 2 when the check cannot start."""
    started = time.monotonic()
    done = check_ztunnel("--cmd", command, "--connect-timeout", "30")
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("zds check ztunnel: ") and says in line, line
    if "no-such-cmd" in command:
        assert "its last output: " in line and "not found" in line, line
    assert done.stdout == ""
    assert time.monotonic() - started < 20  # (not the whole --connect-timeout)


def test_a_ztunnel_command_that_never_connects_cannot_start_the_check(tmp_path: pathlib.Path) -> None:
    pid_file = tmp_path / "pid"
    done = check_ztunnel("--cmd", f"echo $$ > {pid_file}; exec sleep 1000", "--connect-timeout", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert "the ztunnel command runs but did not connect to " in line and "within 2s" in line, line
    assert not running(int(pid_file.read_text()))


def test_a_started_child_that_ignores_sigterm_does_not_outlive_the_check(tmp_path: pathlib.Path) -> None:
    """Only /bin/sh was waited for: a child of it that ignored SIGTERM ran on after the check."""
    pid_file = tmp_path / "pid"
    stubborn = f"sh -c 'trap \"\" TERM; echo $$ > {pid_file}; exec sleep 1000' & "
    run = zds_check("ztunnel", "--cmd", stubborn + ZTUNNEL, "--only", "hello", *FAST, tmp=tmp_path)
    assert run.status("hello") == "pass", run.stdout + run.stderr
    pid = int(pid_file.read_text())
    assert not running(pid), f"pid {pid} outlived the check"


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("long", " bytes, longer than a unix socket path may be (107)"),
        ("file/x.sock", "/file is not a directory"),
        ("/proc/zds-check.sock", "cannot listen on /proc/zds-check.sock (--zds-socket): "),
    ],
)
def test_a_zds_socket_path_that_cannot_be_bound_is_said_in_one_line(
    where: str, says: str, tmp_path: pathlib.Path
) -> None:
    """Each was a traceback."""
    (tmp_path / "file").write_text("x")
    path = (
        str(tmp_path / ("d" * 120) / "x.sock")
        if where == "long"
        else where
        if where[0] == "/"
        else str(tmp_path / where)
    )
    done = check_ztunnel("--zds-socket", path, "--only", "hello", "--connect-timeout", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert says in line and "Traceback" not in done.stderr, line
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_the_directories_made_for_the_zds_socket_are_removed_again(tmp_path: pathlib.Path) -> None:
    done = check_ztunnel(
        "--zds-socket", str(tmp_path / "a" / "b" / "x.sock"), "--only", "hello", "--connect-timeout", "1"
    )
    assert done.returncode == 2 and "no ztunnel connected to " in done.stderr, done.stdout + done.stderr
    assert os.listdir(tmp_path) == []


def test_without_a_restarter_only_the_checks_after_a_stop_for_good_are_errors(tmp_path: pathlib.Path) -> None:
    """Every check was an ERROR, the ones that held too; and a stop for good as the last
    check waited --connect-timeout for a restart that nothing needed."""
    path = str(tmp_path / "zds.sock")
    ztunnel = ZtunnelProc(path, str(tmp_path / "ztunnel.log"), "--no-listeners")
    try:
        started = time.monotonic()
        last = check_at(path, "hello,add-without-workload-info", *FAST, tmp=tmp_path)
        assert last.returncode == 0, last.stdout + last.stderr
        assert time.monotonic() - started < 15, "it waited for a restart after the last check"
        assert ztunnel.wait_exit() == 1
    finally:
        ztunnel.stop()
    ztunnel = ZtunnelProc(path, str(tmp_path / "ztunnel-2.log"), "--no-listeners")
    try:
        only = "hello,add-without-workload-info,keep-after-snapshot"
        run = check_at(path, only, *QUICK, "--connect-timeout", "5", tmp=tmp_path)
    finally:
        ztunnel.stop()
    assert run.statuses() == {
        "hello": "pass",
        "add-without-workload-info": "pass",
        "keep-after-snapshot": "error",
    }, run.stdout
    assert "did not connect again within 5s after it stopped for good" in run.stdout


def test_a_ztunnel_its_supervisor_restarts_at_once_is_no_reconnect(tmp_path: pathlib.Path) -> None:
    """A supervisor that restarts a correct ztunnel 0.3 s after it exited: its new connection,
    within --grace, was taken for the stopped one's reconnect."""
    path = str(tmp_path / "zds.sock")
    ztunnel = " ".join(
        [*ZDS, "ztunnel", "--zds-socket", path, "--no-listeners"]
        + [f"--{n}-listen 127.0.0.1:0" for n in ("admin", "readiness", "metrics")]
    )
    supervisor = subprocess.Popen(
        ["sh", "-c", f"while :; do {ztunnel} >>{tmp_path / 'ztunnel.log'} 2>&1; sleep 0.3; done"],
        start_new_session=True,
    )
    try:
        only = "add-without-workload-info,keep-after-snapshot"
        run = check_at(path, only, "--timeout", "3", "--grace", "2", tmp=tmp_path)
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait()
        wait_until(lambda: not os.path.exists(path) or None, "the socket gone")
    assert run.returncode == 0, run.stdout + run.stderr


#: A ztunnel (argv: socket) that answers a record after SnapshotSent with a ProtocolError
#: nack, closes, and connects again 2 s later from the same process: no stop for good.
BACK_LATER = """
import socket, sys, time
from zds.protocol.messages import Ack, encode_ack
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(sys.argv[1])
    except OSError:
        time.sleep(0.05)
        continue
    s.sendall(bytes([8, 1]))
    while msg := s.recv(2048):
        if msg == bytes([0x1A, 0]):
            s.sendall(encode_ack(Ack("")))
        else:
            s.sendall(encode_ack(Ack('failure to process message : ProtocolError("late keep")')))
            s.close()
            time.sleep(2)
            break
    s.close()
"""


def test_a_ztunnel_that_comes_back_after_grace_from_the_same_process_fails(tmp_path: pathlib.Path) -> None:
    """Only a connection within --grace was a reconnect: one 2 s later passed."""
    path = str(tmp_path / "zds.sock")
    script = tmp_path / "ztunnel.py"
    script.write_text(BACK_LATER)
    ztunnel = subprocess.Popen([sys.executable, str(script), path])
    try:
        run = check_at(path, "keep-after-snapshot", *FAST, tmp=tmp_path)
    finally:
        ztunnel.kill()
        ztunnel.wait()
    assert run.status("keep-after-snapshot") == "fail", run.stdout
    assert "ztunnel connected again" in run.findings("keep-after-snapshot")
