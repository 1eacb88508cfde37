"""``zds check`` against Istio's and ztunnel's own ZDS code (the reference peers of
``../shared/peers``, found by ``harness.peers_dir``: ``$ZDS_PEERS``, ../peers, /work/peers). Skipped, not failed — even
with CI=true — when they are not built there: CI cannot build them.

What the checks find in upstream's own code is pinned here, not hidden: Istio's node agent keeps
a connection whose ack did not come in time and sends the next request on it, and leaves the
netns fds of removed pods to Go's garbage collector.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess

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


def test_istio_node_agent_against_zds_check(tmp_path: pathlib.Path) -> None:
    server = peer(ISTIO_SERVER)
    socket = tmp_path / "istio.sock"
    fifo = tmp_path / "commands"
    os.mkfifo(fifo)
    commands = os.open(fifo, os.O_RDWR)  # held open: the server never sees EOF on its stdin
    log = open(tmp_path / "istio.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([server, "--socket", str(socket)], stdin=commands, stdout=log, stderr=log)
    try:
        wait_until(socket.exists, "Istio's node agent to listen")
        run = zds_check(
            "node-agent",
            "--zds-socket",
            str(socket),
            "--add-cmd",
            f"echo add {{uid}} {{name}} {{namespace}} {{service_account}} {{netns}} > {fifo}",
            "--remove-cmd",
            f"echo del {{uid}} > {fifo}",
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
        os.close(commands)
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
