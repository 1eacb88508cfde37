"""Enrollments and removals that overlap, with real rules in real namespaces and a real
pod store: the interleavings that lost an acknowledged pod or stripped a pod's rules.

A gate holds one step (the rules' removal, the store's commit) until the other request
is under way, so each test makes exactly the interleaving it is about; everything else
is the node agent's own code, in-process, with a ztunnel stand-in acking over the ZDS
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import resource
import sqlite3
import subprocess
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from tests.harness import Pod, async_wait_until, serve_agent, wait_until
from tests.standins import AckingPeer
from zds import defaults
from zds.aio import cancel_and_wait
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns import NetnsHandle, NetnsIdentity, NetnsRef, open_netns
from zds.netns.fixtures import delete_netns
from zds.server import podcache, recovery
from zds.server.agent import AgentConfig, NodeAgent
from zds.server.cni import CniPluginEndpoint
from zds.server.containerpods import ContainerPods
from zds.server.containers import ContainerFacts
from zds.server.control import start_control_server
from zds.server.inpodrules import RedirectConfig
from zds.server.leftovers import Leftovers
from zds.server.netnspolicy import NetnsPolicy
from zds.server.nftables import NftablesRedirector
from zds.server.outcomes import Enrolled, EnrollmentError, EnrollmentOutcome
from zds.server.pods import PodSource, PodSpec
from zds.server.recovery import RecoveryOutcome, recover
from zds.server.redirect import Installed, RedirectError, Redirector, RulesNotOurs, redirector
from zds.server.store import PodStore
from zds.server.storefile import StoreError
from zds.server.storerows import StoredPod

pytestmark = pytest.mark.root

T = TypeVar("T")


class Gate:
    """Holds whoever reaches it while closed; ``reached`` is set when someone does."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.reached = asyncio.Event()

    def close(self) -> None:
        self.open.clear()
        self.reached.clear()

    async def passing(self) -> None:
        self.reached.set()
        await self.open.wait()


class GatedRedirector(Redirector):
    """Istio's iptables rules, for real; an install waits at ``install`` first (and fails
    with ``refuse``), a removal at ``removal``."""

    def __init__(self) -> None:
        super().__init__()
        self.install_gate = Gate()
        self.removal = Gate()
        self.refuse = ""
        #: An install finds rules not ours in the netns (RulesNotOurs: nothing touched).
        self.not_ours = ""
        #: The install puts the rules in, then fails with this.
        self.fail_after = ""
        #: A removal fails with this.
        self.refuse_removal = ""
        #: A removal in a netns of these inodes fails too.
        self.refuse_removal_in: set[int] = set()
        #: Removals tried (past the gate): an undo's, a removal's, each retry's.
        self.removals_tried = 0

    async def install(self, netns: NetnsHandle) -> Installed:
        await self.install_gate.passing()
        if self.refuse:
            raise RedirectError(self.refuse)
        if self.not_ours:
            raise RulesNotOurs(self.not_ours)
        installed = await super().install(netns)
        if self.fail_after:
            raise RedirectError(self.fail_after)
        return installed

    async def remove(self, netns: NetnsHandle, *, routing: bool = True) -> None:
        await self.removal.passing()
        self.removals_tried += 1
        if self.refuse_removal or netns.identity.ino in self.refuse_removal_in:
            raise RedirectError(self.refuse_removal or "iptables-restore: Too many open files")
        await super().remove(netns, routing=routing)


class GatedStore(PodStore):
    """The real pod store; a pod's commit waits at ``commit`` first (and fails with
    ``refuse``; its install row is written as ever); ``committed`` is called right after
    each batch of pods is committed, before their callers are woken."""

    commit: Gate
    #: A pod's install row waits here first (the pod counts as being enrolled in its netns).
    intend: Gate
    refuse = ""
    committed: Callable[[], object] | None = None

    async def intend_soon(self, pod: StoredPod) -> None:
        await self.intend.passing()
        await super().intend_soon(pod)

    async def put_soon(self, pod: StoredPod, *, left: StoredPod | None = None) -> None:
        await self.commit.passing()
        if self.refuse:
            raise StoreError(self.refuse)
        await super().put_soon(pod, left=left)

    def _commit_soon(self) -> None:
        super()._commit_soon()
        if self.committed is not None:
            self.committed()


@dataclass
class Agent:
    agent: NodeAgent
    redirector: GatedRedirector
    store: GatedStore
    peer: AckingPeer

    def spec(self, uid: str, pod: Pod) -> PodSpec:
        return PodSpec.create(uid, NetnsRef.of_path(pod.path), name=uid, namespace="default")

    def stored(self) -> dict[str, tuple[int, int] | None]:
        """uid -> the (dev, inode) of the netns the store holds it in."""
        return {
            p.spec.uid: (p.identity.dev, p.identity.ino) if p.identity is not None else None
            for p in self.store.load()
        }

    def committed(self, table: str) -> list[str]:
        """The uids in a table of the store, as another process reads it: what is committed."""
        with contextlib.closing(sqlite3.connect(self.store.path)) as reader:
            return [uid for (uid,) in reader.execute(f"SELECT uid FROM {table} ORDER BY uid")]


def with_netns_root(tmp_path: Path) -> NetnsPolicy:
    """This node's policy with ``tmp_path/netns-root`` as a --netns-root directory."""
    return NetnsPolicy.for_this_node([str(tmp_path / "netns-root")])


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    redirector = GatedRedirector()
    node_agent = NodeAgent(AgentConfig(), redirector, netns_policy=with_netns_root(tmp_path))
    store = GatedStore.open(str(tmp_path), used_before=False)
    store.commit = Gate()
    store.intend = Gate()
    node_agent.use_store(store)
    path = os.path.join(tmp_path, "ztunnel.sock")
    listener, serving = serve_agent(node_agent, path)
    peer: AckingPeer | None = None
    try:
        peer = AckingPeer(path)
        await async_wait_until(lambda: "snapshot_sent" in peer.kinds, "the snapshot")
        yield Agent(node_agent, redirector, store, peer)
    finally:
        redirector.install_gate.open.set()
        redirector.removal.open.set()
        store.commit.open.set()
        store.intend.open.set()
        if peer is not None:
            peer.close()
        try:
            for uid in [pod.uid for pod in node_agent.pods]:
                await node_agent.remove_pod(uid)  # their rules out of the namespaces before they go
        finally:
            await cancel_and_wait(serving)
            listener.close()
            node_agent.pods.close()
            store.close()


def has_rules(pod: Pod) -> bool:
    """Istio's in-pod chains are in the pod's netns (iptables-save, IPv4)."""
    return rules_at(pod.path)


def rules_at(path: str) -> bool:
    """``has_rules`` for the netns at ``path`` (a named one, a bind mount, /proc/PID/ns/net)."""
    return "ISTIO_OUTPUT" in run_at(path, "iptables-save")


@pytest.fixture
def moved_under_root(tmp_path: Path) -> Iterator[Callable[[Pod], str]]:
    """Moves a pod's netns from its name to a bind mount in the node agents' --netns-root
    directory (``with_netns_root``), which alone holds it then; unmounted at the end."""
    mounted: list[str] = []

    def move(pod: Pod) -> str:
        target = tmp_path / "netns-root" / pod.name
        target.parent.mkdir(exist_ok=True)
        target.touch()
        subprocess.run(["mount", "--bind", pod.path, str(target)], check=True)
        mounted.append(str(target))
        delete_netns(pod.name)
        return str(target)

    yield move
    for path in mounted:  # (lazily: a node agent's fd opened there may still be open)
        subprocess.run(["umount", "--lazy", path], check=False)


def identity(pod: Pod) -> tuple[int, int]:
    return identity_at(pod.path)


def identity_at(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


async def test_a_uid_enrolled_again_during_its_removal_waits_for_it_and_stays(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """RemovePod(u1) is taking u1's rules out of A when AddPod(u1, B) comes: the add waits
    for the removal, then enrolls u1 in B; the removal's end (its store delete, its
    DelWorkload) never reaches the new pod."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    assert has_rules(a)
    agent.redirector.removal.close()
    removal = asyncio.create_task(agent.agent.remove_pod("u1"))
    await asyncio.wait_for(agent.redirector.removal.reached.wait(), 10)
    enrollment = asyncio.create_task(agent.agent.add_pod(agent.spec("u1", b)))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not enrollment.done()
    assert not has_rules(b), "the add went ahead while the removal of its uid was under way"
    agent.redirector.removal.open.set()
    await asyncio.wait_for(removal, 30)
    enrolled = await asyncio.wait_for(enrollment, 30)
    assert enrolled.pod.spec.netns.path == b.path
    pod = agent.agent.pods.get("u1")
    assert pod is enrolled.pod and pod.rules_installed
    assert agent.stored() == {"u1": identity(b)}
    assert has_rules(b) and not has_rules(a)
    await async_wait_until(lambda: agent.peer.kinds.count("add") == 2, "the second add")
    assert agent.peer.kinds == ["snapshot_sent", "add", "del", "add"]


async def test_a_removal_after_an_add_in_flight_of_the_same_uid_removes_it(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """RemovePod(u1) while AddPod(u1) is still committing u1: not "unknown pod" and no
    race: the removal waits for the enrollment, then takes it out."""
    a = make_pod()
    agent.store.commit.close()
    enrollment = asyncio.create_task(agent.agent.add_pod(agent.spec("u1", a)))
    await asyncio.wait_for(agent.store.commit.reached.wait(), 10)
    removal = asyncio.create_task(agent.agent.remove_pod("u1"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not removal.done()
    agent.store.commit.open.set()
    await asyncio.wait_for(enrollment, 30)
    await asyncio.wait_for(removal, 30)
    assert "u1" not in agent.agent.pods
    assert agent.stored() == {}
    assert not has_rules(a)


async def test_a_removal_of_another_pod_keeps_the_rules_of_one_being_enrolled_in_its_netns(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1 lives in A; AddPod(u2, A) has installed the rules and is committing u2 when
    RemovePod(u1) comes: u2 counts as living in A already, so the rules stay."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.store.commit.close()
    enrollment = asyncio.create_task(agent.agent.add_pod(agent.spec("u2", a)))
    await asyncio.wait_for(agent.store.commit.reached.wait(), 10)
    await asyncio.wait_for(agent.agent.remove_pod("u1"), 30)
    assert has_rules(a), "u1's removal took out the rules of u2, which is being enrolled there"
    agent.store.commit.open.set()
    enrolled = await asyncio.wait_for(enrollment, 30)
    assert enrolled.pod.rules_installed and has_rules(a)
    rules = agent.agent.enrollment.rules
    assert rules is not None and await rules.in_place(enrolled.pod)
    assert agent.stored() == {"u2": identity(a)}
    await agent.agent.remove_pod("u2")
    assert not has_rules(a)


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "installed"])
async def test_a_removal_takes_the_rules_out_while_the_pod_being_enrolled_there_has_none_yet(
    agent: Agent, make_pod: Callable[[], Pod], refused: bool
) -> None:
    """u1 lives in A; AddPod(u2, A) has begun (its install row) but installed nothing yet when
    RemovePod(u1) comes. Counted as living in A all the same, u2 kept u1's rules and u1's row
    went; u2 then refused (rules not ours: nothing touched, nothing undone) and the rules stayed
    in A for good, recorded nowhere (review, HIGH). The removal takes them out now; u2, if it
    goes on, installs its own."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.store.intend.close()
    if refused:
        agent.redirector.not_ours = "the netns holds a rule zds did not make that jumps into its chains"
    enrollment = asyncio.create_task(agent.agent.add_pod(agent.spec("u2", a)))
    await asyncio.wait_for(agent.store.intend.reached.wait(), 10)
    await asyncio.wait_for(agent.agent.remove_pod("u1"), 30)
    assert not has_rules(a), "u1's rules stayed for u2, which had installed none"
    agent.store.intend.open.set()
    if refused:
        with pytest.raises(EnrollmentError) as info:
            await asyncio.wait_for(enrollment, 30)
        assert info.value.outcome is EnrollmentOutcome.REFUSED
        assert not has_rules(a) and "u2" not in agent.agent.pods
        assert agent.stored() == {} and agent.committed("installs") == []
    else:
        enrolled = await asyncio.wait_for(enrollment, 30)
        assert enrolled.pod.rules_installed and has_rules(a)
        assert agent.stored() == {"u2": identity(a)}


async def test_an_enrollment_that_fails_to_commit_takes_its_own_rules_out(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """Counting a pod being enrolled as living in its netns must not keep its own rules
    when its enrollment fails: a store that cannot commit leaves the netns as it was."""
    a = make_pod()
    agent.store.refuse = "disk full"  # the pod's own row cannot be committed
    with pytest.raises(EnrollmentError) as info:
        await agent.agent.add_pod(agent.spec("u1", a))
    assert info.value.outcome is EnrollmentOutcome.STORE
    assert "u1" not in agent.agent.pods
    assert not has_rules(a)
    assert agent.committed("installs") == []  # its rules are out: nothing for a next start to do


async def test_rules_a_failed_commit_could_not_take_out_keep_their_row_and_are_retried(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """The pod's row cannot be committed and its rules will not come out: they were left to
    the next start only (logged), redirecting the pod's traffic meanwhile."""
    a = make_pod()
    agent.store.refuse = "disk full"
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    with pytest.raises(EnrollmentError) as info:
        await agent.agent.add_pod(agent.spec("u1", a))
    assert info.value.outcome is EnrollmentOutcome.STORE
    assert has_rules(a) and agent.committed("leftovers") == ["u1"] and agent.committed("installs") == []
    assert len(undo_tasks()) == 1
    agent.redirector.refuse_removal = ""
    await async_wait_until(
        lambda: not has_rules(a) and not agent.committed("leftovers"),
        "the rules out and their row gone",
        timeout=defaults.UNDO_RETRY_INITIAL + 5,
    )
    assert netns_fds(a.path) == 0


async def test_rules_of_a_pod_replaced_from_another_netns_that_stay_in_are_retried(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1 re-added in B: taking its rules out of A failed, and they stayed there for good
    (no row records them: the uid's rows are B's now)."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.refuse_removal_in = {os.stat(a.path).st_ino}
    await agent.agent.add_pod(agent.spec("u1", b))
    await async_wait_until(lambda: len(undo_tasks()) == 1, "A's rules handed to the retry")
    assert has_rules(a) and has_rules(b)
    agent.redirector.refuse_removal_in = set()
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert not has_rules(a) and has_rules(b)
    assert agent.stored() == {"u1": identity(b)} and agent.committed("installs") == []
    assert netns_fds(a.path) == 0


async def test_an_install_that_cannot_be_taken_out_keeps_its_row_for_the_next_start(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    # (a node agent out of fds: iptables could not even be started to take its rules out)
    a = make_pod()
    agent.redirector.fail_after = "ip6tables-restore: Too many open files"
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    with pytest.raises(EnrollmentError) as info:
        await agent.agent.add_pod(agent.spec("u1", a))
    assert info.value.outcome is EnrollmentOutcome.RULES
    assert str(info.value).endswith(
        "what went in could not be taken out: tried again in the background (and at the next start)"
    )
    assert "u1" not in agent.agent.pods
    assert has_rules(a)
    assert agent.committed("leftovers") == ["u1"]  # forgotten, those rules would stay for good
    assert agent.committed("installs") == []  # (moved, in one transaction)


async def _rules_left_by_a_failed_install(agent: Agent, netns: Pod) -> None:
    """u1's install fails in ``netns`` and so does its undo: its rules stay there."""
    agent.redirector.fail_after = "ip6tables-restore: Too many open files"
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    with pytest.raises(EnrollmentError):
        await agent.agent.add_pod(agent.spec("u1", netns))
    agent.redirector.fail_after = ""
    assert has_rules(netns) and agent.committed("leftovers") == ["u1"]


async def test_rules_a_failed_install_could_not_take_out_come_out_once_they_can(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """Until the next start, they redirected the pod's traffic to listeners nobody opens."""
    a = make_pod()
    await _rules_left_by_a_failed_install(agent, a)
    tried = agent.redirector.removals_tried  # (the install's own undo)
    await async_wait_until(
        lambda: agent.redirector.removals_tried > tried,
        "the first retry",
        timeout=defaults.UNDO_RETRY_INITIAL + 5,
    )
    assert has_rules(a) and agent.committed("leftovers") == ["u1"]  # it failed too
    agent.redirector.refuse_removal = ""
    await async_wait_until(
        lambda: not has_rules(a) and not agent.committed("leftovers"),
        "the rules out and their row gone",
        timeout=3 * defaults.UNDO_RETRY_INITIAL + 5,
    )
    assert "u1" not in agent.agent.pods


def undo_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("undo-")]


@pytest.fixture
def retries_held(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Leftover retries wait until this is set before their first pause: a test's setup comes
    first whatever the machine's speed (it had UNDO_RETRY_INITIAL, 2 s, to be done)."""
    gate = asyncio.Event()
    until_out = Leftovers._until_out

    async def held(self: Leftovers, pod: Any, left: Any) -> None:
        await gate.wait()
        await until_out(self, pod, left)

    monkeypatch.setattr(Leftovers, "_until_out", held)
    return gate


async def test_rules_a_failed_install_left_stay_once_another_pod_lives_in_that_netns(
    agent: Agent, make_pod: Callable[[], Pod], caplog: pytest.LogCaptureFixture, retries_held: asyncio.Event
) -> None:
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await _rules_left_by_a_failed_install(agent, a)
    assert len(undo_tasks()) == 1
    tried = agent.redirector.removals_tried  # (the install's own undo)
    agent.redirector.refuse_removal = ""
    enrolled = await agent.agent.add_pod(agent.spec("u2", a))
    assert enrolled.pod.rules_installed
    retries_held.set()  # (a retry that came first would have taken the rules out)
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert "rules a failed install left are kept: another pod lives in its netns now" in caplog.text
    assert agent.redirector.removals_tried == tried, "the retry tried to take them out"
    rules = agent.agent.enrollment.rules
    assert rules is not None and await rules.in_place(enrolled.pod), "the retry took out u2's rules"
    # They are u2's now (its row records them; its removal takes them out): their row goes.
    assert agent.committed("leftovers") == [] and agent.committed("pods") == ["u2"]


async def test_failed_installs_in_one_netns_share_one_retry_that_ends_when_the_netns_goes(
    agent: Agent, make_pod: Callable[[], Pod], caplog: pytest.LogCaptureFixture
) -> None:
    """Each retry held a netns fd (the very thing short when removals fail), and kept a torn
    down pod's netns, and its rules, alive for good."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await _rules_left_by_a_failed_install(agent, a)
    agent.redirector.fail_after = "ip6tables-restore: Too many open files"
    for uid in ("u1", "u2"):
        with pytest.raises(EnrollmentError):
            await agent.agent.add_pod(agent.spec(uid, a))
    assert len(undo_tasks()) == 1
    assert sorted(agent.committed("leftovers")) == ["u1", "u2"]
    assert netns_fds(a.path) == 1, "one netns fd for the retry, none for the pods that joined it"
    held = os.open(a.path, os.O_RDONLY | os.O_CLOEXEC)  # (to count its fds once it is deleted)
    try:
        delete_netns(a.name)  # the sandbox torn down; removals still fail
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert (
            f"rules a failed install left go with their netns: it is no longer at {a.path} nor anywhere else"
            in caplog.text
        )
        assert agent.committed("leftovers") == []
        assert netns_fds(f"/proc/self/fd/{held}") == 1, "the retry let the netns go"
    finally:
        os.close(held)


async def test_rules_a_removal_could_not_take_out_stay_recorded_and_come_out_once_they_can(
    agent: Agent, make_pod: Callable[[], Pod], caplog: pytest.LogCaptureFixture
) -> None:
    """The pod's row went though its rules stayed: nothing would ever take them out (its
    traffic redirected to listeners nobody opens for it, for good)."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    await agent.agent.remove_pod("u1")  # done whatever happens (Istio's rule)
    assert "u1" not in agent.agent.pods and has_rules(a)
    assert agent.committed("leftovers") == ["u1"], "the only record of those rules"
    assert [p.removing for p in agent.store.load_leftovers()] == [True]  # (a removal's)
    assert agent.committed("pods") == []  # (moved, in one transaction)
    agent.redirector.refuse_removal = ""
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert "rules a failed removal left are taken out now" in caplog.text
    assert not has_rules(a) and agent.committed("leftovers") == []


@contextlib.asynccontextmanager
async def started_on(
    tmp_path: Path, rules: Redirector | None, policy: NetnsPolicy | None = None
) -> AsyncIterator[tuple[NodeAgent, PodStore]]:
    """A node agent on the first one's pod store, as after a restart, with ``rules`` (None:
    --no-redirect) and ``policy`` (default: ``with_netns_root``, as the first one's); its
    retries stopped at the end."""
    restarted = NodeAgent(AgentConfig(), rules, netns_policy=policy or with_netns_root(tmp_path))
    store = PodStore.open(str(tmp_path), used_before=True)
    restarted.use_store(store)
    try:
        yield restarted, store
    finally:
        await restarted.tasks.cancel_all()
        restarted.close()
        store.close()


@contextlib.asynccontextmanager
async def restarted_on(
    tmp_path: Path, policy: NetnsPolicy | None = None
) -> AsyncIterator[tuple[NodeAgent, GatedRedirector, PodStore]]:
    """``started_on`` with Istio's iptables rules whose removals fail (until the test says
    otherwise)."""
    redirector = GatedRedirector()
    redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    async with started_on(tmp_path, redirector, policy) as (restarted, store):
        yield restarted, redirector, store


async def one_retry_takes_them_out(
    redirector: GatedRedirector, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    """One retry runs; once removals work again, it takes ``what`` out and ends."""
    assert len(undo_tasks()) == 1
    redirector.refuse_removal = ""
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert f"{what} are taken out now" in caplog.text


async def test_a_removal_a_restart_interrupted_whose_rules_stay_in_keeps_its_row_and_is_retried(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery finished such a removal by deleting the pod's row even when its rules could
    not be taken out at that start: nothing recorded them any more, nor took them out."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.store.mark_removing("u1")  # a removal begun, then the node agent killed
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.REMOVAL_RETRIED}
        assert has_rules(a) and "u1" not in restarted.pods
        assert [p.removing for p in store.load_leftovers()] == [True], "the only record of those rules"
        assert store.load() == []
        await one_retry_takes_them_out(redirector, caplog, "rules a failed removal left")
        assert not has_rules(a) and agent.committed("leftovers") == []


async def test_a_removal_a_restart_interrupted_beside_a_recovered_pod_says_its_rules_stay_for_it(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its rules stay on purpose (u2, recovered, lives in that netns): it was said as a failure
    to take them out (review, LOW); they are still recorded and come out once u2 is gone."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    await agent.agent.add_pod(agent.spec("u2", a))
    agent.store.mark_removing("u1")  # a removal begun, then the node agent killed
    async with started_on(tmp_path, GatedRedirector()) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes["u1"] is RecoveryOutcome.REMOVAL_RETRIED
        assert "its rules stay while a recovered pod lives in its netns" in caplog.text
        assert "could not be taken out" not in caplog.text
        assert has_rules(a) and [p.spec.uid for p in store.load_leftovers()] == ["u1"]
        await restarted.remove_pod("u2")
        await async_wait_until(lambda: not has_rules(a), "the rules out once u2 is gone", timeout=30)
        await async_wait_until(lambda: store.load_leftovers() == [], "their record gone", timeout=30)


async def test_an_install_a_restart_interrupted_whose_rules_stay_in_keeps_its_row_and_is_retried(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery deleted the install row of an enrollment a crash interrupted even when its
    rules could not be taken out at that start: nothing recorded them any more."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    (row,) = agent.store.load()
    await agent.store.intend_soon(row)  # as if killed after the rules went in, before its row
    agent.store.delete("u1")
    assert agent.committed("installs") == ["u1"] and agent.committed("pods") == []
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        await recover(store, restarted.enrollment)
        assert "what went in could not be taken out: tried again in the background" in caplog.text
        assert has_rules(a) and agent.committed("leftovers") == ["u1"], "the only record of those rules"
        assert agent.committed("installs") == []
        await one_retry_takes_them_out(redirector, caplog, "rules a failed install left")
        assert not has_rules(a) and agent.committed("leftovers") == []


async def test_a_removal_retry_leaves_alone_the_row_of_a_later_removal_of_its_uid_elsewhere(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1's removal fails in A, u1 comes back in B and its removal fails there too: A's retry,
    once A's rules were out, deleted the row by uid: B's rules then recorded nowhere."""
    a, b = make_pod(), make_pod()
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    for netns in (a, b):
        await agent.agent.add_pod(agent.spec("u1", netns))
        await agent.agent.remove_pod("u1")
    assert has_rules(a) and has_rules(b) and len(undo_tasks()) == 2
    agent.redirector.refuse_removal = ""
    agent.redirector.refuse_removal_in = {os.stat(b.path).st_ino}  # B's still fail
    await async_wait_until(lambda: not has_rules(a), "A's rules out", timeout=defaults.UNDO_RETRY_INITIAL + 5)
    await async_wait_until(lambda: len(undo_tasks()) == 1, "A's retry ended")
    assert has_rules(b)
    assert agent.committed("leftovers") == ["u1"], "B's row went: its rules recorded nowhere"
    assert [p.identity.ino if p.identity else None for p in agent.store.load_leftovers()] == [
        os.stat(b.path).st_ino
    ]


async def test_a_retry_leaves_alone_the_rows_of_a_uid_being_enrolled_while_another_pod_lives_there(
    agent: Agent, make_pod: Callable[[], Pod], caplog: pytest.LogCaptureFixture, retries_held: asyncio.Event
) -> None:
    """A retry in A found a pod with rules there (u2) and dropped u1's row as that pod's, also
    while u1 was being enrolled: a re-add of u1 elsewhere records A's rules in its commit,
    while the old u1 still counts as living in A, and the retry took that fresh row too."""
    caplog.set_level(logging.DEBUG, logger="zds.server")
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    await agent.agent.remove_pod("u1")
    await agent.agent.add_pod(agent.spec("u2", a))  # (its rules: the same ones, in A)
    agent.store.commit.close()  # u1's enrollment held before its row is committed
    adding = asyncio.create_task(agent.agent.add_pod(agent.spec("u1", a)))
    await asyncio.wait_for(agent.store.commit.reached.wait(), 10)
    retries_held.set()  # (u1's enrollment holds its uid now: the retry comes while it does)
    await async_wait_until(
        lambda: "wait: a pod lives" in caplog.text or "are kept" in caplog.text,
        "a retry",
        timeout=defaults.UNDO_RETRY_INITIAL + 5,
    )
    assert "are kept" not in caplog.text and agent.committed("leftovers") == ["u1"]
    agent.store.commit.open.set()
    await adding
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=2 * defaults.UNDO_RETRY_INITIAL + 5
    )
    assert "rules a failed removal left are kept: another pod lives in its netns now" in caplog.text
    assert agent.committed("leftovers") == [] and has_rules(a)


@pytest.fixture
def sleeper_in(make_pod: Callable[[], Pod]) -> Iterator[Callable[[Pod], subprocess.Popen[bytes]]]:
    """A process in a pod's netns (holds it alive without its name); each killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(pod: Pod) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["ip", "netns", "exec", pod.name, "sleep", "300"])
        started.append(proc)
        wait_until(lambda: _netns_of(proc.pid) == identity(pod), "the process in the pod's netns")
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _netns_of(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("by", ["pid", "path, its name gone", "path, moved under --netns-root"])
async def test_a_removal_retry_goes_on_while_anything_holds_the_netns(
    agent: Agent,
    make_pod: Callable[[], Pod],
    sleeper_in: Callable[[Pod], subprocess.Popen[bytes]],
    moved_under_root: Callable[[Pod], str],
    caplog: pytest.LogCaptureFixture,
    by: str,
) -> None:
    """The retry asked whether the pod's netns was still at ``str(ref)``: for a pod enrolled
    by pid that is "pid:N", never a file, so its first try ended it ("go with their netns")
    and deleted the row while the rules stayed in a live netns; as for a pod whose path went
    while its processes live on (a recovered pod found elsewhere), and for one whose netns
    only a bind mount in a --netns-root directory holds (only /run/netns was looked at)."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    proc = sleeper_in(a) if "moved" not in by else None
    ref = NetnsRef.of_pid(proc.pid) if proc is not None and by == "pid" else NetnsRef.of_path(a.path)
    await agent.agent.add_pod(PodSpec.create("u1", ref, name="u1", namespace="default"))
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    await agent.agent.remove_pod("u1")
    if proc is None:
        held = moved_under_root(a)  # its name goes; a bind mount elsewhere keeps the netns
    else:
        held = f"/proc/{proc.pid}/ns/net"
        if by != "pid":
            delete_netns(a.name)  # its path goes; the process keeps the netns
    tried = agent.redirector.removals_tried
    await async_wait_until(
        lambda: agent.redirector.removals_tried > tried, "a retry", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert len(undo_tasks()) == 1 and "go with their netns" not in caplog.text
    assert rules_at(held) and agent.committed("leftovers") == ["u1"]
    agent.redirector.refuse_removal = ""
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=2 * defaults.UNDO_RETRY_INITIAL + 5
    )
    assert "rules a failed removal left are taken out now" in caplog.text
    assert not rules_at(held) and agent.committed("leftovers") == []


async def test_a_pod_whose_netns_only_a_netns_root_directory_holds_is_found_there_at_a_restart(
    agent: Agent, make_pod: Callable[[], Pod], moved_under_root: Callable[[Pod], str], tmp_path: Path
) -> None:
    """Recovery looked for a netns whose path went only in /proc and /run/netns: one that a
    bind mount in a --netns-root directory holds was taken for gone, its row dropped while
    its rules stayed in (recorded nowhere)."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    held = moved_under_root(a)
    async with restarted_on(tmp_path) as (restarted, _, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.FOUND_ELSEWHERE}
        pod = restarted.pods.get("u1")
        assert pod is not None and pod.rules_installed and pod.netns is not None
        assert pod.netns.identity == NetnsIdentity(*identity_at(held))
        assert rules_at(held) and [row.spec.uid for row in store.load()] == ["u1"]


def netns_fds(path: str) -> int:
    """How many of this process's fds are the netns at ``path``."""
    st = os.stat(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            held = os.stat(f"/proc/self/fd/{fd}")
            count += (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)
    return count


async def test_a_store_that_cannot_commit_an_install_row_refuses_the_pod_before_any_rule(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    a = make_pod()
    agent.store.close()  # every write fails from now on
    with pytest.raises(EnrollmentError) as info:
        await agent.agent.add_pod(agent.spec("u1", a))
    assert info.value.outcome is EnrollmentOutcome.STORE
    assert "u1" not in agent.agent.pods
    assert not has_rules(a) and agent.redirector.install_gate.reached.is_set() is False


async def test_an_enrollment_commits_an_install_row_before_its_rules_go_in_and_its_own_row_takes_it_out(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """Killed between its rules going in and its row's commit, the node agent would leave
    rules no row records (a pod's traffic redirected to listeners nobody opens, for good):
    the install row, committed first, lets the next start take them out."""
    a = make_pod()
    agent.redirector.install_gate.close()
    enrollment = asyncio.create_task(agent.agent.add_pod(agent.spec("u1", a)))
    await asyncio.wait_for(agent.redirector.install_gate.reached.wait(), 10)
    assert agent.committed("installs") == ["u1"] and agent.committed("pods") == []
    agent.redirector.install_gate.open.set()
    await asyncio.wait_for(enrollment, 30)
    assert agent.committed("installs") == [] and agent.committed("pods") == ["u1"]
    assert has_rules(a)


async def test_a_failed_install_leaves_no_install_row(agent: Agent, make_pod: Callable[[], Pod]) -> None:
    a = make_pod()
    agent.redirector.refuse = "iptables-restore: line 3 failed"
    with pytest.raises(EnrollmentError) as info:
        await agent.agent.add_pod(agent.spec("u1", a))
    assert info.value.outcome is EnrollmentOutcome.RULES
    assert agent.committed("installs") == [] and agent.committed("pods") == []
    assert not has_rules(a)


async def test_rules_a_removal_left_outlive_a_re_add_of_their_uid_elsewhere_and_a_restart(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """u1's removal left its rules in A; u1 came back in B before the retry took them out, and
    its row (one per uid) overwrote the one that recorded A's rules: after a stop, nothing
    recorded them, nor ever took them out."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    await agent.agent.remove_pod("u1")
    await agent.agent.add_pod(agent.spec("u1", b))
    await cancel_and_wait(*undo_tasks())  # the node agent stopped before the retry took them out
    assert has_rules(a) and has_rules(b)
    assert agent.stored() == {"u1": identity(b)}
    await a_start_takes_out_what_is_left(tmp_path, a.path, b)
    assert "rules a failed removal left before this start: what went in is taken out" in caplog.text


async def a_start_takes_out_what_is_left(tmp_path: Path, left_at: str, b: Pod) -> None:
    """A start whose removals work restores u1 in ``b`` and takes out the rules recorded as
    left in the netns at ``left_at``."""
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        redirector.refuse_removal = ""
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.RESTORED}
        assert not rules_at(left_at), "rules no row recorded stayed"
        assert has_rules(b) and store.load_leftovers() == []


async def test_rules_of_a_pod_recovered_without_opening_its_netns_stay_recorded_when_it_is_re_added_elsewhere(
    agent: Agent, make_pod: Callable[[], Pod], moved_under_root: Callable[[Pod], str], tmp_path: Path
) -> None:
    """u1 was enrolled from a --netns-root directory, and recovered by a start without it (its
    netns not opened); re-added in B, its row became B's and nothing recorded its rules in
    the first netns any more: a start with the directory again left them there for good."""
    a, b = make_pod(), make_pod()
    held = moved_under_root(a)
    await agent.agent.add_pod(PodSpec.create("u1", NetnsRef.of_path(held), name="u1", namespace="default"))
    async with restarted_on(tmp_path, NetnsPolicy.for_this_node()) as (restarted, _, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.PLACE_REFUSED}
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u1", b))
        assert has_rules(b) and agent.stored() == {"u1": identity(b)}
        (left,) = store.load_leftovers()
        assert (
            left.removing and left.rules == "iptables" and left.identity == NetnsIdentity(*identity_at(held))
        )
    assert rules_at(held)
    await a_start_takes_out_what_is_left(tmp_path, held, b)


async def enrolled_with_stale_rules(agent: Agent, make_pod: Callable[[], Pod], count: int) -> list[Pod]:
    """``count`` pods enrolled, their rows then saying their rules are not as recorded (each
    goes in again at the next start)."""
    made = [make_pod() for _ in range(count)]
    for n, pod in enumerate(made):
        await agent.agent.add_pod(agent.spec(f"u{n}", pod))
    for row in agent.store.load():
        agent.store.put(row.spec, row.identity, rules=row.rules, rules_digest="stale", cookie=row.cookie)
    return made


async def recovery_stopped_at_the_gate(
    store: PodStore, restarted: NodeAgent, redirector: GatedRedirector
) -> None:
    """A recovery stopped while the first pods' rules wait at ``redirector``'s install gate and
    the others wait their turn; the gate then opened: it ends with CancelledError."""
    redirector.install_gate.close()
    recovering = asyncio.create_task(recover(store, restarted.enrollment))
    await asyncio.wait_for(redirector.install_gate.reached.wait(), 10)
    recovering.cancel()
    await asyncio.sleep(0)
    redirector.install_gate.open.set()  # (those under way go in to their end)
    with pytest.raises(asyncio.CancelledError):
        await recovering


async def test_a_recovery_stopped_midway_closes_the_netns_it_opened(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """A stop during recovery left the netns fds of the pods it had not restored (waiting
    their turn, or with their rules going in) to the garbage collector."""
    made = await enrolled_with_stale_rules(agent, make_pod, recovery.CONCURRENCY + 2)
    before = [netns_fds(pod.path) for pod in made]  # (the first node agent's, ztunnel's stand-in's)
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        await recovery_stopped_at_the_gate(store, restarted, redirector)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            gc.collect()
        assert [str(w.message) for w in caught if "NetnsHandle" in str(w.message)] == []
        assert len(restarted.pods) == 0
        assert [netns_fds(pod.path) for pod in made] == before


async def test_a_recovery_stopped_while_rules_go_in_again_leaves_every_pod_its_rules(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """A stop while a start reinstalled pods' rules (their rules not as recorded: another
    --no-dns-capture, an upgrade) cancelled those reinstalls, and a cancelled install takes
    out what went in: with it the rules the pod had, which worked. The pods under way were
    left without any, still recorded with them, until the next start. Now those reinstalls
    go in to their end and their rows say so; the stop comes after them."""
    made = await enrolled_with_stale_rules(agent, make_pod, recovery.CONCURRENCY + 2)
    assert all(has_rules(pod) for pod in made)
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        redirector.refuse_removal = ""  # (a cancelled install's undo takes the rules out)
        await recovery_stopped_at_the_gate(store, restarted, redirector)
        assert [n for n, pod in enumerate(made) if not has_rules(pod)] == []
        assert redirector.removals_tried == 0
        reinstalled = {row.spec.uid: row.rules_digest for row in store.load()}
        assert 0 < sum(digest != "stale" for digest in reinstalled.values()) <= recovery.CONCURRENCY


async def test_a_recovery_stopped_after_the_other_backends_rules_came_out_puts_this_ones_in(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Restarted with the other --redirect-backend, a start takes each pod's iptables rules out
    and puts nftables' in: a stop between the two left the pod without any (its row still
    naming iptables) until the next start. The reinstall now goes to its end first."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    async with started_on(tmp_path, NftablesRedirector()) as (restarted, store):
        rules = restarted.enrollment.rules
        assert rules is not None
        out, gate = asyncio.Event(), asyncio.Event()
        remove_other = rules.remove_other

        async def then_wait(*args: Any) -> bool:
            done = await remove_other(*args)
            out.set()
            await gate.wait()  # (the stop comes here: iptables' rules out, nftables' not in)
            return done

        rules.remove_other = then_wait  # type: ignore[method-assign,assignment]
        recovering = asyncio.create_task(recover(store, restarted.enrollment))
        await asyncio.wait_for(out.wait(), 10)
        assert not has_rules(a)
        recovering.cancel()
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await recovering
        assert nftables_rules(a) and not has_rules(a)
        assert [(row.spec.uid, row.rules) for row in store.load()] == [("u1", "nftables")]
        assert store.load_installs() == []


class BuggyInstall(GatedRedirector):
    """An install that fails with what no rule backend raises (a bug), once past the gate."""

    async def install(self, netns: NetnsHandle) -> Installed:
        await self.install_gate.passing()
        raise KeyError("a bug")


async def test_a_bug_in_a_reinstall_the_stop_let_finish_is_said_and_the_stop_goes_on(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reinstall let run to its end after the stop came, failing with what nothing expects,
    ended the start with that error (a traceback, not the stop) and left the other pods' tasks
    running: it is said in a line, and the stop goes on as the others end."""
    made = await enrolled_with_stale_rules(agent, make_pod, 2)
    before = [netns_fds(pod.path) for pod in made]
    redirector = BuggyInstall()
    async with started_on(tmp_path, redirector) as (restarted, store):
        await recovery_stopped_at_the_gate(store, restarted, redirector)
        assert "reinstalling the pod's rules failed: KeyError('a bug')" in caplog.text
        assert len(restarted.pods) == 0
        gc.collect()
        assert [netns_fds(pod.path) for pod in made] == before


class FailingInstall(NftablesRedirector):
    """Istio's nftables rules, for real; its ``nth`` install fails before anything goes in."""

    def __init__(self, nth: int) -> None:
        super().__init__()
        self.nth, self.installs = nth, 0

    async def install(self, netns: NetnsHandle) -> Installed:
        self.installs += 1
        if self.installs == self.nth:
            raise RedirectError("nft: Could not process rule: No buffer space available")
        return await super().install(netns)


async def test_a_pod_restored_beside_others_with_the_other_backends_rules_leaves_their_policy_routing(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Pods sharing a netns, stored with iptables rules, restored by a start with nftables: each
    took the iptables rules and the policy routing they share out again, also once others were
    restored there with nftables; the one whose install then failed left them without it."""
    a = make_pod()
    uids = [f"u{i}" for i in range(recovery.CONCURRENCY + 1)]  # (the last waits for a restored one)
    for uid in uids:
        await agent.agent.add_pod(agent.spec(uid, a))
    async with started_on(tmp_path, FailingInstall(nth=len(uids))) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {
            uid: RecoveryOutcome.RULES_FAILED if uid == uids[-1] else RecoveryOutcome.RULES_REINSTALLED
            for uid in uids
        }
        assert not has_rules(a)
        rules = restarted.enrollment.rules
        first = restarted.pods.get(uids[0])
        assert rules is not None and first is not None
        assert await rules.in_place(first), "the restored pods' rules (their policy routing) were taken out"


async def test_a_pod_restored_beside_one_with_the_new_backends_rules_leaves_one_rule_set(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """u0 (nftables, in place) and u1 (iptables) in one netns, a start with nftables: u1 took
    the iptables rules, and the policy routing both share, out once u0 was back; its own
    install failing then, u0 was left without it. Then the iptables rules waited for the pods
    to go: both rule sets in the netns for as long as they lived. Now they come out at once,
    the policy routing staying."""
    a = make_pod()
    with contextlib.closing(open_netns(a.path)) as netns:
        installed = await redirector("nftables").install(netns)
        agent.store.put(agent.spec("u0", a), netns.identity, rules="nftables", rules_digest=installed.digest)
    await agent.agent.add_pod(agent.spec("u1", a))  # (after u0: restored in that order)
    async with started_on(tmp_path, FailingInstall(nth=1)) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u0": RecoveryOutcome.RESTORED, "u1": RecoveryOutcome.RULES_FAILED}
        rules, u0 = restarted.enrollment.rules, restarted.pods.get("u0")
        assert rules is not None and u0 is not None
        assert await rules.in_place(u0), "u0's policy routing was taken out"
        assert not has_rules(a) and nftables_rules(a)
        assert store.load_leftovers() == []


async def test_an_install_of_the_new_backend_a_crash_cut_short_leaves_one_rule_set_at_a_start_with_the_old(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """u1 stored with iptables rules; a start with nftables took them out and put nftables' in,
    and was killed before it rewrote u1's row (its install row naming nftables). A start with
    iptables again put iptables' rules back for u1 and left nftables' beside them, recorded
    as leftovers that waited for the pod to go: both rule sets for as long as it lived, and
    at every start on iptables (found by a SIGKILL chaos run)."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    with contextlib.closing(open_netns(a.path)) as netns:
        await redirector("iptables").remove(netns)  # (the nftables start's remove_other)
        row = agent.store.row("u1")
        assert row is not None
        await agent.store.intend_soon(dataclasses.replace(row, rules="nftables", rules_digest=""))
        await redirector("nftables").install(netns)  # ... then killed: u1's row names iptables
    assert not has_rules(a) and nftables_rules(a)
    async with started_on(tmp_path, Redirector()) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.RULES_REINSTALLED}
        rules, u1 = restarted.enrollment.rules, restarted.pods.get("u1")
        assert rules is not None and u1 is not None
        assert has_rules(a) and not nftables_rules(a), "both rule sets in the pod's netns"
        assert await rules.in_place(u1), "u1's policy routing was taken out with nftables' rules"
        assert store.load_leftovers() == [] and store.load_installs() == []


def run_at(path: str, *argv: str) -> str:
    """What ``argv`` printed, run in the netns at ``path``."""
    return subprocess.run(
        ["nsenter", f"--net={path}", *argv], capture_output=True, text=True, check=True
    ).stdout


async def test_a_restart_whose_reinstall_is_refused_keeps_the_rules_recorded_for_the_removal(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """While the node agent was down, a rule of the pod's own came to jump into ISTIO_OUTPUT:
    the restart's reinstall is refused, nothing touched, and the rules stay in; the row said
    no rules from then on, and the pod's removal left them in the netns for good (Istio's
    reconcile leaves the pod as it is, its removal takes them out)."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    run_at(a.path, "iptables", "-t", "nat", "-I", "OUTPUT", "-p", "udp", "-j", "ISTIO_OUTPUT")
    async with started_on(tmp_path, Redirector()) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.RULES_FAILED}
        assert [row.rules for row in store.load()] == ["iptables"]
        await restarted.remove_pod("u1")
    saved = run_at(a.path, "iptables-save")
    assert "REDIRECT" not in saved and "ISTIO_PRERT" not in saved
    assert [line for line in saved.splitlines() if "ISTIO" in line] == [
        ":ISTIO_OUTPUT - [0:0]",
        "-A OUTPUT -p udp -j ISTIO_OUTPUT",
    ]
    assert "lookup 100" not in run_at(a.path, "ip", "rule")


async def test_an_install_a_crash_cut_short_is_taken_out_though_the_restart_rewrites_the_pods_row(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """u1 lives in A; a crash cut its re-add into C short while C's rules went in (its install
    row). A restart of another configuration reinstalls u1's rules in A and rewrites its row,
    which took C's install row with it (``installs`` holds one row a uid): C's rules stayed,
    recorded nowhere, for good. The install rows move to ``leftovers`` before anything else."""
    a, c = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    with contextlib.closing(open_netns(c.path)) as netns:
        await Redirector().install(netns)
        await agent.store.intend_soon(
            StoredPod(agent.spec("u1", c), netns.identity, "iptables", "", removing=False, enrolled_at=1.0)
        )
    async with started_on(tmp_path, Redirector(RedirectConfig(dns_capture=False))) as (restarted, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.RULES_REINSTALLED}
        assert store.load_installs() == [] == store.load_leftovers()
    assert has_rules(a) and not has_rules(c)


async def _nftables_rules_in(pod: Pod) -> NetnsHandle:
    """Istio's nftables rules put in ``pod``'s netns (by the real backend); its netns, open."""
    netns = open_netns(pod.path)
    await redirector("nftables").install(netns)
    return netns


def nftables_rules(pod: Pod) -> bool:
    listed = subprocess.run(
        ["ip", "netns", "exec", pod.name, "nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    return "istio" in listed


@contextlib.asynccontextmanager
async def recovered_under_no_redirect(pod: Pod, tmp_path: Path) -> AsyncIterator[tuple[NodeAgent, PodStore]]:
    """A --no-redirect node agent with u1 in ``pod``'s netns as recovery leaves it when an
    earlier run's (nftables) rules there would not come out: cached, its rules still in; its
    retries stopped at the end."""
    netns = await _nftables_rules_in(pod)
    store = PodStore.open(str(tmp_path), used_before=False)
    node_agent = NodeAgent(AgentConfig(), None)
    node_agent.use_store(store)
    try:
        spec = PodSpec.create("u1", NetnsRef.of_path(pod.path), name="u1", namespace="default")
        store.put(spec, netns.identity, rules="nftables")
        node_agent.enrollment.restore(
            podcache.Pod(spec=spec, netns=netns, rules_installed=True, rules_backend="nftables")
        )
        yield node_agent, store
    finally:
        await node_agent.tasks.cancel_all()
        node_agent.close()
        store.close()


async def test_a_pod_recovered_under_no_redirect_with_rules_that_stayed_in_hands_them_to_the_retry(
    make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """A --no-redirect start could not take out the rules an earlier run (nftables) installed:
    the pod stays cached with them in. Its removal then failed with an AssertionError (the
    retry knew only this run's rule set, and there is none): no DelWorkload, its row left
    marked removing. Now the retry takes them out with the rule set that installed them."""
    a = make_pod()
    async with recovered_under_no_redirect(a, tmp_path) as (node_agent, store):
        await node_agent.remove_pod("u1")
        assert [(r.spec.uid, r.rules, r.removing) for r in store.load_leftovers()] == [
            ("u1", "nftables", True)
        ]
        assert store.load() == [] and nftables_rules(a)
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert not nftables_rules(a) and store.load_leftovers() == []


async def test_the_other_rule_sets_leftovers_come_out_beside_a_pod_of_this_run_keeping_its_routing(
    agent: Agent, make_pod: Callable[[], Pod], caplog: pytest.LogCaptureFixture
) -> None:
    """nftables rules left in A (an earlier run's), and a pod of this run's (iptables) enrolled
    there: the retry took that pod's rules for theirs ("kept"), dropped their row, and the
    nftables rules stayed in A for good once the pod was gone; later they waited for the pod
    to go, both rule sets in A while it lived. They come out beside it now, the policy
    routing its rules share staying."""
    caplog.set_level(logging.DEBUG, logger="zds.server")
    a = make_pod()
    netns = await _nftables_rules_in(a)
    await agent.agent.add_pod(agent.spec("u2", a))
    spec = PodSpec.create("u1", NetnsRef.of_path(a.path), name="u1", namespace="default")
    left = podcache.Pod(spec=spec, netns=netns, rules_installed=True, rules_backend="nftables")
    assert agent.agent.enrollment.leftovers.take_if_left(left, removal=True)
    await async_wait_until(
        lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
    )
    assert "rules a failed removal left are taken out now" in caplog.text and "are kept" not in caplog.text
    assert agent.committed("leftovers") == []
    assert not nftables_rules(a) and has_rules(a)
    u2, rules = agent.agent.pods.get("u2"), agent.agent.enrollment.rules
    assert u2 is not None and rules is not None
    assert await rules.in_place(u2), "u2's policy routing went with the nftables rules"
    await agent.agent.remove_pod("u2")
    assert not has_rules(a) and "lookup 100" not in run_at(a.path, "ip", "rule")


async def test_a_retry_stopped_before_it_ever_ran_lets_its_netns_go(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    a = make_pod()
    spec = PodSpec.create("u1", NetnsRef.of_path(a.path), name="u1", namespace="default")
    left = podcache.Pod(spec=spec, netns=open_netns(a.path), rules_installed=True, rules_backend="iptables")
    leftovers = agent.agent.enrollment.leftovers
    leftovers.retry(left, removal=True)
    (task,) = undo_tasks()
    task.cancel()  # (a stop right after: the task never ran)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert netns_fds(a.path) == 0
    assert left.netns is not None and left.netns.identity not in leftovers


async def test_rules_a_failed_reinstall_at_a_start_left_are_recorded_and_come_out(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """A start found a pod's rules changed, reinstalled them, and that failed half-way with
    its undo failing too: the pod stayed (`rules failed`), its row rewritten without rules,
    and what went in was recorded nowhere, in its netns for good. They are nobody's (the pod
    has none, as its row says): they come out while it stays."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    change_rules(a)
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        redirector.fail_after = "ip6tables-restore: Too many open files"  # (its undo fails too)
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.RULES_FAILED}
        assert has_rules(a) and [(r.spec.uid, r.rules) for r in store.load_leftovers()] == [
            ("u1", "iptables")
        ]
        assert len(undo_tasks()) == 1
        redirector.refuse_removal = ""
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert not has_rules(a) and store.load_leftovers() == []
        assert "u1" in restarted.pods and [(r.spec.uid, r.rules) for r in store.load()] == [("u1", "")]


def change_rules(pod: Pod) -> None:
    """Change Istio's rules in the pod's netns behind the node agent's back (a chain flushed)."""
    subprocess.run(
        ["ip", "netns", "exec", pod.name, "iptables", "-t", "nat", "-F", "ISTIO_OUTPUT"], check=True
    )


async def test_rules_a_pod_re_added_elsewhere_leaves_are_recorded_before_they_are_taken_out(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1's row became B's at once, while A's rules came out later: a kill -9, or a stop that
    cancelled that removal, meanwhile left them in A recorded nowhere."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.removal.close()
    await agent.agent.add_pod(agent.spec("u1", b))
    await asyncio.wait_for(agent.redirector.removal.reached.wait(), 10)
    assert agent.committed("leftovers") == ["u1"] and agent.stored() == {"u1": identity(b)}
    agent.redirector.removal.open.set()
    await async_wait_until(lambda: not agent.committed("leftovers"), "A's rules out and their row gone")
    assert not has_rules(a) and has_rules(b)


async def test_a_pod_without_rules_in_a_netns_does_not_keep_the_rules_of_one_removed_from_it(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """A pod whose rules failed at a start (cached without them) counted as keeping the rules
    there: a pod enrolled beside it and removed left its rules in, recorded nowhere."""
    a = make_pod()
    spec = PodSpec.create("u1", NetnsRef.of_path(a.path), name="u1", namespace="default")
    agent.agent.enrollment.restore(podcache.Pod(spec=spec, netns=open_netns(a.path)))  # (rules failed)
    await agent.agent.add_pod(agent.spec("u2", a))
    await agent.agent.remove_pod("u2")
    assert not has_rules(a), "u2's rules stayed for a pod that has none"


async def test_a_pod_re_added_in_its_netns_under_no_redirect_hands_an_earlier_runs_rules_to_the_retry(
    make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Recovered with an earlier run's rules that would not come out, then added again in the
    same netns: the new row (no rules) replaced the only record of them, for good."""
    a = make_pod()
    async with recovered_under_no_redirect(a, tmp_path) as (node_agent, store):
        spec = PodSpec.create("u1", NetnsRef.of_path(a.path), name="u1", namespace="default")
        await node_agent.enrollment.load(spec)  # (no ztunnel here: cached, not delivered)
        assert [(r.spec.uid, r.rules) for r in store.load_leftovers()] == [("u1", "nftables")]
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert not nftables_rules(a) and store.load_leftovers() == []


async def test_the_removal_of_a_pod_recovered_without_opening_its_netns_keeps_the_record_of_its_rules(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """Its netns at a place this run does not allow (or no fd to open it): the removal deleted
    its row while its rules stayed in that netns."""
    a = make_pod()
    spec = agent.spec("u1", a)
    agent.store.put(spec, NetnsIdentity(*identity(a)), rules="iptables")
    # (as recovery caches it when it could not open its netns)
    agent.agent.enrollment.restore(
        podcache.Pod(spec=spec, netns=None, rules_installed=True, rules_backend="iptables")
    )
    await agent.agent.remove_pod("u1")
    assert [(p.spec.uid, p.removing) for p in agent.store.load()] == [("u1", True)]


async def test_a_start_with_no_fd_to_open_a_netns_keeps_the_record_of_the_rules_left_there(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """A netns that could not be opened for want of an fd was taken for gone, and the row of
    the rules left there deleted (no fds: the very state that leaves rules behind)."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.redirector.refuse_removal = "cannot start iptables-restore: Too many open files"
    await agent.agent.remove_pod("u1")
    await cancel_and_wait(*undo_tasks())
    assert agent.committed("leftovers") == ["u1"]
    async with restarted_on(tmp_path) as (restarted, _, store):
        with no_fd_to_spare():
            await recover(store, restarted.enrollment)
        assert [r.spec.uid for r in store.load_leftovers()] == ["u1"] and has_rules(a)


async def test_a_stop_right_after_a_re_added_pods_row_is_committed_leaves_its_old_rules_recorded(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1 re-added from A to B: its row became B's in one transaction, the record of A's rules
    was written once it was cached, a turn of the loop later; a stop in between (its add
    cancelled) left them in A recorded nowhere."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    adding = agent.agent.start_add(agent.spec("u1", b))  # (the enrollment's own task)
    # The stop: that task cancelled right after its row's commit (not its install row's, before).
    agent.store.committed = lambda: agent.stored()["u1"] == identity(b) and adding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await adding
    assert agent.stored() == {"u1": identity(b)}
    assert agent.committed("leftovers") == ["u1"] and has_rules(a)
    assert [r.identity for r in agent.store.load_leftovers()] == [NetnsIdentity(*identity(a))]


async def test_a_pod_whose_netns_a_start_has_no_fd_to_open_is_not_said_gone_and_keeps_its_netns(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Recovered as ``netns gone`` though its netns lives (only no fd to open it), and without
    the netns's identity: re-added elsewhere, nothing recorded the rules it left there."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    async with restarted_on(tmp_path) as (restarted, _, store):
        with no_fd_to_spare():
            report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.NETNS_NOT_OPENED}
        pod = restarted.pods.get("u1")
        assert pod is not None and pod.netns is None and pod.recovery == "netns not opened (no fd)"
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u1", b))
        (left,) = store.load_leftovers()
        assert left.identity == NetnsIdentity(*identity(a)) and has_rules(a)


async def test_rules_a_pod_recovered_with_no_fd_left_are_recorded_when_it_is_re_added_there_without_rules(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Re-added in the same netns by a --no-redirect node agent, a pod recovered without opening
    it had its row replaced by one without rules: nothing recorded (or took out) the rules an
    earlier run put there."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    async with started_on(tmp_path, None) as (restarted, store):
        with no_fd_to_spare():
            report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.NETNS_NOT_OPENED}
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u1", a))
        assert [(r.spec.uid, r.rules, r.identity) for r in store.load_leftovers()] == [
            ("u1", "iptables", NetnsIdentity(*identity(a)))
        ]
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert not has_rules(a) and store.load_leftovers() == []


async def test_the_removal_of_a_pod_recovered_with_no_fd_left_keeps_its_rules_recorded_past_a_re_add(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Its row, marked removing, was the only record of its rules: a re-add of the uid
    elsewhere replaced it."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    async with restarted_on(tmp_path) as (restarted, _, store):
        with no_fd_to_spare():
            await recover(store, restarted.enrollment)
        await restarted.remove_pod("u1")
        assert store.load() == [] and [r.removing for r in store.load_leftovers()] == [True]
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u1", b))
        assert [r.identity for r in store.load_leftovers()] == [NetnsIdentity(*identity(a))]
        assert has_rules(a) and agent.stored() == {"u1": identity(b)}


async def test_a_removal_a_restart_interrupted_whose_netns_it_cannot_open_stays_recorded_past_a_re_add(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Its row, marked removing, stayed the only record of its rules (``removal left``): a
    re-add of the uid replaced it."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    agent.store.mark_removing("u1")  # a removal begun, then the node agent killed
    async with restarted_on(tmp_path) as (restarted, _, store):
        with no_fd_to_spare():
            report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.REMOVAL_LEFT}
        assert store.load() == [] and [r.removing for r in store.load_leftovers()] == [True]
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u1", b))
        assert [r.identity for r in store.load_leftovers()] == [NetnsIdentity(*identity(a))]
        assert has_rules(a)


async def test_a_pod_recovered_without_opening_its_netns_keeps_its_rules_from_a_removal_beside_it(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """u1 came back without its netns opened (no fd), its rules in A; u2 enrolled in A and
    removed took them out (only pods whose netns was open counted as living there)."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        with no_fd_to_spare():
            await recover(store, restarted.enrollment)
        redirector.refuse_removal = ""
        with pytest.raises(EnrollmentError, match="no ztunnel connection"):  # (stays cached)
            await restarted.add_pod(agent.spec("u2", a))
        await restarted.remove_pod("u2")
        assert has_rules(a), "u2's removal took out the rules of u1"


@contextlib.contextmanager
def no_fd_to_spare() -> Iterator[None]:
    """Every fd number below the soft limit taken meanwhile (the limit lowered to the highest
    in use, the holes below it filled)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    filler: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_removal_a_restart_interrupted_beside_a_pod_coming_back_leaves_its_rules_to_it(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """u1's removal interrupted in A, where u2 lives: recovery took the rules (and the policy
    routing) out of A whenever u1's row came before u2 was back (eight at a time), with u2's
    rules, or the other backend's beside them. They are left to the retry, which finds them
    u2's."""
    caplog.set_level(logging.INFO, logger="zds.server")
    a = make_pod()
    for uid in ("u1", "u2"):
        await agent.agent.add_pod(agent.spec(uid, a))
    agent.store.mark_removing("u1")  # a removal begun, then the node agent killed
    async with restarted_on(tmp_path) as (restarted, redirector, store):
        report = await recover(store, restarted.enrollment)
        assert report.outcomes == {"u1": RecoveryOutcome.REMOVAL_RETRIED, "u2": RecoveryOutcome.RESTORED}
        assert redirector.removals_tried == 0 and has_rules(a)
        assert [r.spec.uid for r in store.load_leftovers()] == ["u1"]
        await async_wait_until(
            lambda: not undo_tasks(), "the retry ended", timeout=defaults.UNDO_RETRY_INITIAL + 5
        )
        assert "rules a failed removal left are kept: another pod lives in its netns now" in caplog.text
        assert store.load_leftovers() == [] and has_rules(a) and redirector.removals_tried == 0


class GatedNftables(NftablesRedirector):
    """Istio's nftables rules, for real; an install waits at ``gate`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    async def install(self, netns: NetnsHandle) -> Installed:
        await self.gate.passing()
        return await super().install(netns)


async def test_a_restart_with_the_other_backend_commits_an_install_row_before_its_rules_go_in(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """Killed between the new backend's rules going in and the pod's row being rewritten, the
    row named the old backend: the next start with the new one took its rules for the pod's
    (kept both rule sets), one with the old one never took them out. The install row, as an
    enrollment's, records them meanwhile."""
    a = make_pod()
    await agent.agent.add_pod(agent.spec("u1", a))
    nft = GatedNftables()
    nft.gate.close()
    async with started_on(tmp_path, nft) as (restarted, store):
        recovering = asyncio.create_task(recover(store, restarted.enrollment))
        await asyncio.wait_for(nft.gate.reached.wait(), 10)
        with contextlib.closing(sqlite3.connect(store.path)) as reader:
            assert reader.execute("SELECT uid, rules FROM installs").fetchall() == [("u1", "nftables")]
            assert reader.execute("SELECT uid, rules FROM pods").fetchall() == [("u1", "iptables")]
        nft.gate.open.set()
        report = await asyncio.wait_for(recovering, 30)
        assert report.outcomes == {"u1": RecoveryOutcome.RULES_REINSTALLED}
        assert agent.committed("installs") == [] and nftables_rules(a) and not has_rules(a)
        assert [(row.spec.uid, row.rules) for row in store.load()] == [("u1", "nftables")]


# -- a CNI event or the engine beside the control API, for one uid --------------------------


def cni_spec(uid: str, pod: Pod) -> PodSpec:
    """The pod of an event as Istio's CNI plugin sends it (no container named)."""
    return PodSpec.create(
        uid, NetnsRef.of_path(pod.path), name=uid, namespace="default", source=PodSource.ISTIO_CNI
    )


async def decided_while_the_api_installs(
    agent: Agent, spec: PodSpec, decide: Coroutine[Any, Any, T]
) -> tuple[Enrolled, T]:
    """AddPod(``spec``) from the control API holds at its rules' install while another source
    decides on the uid (``decide``, on what it saw before): that waits for the enrollment's
    turn to end; then both finish. The enrollment and what ``decide`` said."""
    agent.redirector.install_gate.close()
    enrollment = asyncio.create_task(agent.agent.add_pod(spec))
    await asyncio.wait_for(agent.redirector.install_gate.reached.wait(), 10)
    deciding = asyncio.create_task(decide)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not deciding.done()
    agent.redirector.install_gate.open.set()
    return await asyncio.wait_for(enrollment, 30), await asyncio.wait_for(deciding, 30)


async def test_a_cni_del_leaves_alone_the_pod_the_control_api_enrolled_meanwhile(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """u1 is the CNI plugin's pod in A; AddPod(u1, B) is installing its rules when the
    plugin's DEL for u1 comes. The DEL looked at the plugin's pod, but by its turn the pod is
    the control API's: left alone, as a DEL that came after it (it removed the acked pod)."""
    a, b = make_pod(), make_pod()
    containers = ContainerPods(agent.agent)
    await agent.agent.add_pod(cni_spec("u1", a))
    enrolled, said = await decided_while_the_api_installs(
        agent, agent.spec("u1", b), containers.cni_del("u1", "")
    )
    assert said == (200, "left alone: enrolled by api")
    assert agent.agent.pods.get("u1") is enrolled.pod
    assert agent.stored() == {"u1": identity(b)}
    assert has_rules(b)
    await async_wait_until(lambda: not has_rules(a), "the replaced pod's rules out of A")


async def test_a_cni_add_does_not_replace_the_pod_the_control_api_enrolled_meanwhile(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """AddPod(u1, B) is installing its rules when an ADD as Istio's plugin sends it names u1
    in A: refused once its turn comes, as an ADD that came after it (it replaced the acked pod)."""
    a, b = make_pod(), make_pod()
    endpoint = CniPluginEndpoint(agent.agent, ContainerPods(agent.agent))
    body = json.dumps({"Netns": a.path, "PodName": "web", "PodNamespace": "shop", "PodUID": "u1"}).encode()
    enrolled, said = await decided_while_the_api_installs(agent, agent.spec("u1", b), endpoint._process(body))
    assert said == (500, "uid u1 is held by a pod from api; not replaced")
    assert agent.agent.pods.get("u1") is enrolled.pod
    assert agent.stored() == {"u1": identity(b)}
    assert has_rules(b) and not has_rules(a)


async def test_a_cni_add_whose_del_came_while_it_waited_for_the_container_is_not_enrolled(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """zds-cni's config timeout under the node agent's wait for the container's facts (10 s):
    the plugin gives the ADD up, tells the runtime it failed and sends the DEL, which found
    nothing yet; the ADD, once the engine reported the container, enrolled it all the same (a
    pod, with rules, for a container the runtime was told has no network). An ADD no DEL
    overtook is enrolled as before."""
    a, b = make_pod(), make_pod()
    containers = ContainerPods(agent.agent)
    containers.engine = "stand-in"
    ambient = {defaults.DATAPLANE_MODE_LABEL: defaults.DATAPLANE_MODE_AMBIENT}
    given_up, kept = "c" * 64, "d" * 64

    def added(cid: str, pod: Pod) -> asyncio.Task[tuple[int, str]]:
        spec = PodSpec.create(cid, NetnsRef.of_path(pod.path), source=PodSource.CNI)
        return asyncio.ensure_future(containers.cni_add(spec, cid))

    adds = added(given_up, a), added(kept, b)
    await asyncio.sleep(0)  # (both arrived: waiting for their containers' facts)
    assert not any(add.done() for add in adds)
    assert await containers.cni_del(given_up, a.path) == (200, "not enrolled")
    # (a DEL naming another place is not that ADD's, as it is not an enrolled pod's)
    assert await containers.cni_del(kept, a.path) == (200, "not enrolled")
    containers.learn(ContainerFacts(id=given_up, name="gone", labels=ambient))
    containers.learn(ContainerFacts(id=kept, name="web", labels=ambient))
    said = list(await asyncio.wait_for(asyncio.gather(*adds), 30))
    assert said == [
        (409, "container gone: its DEL came while this ADD waited; not enrolled"),
        (200, "enrolled: container web is labelled istio.io/dataplane-mode=ambient"),
    ]
    assert agent.agent.pods.get(given_up) is None and not has_rules(a)
    assert agent.stored() == {kept: identity(b)} and has_rules(b)
    assert not containers._adds_waiting  # (nothing kept once the ADDs are answered)


async def test_a_cni_add_waiting_for_its_container_is_answered_at_the_stop(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """The stop waited for an ADD's wait for the engine's facts (10 s), and the ADD was then
    told the engine may be unreachable."""
    a = make_pod()
    containers = ContainerPods(agent.agent, lookup_timeout=60.0)
    containers.engine = "stand-in"
    spec = PodSpec.create("c" * 64, NetnsRef.of_path(a.path), source=PodSource.CNI)
    add = asyncio.ensure_future(containers.cni_add(spec, "c" * 64))
    await asyncio.sleep(0)  # (it waits for its container's facts)
    assert not add.done()
    containers.stop()
    assert await asyncio.wait_for(add, 5) == (503, "node agent shutting down; the pod was not enrolled")
    assert agent.agent.pods.get("c" * 64) is None and not has_rules(a)


def engine_spec(uid: str, pod: Pod) -> PodSpec:
    """The pod of container ``uid`` as the container engine enrolls it."""
    return PodSpec.create(
        uid, NetnsRef.of_path(pod.path), name=uid, namespace="default", source=PodSource.CONTAINER_ENGINE
    )


def inspection(cid: str, pod: Pod, pid: int) -> dict[str, object]:
    """The engine's inspection of a running container labelled for ambient, in ``pod``'s netns."""
    return {
        "Id": cid,
        "Name": "/web",
        "Config": {"Labels": {defaults.DATAPLANE_MODE_LABEL: defaults.DATAPLANE_MODE_AMBIENT}},
        "State": {"Running": True, "Pid": pid},
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {"SandboxKey": pod.path, "Networks": {}},
    }


async def test_the_engine_leaves_alone_the_pod_the_control_api_enrolled_while_it_decided_a_removal(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """Container c1's pod is the engine's, in A; AddPod(c1, B) is installing its rules when the
    engine says c1 is gone. The engine decided on its own pod, but by its turn the pod is the
    control API's: left alone (it removed the acked pod)."""
    a, b = make_pod(), make_pod()
    containers = ContainerPods(agent.agent)
    await agent.agent.add_pod(engine_spec("c1", a))
    enrolled, _ = await decided_while_the_api_installs(
        agent, agent.spec("c1", b), containers.sync("c1", None)
    )
    assert agent.agent.pods.get("c1") is enrolled.pod
    assert agent.stored() == {"c1": identity(b)}
    assert has_rules(b)


async def test_the_engine_does_not_replace_the_pod_the_control_api_enrolled_while_it_decided_an_enrollment(
    agent: Agent, make_pod: Callable[[], Pod], sleeper_in: Callable[[Pod], subprocess.Popen[bytes]]
) -> None:
    """Container c1 runs selected in A, no pod yet; AddPod(c1, B) is installing its rules when
    the engine reports c1. The engine decided to enroll it, but by its turn the uid's pod is
    the control API's: left alone (it replaced the acked pod with A)."""
    a, b = make_pod(), make_pod()
    container = sleeper_in(a)
    containers = ContainerPods(agent.agent)
    syncing = containers.sync("c1", inspection("c1", a, container.pid))
    enrolled, _ = await decided_while_the_api_installs(agent, agent.spec("c1", b), syncing)
    assert agent.agent.pods.get("c1") is enrolled.pod
    assert agent.stored() == {"c1": identity(b)}
    assert has_rules(b) and not has_rules(a)


async def test_a_zds_cni_pod_goes_once_its_container_is_no_longer_this_node_agents(
    agent: Agent, make_pod: Callable[[], Pod], sleeper_in: Callable[[Pod], subprocess.Popen[bytes]]
) -> None:
    """zds-cni enrolled c1 (its Istio labels the plugin's business); the node agent restarted
    with a --container-label c1 does not carry: the reconcile takes the pod out, as an engine
    pod's (it stayed, with its rules). One that carries it stays."""
    a, b = make_pod(), make_pod()
    containers = ContainerPods(agent.agent)
    containers.label_filter = ("team=a",)
    for cid, pod in (("c1", a), ("c2", b)):
        await agent.agent.add_pod(
            PodSpec.create(
                cid, NetnsRef.of_path(pod.path), name=cid, namespace="default", source=PodSource.CNI
            )
        )
    theirs, ours = inspection("c1", a, sleeper_in(a).pid), inspection("c2", b, sleeper_in(b).pid)
    ours["Config"] = {"Labels": {"team": "a"}}  # (no Istio label: zds-cni's "enroll: all" took it)
    await containers.sync("c1", theirs)
    await containers.sync("c2", ours)
    assert list(agent.stored()) == ["c2"] and [pod.uid for pod in agent.agent.pods] == ["c2"]
    assert not has_rules(a) and has_rules(b)


async def test_the_engine_keeps_a_pod_whose_netns_it_cannot_open_for_want_of_fds(
    agent: Agent, make_pod: Callable[[], Pod], sleeper_in: Callable[[Pod], subprocess.Popen[bytes]]
) -> None:
    """Out of fds (EMFILE), the engine's look at a running container's netns says nothing
    about the container: its pod stays (it was removed as a container gone, and came back
    only with the container's next event)."""
    a = make_pod()
    containers = ContainerPods(agent.agent)
    info = inspection("c1", a, sleeper_in(a).pid)
    await containers.sync("c1", info)
    pod = agent.agent.pods.get("c1")
    assert pod is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # (no fd to open from here)
    try:
        await containers.sync("c1", info)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert agent.agent.pods.get("c1") is pod and agent.stored() == {"c1": identity(a)} and has_rules(a)


# -- the node agent's stop cutting short a control API call ---------------------------------


async def test_unary_calls_a_stop_cuts_short_are_told_what_became_of_their_pod(
    agent: Agent, make_pod: Callable[[], Pod], tmp_path: Path
) -> None:
    """The stop cancels the enrollments and removals under way (``tasks.cancel_all``) while
    their callers can still be answered: AddPod and RemovePod then say so, as the bulk path
    does (they were ended by gRPC's stop with "Cancelling all calls", nothing said)."""
    a, b = make_pod(), make_pod()
    await agent.agent.add_pod(agent.spec("u2", b))
    path = str(tmp_path / "control.sock")
    server, _ = await start_control_server(agent.agent, path)
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
            agent.store.commit.close()
            adding = asyncio.ensure_future(
                stub.AddPod(
                    nodeagent_pb2.AddPodRequest(uid="u1", netns_path=a.path, name="u1", namespace="default")
                )
            )
            await asyncio.wait_for(agent.store.commit.reached.wait(), 10)
            agent.redirector.removal.close()
            removing = asyncio.ensure_future(stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="u2")))
            await asyncio.wait_for(agent.redirector.removal.reached.wait(), 10)
            await agent.agent.tasks.cancel_all()
            for call, details in (
                (adding, "node agent shutting down; the pod was not enrolled"),
                (
                    removing,
                    "node agent shutting down; the pod's removal is recorded: it ends when the node agent starts again",
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await asyncio.wait_for(call, 10)
                assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.UNAVAILABLE, details)
    finally:
        agent.store.commit.open.set()
        agent.redirector.removal.open.set()
        await server.stop(None)


async def test_a_removal_of_an_unknown_uid_says_which_connections_never_acked_its_delworkload(
    agent: Agent, tmp_path: Path
) -> None:
    """RemovePod of a uid no pod has sends DelWorkload anyway (as Istio); a ztunnel gone before
    it acked is said (the answer read as if every connection had let the workload go)."""
    path = str(tmp_path / "control.sock")
    server, _ = await start_control_server(agent.agent, path)
    agent.peer.delay = 60.0  # (close() cuts it short)
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
            removing = asyncio.ensure_future(stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="gone")))
            await async_wait_until(lambda: "del" in agent.peer.kinds, "the DelWorkload out")
            agent.peer.close()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await asyncio.wait_for(removing, 10)
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert failed.value.details().startswith(
                "no pod with uid gone is enrolled (DelWorkload sent to 1 ztunnel connection(s) anyway, "
                "as Istio does; not acked by 1: "
            )
    finally:
        await server.stop(None)


async def test_an_enrollment_during_the_stop_says_the_pod_comes_back_not_the_next_snapshot(
    agent: Agent, make_pod: Callable[[], Pod]
) -> None:
    """A pod enrolled while the node agent stops (its ztunnel connections closed already) was
    told it goes out "in the next snapshot": there is none before the next start."""
    agent.peer.close()
    await async_wait_until(lambda: not agent.agent.registry.ready(), "the ztunnel connection gone")
    agent.agent.enrollment.stopping = True
    with pytest.raises(EnrollmentError) as failed:
        await agent.agent.add_pod(agent.spec("u1", make_pod()))
    assert failed.value.outcome is EnrollmentOutcome.NO_CONNECTION
    assert str(failed.value) == (
        "node agent shutting down; the pod is stored: it comes back when the node agent starts again"
    )
    assert agent.stored() == {"u1": agent.stored()["u1"]}
