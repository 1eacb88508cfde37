"""The pods of CNI events whose netns is gone are removed (``--netns-sweep``): Istio's plugin
sends no event when a pod goes, and zds-cni's DEL is lost while the node agent is down; the
pod stayed enrolled, its netns kept alive by the node agent's fd and ztunnel's sockets."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import Namespaces, NodeAgentProc, post_unix, wait_until
from tests.standins import AckingPeer
from zds.protocol.messages import DelWorkload

pytestmark = pytest.mark.root


def cni_add(server: NodeAgentProc, netns: str, name: str) -> None:
    """Istio's plugin's event: no container named, no DEL ever."""
    body = json.dumps({"Netns": netns, "PodName": name, "PodNamespace": "shop", "IPs": []}).encode()
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 200, answer


def listed(server: NodeAgentProc) -> set[str]:
    return {pod.name for pod in server.list_pods()}


def test_a_cni_pod_whose_netns_nothing_holds_is_removed_and_no_other(
    tmp_path: Path, namespaces: Namespaces
) -> None:
    server = NodeAgentProc(str(tmp_path), "--netns-sweep", "0.2").wait_ready()
    peer = AckingPeer(server.zds_socket)
    inside: subprocess.Popen[bytes] | None = None
    try:
        peer.wait_snapshot()
        gone, lived_in, by_hand, stays = (
            namespaces.make(label) for label in ("gone", "lived", "hand", "stays")
        )
        cni_add(server, gone, "gone")
        cni_add(server, lived_in, "lived-in")
        cni_add(server, stays, "stays")
        server.add_pod("by-hand", by_hand, name="by-hand")
        # A process in it: the netns lives on without its name (a pod whose runtime let go
        # of the name, a /proc/PID/ns/net pod).
        inside = subprocess.Popen(["ip", "netns", "exec", os.path.basename(lived_in), "sleep", "infinity"])
        wait_until(
            lambda: os.stat(f"/proc/{inside.pid}/ns/net").st_ino == os.stat(lived_in).st_ino,
            "the process in the netns",
        )
        for label in ("gone", "lived", "hand"):
            namespaces.delete(label)
        wait_until(lambda: "gone" not in listed(server), "the pod whose netns is gone removed")
        dels = [r for r in peer.received if isinstance(r, DelWorkload)]
        assert len(dels) == 1, peer.kinds  # (its own: ztunnel lets the netns go)
        server.wait_for_output("its netns is gone")
        inside.kill()
        inside.wait()
        # Nothing holds that one now either: the next look finds it gone.
        wait_until(lambda: "lived-in" not in listed(server), "the pod whose last process ended removed")
        # Not CNI's: the control API's pods go by hand, whatever became of their netns.
        assert listed(server) == {"stays", "by-hand"}
    finally:
        if inside is not None and inside.poll() is None:
            inside.kill()
            inside.wait()
        peer.close()
        server.stop()
