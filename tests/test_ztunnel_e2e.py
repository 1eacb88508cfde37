"""Both ends as real processes: ``zds server`` + ``zds ztunnel`` + pod namespaces.

The node agent runs without redirection rules (``--no-redirect``: that is
another change's story); what is checked here is the handshake as it shows
outside the processes: listening sockets inside each pod's netns, owned by
which ztunnel process, and what the node agent says about its connections.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import PORTS, NodeAgentProc, Pod, ZtunnelProc, pod_ports, wait_until


class Processes:
    """Every process a test starts, stopped by PID at the end whatever happens. Node
    agents share their sockets (under ``tmp``): a second one is a restart."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: list[NodeAgentProc] = []
        self.ztunnels: list[ZtunnelProc] = []

    def server(self, pods_file: Path | None = None, *flags: str) -> NodeAgentProc:
        """``zds server`` (no iptables rules), ready."""
        extra = ["--pods", str(pods_file)] if pods_file is not None else []
        s = NodeAgentProc(str(self.tmp), *extra, *flags, name=f"server-{len(self.servers)}")
        self.servers.append(s)
        return s.wait_ready()

    def ztunnel(self, server: NodeAgentProc, *extra: str) -> ZtunnelProc:
        z = ZtunnelProc(server.zds_socket, str(self.tmp / f"ztunnel-{len(self.ztunnels)}.log"), *extra)
        self.ztunnels.append(z)
        return z

    def close(self) -> None:
        for z in self.ztunnels:
            z.stop(signal.SIGKILL)
        for s in self.servers:
            s.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def pod_add(server: NodeAgentProc, uid: str, pod: Pod) -> subprocess.CompletedProcess[str]:
    """``zds pod add`` of ``pod`` as ``uid``."""
    return server.cli(
        "pod",
        "add",
        "--uid",
        uid,
        "--name",
        f"pod-{uid}",
        "--namespace",
        "default",
        "--service-account",
        "default",
        "--netns",
        pod.path,
    )


def pod_remove(server: NodeAgentProc, uid: str) -> subprocess.CompletedProcess[str]:
    """``zds pod remove`` of ``uid``."""
    return server.cli("pod", "remove", "--uid", uid)


def enrolled(z: ZtunnelProc, pod: Pod) -> bool:
    return sorted(pod_ports(pod, z.pid)) == list(PORTS)


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def write_pods_file(path: Path, pods: dict[str, Pod]) -> Path:
    lines = [
        json.dumps(
            {
                "uid": uid,
                "name": f"pod-{uid}",
                "namespace": "default",
                "service_account": "default",
                "netns": p.path,
            }
        )
        for uid, p in pods.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.root
@pytest.mark.slow
def test_enroll_remove_kill_and_restart_the_ztunnel(procs: Processes, make_pod: Callable[[], Pod]) -> None:
    pods = {uid: make_pod() for uid in ("uid-1", "uid-2", "uid-3")}
    server = procs.server()
    z = procs.ztunnel(server)
    wait_until(lambda: z.ready_status() == 200, "ztunnel ready (empty snapshot)")

    # Enroll: each pod gets its listeners, inside its own netns.
    for uid, pod in pods.items():
        ok(pod_add(server, uid, pod))
    for pod in pods.values():
        wait_until(functools.partial(enrolled, z, pod), f"listeners in {pod.name}")
    assert z.workload_states() == {uid: "Up" for uid in pods}

    # Remove: the pod's listeners go, the others stay.
    ok(pod_remove(server, "uid-3"))
    wait_until(lambda: not pod_ports(pods["uid-3"], z.pid), "uid-3's listeners closed")
    assert enrolled(z, pods["uid-1"]) and enrolled(z, pods["uid-2"])

    # kill -9 the ztunnel: its listeners die with it, the node agent drops the connection.
    wait_until(lambda: server.connected_count() == 1, "the node agent to count the ztunnel")
    z.stop(signal.SIGKILL)
    wait_until(lambda: server.connected_count() == 0, "the node agent to drop the dead connection")
    for pod in pods.values():
        assert not subprocess.run(
            ["ip", "netns", "exec", pod.name, "ss", "-ltnH"], capture_output=True, text=True, check=True
        ).stdout.strip(), f"something still listens in {pod.name}"

    # Restart it: the snapshot brings back exactly the enrolled pods.
    z2 = procs.ztunnel(server)
    wait_until(lambda: z2.ready_status() == 200, "restarted ztunnel ready")
    for uid in ("uid-1", "uid-2"):
        wait_until(functools.partial(enrolled, z2, pods[uid]), f"{uid}'s listeners back")
    assert not pod_ports(pods["uid-3"], z2.pid), "the removed pod stays removed"
    assert z2.workload_states() == {"uid-1": "Up", "uid-2": "Up"}
    assert z2.stop() == 0


@pytest.mark.root
@pytest.mark.slow
def test_a_node_agent_restarted_with_fewer_pods_makes_ztunnel_drop_exactly_those(
    procs: Processes, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    pods = {uid: make_pod() for uid in ("uid-1", "uid-2", "uid-3")}
    server = procs.server(write_pods_file(tmp_path / "all.jsonl", pods))
    z = procs.ztunnel(server)
    wait_until(lambda: z.ready_status() == 200, "ztunnel ready")
    for pod in pods.values():
        wait_until(functools.partial(enrolled, z, pod), f"listeners in {pod.name}")
    kept_before = pod_ports(pods["uid-1"], z.pid)
    connections_before = z.metrics()["zds_ztunnel_connections_total"]

    assert server.stop() == 0
    wait_until(lambda: z.ready_status() == 500, "ztunnel not ready while the node agent is down")
    assert all(enrolled(z, pod) for pod in pods.values()), "workloads stay served while disconnected"

    fewer = {"uid-1": pods["uid-1"]}
    # A node agent that knows fewer pods: its pod store is set aside (it would restore all three).
    server = procs.server(write_pods_file(tmp_path / "fewer.jsonl", fewer), "--reset-state")
    wait_until(lambda: z.metrics()["zds_ztunnel_connections_total"] > connections_before, "the reconnect")
    wait_until(lambda: z.ready_status() == 200, "ztunnel ready after the new snapshot")
    wait_until(
        lambda: not pod_ports(pods["uid-2"], z.pid) and not pod_ports(pods["uid-3"], z.pid),
        "the missing pods' listeners closed",
    )
    assert pod_ports(pods["uid-1"], z.pid) == kept_before, "the kept pod's very sockets stayed open"
    assert z.workload_states() == {"uid-1": "Up"}
    metrics = z.metrics()
    assert metrics["workload_manager_proxies_started_total"] == 3
    assert metrics["workload_manager_proxies_stopped_total"] == 2


@pytest.mark.root
@pytest.mark.slow
def test_with_two_ztunnels_adds_reach_the_newest_and_deletes_reach_both(
    procs: Processes, make_pod: Callable[[], Pod]
) -> None:
    old_pod, new_pod = make_pod(), make_pod()
    server = procs.server()
    old = procs.ztunnel(server)
    wait_until(lambda: old.ready_status() == 200, "first ztunnel ready")
    ok(pod_add(server, "uid-old", old_pod))
    wait_until(lambda: enrolled(old, old_pod), "first ztunnel serves the first pod")

    # A second ztunnel (an upgrade): its snapshot has the first pod, which both now
    # serve (SO_REUSEPORT on both sides, as ztunnel's INPOD_PORT_REUSE).
    new = procs.ztunnel(server)
    wait_until(lambda: new.ready_status() == 200, "second ztunnel ready")
    wait_until(lambda: enrolled(new, old_pod), "second ztunnel serves the first pod too")
    assert enrolled(old, old_pod)
    wait_until(lambda: server.connected_count() == 2, "two connections at the node agent")

    # An add goes to the newest connection only.
    ok(pod_add(server, "uid-new", new_pod))
    wait_until(lambda: enrolled(new, new_pod), "newest ztunnel serves the new pod")
    assert not pod_ports(new_pod, old.pid), "the old ztunnel was not told about the new pod"
    assert "uid-new" not in old.workload_states()

    # A delete goes to both.
    ok(pod_remove(server, "uid-old"))
    wait_until(lambda: not pod_ports(old_pod, new.pid), "newest ztunnel released the pod")
    wait_until(lambda: not pod_ports(old_pod, old.pid), "old ztunnel released the pod too")
    assert old.workload_states() == {}
    assert new.workload_states() == {"uid-new": "Up"}
    assert old.stop() == 0 and new.stop() == 0
