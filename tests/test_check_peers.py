"""``zds check`` against Istio's and ztunnel's own ZDS code (the reference peers of
``../shared/peers``, found by ``harness.peers_dir``: ``$ZDS_PEERS``, ../peers, /work/peers). Skipped, not failed — even
with CI=true — when they are not built there: CI cannot build them.

What the checks find in upstream's own code is pinned here, not hidden: Istio's node agent keeps
a connection whose ack did not come in time and sends the next request on it, and leaves the
netns fds of removed pods to Go's garbage collector.

Istio's server takes its commands on stdin and answers each with a line, in order. The check's
``--add-cmd`` must return once the agent has the pod (a snapshot scenario connects right after
its adds): each command goes through ``StdinRelay`` and waits for its answer. Written into a
FIFO instead, an add could still be unread when the check connected, and the pod was missing
from that snapshot (a failed CI run).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

import pytest

from tests.harness import peers_dir, wait_until, zds_check
from zds.check.agentchecks import CHECKS as AGENT_CHECKS

pytestmark = pytest.mark.root

#: Where each peer lives under the peers directory.
ISTIO_SERVER = "istio-go/bin/istio-zds-server"
ZTUNNEL_PEER = "ztunnel-rs/target/release/ztunnel-zds-peer"

#: The checks Istio's node agent fails, and what they find (upstream departures, see the module doc).
ISTIO_DEPARTURES = {
    "ack-deadline": "on the same connection, which was never acked nor closed",
    "fd-hygiene": "on the netns of removed pods",
}


def peer(relative: str) -> str:
    base = peers_dir()
    path = base / relative if base is not None else None
    if path is None or not os.access(path, os.X_OK):
        pytest.skip(f"the reference peer {relative} is not built (set ZDS_PEERS; see ../shared/peers)")
    return str(path)


class StdinRelay:
    """Passes command lines from a unix socket to a process's stdin and each answer line back.

    The process answers its commands in order, so the answers go to the waiting connections
    first come, first served. ``command(words)`` is a shell command that sends ``words`` (a
    ``zds check`` template: its placeholders are filled shell-quoted) as one line and prints the
    answer once it has come.
    """

    def __init__(self, path: pathlib.Path, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.path = path
        self._stdin = stdin
        self._stdout = stdout
        self._waiting: collections.deque[socket.socket] = collections.deque()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(64)
        self._threads = [
            threading.Thread(target=self._accept, daemon=True),
            threading.Thread(target=self._answer, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def command(self, words: str) -> str:
        client = (
            "import socket,sys; s=socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1]); "
            "s.sendall(' '.join(sys.argv[2:]).encode() + b'\\n'); print(s.makefile().readline().strip())"
        )
        return f"{sys.executable} -I -S -c {shlex.quote(client)} {shlex.quote(str(self.path))} {words}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn.makefile("rb") as lines:
                line = lines.readline()
            if not line.strip():  # (the server skips a blank line: its answer would be the next's)
                with conn, contextlib.suppress(OSError):
                    conn.sendall(b"err blank command\n")
                continue
            with self._lock:
                self._waiting.append(conn)
                self._stdin.write(line)
                self._stdin.flush()

    def _answer(self) -> None:
        for line in self._stdout:
            with self._lock:
                conn = self._waiting.popleft() if self._waiting else None
            if conn is not None:
                with conn, contextlib.suppress(OSError):  # (a client gone: the next is still answered)
                    conn.sendall(line)

    def close(self) -> None:
        """After the process has ended (its stdout at EOF)."""
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for thread in self._threads:
            thread.join(10)
        for conn in self._waiting:
            conn.close()


def test_istio_node_agent_against_zds_check(tmp_path: pathlib.Path) -> None:
    server = peer(ISTIO_SERVER)
    socket_path = tmp_path / "istio.sock"
    log = open(tmp_path / "istio.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [server, "--socket", str(socket_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
    )
    assert proc.stdin is not None and proc.stdout is not None
    relay = StdinRelay(tmp_path / "relay.sock", proc.stdin, proc.stdout)
    try:
        wait_until(socket_path.exists, "Istio's node agent to listen")
        run = zds_check(
            "node-agent",
            "--zds-socket",
            str(socket_path),
            "--add-cmd",
            relay.command("add {uid} {name} {namespace} {service_account} {netns}"),
            "--remove-cmd",
            relay.command("del {uid}"),
            "--agent-pid",
            str(proc.pid),
            "--cycles",
            "5",
            "--timeout",
            "5",
            tmp=tmp_path,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        relay.close()
        proc.stdin.close()
        proc.stdout.close()
        log.close()
    assert run.returncode == 1, run.stdout + run.stderr
    failed = {name for name, status in run.statuses().items() if status != "pass"}
    assert failed == set(ISTIO_DEPARTURES), run.stdout
    for name, says in ISTIO_DEPARTURES.items():
        assert says in run.findings(name), run.stdout
    assert len(run.report["checks"]) == len(AGENT_CHECKS)


def test_ztunnel_inpod_code_against_zds_check(tmp_path: pathlib.Path) -> None:
    ztunnel = peer(ZTUNNEL_PEER)
    run = zds_check("ztunnel", "--cmd", f"{ztunnel} {{socket}}", "--timeout", "5", tmp=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    statuses = run.statuses()
    assert statuses.pop("readiness") == "skip"  # the peer serves no readiness probe
    assert set(statuses.values()) == {"pass"}, run.stdout
