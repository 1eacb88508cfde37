"""Istio's ambient selection rules on a container's labels, and a container as a pod."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest

from zds.netns import NetnsRef
from zds.server.agent import NodeAgent
from zds.server.containerpods import ContainerPods
from zds.server.containers import ContainerFacts, addresses, shares_netns
from zds.server.engine import ContainerEngineSource
from zds.server.names import dns_name
from zds.server.pods import PodSource
from zds.server.selection import select
from zds.server.tasks import TaskOwner

MODE = "istio.io/dataplane-mode"


@pytest.mark.parametrize(
    ("labels", "namespace", "selected", "reason"),
    [
        ({MODE: "ambient"}, {}, True, "labelled istio.io/dataplane-mode=ambient"),
        ({MODE: "none"}, {MODE: "ambient"}, False, "labelled istio.io/dataplane-mode=none"),
        ({}, {MODE: "ambient"}, True, "in a namespace labelled istio.io/dataplane-mode=ambient"),
        ({}, {}, False, "not labelled"),
        ({MODE: "sidecar"}, {}, False, "not labelled"),
        (
            {MODE: "ambient", "sidecar.istio.io/status": "{}"},
            {},
            False,
            "with a sidecar (sidecar.istio.io/status)",
        ),
    ],
)
def test_istios_default_enablement_selectors(
    labels: dict[str, str], namespace: dict[str, str], selected: bool, reason: str
) -> None:
    decision = select(labels, namespace)
    assert decision.selected is selected and reason in decision.reason


def test_the_host_network_never_joins() -> None:
    assert not select({MODE: "ambient"}, host_network=True).selected


def test_a_podman_create_event_says_who_the_container_is() -> None:
    event = {
        "Type": "container",
        "Action": "create",
        "Actor": {
            "ID": "0712907cef42",
            "Attributes": {
                "com.docker.compose.project": "bookinfo",
                "containerExitCode": "0",
                "image": "localhost/zds-base:bookworm",
                MODE: "ambient",
                "zds.io/service-account": "bookinfo-reviews",
                "name": "bookinfo_reviews_1",
                "podId": "",
            },
        },
    }
    facts = ContainerFacts.from_event(event)
    assert facts is not None
    assert (facts.id, facts.name, facts.namespace, facts.service_account) == (
        "0712907cef42",
        "bookinfo_reviews_1",
        "bookinfo",
        "bookinfo-reviews",
    )
    assert facts.selection.selected and "image" not in facts.labels
    spec = facts.pod_spec(NetnsRef.of_path("/run/netns/netns-1"), ("10.1.0.2",), PodSource.CONTAINER_ENGINE)
    # Kubernetes' names: podman-compose's underscores become dashes.
    assert (spec.uid, spec.name, spec.namespace, spec.ips) == (
        "0712907cef42",
        "bookinfo-reviews-1",
        "bookinfo",
        ("10.1.0.2",),
    )
    assert dns_name("My_App.v2_", 253) == "my-app.v2" and dns_name("__", 63) == "container"


def test_an_inspected_container_outside_compose_is_in_the_default_namespace() -> None:
    info = {
        "Id": "abc",
        "Name": "/web",
        "Config": {"Labels": {MODE: "ambient"}},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"Networks": {"a": {"IPAddress": "10.0.0.2", "GlobalIPv6Address": "fd00::2"}}},
    }
    facts = ContainerFacts.from_inspect(info)
    assert (facts.name, facts.namespace, facts.service_account) == ("web", "default", "default")
    assert addresses(info) == ("10.0.0.2", "fd00::2") and not shares_netns(info)
    odd = {"b": {"IPAddress": "10.0.0.3", "GlobalIPv6Address": ["fd00::3"]}, "c": {"IPAddress": "none"}}
    assert addresses({"NetworkSettings": {"Networks": odd}}) == ("10.0.0.3",)  # not addresses: left out
    assert shares_netns({"HostConfig": {"NetworkMode": "container:infra"}})
    host = ContainerFacts.from_inspect({**info, "HostConfig": {"NetworkMode": "host"}})
    assert not host.selection.selected


async def test_a_handler_cancelled_as_another_container_is_learnt_stops_waiting() -> None:
    # Python 3.11's asyncio.wait_for returned the event here and swallowed the cancel: the
    # cancelled ADD went on waiting for its container for the whole lookup timeout.
    pods = ContainerPods(cast(NodeAgent, None), lookup_timeout=30.0)
    waiting = asyncio.create_task(pods.wait_facts("wanted"))
    await asyncio.sleep(0)  # it waits for the engine now
    pods.learn(ContainerFacts(id="another", name="another"))
    waiting.cancel()
    try:
        await asyncio.wait({waiting}, timeout=5)
        assert waiting.cancelled()
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_the_facts_of_another_agents_container_go_with_it() -> None:
    """With --container-label, every event of another agent's container was learnt, its
    removal's too: their facts piled up until the next reconnect (10,000 containers made
    and removed, 10,000 kept)."""
    pods = ContainerPods(cast(NodeAgent, SimpleNamespace(pods={})))
    source = ContainerEngineSource("/nonexistent/engine.sock", pods, TaskOwner(), ("team=a",))

    def event(action: str) -> dict[str, object]:
        return {"Type": "container", "Action": action, "Actor": {"ID": "c1", "Attributes": {"team": "b"}}}

    for action, known in (("create", True), ("start", True), ("died", True), ("remove", False)):
        source._handle(event(action))  # (another agent's container: nothing is asked of the engine)
        assert ("c1" in pods.facts) is known, action
