"""zds-cni's ADD of a container's pod: the pod is named by the container engine's facts
(through ``ContainerFacts.pod_spec``, so ``PodSpec.create``), whatever the event said,
with the netns, addresses and source of the event."""

from __future__ import annotations

import json
from typing import cast

import pytest

from zds import defaults
from zds.server.agent import NodeAgent
from zds.server.cni import parse_event
from zds.server.containerpods import ContainerPods
from zds.server.containers import ContainerFacts
from zds.server.pods import PodSource, PodSpec


class _Agent:
    """What ``ContainerPods.cni_add`` asks of the node agent: its pods, and to add one."""

    def __init__(self) -> None:
        self.pods: dict[str, object] = {}
        self.added: list[PodSpec] = []

    async def add_pod(self, spec: PodSpec, *, expect: object = None) -> None:
        assert expect is None  # (no pod held the uid: the one cni_add decided on)
        self.added.append(spec)


@pytest.mark.parametrize(
    ("labels", "namespace", "service_account"),
    [
        ({}, defaults.POD_NAMESPACE, defaults.SERVICE_ACCOUNT),
        (
            {defaults.COMPOSE_PROJECT_LABEL: "Book_Info", defaults.SERVICE_ACCOUNT_LABEL: "reviews"},
            "book-info",
            "reviews",
        ),
        ({defaults.SERVICE_ACCOUNT_LABEL: ""}, defaults.POD_NAMESPACE, defaults.SERVICE_ACCOUNT),
    ],
)
async def test_a_containers_pod_is_named_by_its_facts_with_the_events_netns_and_addresses(
    labels: dict[str, str], namespace: str, service_account: str
) -> None:
    agent = _Agent()
    pods = ContainerPods(cast(NodeAgent, agent), lookup_timeout=5.0)
    pods.engine = "stand-in"
    cid = "0712907cef42"
    pods.learn(
        ContainerFacts(id=cid, name="Reviews_1", labels={"istio.io/dataplane-mode": "ambient", **labels})
    )
    event = {
        "Netns": "/run/netns/netns-1",
        "PodName": "what-the-runtime-said",
        "PodNamespace": "elsewhere",
        "PodUID": "not-the-container-id",
        "IPs": [{"Address": {"IP": "10.1.0.2", "Mask": "////AA=="}}],
        "ContainerID": cid,
    }
    spec, container = parse_event(json.dumps(event).encode())
    assert container == cid
    status, text = await pods.cni_add(spec, cid)
    assert status == 200, text
    [added] = agent.added
    assert added == PodSpec.create(
        cid,
        spec.netns,
        name="reviews-1",
        namespace=namespace,
        service_account=service_account,
        ips=("10.1.0.2",),
        source=PodSource.CNI,
    )
