"""The ztunnel side at the end of its fd budget: a pod takes 7 fds (3 TCP listeners and
UDP+TCP DNS on 127.0.0.1 and ::1), and ``FD_RESERVE`` of them always stay free, so that a
netns fd can still be received. A pod past the budget is nacked with the reason and stays
Pending; the process never runs out, never crashes, keeps serving the pods it has, and
starts the pending ones (retry) once fds are free again.

Run under ``prlimit --nofile=220:220`` so the limit is reached with a few pods."""

from __future__ import annotations

import functools
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.harness import ZDS, NodeAgentProc, ZtunnelProc, fd_count, run_all, wait_until
from tests.standins import FakeNodeAgent
from zds import defaults
from zds.netns import open_netns
from zds.netns.fixtures import create_netns, delete_netns

pytestmark = pytest.mark.root

LIMIT = 220
PODS = 24
PER_POD = 7
#: The node agent's: its reserve and ~60 of its own (gRPC, the pod store, the ZDS and control
#: sockets, epoll, stdio), then one fd a pod.
AGENT_LIMIT = defaults.NODE_AGENT_FD_RESERVE + 100
AGENT_PODS = 120
#: Past the ztunnel side's budget: its pods, then more pending ones than the reserve holds.
OVERFLOW_PODS = (LIMIT - defaults.FD_RESERVE) // PER_POD + defaults.FD_RESERVE + 12


def made_netns(count: int) -> Iterator[list[str]]:
    tag = secrets.token_hex(3)
    names = [f"zfd-{tag}-{i}" for i in range(count)]
    paths: list[str] = []
    try:
        for name in names:
            paths.append(create_netns(name))
        yield paths
    finally:
        run_all([functools.partial(delete_netns, name, missing_ok=True) for name in names], "namespaces")


@pytest.fixture
def netns_paths() -> Iterator[list[str]]:
    yield from made_netns(PODS)


@pytest.fixture
def many_netns_paths() -> Iterator[list[str]]:
    yield from made_netns(AGENT_PODS)


def add_each(
    server: NodeAgentProc,
    paths: list[str],
    refusal: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
    most_refused: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Add a pod u0, u1, ... in each netns, in turn (until ``most_refused`` were refused):
    (the acked, {the refused: why}); each refusal must be ``refusal``."""
    acked: list[str] = []
    refused: dict[str, str] = {}
    for i, path in enumerate(paths):
        try:
            server.add_pod(f"u{i}", path)
            acked.append(f"u{i}")
        except grpc.RpcError as exc:
            assert exc.code() is refusal, exc
            refused[f"u{i}"] = exc.details() or ""
            if len(refused) == most_refused:
                break
    return acked, refused


def test_past_the_fd_budget_a_pod_is_nacked_and_pending_never_a_crash(
    tmp_path: Path, netns_paths: list[str]
) -> None:
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    ztunnel = ZtunnelProc(
        server.zds_socket, str(tmp_path / "ztunnel.log"), "--retry-interval", "0.2", fd_limit=LIMIT
    )
    try:
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        acked, refused = add_each(server, netns_paths)
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
        up = {uid for uid, w in states.items() if w["state"] == "Up"}
        pending = {uid for uid, w in states.items() if w["state"] == "Pending"}
        # (A refused pod may come Up on a retry, every 0.2 s here, once fds are free again: the
        # pods pending past half the reserve let their netns fd go. Never past the budget.)
        assert set(acked) <= up and up | pending == set(acked) | set(refused) and pending
        assert len(up) <= (LIMIT - defaults.FD_RESERVE) // PER_POD
        assert all("fd budget exhausted" in states[uid]["lastError"] for uid in pending)
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


def ipt_rules(netns_path: str) -> str:
    """The ISTIO lines of iptables-save in the netns at ``netns_path``."""
    done = subprocess.run(
        ["nsenter", f"--net={netns_path}", "iptables-save"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return "\n".join(line for line in done.stdout.splitlines() if "ISTIO" in line)


def pipes_of(pid: int) -> int:
    return sum(
        os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:") for fd in os.listdir(f"/proc/{pid}/fd")
    )


def test_a_node_agent_with_too_few_fds_to_work_refuses_to_start_and_touches_nothing(tmp_path: Path) -> None:
    # Under its reserve, a start's recovery ran out of fds checking the stored pods' rules:
    # they were "reinstalled" (and failed, and the rows rewritten), then it could not listen.
    limit = defaults.NODE_AGENT_MIN_FDS - 1
    paths = {"--zds-socket": "z/zds.sock", "--control-socket": "c/control.sock", "--state-dir": "state"}
    argv = [*ZDS, "server", "--cni-socket", "off", "--http-listen", "off", "--no-redirect"]
    for flag, path in paths.items():
        argv += [flag, str(tmp_path / path)]
    done = subprocess.run(
        ["prlimit", f"--nofile={limit}:{limit}", "--", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()
    assert line.endswith(
        f"RLIMIT_NOFILE is {limit} (hard limit {limit}): the node agent keeps "
        f"{defaults.NODE_AGENT_FD_RESERVE} fds free and needs at least {defaults.NODE_AGENT_MIN_FDS} "
        "to start; raise the limit (ulimit -n, LimitNOFILE)"
    ), line
    assert list(tmp_path.iterdir()) == []  # no socket, no state directory


def test_a_node_agent_out_of_fds_refuses_a_pod_before_touching_its_netns(
    tmp_path: Path, many_netns_paths: list[str]
) -> None:
    # Out of fds mid-install, the rules it had put in could not be taken out (iptables could
    # not be started), and each failed start of iptables leaked its pipes: never got there.
    server = NodeAgentProc(
        str(tmp_path), redirect=True, wrapper=["prlimit", f"--nofile={AGENT_LIMIT}:{AGENT_LIMIT}", "--"]
    ).wait_ready()
    ztunnel = ZtunnelProc(server.zds_socket, str(tmp_path / "ztunnel.log"), "--no-listeners")
    try:
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        assert (
            f"RLIMIT_NOFILE is {AGENT_LIMIT}: {defaults.NODE_AGENT_FD_RESERVE} fds are kept free"
            in server.output()
        )
        pipes = pipes_of(server.pid)
        acked, refused = add_each(
            server, many_netns_paths, grpc.StatusCode.RESOURCE_EXHAUSTED, most_refused=3
        )
        assert acked == [f"u{i}" for i in range(len(acked))] and len(refused) == 3
        assert len(acked) >= AGENT_LIMIT - defaults.NODE_AGENT_FD_RESERVE - 60
        for uid, reason in refused.items():
            assert re.fullmatch(
                rf"fd budget exhausted: the node agent has \d+ of {AGENT_LIMIT} fds open \(RLIMIT_NOFILE\), "
                rf"a pod takes 1 and {defaults.NODE_AGENT_FD_RESERVE} are kept free .*",
                reason,
            ), reason
            assert ipt_rules(many_netns_paths[int(uid[1:])]) == "", f"{uid}'s netns was touched"
        assert ipt_rules(many_netns_paths[0]), "the acked pods have their rules"
        assert AGENT_LIMIT - fd_count(server.pid) >= defaults.NODE_AGENT_FD_RESERVE - 1
        assert pipes_of(server.pid) == pipes
        assert {p.uid for p in server.list_pods()} == set(acked)

        # Room again: the refused pod goes in.
        server.remove_pod(acked[0])
        again = next(iter(refused))
        server.add_pod(again, many_netns_paths[int(again[1:])])
        assert ipt_rules(many_netns_paths[int(again[1:])])
    finally:
        ztunnel.stop()
        server.stop()
    assert "Traceback" not in server.output()


@pytest.fixture
def overflow_netns_paths() -> Iterator[list[str]]:
    yield from made_netns(OVERFLOW_PODS)


def test_pending_pods_past_half_the_reserve_let_their_netns_go_and_the_connection_holds(
    tmp_path: Path, overflow_netns_paths: list[str]
) -> None:
    # Each pending pod held its netns fd for the retry: past the reserve, a netns fd could not
    # be received (MSG_CTRUNC), the connection failed, the snapshot hit the same wall, for good;
    # and a restart at the limit died importing its own code (EMFILE).
    server = NodeAgentProc(str(tmp_path)).wait_ready()
    log = str(tmp_path / "ztunnel.log")
    ztunnel = ZtunnelProc(server.zds_socket, log, "--retry-interval", "0.2", fd_limit=LIMIT)
    try:
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        acked, refused = add_each(server, overflow_netns_paths)
        let_go = [uid for uid, o in refused.items() if "its netns fd is let go" in o]
        assert all("fd budget exhausted" in o for o in refused.values()), refused
        kept = [uid for uid in refused if uid not in let_go]
        assert kept and let_go, refused
        assert kept == list(refused)[: len(kept)], "pods keep their netns until half the reserve is left"
        assert server.connected_count() == 1, "the connection held"
        # (half the reserve free when the last pod let its netns go; HTTP may have taken some since)
        assert LIMIT - fd_count(ztunnel.pid) >= defaults.FD_RESERVE // 4
        states = ztunnel.config_dump()["workloadState"]
        assert {uid for uid, w in states.items() if w["state"] == "Pending"} == set(refused)

        # Room again: pods that kept their netns come up at a retry, those that let it go at the
        # snapshot of the connection the ztunnel side makes again for them (in the node agent's
        # order, so the first refused first), as many as fit; the removed pods are gone (a
        # DelWorkload on the connection the side closes for that snapshot is made good by its
        # reconcile). Only where it settles is asserted: what comes up first is timing.
        for uid in acked:
            server.remove_pod(uid)
        fit = min(len(refused), len(acked) - 2)

        def settled() -> set[str] | None:
            states = ztunnel.workload_states()
            up = {uid for uid, state in states.items() if state == "Up"}
            return up if set(states) == set(refused) and set(list(refused)[:fit]) <= up else None

        wait_until(settled, "every refused pod held (the first of them up), every removed one gone")
        ztunnel.stop()
        assert "Traceback" not in ztunnel.output()

        # A restart at the limit with more pods than fit: up, serving, never out of fds.
        ztunnel = ZtunnelProc(server.zds_socket, str(tmp_path / "ztunnel2.log"), fd_limit=LIMIT)
        wait_until(lambda: "snapshot reconciled" in ztunnel.output(), "the restarted ztunnel's snapshot")
        assert ztunnel.proc.poll() is None
        assert LIMIT - fd_count(ztunnel.pid) >= defaults.FD_RESERVE // 4
        assert ztunnel.config_dump()["workloadState"]
    finally:
        ztunnel.stop()
        server.stop()
    assert "Traceback" not in ztunnel.output()


def test_pods_pending_for_another_reason_let_their_fd_go_too_in_the_first_snapshot(tmp_path: Path) -> None:
    """Pods pending for something else than fds (here an fd that is no netns; a taken port
    alike) held their fd each: a first snapshot of hundreds used them all, and the ztunnel
    side died importing its event loop's code (EMFILE, a traceback). Past half the reserve
    they let it go, as pods short of fds do."""
    from zds.protocol.messages import AddWorkload, WorkloadInfo

    agent = FakeNodeAgent(str(tmp_path / "zds.sock"))
    ztunnel = ZtunnelProc(agent.path, str(tmp_path / "ztunnel.log"), "--no-listeners", fd_limit=LIMIT)
    try:
        conn = agent.connect_and_hello()
        said = []
        for i in range(LIMIT + 40):
            read_end, write_end = os.pipe()
            try:
                info = WorkloadInfo(name=f"pod-{i}", namespace="default", service_account="default")
                said.append(conn.request(AddWorkload(uid=f"u{i}", info=info), [read_end]).error)
            finally:
                os.close(read_end)
                os.close(write_end)
        assert all("not a network namespace" in error for error in said), said[0]
        assert any("its netns fd is let go" in error for error in said)
        assert conn.snapshot().ok
        wait_until(lambda: "snapshot reconciled" in ztunnel.output(), "the first snapshot reconciled")
        wait_until(lambda: ztunnel.config_dump()["workloadState"], "served after it (its event loop up)")
        assert ztunnel.proc.poll() is None
        assert LIMIT - fd_count(ztunnel.pid) >= defaults.FD_RESERVE // 4
    finally:
        ztunnel.stop()
        agent.close()
    assert "Traceback" not in ztunnel.output()


def test_pods_that_let_their_netns_go_come_back_with_a_new_snapshot_once_fds_are_free(tmp_path: Path) -> None:
    """A pod that let its netns fd go for want of fds waited for the node agent to send it
    again: the next snapshot (the node agent restarted) or the pod added again, so after the
    shortage it stayed broken, its rules sending its traffic to ports nobody listened on
    (ztunnel keeps the fd, and retries). Once fds are free again the ztunnel side reconnects,
    and the new connection's snapshot sends it again: it is up."""
    from zds.protocol.messages import AddWorkload, DelWorkload, WorkloadInfo, encode_request

    def info(name: str) -> WorkloadInfo:
        return WorkloadInfo(name=name, namespace="default", service_account="default")

    agent = FakeNodeAgent(str(tmp_path / "zds.sock"))
    log = str(tmp_path / "ztunnel.log")
    ztunnel = ZtunnelProc(agent.path, log, "--retry-interval", "0.2", fd_limit=LIMIT)
    held: list[int] = []  # the test's own pipes: each read end sent as a pod's "netns" (pending, held)
    name = f"zfd-{secrets.token_hex(3)}-real"
    pod = create_netns(name)
    try:
        conn = agent.connect_and_hello()
        for i in range(LIMIT):  # until past half the reserve: pods let their netns go
            read_end, write_end = os.pipe()
            held += [read_end, write_end]
            if (
                "its netns fd is let go"
                in conn.request(AddWorkload(uid=f"u{i}", info=info(f"p{i}")), [read_end]).error
            ):
                break
        fillers = i
        with open_netns(pod) as netns:
            said = conn.request(AddWorkload(uid="real", info=info("real")), [netns.fd]).error
        assert "its netns fd is let go" in said, said
        assert conn.snapshot().ok
        for i in range(fillers + 1):  # room again
            # The side reconnects at its next retry tick once there is room: that may be
            # before the last of these (the new connection's snapshot drops what is left).
            try:
                conn.send(encode_request(DelWorkload(uid=f"u{i}")))
            except (BrokenPipeError, ConnectionResetError):
                break
            if not conn.recv():
                break
        again = agent.connect_and_hello(timeout=30)  # the ztunnel side's new connection
        assert "reconnecting for a snapshot that sends them again" in ztunnel.output()
        with open_netns(pod) as netns:
            assert again.request(AddWorkload(uid="real", info=info("real")), [netns.fd]).ok
        assert again.snapshot().ok
        wait_until(
            lambda: ztunnel.config_dump()["workloadState"].get("real", {}).get("state") == "Up", "the pod up"
        )
        again.close()
    finally:
        for fd in held:
            os.close(fd)
        ztunnel.stop()
        agent.close()
        delete_netns(name, missing_ok=True)
    assert "Traceback" not in ztunnel.output()
