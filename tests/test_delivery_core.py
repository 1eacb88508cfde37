"""Istio's rules of delivery, pinned on the node agent's socket-free core.

``Enrollment`` with a real ``PodCache``, ``ConnectionRegistry``, ``EventBus``,
``Telemetry`` and ``TaskOwner``, and stand-in connections: plain objects with an
``id`` and an async ``deliver`` that record what they got, close the fd they
are handed (as a real connection does once it is sent) and answer with an ack,
a nack or ``ConnectionLost``. The netns is this process's own
(``/proc/self/ns/net``), which any user can open: no root, no socket, no process.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from opentelemetry import context as otel_context

from tests.harness import is_open, open_fds
from zds.netns import NetnsIdentity, NetnsRef, netns_identity
from zds.protocol.messages import Ack, AddWorkload, DelWorkload, KeepWorkload, Request, encode_request
from zds.server.agent import NodeAgent
from zds.server.enrollment import Enrollment
from zds.server.events import EventBus
from zds.server.link import ConnectionLost
from zds.server.netnspolicy import NetnsPolicy
from zds.server.outcomes import DeleteResult, EnrollmentError, EnrollmentOutcome
from zds.server.podcache import PodCache
from zds.server.pods import PodSpec
from zds.server.registry import ConnectionRegistry
from zds.server.tasks import TaskOwner
from zds.server.telemetry import Telemetry

#: This process's own network namespace: openable without root.
SELF_NETNS = NetnsRef.of_pid(os.getpid())  # /proc/PID/ns/net of this process: no root needed


def pod_spec(uid: str = "pod-a", netns: NetnsRef = SELF_NETNS) -> PodSpec:
    return PodSpec.create(uid, netns, name=f"{uid}-name", namespace="bookinfo", service_account="reviews")


def test_a_pod_spec_is_immutable_and_encodes_its_add_workload_once() -> None:
    spec = pod_spec()
    encoded = spec.add_workload_bytes
    assert spec.add_workload_bytes is encoded  # (kept: sent again in every snapshot)
    for name, value in (("uid", "other"), ("add_workload_bytes", b""), ("extra", 1)):
        with pytest.raises(AttributeError):
            setattr(spec, name, value)
    assert spec.add_workload_bytes is encoded and spec.uid == "pod-a"


@dataclass
class Delivery:
    """What one ``deliver`` call got."""

    request: Request
    #: The netns identity of the fd handed over (None: no fd), read before closing it.
    fd_identity: NetnsIdentity | None
    payload: bytes | None


@dataclass(eq=False)  # hashed by identity, as the registry keys connections
class StandInConnection:
    """A ztunnel connection without a socket: records each delivery, closes its fd, answers."""

    id: str
    answer: Ack | ConnectionLost = field(default_factory=Ack)
    #: When set, ``deliver`` waits for it before answering (an ack still on its way).
    gate: asyncio.Event | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    #: Set once a request was handed over (its answer may still be held by ``gate``).
    delivered: asyncio.Event = field(default_factory=asyncio.Event)
    answered: int = 0

    async def deliver(
        self,
        request: Request,
        fd: int | None = None,
        *,
        payload: bytes | None = None,
        trace_context: otel_context.Context | None = None,
    ) -> Ack:
        fd_identity = None
        if fd is not None:
            assert is_open(fd), "deliver was handed a closed fd"
            fd_identity = netns_identity(fd)
            os.close(fd)  # the fd is the connection's: a real one closes it once sent
        self.deliveries.append(Delivery(request, fd_identity, payload))
        self.delivered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.answered += 1
        if isinstance(self.answer, ConnectionLost):
            raise self.answer
        return self.answer

    @property
    def requests(self) -> list[Request]:
        return [d.request for d in self.deliveries]


@dataclass
class Core:
    """The node agent's delivery core, with nothing behind it."""

    cache: PodCache
    registry: ConnectionRegistry[StandInConnection]
    tasks: TaskOwner
    enrollment: Enrollment

    def connect(self, *conns: StandInConnection, hello: bool = True) -> None:
        """Admit each connection (accept) and, with ``hello``, let it say hello, in this order."""
        for conn in conns:
            self.registry.admit(conn)
            if hello:
                self.registry.hello(conn)


@pytest.fixture
async def core() -> AsyncIterator[Core]:
    fds_before = open_fds()
    cache = PodCache()
    registry: ConnectionRegistry[StandInConnection] = ConnectionRegistry(max_connections=8)
    tasks = TaskOwner()
    enrollment = Enrollment(cache, registry, None, EventBus(), Telemetry(), tasks)
    yield Core(cache, registry, tasks, enrollment)
    await tasks.cancel_all()
    cache.close()
    # Every netns fd the core opened and every dup it handed out is closed.
    assert open_fds() <= fds_before


async def owned_tasks_finish() -> None:
    """Let the tasks a cancelled caller left behind run to their end."""
    for _ in range(100):
        if len(asyncio.all_tasks()) == 1:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"tasks still running: {asyncio.all_tasks()}")


# -- where an AddWorkload goes -------------------------------------------------------------


async def test_an_add_goes_only_to_the_newest_connection_that_said_hello(core: Core) -> None:
    first, second, third = StandInConnection("first"), StandInConnection("second"), StandInConnection("third")
    core.connect(first, second, third, hello=False)
    # Newest is by hello, not by accept: "third" said hello before "first".
    core.registry.hello(third)
    core.registry.hello(first)
    spec = pod_spec()

    enrolled = await core.enrollment.add(spec)

    assert enrolled.conn_id == "first"
    assert first.requests == [spec.add_workload]
    assert second.deliveries == []
    assert third.deliveries == []
    pod = core.cache.get(spec.uid)
    assert pod is enrolled.pod
    assert pod.netns is not None
    # It got a dup of the pod's netns, not the cache's own fd (still open).
    assert first.deliveries[0].fd_identity == pod.netns.identity
    assert is_open(pod.netns.fd)


async def test_a_connection_admitted_without_hello_gets_nothing(core: Core) -> None:
    silent = StandInConnection("silent")
    core.connect(silent, hello=False)

    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec())

    assert caught.value.outcome is EnrollmentOutcome.NO_CONNECTION
    assert silent.deliveries == []
    await core.enrollment.remove("pod-a")
    assert silent.deliveries == []


# -- where a DelWorkload goes ----------------------------------------------------------------


async def test_a_delete_goes_to_every_connection_that_said_hello(core: Core) -> None:
    old, silent, new = StandInConnection("old"), StandInConnection("silent"), StandInConnection("new")
    core.connect(old)
    core.connect(silent, hello=False)
    core.connect(new)
    await core.enrollment.add(pod_spec())

    pod, results = await core.enrollment.remove("pod-a")

    # Oldest first, so a draining ztunnel releases the pod too.
    assert results == [DeleteResult("old", ""), DeleteResult("new", "")]
    assert old.deliveries == [Delivery(DelWorkload(uid="pod-a"), None, None)]
    assert new.requests == [pod.spec.add_workload, DelWorkload(uid="pod-a")]
    assert new.deliveries[1].fd_identity is None
    assert silent.deliveries == []
    assert "pod-a" not in core.cache
    assert pod.netns is not None and pod.netns.closed


async def test_a_removal_is_done_whatever_each_ztunnel_answers(core: Core) -> None:
    nacking = StandInConnection("nacking", answer=Ack("failure to process message : no"))
    lost = StandInConnection("lost", answer=ConnectionLost("lost", "peer went away"))
    core.connect(nacking, lost)
    await core.enrollment.load(pod_spec())

    pod, results = await core.enrollment.remove("pod-a")

    assert [r.conn_id for r in results] == ["nacking", "lost"]
    assert results[0].error == "failure to process message : no"
    assert "peer went away" in results[1].error
    assert "pod-a" not in core.cache
    assert pod.netns is not None and pod.netns.closed


async def test_remove_with_no_connection_still_forgets_the_pod_and_closes_its_netns(core: Core) -> None:
    await core.enrollment.load(pod_spec())
    cached = core.cache.get("pod-a")
    assert cached is not None and cached.netns is not None
    fd = cached.netns.fd

    pod, results = await core.enrollment.remove("pod-a")

    assert pod is cached
    assert results == []
    assert "pod-a" not in core.cache
    assert core.cache.spec("pod-a", removing=True) is None  # the removal is over
    assert pod.netns is not None and pod.netns.closed
    assert not is_open(fd)


async def test_removing_an_unknown_uid_is_a_key_error(core: Core) -> None:
    with pytest.raises(KeyError):
        await core.enrollment.remove("nobody")


# -- what stays cached -----------------------------------------------------------------------


async def test_with_no_connection_the_pod_is_cached_and_the_outcome_is_no_connection(core: Core) -> None:
    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec())

    assert caught.value.outcome is EnrollmentOutcome.NO_CONNECTION
    pod = core.cache.get("pod-a")
    assert pod is not None
    assert pod.netns is not None and not pod.netns.closed
    assert pod.last_error == "no ztunnel connection"


async def test_a_nack_leaves_the_pod_cached_with_outcome_nacked(core: Core) -> None:
    conn = StandInConnection("z", answer=Ack("failure to start proxy : address in use"))
    core.connect(conn)

    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec())

    assert caught.value.outcome is EnrollmentOutcome.NACKED
    assert str(caught.value) == "failure to start proxy : address in use"
    pod = core.cache.get("pod-a")
    assert pod is not None and pod.netns is not None and not pod.netns.closed


async def test_a_lost_connection_leaves_the_pod_cached_with_outcome_lost(core: Core) -> None:
    lost = ConnectionLost("z", "peer closed the connection")
    core.connect(StandInConnection("z", answer=lost))

    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec())

    assert caught.value.outcome is EnrollmentOutcome.LOST
    pod = core.cache.get("pod-a")
    assert pod is not None and pod.netns is not None and not pod.netns.closed
    assert pod.last_error == str(lost)


async def test_an_ack_timeout_leaves_the_pod_cached_with_outcome_timeout(core: Core) -> None:
    lost = ConnectionLost("z", "no ack for add within 5s", ack_timeout=True)
    core.connect(StandInConnection("z", answer=lost))

    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec())

    assert caught.value.outcome is EnrollmentOutcome.TIMEOUT
    pod = core.cache.get("pod-a")
    assert pod is not None and pod.netns is not None and not pod.netns.closed
    assert pod.last_error == str(lost)


async def test_re_adding_a_uid_replaces_the_cached_pod_and_closes_the_old_netns(core: Core) -> None:
    conn = StandInConnection("z")
    core.connect(conn)
    first = (await core.enrollment.add(pod_spec())).pod
    assert first.netns is not None
    old_fd = first.netns.fd

    second = (await core.enrollment.add(pod_spec())).pod

    assert second is not first
    assert core.cache.get("pod-a") is second
    assert len(core.cache) == 1
    assert first.netns.closed
    assert second.netns is not None and not second.netns.closed
    # The old number may be reused by the new handle; if not, it is closed.
    assert old_fd == second.netns.fd or not is_open(old_fd)
    assert conn.requests == [first.spec.add_workload, second.spec.add_workload]


async def test_an_invalid_pod_is_not_cached_and_nothing_is_sent(core: Core, tmp_path: pathlib.Path) -> None:
    conn = StandInConnection("z")
    core.connect(conn)

    with pytest.raises(EnrollmentError) as caught:
        await core.enrollment.add(pod_spec(netns=NetnsRef.of_path(str(tmp_path / "gone"))))

    assert caught.value.outcome is EnrollmentOutcome.INVALID
    assert "pod-a" not in core.cache
    assert conn.deliveries == []


# -- callers that give up --------------------------------------------------------------------


async def test_an_enrollment_completes_even_if_its_caller_is_cancelled(core: Core) -> None:
    conn = StandInConnection("z", gate=asyncio.Event())
    core.connect(conn)
    caller = asyncio.create_task(core.enrollment.add(pod_spec()))
    await conn.delivered.wait()  # the Add is out, its ack not yet back

    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert conn.gate is not None
    conn.gate.set()
    await owned_tasks_finish()

    assert conn.answered == 1
    assert conn.requests == [pod_spec().add_workload]
    pod = core.cache.get("pod-a")
    assert pod is not None
    assert pod.netns is not None and not pod.netns.closed
    assert pod.last_error == ""


async def test_a_removal_completes_even_if_its_caller_is_cancelled(core: Core) -> None:
    conn = StandInConnection("z", gate=asyncio.Event())
    core.connect(conn)
    pod = await core.enrollment.load(pod_spec())
    caller = asyncio.create_task(core.enrollment.remove("pod-a"))
    await conn.delivered.wait()  # the Del is out, its ack not yet back

    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert pod.netns is not None and not pod.netns.closed  # still in use: the Del awaits its ack
    assert conn.gate is not None
    conn.gate.set()
    await owned_tasks_finish()

    assert conn.answered == 1
    assert "pod-a" not in core.cache
    assert core.cache.spec("pod-a", removing=True) is None
    assert pod.netns.closed


# -- AddWorkload encoded once ---------------------------------------------------------------


async def test_the_add_workload_payload_is_encoded_once_and_reused_for_every_delivery(core: Core) -> None:
    old, new = StandInConnection("old"), StandInConnection("new")
    core.connect(old)
    spec = pod_spec()
    await core.enrollment.add(spec)
    core.connect(new)
    await core.enrollment.add(spec)

    first, second = old.deliveries[0].payload, new.deliveries[0].payload
    assert first == encode_request(spec.add_workload)
    assert first is spec.add_workload_bytes
    assert second is first


# -- the registry ----------------------------------------------------------------------------


def test_only_connections_that_said_hello_count_against_the_limit() -> None:
    registry: ConnectionRegistry[StandInConnection] = ConnectionRegistry(max_connections=2)
    a, b, c = StandInConnection("a"), StandInConnection("b"), StandInConnection("c")
    assert not registry.full()
    for conn in (a, b, c):
        assert registry.admit(conn) is None
    registry.hello(a)
    assert not registry.full(), "b and c never said hello: they hold no place"
    registry.hello(b)
    assert registry.full()
    assert len(registry) == 2  # only those that said hello count as connected

    assert registry.remove(c) is False  # it had not said hello
    assert registry.remove(b) is True
    assert not registry.full()
    assert registry.live() == [a]


def test_past_the_bound_the_oldest_connection_waiting_for_its_hello_is_dropped() -> None:
    registry: ConnectionRegistry[StandInConnection] = ConnectionRegistry(max_connections=2, max_waiting=3)
    conns = [StandInConnection(str(i)) for i in range(5)]
    assert [registry.admit(conn) for conn in conns[:3]] == [None, None, None]
    registry.hello(conns[0])  # said hello: no longer waiting, never dropped for being idle
    assert registry.admit(conns[3]) is None
    assert registry.admit(conns[4]) is conns[1], "the oldest still waiting goes first"
    assert conns[1] not in registry.live()
    assert registry.admit(StandInConnection("5")) is conns[2]


def test_the_registry_newest_and_ready_after_remove() -> None:
    registry: ConnectionRegistry[StandInConnection] = ConnectionRegistry(max_connections=8)
    a, b, c = StandInConnection("a"), StandInConnection("b"), StandInConnection("c")
    for conn in (a, b, c):
        registry.admit(conn)
    registry.hello(b)
    registry.hello(a)
    registry.hello(c)
    registry.hello(b)  # a second hello changes nothing
    assert registry.ready() == [b, a, c]
    assert registry.newest() is c

    assert registry.remove(c) is True
    assert registry.newest() is a
    assert registry.ready() == [b, a]
    assert registry.remove(b) is True
    assert registry.ready() == [a]
    assert registry.newest() is a
    assert registry.remove(a) is True
    assert registry.newest() is None
    assert registry.ready() == []
    assert registry.remove(a) is False  # already gone


def test_a_hello_from_a_connection_not_admitted_is_ignored() -> None:
    registry: ConnectionRegistry[StandInConnection] = ConnectionRegistry(max_connections=8)
    stray = StandInConnection("stray")
    registry.hello(stray)
    assert registry.newest() is None
    assert registry.live() == []


# -- the snapshot a new connection gets --------------------------------------------------------


@pytest.fixture
async def agent() -> AsyncIterator[NodeAgent]:
    # This process's netns is the node's: a node agent that forbids nothing, for this unit test only.
    node_agent = NodeAgent(netns_policy=NetnsPolicy(roots=("/",), forbidden={}))
    yield node_agent
    node_agent.pods.close()


async def test_snapshot_item_is_an_add_with_a_dup_of_the_pods_netns(agent: NodeAgent) -> None:
    spec = pod_spec()
    pod = await agent.load(spec)
    assert pod.netns is not None

    item = agent.snapshot_item("pod-a")

    assert item is not None
    assert item.request == spec.add_workload
    assert isinstance(item.request, AddWorkload)
    assert item.payload is spec.add_workload_bytes
    assert item.fd is not None
    try:
        assert item.fd != pod.netns.fd  # a dup the connection owns, not the cache's fd
        assert netns_identity(item.fd) == pod.netns.identity
    finally:
        os.close(item.fd)
    assert is_open(pod.netns.fd)


async def test_snapshot_item_is_a_keep_for_a_pod_whose_netns_is_none(
    agent: NodeAgent, tmp_path: pathlib.Path
) -> None:
    # A netns that cannot be opened at start-up: the pod stays known, without one.
    pod = await agent.load(pod_spec(netns=NetnsRef.of_path(str(tmp_path / "gone"))))
    assert pod.netns is None

    item = agent.snapshot_item("pod-a")

    assert item is not None
    assert item.request == KeepWorkload(uid="pod-a")
    assert item.fd is None


async def test_snapshot_item_is_none_for_an_unknown_uid(agent: NodeAgent) -> None:
    await agent.load(pod_spec())
    assert agent.snapshot_item("removed-meanwhile") is None
