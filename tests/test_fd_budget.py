"""The ztunnel side at the end of its fd budget: a pod takes 7 fds (3 TCP listeners and
UDP+TCP DNS on 127.0.0.1 and ::1), and ``FD_RESERVE`` of them always stay free, so that a
netns fd can still be received. A pod past the budget is nacked with the reason and stays
Pending; the process never runs out, never crashes, keeps serving the pods it has, and
starts the pending ones (retry) once fds are free again.

Run under ``prlimit --nofile=220:220`` so the limit is reached with a few pods."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import NodeAgentProc, ZtunnelProc, fd_count, wait_until
from zds import defaults
from zds.netns.fixtures import create_netns, delete_netns

pytestmark = pytest.mark.root

LIMIT = 220
PODS = 24
PER_POD = 7


@pytest.fixture
def netns_paths() -> Iterator[list[str]]:
    tag = secrets.token_hex(3)
    names = [f"zfd-{tag}-{i}" for i in range(PODS)]
    paths: list[str] = []
    try:
        for name in names:
            paths.append(create_netns(name))
        yield paths
    finally:
        for name in names:
            delete_netns(name, missing_ok=True)


def test_past_the_fd_budget_a_pod_is_nacked_and_pending_never_a_crash(
    tmp_path: Path, netns_paths: list[str]
) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    ztunnel = ZtunnelProc(
        server.zds_socket, str(tmp_path / "ztunnel.log"), "--retry-interval", "0.2", fd_limit=LIMIT
    )
    try:
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        outcomes: dict[str, str] = {}
        for i, path in enumerate(netns_paths):
            try:
                server.add_pod(f"u{i}", path)
                outcomes[f"u{i}"] = "acked"
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION, exc
                outcomes[f"u{i}"] = exc.details() or ""
        acked = [uid for uid, o in outcomes.items() if o == "acked"]
        refused = {uid: o for uid, o in outcomes.items() if o != "acked"}
        # The first pods fit; from the first one that does not, every one is refused.
        assert acked == [f"u{i}" for i in range(len(acked))] and refused
        # ... and the budget is the fds, not a guess: all but the reserve and ~40 of the
        # process's own (HTTP, the ZDS socket, epoll, stdio) go to pods.
        assert (
            (LIMIT - defaults.FD_RESERVE - 40) // PER_POD
            <= len(acked)
            <= (LIMIT - defaults.FD_RESERVE) // PER_POD
        )
        for reason in refused.values():
            assert re.fullmatch(
                rf"failure to start proxy : fd budget exhausted: \d+ of {LIMIT} fds open \(RLIMIT_NOFILE\), "
                rf"a pod takes {PER_POD} and {defaults.FD_RESERVE} are kept free; raise the limit .*",
                reason,
            ), reason
        # Still there, still serving: the acked pods Up, the refused ones Pending with the reason.
        assert ztunnel.proc.poll() is None
        assert LIMIT - fd_count(ztunnel.pid) >= defaults.FD_RESERVE - PER_POD
        states = ztunnel.config_dump()["workloadState"]
        assert {uid for uid, w in states.items() if w["state"] == "Up"} == set(acked)
        assert {uid for uid, w in states.items() if w["state"] == "Pending"} == set(refused)
        assert all("fd budget exhausted" in states[uid]["lastError"] for uid in refused)
        assert ztunnel.get("readiness", "/healthz/ready")[0] == 500  # not ready: pods pending
        assert {p.uid: p.state for p in server.list_pods()}[next(iter(refused))] == 3  # POD_STATE_FAILED

        # Room again (pods removed): the pending ones start on the next retry.
        for uid in acked[: len(refused) + 1]:
            server.remove_pod(uid)
        wait_until(
            lambda: all(w["state"] == "Up" for w in ztunnel.config_dump()["workloadState"].values()),
            "the pending pods up after fds were freed",
        )
        assert ztunnel.get("readiness", "/healthz/ready")[0] == 200
    finally:
        ztunnel.stop()
        server.stop()
    assert "Traceback" not in ztunnel.output()


def fd_table_size(pid: int) -> int:
    """How many fds the kernel's fd table of ``pid`` holds now (``FDSize``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^FDSize:\s+(\d+)$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def test_both_sides_size_their_fd_table_at_start_within_the_soft_limit(tmp_path: Path) -> None:
    # A table that grows later grows after an RCU grace period (~10 ms) in a process with threads.
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    ztunnel = ZtunnelProc(server.zds_socket, str(tmp_path / "ztunnel.log"), fd_limit=LIMIT)
    try:
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        assert fd_table_size(server.pid) >= defaults.FD_TABLE_ENTRIES
        assert LIMIT <= fd_table_size(ztunnel.pid) < 2 * LIMIT  # never past the soft limit's size
    finally:
        ztunnel.stop()
        server.stop()
