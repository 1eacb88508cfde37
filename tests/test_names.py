"""A pod's uid, name, namespace and service account are checked like Kubernetes checks
them, and given the same defaults, whatever path the pod comes by (gRPC, a CNI event, a
pods file, the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from tests.harness import NodeAgentProc, pod_netns, post_unix
from tests.standins import AckingPeer
from zds.gen import nodeagent_pb2
from zds.netns import NetnsRef
from zds.server import names
from zds.server.pods import PodSpec, PodSpecError

pytestmark = pytest.mark.root

#: (uid, service account, what the refusal says): each is something Kubernetes refuses.
BAD = [
    ("pod\u0007bell", "sa", "has characters that are not printable"),
    ("u" * 129, "sa", "is 129 bytes, over 128"),
    ("ü" * 65, "sa", "is 130 bytes, over 128"),  # 65 characters, 130 bytes
    ("u1", "Default_SA", "service account 'Default_SA' is not a DNS-1123 subdomain"),
    ("u1", "sa..x", "service account 'sa..x' is not a DNS-1123 subdomain"),
    # (a regex's $ matches before a last newline too: Kubernetes' check, in Go, does not)
    ("u1", "sa\n", "service account 'sa\\n' is not a DNS-1123 subdomain"),
]


@pytest.mark.parametrize(("uid", "service_account", "text"), BAD)
def test_what_kubernetes_refuses_is_invalid_argument_on_the_grpc_path(
    server: NodeAgentProc, uid: str, service_account: str, text: str
) -> None:
    with server.control() as stub, pytest.raises(grpc.RpcError) as info:
        stub.AddPod(
            nodeagent_pb2.AddPodRequest(
                uid=uid, name="web", namespace="shop", service_account=service_account, netns_path=pod_netns()
            ),
            timeout=30,
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert text in (info.value.details() or "")
    assert server.list_pods() == []


@pytest.mark.parametrize(("uid", "service_account", "text"), BAD)
def test_what_kubernetes_refuses_is_500_as_istios_and_one_warning_on_the_cni_path(
    server: NodeAgentProc, uid: str, service_account: str, text: str
) -> None:
    body = {
        "Netns": pod_netns(),
        "PodName": "web",
        "PodNamespace": "shop",
        "PodUID": uid,
        "ServiceAccount": service_account,
    }
    status, answer = post_unix(server.cni_socket, "/cmdadd", json.dumps(body).encode())
    assert status == 500 and text in answer, answer
    assert answer.count("\n") == 1
    assert server.list_pods() == []
    server.wait_for_output("refused CNI add event")
    [line] = [line for line in server.output().splitlines() if text in line]
    assert " warning zds.server.cni: refused CNI add event: " in line
    assert " error " not in server.output() and "Traceback" not in server.output()


def test_a_container_id_libcni_would_refuse_is_400_on_the_cni_path(server: NodeAgentProc) -> None:
    body = {"Netns": pod_netns(), "PodName": "web", "PodNamespace": "shop", "PodUID": "u1"}
    status, answer = post_unix(
        server.cni_socket, "/cmdadd", json.dumps({**body, "ContainerID": "c1\nforged"}).encode()
    )
    assert status == 400 and "ContainerID 'c1\\nforged' is not a container id" in answer, answer
    assert server.list_pods() == []


@pytest.mark.parametrize("field", ["name", "namespace", "service_account"])
@pytest.mark.parametrize("value", ["web\n", "\nweb", "web\nweb", "web.\n", "web\r"])
def test_a_name_with_a_line_break_anywhere_is_refused(field: str, value: str) -> None:
    identity = {"uid": "u1", "name": "web", "namespace": "shop", "service_account": "sa", field: value}
    problem = names.pod_problem(**identity)
    assert problem is not None and repr(value) in problem and "\n" not in problem, problem


def test_a_uid_with_a_line_break_is_said_escaped_when_its_addworkload_is_too_long() -> None:
    """That refusal comes before the names' rules: it put the uid in as it was (a forged log
    line where the CNI path logs it)."""
    spec = PodSpec.create(
        "x\n2026-12-04T00:00:00.000Z error forged", NetnsRef.of_path(pod_netns()), name="n" * 1100
    )
    with pytest.raises(
        PodSpecError, match=r"^pod 'x\\n2026-.*: its AddWorkload would be \d+ bytes"
    ) as refused:
        spec.validate()
    assert "\n" not in str(refused.value)


def test_a_uid_that_is_no_name_says_so_when_it_stands_for_the_name(server: NodeAgentProc) -> None:
    """``zds pod add --uid pod_1`` without ``--name``: the name is the uid, which Kubernetes
    would not take for a name; the refusal says where that name came from."""
    done = server.cli("pod", "add", "--uid", "pod_1", "--netns", pod_netns())
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert (
        "pod pod_1: name (the uid, the name when none is given) 'pod_1' is not a DNS-1123 subdomain" in line
    ), line
    named = server.cli("pod", "add", "--uid", "pod_1", "--name", "pod-1", "--netns", pod_netns())
    assert "no ztunnel connection" in named.stderr  # (enrolled and cached all the same)
    assert [pod.name for pod in server.list_pods()] == ["pod-1"]


def test_the_same_defaults_whatever_the_pod_comes_by(tmp_path: Path) -> None:
    """No name, namespace or service account: the name is the uid, the namespace and the
    service account ``default`` — from a pods file at start, gRPC AddPod and zds pod add."""
    pods = tmp_path / "pods.jsonl"
    pods.write_text(json.dumps({"uid": "from-file", "netns": pod_netns()}) + "\n")
    server = NodeAgentProc(str(tmp_path), "--pods", str(pods)).wait_ready()
    peer = AckingPeer(server.zds_socket)
    try:
        peer.wait_snapshot()
        with server.control() as stub:
            stub.AddPod(nodeagent_pb2.AddPodRequest(uid="from-grpc", netns_path=pod_netns()), timeout=30)
        done = server.cli("pod", "add", "--uid", "from-cli", "--netns", pod_netns())
        assert done.returncode == 0, done.stderr
        listed = {(p.uid, p.name, p.namespace, p.service_account) for p in server.list_pods()}
        assert listed == {(uid, uid, "default", "default") for uid in ("from-file", "from-grpc", "from-cli")}
    finally:
        peer.close()
        server.stop()


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"ips": [f"fd00::{i:x}" for i in range(17)]}, "ips: 17 addresses, over 16"),
        (
            {"netns_path": "/var/run/netns/" + "a" * 1_000_000},
            "pod u1: its netns path is 1000015 bytes, over 4096",
        ),
    ],
    ids=["ips", "netns-path"],
)
def test_a_pod_too_large_to_list_or_quote_is_refused_in_one_short_line(
    server: NodeAgentProc, fields: dict[str, object], text: str
) -> None:
    """Every pod's addresses go out in each ListPods, reply and Watch event, and a refusal
    quotes its path: more addresses than a pod has, or a path longer than PATH_MAX, would
    make one client's pod break every client's ListPods, or its own refusal a protocol error."""
    request = nodeagent_pb2.AddPodRequest(uid="u1", netns_path=pod_netns())
    for name, value in fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    with server.control() as stub, pytest.raises(grpc.RpcError) as info:
        stub.AddPod(request, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(text) and len(info.value.details() or "") < 200
    assert server.list_pods() == []


def test_a_long_value_a_refusal_quotes_is_cut_so_the_reason_still_arrives(server: NodeAgentProc) -> None:
    with server.control() as stub, pytest.raises(grpc.RpcError) as info:
        stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="x" * 1_000_000), timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # (no pod can have it)
    details = info.value.details() or ""
    assert details == f"pod uid {'x' * 40 + '...'!r} is 1000000 bytes, over 128", details
