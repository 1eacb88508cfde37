"""Pods of containers: where the CNI plugin's events and the container engine meet.

Both sources name a container's pod by the container id and both go through
here, one uid at a time (a lock per uid), so they agree on one pod: never two
enrollments racing, never one source removing what the other just enrolled. The
control API takes no such lock: what it enrolls or removes meanwhile shows when the
enrollment or removal decided on here has its turn (``expect``, ``PodChanged``), and
the decision is made again on what is there then.
Only pods of containers (source ``cni`` or ``container-engine``) are ever
replaced or removed here (and, by a CNI event, a pod an event as Istio's plugin
sends it enrolled: source ``istio-cni``, which the engine never touches); a pod
another source enrolled under the same uid is left alone.

The CNI plugin runs while the runtime creates the container's network, before
the container starts. Podman holds the container's lock all that time, so the
engine cannot be asked about it then: the container's labels come from the
engine's ``create`` event (or its listing), which the event waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from zds import defaults
from zds.netns import NetnsError, NetnsRef, OutOfFds, open_netns
from zds.server.agent import NodeAgent
from zds.server.containers import ContainerFacts, addresses, container_netns, running, shares_netns
from zds.server.locks import KeyedLocks
from zds.server.outcomes import EnrollmentError, EnrollmentOutcome, PodChanged, RemovalNotRecorded
from zds.server.podcache import Pod
from zds.server.pods import PodSource, PodSpec
from zds.server.selection import Selection

log = logging.getLogger("zds.server.containers")


class ContainerPods:
    """The pods of containers, their facts, and one lock per uid."""

    def __init__(self, agent: NodeAgent, lookup_timeout: float = defaults.CONTAINER_LOOKUP_TIMEOUT) -> None:
        self.agent = agent
        self.lookup_timeout = lookup_timeout
        #: Set once a container engine feeds this (zds server --container-engine): then labels decide.
        self.engine: str | None = None
        #: ``--container-label``: every one (KEY or KEY=VALUE) a container must carry to be this
        #: node agent's; one without is another's, answered at once ("not selected").
        self.label_filter: tuple[str, ...] = ()
        self.facts: dict[str, ContainerFacts] = {}
        #: The node agent is stopping: an ADD waiting for its container's facts is answered now.
        self.stopping = False
        #: Set while a container engine is followed: makes a container's pod what the engine
        #: says, soon (``ContainerEngineSource.request_sync``).
        self.resync: Callable[[str], None] | None = None
        self._learned = asyncio.Event()
        self._locks: KeyedLocks[str] = KeyedLocks()
        #: Each container's ADDs from their arrival until they hold its lock (a DEL of it
        #: meanwhile marks them: the runtime gave those up).
        self._adds_waiting: dict[str, list[_WaitingAdd]] = {}

    # -- serialization ----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def serialized(self, uid: str) -> AsyncIterator[None]:
        """One thing at a time per uid, whichever source asks."""
        async with self._locks.hold(uid):
            yield

    def held_elsewhere(self, uid: str, *, istio: bool = False) -> str | None:
        """Why a CNI event (``istio``: as Istio's plugin sends it) must not replace the pod of
        ``uid``: another source enrolled it (None: no pod, a pod of a container, or, for an
        event as Istio's, one such an event enrolled). Asked while ``serialized(uid)`` is held."""
        held = self.agent.pods.get(uid)
        if held is None or (held.spec.source.cni if istio else held.spec.source.container):
            return None
        return f"uid {uid} is held by a pod from {held.spec.source.value}; not replaced"

    async def add_unless_held(self, spec: PodSpec, *, istio: bool = False) -> str | None:
        """Enroll ``spec`` unless another source holds its uid (``held_elsewhere``: the refusal
        is returned), deciding again when the control API changed the uid's pod by the
        enrollment's turn. Called while ``serialized(spec.uid)`` is held; EnrollmentError as
        ``NodeAgent.add_pod``."""
        while True:
            held = self.agent.pods.get(spec.uid)
            if (refusal := self.held_elsewhere(spec.uid, istio=istio)) is not None:
                return refusal
            try:
                await self.agent.add_pod(spec, expect=held)
                return None
            except PodChanged:
                continue

    # -- facts --------------------------------------------------------------------------
    def mine(self, labels: Mapping[str, str]) -> bool:
        """Whether a container with these labels carries every ``--container-label``."""
        for wanted in self.label_filter:
            key, eq, value = wanted.partition("=")
            if key not in labels or (eq and labels[key] != value):
                return False
        return True

    def selection(self, facts: ContainerFacts) -> Selection:
        """Istio's rules on the container's labels, once it is this node agent's (``mine``)."""
        if not self.mine(facts.labels):
            return Selection(
                False, f"without the label(s) {', '.join(self.label_filter)} (--container-label)"
            )
        return facts.selection

    def learn(self, facts: ContainerFacts) -> None:
        self.facts[facts.id] = facts
        self._learned.set()
        self._learned = asyncio.Event()

    def forget(self, cid: str) -> None:
        self.facts.pop(cid, None)

    def stop(self) -> None:
        """The node agent stops: what waits for a container's facts gives up now."""
        self.stopping = True
        self._learned.set()

    async def wait_facts(self, cid: str) -> ContainerFacts | None:
        """The container's facts, waiting up to the lookup timeout for the engine to report it
        (None: not reported by then, or the node agent stops)."""
        deadline = time.monotonic() + self.lookup_timeout
        while cid not in self.facts:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stopping:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._learned.wait()
        return self.facts[cid]

    # -- the CNI plugin's events ------------------------------------------------------------
    async def cni_add(self, spec: PodSpec, cid: str) -> tuple[int, str]:
        """zds-cni's ADD: (HTTP status, text). 200 enrolled or not selected; 500 the uid is
        another source's; 503 it cannot be told whether the container joins; 409 its DEL came
        while it waited (the runtime gave it up: not enrolled). EnrollmentError: the enrollment
        failed (the caller answers it as an Istio-style event's)."""
        if self.engine is None:
            return 503, (
                f"cannot tell whether container {cid[:12]} joins the mesh: this node agent has no "
                "container engine to read its labels from (zds server --container-engine SOCKET); "
                "or chain zds-cni with enroll: all"
            )
        waiting = self._add_arrived(cid, spec.netns)
        try:
            facts = await self.wait_facts(cid)
            if facts is None and self.stopping:
                return 503, "node agent shutting down; the pod was not enrolled"
            if facts is None:
                return 503, (
                    f"container {cid[:12]} is unknown to the container engine {self.engine} "
                    f"(waited {self.lookup_timeout:g}s for it); is the engine reachable?"
                )
            selection = self.selection(facts)
            if not selection.selected:
                log.info("container %s not enrolled: %s", facts.name, selection.reason, extra={"uid": cid})
                return 200, f"not selected: container {facts.name} is {selection.reason}"
            # The pod of a container is named by its id (facts.id is cid), whatever PodUID said.
            spec = facts.pod_spec(spec.netns, spec.ips, spec.source)
            async with self.serialized(cid):
                self._add_served(cid, waiting)
                if waiting.deleted:
                    # The DEL came while this waited for the container's facts or the lock: the
                    # runtime gave the ADD up (zds-cni sends it after a timeout shorter than
                    # the wait for the facts); enrolled now, the pod would stay for a container
                    # the runtime was told has no network.
                    return 409, f"container {facts.name}: its DEL came while this ADD waited; not enrolled"
                if (refusal := await self.add_unless_held(spec)) is not None:
                    return 500, refusal
            return 200, f"enrolled: container {facts.name} is {selection.reason}"
        finally:
            self._add_served(cid, waiting)

    def _add_arrived(self, cid: str, netns: NetnsRef) -> _WaitingAdd:
        waiting = _WaitingAdd(netns)
        self._adds_waiting.setdefault(cid, []).append(waiting)
        return waiting

    def _add_served(self, cid: str, waiting: _WaitingAdd) -> None:
        """``waiting`` holds the lock (or gave up): a DEL from now on comes after it."""
        adds = self._adds_waiting.get(cid, [])
        if waiting in adds:
            adds.remove(waiting)
            if not adds:
                del self._adds_waiting[cid]

    async def cni_del(self, uid: str, netns: str) -> tuple[int, str]:
        """DEL: the pod is gone. 200 (a DEL must not fail on what is gone already), but 500
        when its removal cannot be recorded (the pod stays enrolled).
        A container's pod is then looked at again through the engine: a network the container
        left (``podman network disconnect``) is not the container gone, and one that still
        runs selected is enrolled again (its pod had stayed away until the next reconcile)."""
        for waiting in self._adds_waiting.get(uid, ()):
            # (as for an enrolled pod below: a DEL naming another place is not this ADD's)
            waiting.deleted = waiting.deleted or not netns or _same_place(waiting.netns, netns)
        async with self.serialized(uid):
            while True:  # (again when the control API changed the uid's pod meanwhile)
                held = self.agent.pods.get(uid)
                if held is None:
                    return 200, "not enrolled"
                if not held.spec.source.cni:
                    return 200, f"left alone: enrolled by {held.spec.source.value}"
                if netns and not _same_place(held.spec.netns, netns):
                    return 200, f"left alone: enrolled in {held.spec.netns}, not {netns}"
                try:
                    await self.agent.remove_pod(uid, expect=held)
                    break
                except PodChanged:
                    continue
                except RemovalNotRecorded as exc:
                    # (zds-cni logs it and succeeds, as a DEL must; the engine watch and the next
                    # start's reconciliation, finding the container gone, try the removal again)
                    return 500, str(exc)
        if held.spec.source is PodSource.CNI and self.resync is not None:
            self.resync(uid)
        return 200, "removed"

    async def cni_check(self, spec: PodSpec, cid: str | None) -> tuple[int, str]:
        """CHECK: a pod that should be enrolled is, in this netns, with its rules."""
        if cid is not None:
            facts = await self.wait_facts(cid) if self.engine is not None else None
            if facts is None:
                return 503, f"cannot tell whether container {cid[:12]} joins the mesh"
            if not self.selection(facts).selected:
                return 200, "not selected"
        held = self.agent.pods.get(spec.uid)
        if held is None:
            return 500, f"pod {spec.uid[:12]} is not enrolled"
        if spec.netns.path is None or not _same_place(held.spec.netns, spec.netns.path):
            return 500, f"pod {spec.uid[:12]} is enrolled in {held.spec.netns}, not {spec.netns}"
        if held.netns is not None and not _still_at(held, spec.netns.path):
            return 500, f"pod {spec.uid[:12]} is enrolled in a netns that is no longer at {spec.netns}"
        if self.agent.enrollment.rules is not None and not held.rules_installed:
            return 500, f"pod {spec.uid[:12]} has no redirection rules"
        return 200, "enrolled"

    # -- the container engine -------------------------------------------------------------
    async def sync(self, cid: str, info: Mapping[str, Any] | None) -> None:
        """Make the pod of container ``cid`` what the engine says (``info``: its inspection,
        None once it is gone): enrolled while it runs selected, in its current netns; removed
        otherwise. Never touches a pod another source enrolled."""
        if info is not None:
            facts = ContainerFacts.from_inspect(info)
            self.learn(facts)
        async with self.serialized(cid):
            while True:  # (again when the control API changed the uid's pod meanwhile)
                try:
                    return await self._sync(cid, info)
                except PodChanged:
                    continue

    async def _sync(self, cid: str, info: Mapping[str, Any] | None) -> None:
        """``sync`` once: PodChanged when the control API changed the pod it decided on."""
        held = self.agent.pods.get(cid)
        if held is not None and not held.spec.source.container:
            return
        if held is not None and info is not None and _still_in(held, info):
            return  # not running (yet): starting again in the netns its CNI plugin just made
        wanted = None
        if info is not None and not shares_netns(info):
            try:
                wanted = container_netns(info, self.agent.enrollment.policy)
            except NetnsError as exc:
                log.warning("container %s: %s", cid[:12], exc, extra={"uid": cid})
                if isinstance(exc, OutOfFds):
                    # Not a netns gone: nothing can be told now (the pod it has stays; its
                    # next event, or the next reconcile, looks again).
                    return
        known = self.facts.get(cid)
        selected = wanted is not None and known is not None and self.selection(known).selected
        gone = held is not None and (wanted is None or _identity(held) != wanted.identity)
        # A pod the CNI plugin enrolled goes with its container's netns, or once the container
        # is no longer this node agent's (--container-label); Istio's labels were its plugin's
        # business (zds-cni's "enroll: all" enrolls unlabelled containers).
        unselected = held is not None and (
            not selected
            if held.spec.source is PodSource.CONTAINER_ENGINE
            else known is not None and not self.mine(known.labels)
        )
        if held is not None and (gone or unselected):
            log.info("container gone or changed: removing its pod", extra=held.spec.log_extra)
            try:
                await self.agent.remove_pod(cid, expect=held)
            except RemovalNotRecorded as exc:
                log.error("%s", exc, extra=held.spec.log_extra)  # the next reconcile tries again
                return
            held = None
        if selected and held is None and wanted is not None and info is not None and known is not None:
            spec = known.pod_spec(wanted.ref, addresses(info), PodSource.CONTAINER_ENGINE)
            try:
                await self.agent.add_pod(spec, expect=None)
            except EnrollmentError as exc:
                # (no ztunnel connected yet: the pod is cached, and goes out in its snapshot)
                level = logging.INFO if exc.outcome is EnrollmentOutcome.NO_CONNECTION else logging.ERROR
                log.log(level, "container %s: %s", spec.name, exc, extra=spec.log_extra)

    def owned(self) -> list[str]:
        """The uids of every pod of a container."""
        return [pod.uid for pod in self.agent.pods if pod.spec.source.container]


def _still_in(pod: Pod, info: Mapping[str, Any]) -> bool:
    """A container that is not running still has the pod's netns (between its CNI ADD and its start)."""
    if running(info) or pod.netns is None:
        return False
    sandbox = str((info.get("NetworkSettings") or {}).get("SandboxKey") or "")
    if not sandbox:
        return False
    try:
        with open_netns(sandbox) as current:
            return current.identity == pod.netns.identity
    except NetnsError:
        return False


def _identity(pod: Pod) -> object:
    return pod.netns.identity if pod.netns is not None else None


def _same_place(enrolled: NetnsRef, path: str) -> bool:
    """Whether an event's ``Netns``, read as an ADD's is (``NetnsRef.of_path``: the events'
    parsers did), names the place a pod was enrolled from, its directory resolved
    (``/run/netns`` is ``/var/run/netns``). A pod enrolled by pid has no place to differ."""
    if enrolled.path is None or path == enrolled.path:
        return True
    try:
        return _resolved(path) == _resolved(enrolled.path)
    except ValueError:  # (a NUL in it: a CHECK's; a DEL's is refused before)
        return False


def _resolved(path: str) -> str:
    """``path`` with its directory resolved (the file itself may be gone: a DEL's often is)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _still_at(pod: Pod, path: str) -> bool:
    """Whether the netns at ``path`` is still the one the pod holds (not one made again
    under the same name)."""
    assert pod.netns is not None
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # (gone; a NUL in it)
        return False
    return (st.st_dev, st.st_ino) == (pod.netns.identity.dev, pod.netns.identity.ino)


class _WaitingAdd:
    """A CNI ADD between its arrival and its turn at the container's lock."""

    __slots__ = ("deleted", "netns")

    def __init__(self, netns: NetnsRef) -> None:
        #: Where it enrolls the container's pod from.
        self.netns = netns
        #: A DEL of the container (for that place, or naming none) came meanwhile.
        self.deleted = False
