"""A ``zds check`` killed by SIGKILL: the ztunnel it started ends with it, and the next check
(either kind) removes what it left (its pods' namespaces, its temporary directory, a ztunnel
process that outlived it), once it is gone, and nothing of a check that runs."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness import FAST_CHECK as FAST
from tests.harness import ZDS, StartServer, wait_until
from tests.harness import ZTUNNEL_CMD as ZTUNNEL
from zds import runtime
from zds.netns.fixtures import create_netns, delete_netns, list_netns

pytestmark = pytest.mark.root

#: Named namespaces ``zds check`` makes start with this.
PREFIX = "zdsck-"


def check_netns() -> set[str]:
    return {name for name in list_netns() if name.startswith(PREFIX)}


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and waiting for its parent, does not)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent_of(pid: int) -> int:
    return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@dataclass
class KilledCheck:
    """A ``zds check ztunnel`` SIGKILLed while its ztunnel ran: what it had made."""

    check: int
    ztunnel: int
    sleeper: int
    tmp: str
    netns: set[str]


class Checks:
    """``zds check ztunnel`` runs whose ztunnel says where it is (pid files under ``tmp``), and
    what they made, removed by hand at the end if the checks did not."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.pids: list[int] = []
        self.dirs: list[str] = []
        self.names: set[str] = set()
        self.before = check_netns()

    def start(self, tag: str, *args: str, delay: float = 0) -> subprocess.Popen[str]:
        """A check whose ztunnel (its pid in TAG.ztunnel) comes ``delay`` seconds after a child of
        its shell, ``sleep`` (TAG.sleep: the shell's children go with the group); its socket's
        path in TAG.socket."""
        at = self.tmp / tag
        command = (
            f"echo {{socket}} > {at}.socket; sleep 1000 & echo $! > {at}.sleep; sleep {delay}; "
            f"echo $$ > {at}.ztunnel; exec {ZTUNNEL}"
        )
        proc = subprocess.Popen(
            [*ZDS, "check", "ztunnel", "--cmd", command, *FAST, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.pids.append(self.pid(tag, "sleep"))
        self.dirs.append(os.path.dirname(wait_until(lambda: self.read(tag, "socket"), f"{tag}.socket")))
        return proc

    def read(self, tag: str, what: str) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            if (text := (self.tmp / f"{tag}.{what}").read_text()).endswith("\n"):
                return text.strip()
        return None

    def pid(self, tag: str, what: str, timeout: float = 15) -> int:
        pid = int(wait_until(lambda: self.read(tag, what), f"{tag}.{what}", timeout=timeout))
        if pid not in self.pids:
            self.pids.append(pid)
        return pid

    def made(self) -> set[str]:
        self.names |= check_netns() - self.before
        return check_netns() - self.before

    def kill(
        self, tag: str, proc: subprocess.Popen[str], *, keeper_too: bool = False, pods: int = 1
    ) -> KilledCheck:
        """SIGKILL the check once it made ``pods`` pods (and, ``keeper_too``, every process
        between it and its ztunnel, first): what it had made."""
        ztunnel = self.pid(tag, "ztunnel")
        made: set[str] = wait_until(
            lambda: self.made() if len(self.made()) >= pods else None, "its pods", timeout=60
        )
        between = []
        if keeper_too:
            pid = parent_of(ztunnel)
            while pid not in (proc.pid, 1, 0):
                between.append(pid)
                pid = parent_of(pid)
        for pid in [*between, proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        return KilledCheck(proc.pid, ztunnel, self.pid(tag, "sleep"), self.dirs[-1], made | self.made())

    def close(self) -> None:
        for proc in self.procs:  # (SIGTERM: a check stops its ztunnel then)
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid_file in self.tmp.glob("*.ztunnel"):
            with contextlib.suppress(ValueError):
                self.pids.append(int(pid_file.read_text()))
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                if running(pid):
                    os.kill(pid, signal.SIGKILL)
        for name in self.names:
            delete_netns(name, missing_ok=True)
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        next_check(self.tmp)  # (the record of a check killed here, if it stayed)


@pytest.fixture
def checks(tmp_path: pathlib.Path) -> Iterator[Checks]:
    made = Checks(tmp_path)
    try:
        yield made
    finally:
        made.close()


def next_check(tmp: pathlib.Path, role: str = "ztunnel") -> subprocess.CompletedProcess[str]:
    """A check of ``role`` that cannot start (nothing at its socket): it clears before it finds out."""
    socket = ["--zds-socket", str(tmp / "nothing.sock")]
    extra = ["--connect-timeout", "1", "--only", "hello"] if role == "ztunnel" else []
    return subprocess.run([*ZDS, "check", role, *socket, *extra], capture_output=True, text=True, timeout=60)


def test_a_sigkilled_check_takes_its_ztunnel_along_and_the_next_check_removes_the_rest(
    checks: Checks,
) -> None:
    """The ztunnel (in a session of its own) and what it started ran on after the check died,
    binding its ports and retrying; its namespaces and temporary directory stayed for good."""
    proc = checks.start("a")
    killed = checks.kill("a", proc)
    wait_until(
        lambda: not running(killed.ztunnel) and not running(killed.sleeper), "the ztunnel gone", timeout=20
    )
    assert killed.netns <= check_netns() and os.path.isdir(killed.tmp)  # (nothing has removed them yet)

    done = next_check(checks.tmp)
    assert done.returncode == 2, done.stderr
    said, cannot = done.stderr.splitlines()
    assert said.startswith(
        f"zds check ztunnel: removed what a check that did not end left (pid {proc.pid}): "
    )
    assert f"{len(killed.netns)} namespace" in said and killed.tmp in said, said
    assert "no ztunnel connected" in cannot
    assert not killed.netns & check_netns()
    assert not os.path.exists(killed.tmp)
    assert "removed what" not in next_check(checks.tmp).stderr  # (said once: its record went too)


def test_a_ztunnel_whose_keeper_died_too_is_ended_by_the_next_check(checks: Checks) -> None:
    """What stops the ztunnel when the check dies killed as well: the next check ends it (by its
    record's token, only processes of its group), and the node agent's port is free again."""
    proc = checks.start("b")
    killed = checks.kill("b", proc, keeper_too=True)
    assert running(killed.ztunnel) and running(killed.sleeper)

    done = next_check(checks.tmp, "node-agent")
    assert done.returncode == 2, done.stderr
    said = done.stderr.splitlines()[0]
    assert said.startswith("zds check node-agent: removed what a check that did not end left (pid "), said
    assert f"ztunnel's processes {killed.ztunnel}, {killed.sleeper}" in said or (
        f"ztunnel's processes {killed.sleeper}, {killed.ztunnel}" in said
    ), said
    assert not running(killed.ztunnel) and not running(killed.sleeper)
    assert not killed.netns & check_netns() and not os.path.exists(killed.tmp)


def test_the_next_check_leaves_a_running_checks_things_and_a_name_made_again_since(checks: Checks) -> None:
    """Only what a gone check's record names, and is still that thing, goes: never the pods,
    directory or processes of a check that runs; nor a namespace of a dead check's name made anew."""
    live = checks.start("l", "--only", "pending-retry", delay=12)  # (its pods: once its ztunnel is there)
    live_sleeper, live_tmp = checks.pid("l", "sleep"), checks.dirs[-1]
    dead = checks.kill("d", checks.start("d"), pods=2)
    reused = sorted(dead.netns)[0]
    delete_netns(reused)
    create_netns(reused)  # (another namespace, by that name)
    try:
        said = next_check(checks.tmp).stderr.splitlines()[0]
        assert said.startswith(
            f"zds check ztunnel: removed what a check that did not end left (pid {dead.check}): "
        )
        assert f"{len(dead.netns) - 1} namespace" in said and reused not in said, said
        assert reused in check_netns() and not (dead.netns - {reused}) & check_netns()
        assert running(live_sleeper) and os.path.isdir(live_tmp), "the running check's things went"

        live_netns = wait_until(lambda: checks.made() - dead.netns, "the running check's pods", timeout=30)
        assert "removed what" not in next_check(checks.tmp).stderr
        assert live_netns <= check_netns() and running(checks.pid("l", "ztunnel"))
        assert live.wait(120) == 0, live.stderr.read() if live.stderr else ""
    finally:
        delete_netns(reused)


def test_a_sigkilled_node_agent_check_leaves_its_pods_netns_to_the_next_check(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    server = start_server()
    before = check_netns()
    check = subprocess.Popen(
        [
            *ZDS,
            "check",
            "node-agent",
            "--zds-socket",
            server.zds_socket,
            "--control-socket",
            server.control_socket,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    made: set[str] = set()
    try:
        wait_until(lambda: server.list_pods(), "the check's first pod in the node agent")
        check.kill()
        check.wait()
        made = check_netns() - before
        assert made
        done = next_check(tmp_path)
        said = done.stderr.splitlines()[0]
        assert said.startswith(
            f"zds check ztunnel: removed what a check that did not end left (pid {check.pid}): "
        )
        assert not made & check_netns()
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
        for name in made:
            delete_netns(name, missing_ok=True)


def dead_record(tmp: str, started: int) -> str:
    """A record, as a check writes it, of a check that is gone (a pid no process has, which
    started at ``started``: records are cleared in the order of their names), naming only
    ``tmp``: its path."""
    import json
    import secrets

    from zds.check import remains

    os.makedirs(remains.RECORDS, mode=0o700, exist_ok=True)
    pid = runtime.PID_MAX_LIMIT + 1  # (no process has it)
    path = os.path.join(remains.RECORDS, f"{pid}-{started}.json")
    doc = {"token": secrets.token_hex(16), "tmp": tmp, "netns": {}, "peers": []}
    pathlib.Path(path).write_text(json.dumps(doc))
    return path


def test_a_record_that_cannot_be_cleared_stays_and_the_others_are_cleared_all_the_same() -> None:
    from zds.check.remains import clear_dead_checks
    from zds.errors import ZdsError

    stuck, free = (tempfile.mkdtemp(prefix="zds-check-") for _ in range(2))
    mount = os.path.join(stuck, "m")
    os.mkdir(mount)
    subprocess.run(["mount", "-t", "tmpfs", "none", mount], check=True)  # (rmdir: EBUSY)
    records = [dead_record(stuck, 1), dead_record(free, 2)]  # (the stuck one first)
    try:
        with pytest.raises(ZdsError) as raised:
            clear_dead_checks()
        said = str(raised.value)
        assert "record stays" in said and "removed what a check that did not end left" in said, said
        assert not os.path.exists(free)  # (cleared, whatever its place after the stuck one)
        assert os.path.exists(stuck) and [os.path.exists(r) for r in records] == [True, False]
    finally:
        subprocess.run(["umount", mount], check=False)
        shutil.rmtree(stuck, ignore_errors=True)
        shutil.rmtree(free, ignore_errors=True)
        for record in records:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record)


@pytest.mark.parametrize(("command", "code"), [("kill -9 $$", -9), ("kill -TERM $$", -15), ("exit 3", 3)])
def test_the_keeper_ends_as_its_command_did(command: str, code: int) -> None:
    from zds.check import keeper

    done = subprocess.run(
        [sys.executable, "-I", "-S", keeper.__file__, str(os.getpid()), command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (code, "")
