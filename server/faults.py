"""Faults on demand: make the node agent misbehave on purpose, to test a ztunnel.

A fault is asked for through the control API (``InjectFault``, ``zds fault``) or a
``--faults FILE`` at start-up, checked once (refused with one line when it makes
no sense: ``FaultError`` carries INVALID or PRECONDITION), logged, counted
(``zds_faults_total{kind,outcome}``) and published on ``Watch`` when it is armed
and again when it takes effect.

Kinds, by what they act on:

- the next message(s) on a connection: ``delay``, ``drop-before``, ``drop-after``,
  ``pipeline``, ``non-canonical``, ``wrong-netns``;
- a record of its own, written at the connection's next free moment (inside a
  snapshot too, unless ``after_snapshot``): ``oversize-record``, ``unknown-field``,
  ``no-payload``, ``empty-record``, ``add-without-fd``, ``add-with-two-fds``,
  ``add-without-workload-info``, ``not-a-netns-fd``, ``fd-on-del``,
  ``keep-unknown-uid``, ``duplicate-add``, ``second-snapshot-sent``;
- a connection's hello and snapshot: ``record-before-hello``,
  ``withhold-snapshot-sent``, ``omit-from-snapshot``;
- the node agent's delivery: ``add-to-oldest``, ``del-to-newest-only``,
  ``leak-netns-fds``.

A connection fault targets the newest connection, a given one, or the next one
to be accepted. The per-message cost when nothing is armed is one attribute
check (``ZtunnelConnection.faults is not None``); the mechanics live in
``faultplay``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zds import defaults
from zds.server.eventkinds import EventKind
from zds.server.faultkinds import NEEDS_POD, Category, FaultError, FaultKind, Refusal

if TYPE_CHECKING:
    from zds.server.connection import ZtunnelConnection
    from zds.server.events import EventBus
    from zds.server.faultplay import ConnectionFaults
    from zds.server.link import ZtunnelLink
    from zds.server.podcache import Pod, PodCache
    from zds.server.registry import ConnectionRegistry
    from zds.server.telemetry import Telemetry

log = logging.getLogger("zds.server.faults")


@dataclass(frozen=True)
class FaultSpec:
    """What was asked for."""

    kind: FaultKind
    count: int = 1
    delay: float = 0.0
    uid: str = ""
    #: Record faults: wait until the connection's snapshot is complete; message faults: act on
    #: live updates only.
    after_snapshot: bool = False
    #: A connection id; "" means the newest (unless ``next_connection``).
    connection_id: str = ""
    next_connection: bool = False
    #: With ``next_connection``: let this many connections be accepted first.
    skip_connections: int = 0


def _flag(name: str) -> str:
    """A field as zds fault names it (``--skip-connections``)."""
    return "--connection" if name == "connection_id" else "--" + name.replace("_", "-")


def spec_problem(spec: FaultSpec, field: Callable[[str], str]) -> str | None:
    """What is wrong with ``spec`` whatever the node agent's state (None: nothing), each
    field named by ``field`` (a flag of zds fault, a key of a faults file)."""
    kind, label = spec.kind, spec.kind.label
    if spec.count < 1:
        return f"{label}: {field('count')} must be at least 1"
    if kind.category is Category.CONNECTION and spec.count > 1:
        return f"{label} acts once on its connection: {field('count')} must be 1"
    if kind is FaultKind.DELAY and spec.delay <= 0:
        return f"delay: give {field('delay')} SECONDS (more than 0)"
    if not 0 <= spec.delay <= defaults.FAULT_DELAY_MAX:  # (also NaN)
        return f"{label}: {field('delay')} must be 0 to {defaults.FAULT_DELAY_MAX:g} seconds"
    if spec.delay and kind is not FaultKind.DELAY:
        return f"{label} takes no {field('delay')}"
    if kind is FaultKind.OMIT_FROM_SNAPSHOT and not spec.uid:
        return f"omit-from-snapshot: give {field('uid')} of the pod to leave out"
    if spec.uid and kind not in NEEDS_POD and kind is not FaultKind.OMIT_FROM_SNAPSHOT:
        return f"{label} takes no {field('uid')}"
    if spec.after_snapshot and kind.category not in (Category.MESSAGE, Category.RECORD):
        return f"{label} takes no {field('after_snapshot')} (message and record faults do)"
    if kind.category is Category.DELIVERY:
        if spec.connection_id or spec.next_connection or spec.skip_connections:
            return f"{label} acts on the node agent's delivery, not on one connection"
        return None
    if spec.skip_connections < 0:
        return f"{label}: {field('skip_connections')} must not be negative"
    if spec.skip_connections and not spec.next_connection:
        return f"{label}: {field('skip_connections')} goes with {field('next_connection')}"
    if spec.connection_id and spec.next_connection:  # (the id was kept, unused, whatever its size)
        return f"{label}: {field('connection_id')} or {field('next_connection')}, not both"
    return None


@dataclass
class Fault:
    """An injected fault and what became of it."""

    id: str
    spec: FaultSpec
    #: What it acts on: "conn ID", "the next connection", "the node agent".
    target: str
    remaining: int
    state: str = "armed"
    #: Connections still to let pass before it attaches (``skip_connections``).
    skips: int = 0
    detail: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def kind(self) -> FaultKind:
        return self.spec.kind


class FaultBook:
    """Every fault of one node agent: checks, arms, hands out and reports them."""

    def __init__(
        self,
        registry: ConnectionRegistry[ZtunnelConnection],
        pods: PodCache,
        events: EventBus,
        telemetry: Telemetry,
    ) -> None:
        self._registry = registry
        self._pods = pods
        self._events = events
        self._telemetry = telemetry
        self._ids = itertools.count(1)
        #: Faults armed and not yet applied or dropped (pruned at each inject): at most
        #: ``defaults.FAULTS_ARMED_MAX`` (one InjectFault each, they had no bound).
        self._armed: list[Fault] = []
        #: Connection faults waiting for the next accepted connection.
        self._next: list[Fault] = []
        #: Delivery faults, by kind.
        self._delivery: dict[FaultKind, list[Fault]] = {}
        #: Each connection's faults, by connection id (also while the connection's own
        #: reference is lent out, see faultplay).
        self.states: dict[str, ConnectionFaults] = {}
        #: Pods whose netns fd leak-netns-fds kept open.
        self.leaked: list[Pod] = []
        #: Told this book while a delivery fault is armed, None once none is (the enrollment's
        #: delivery then asks nothing: not even a check per pod while no fault is armed).
        self.on_delivery: Callable[[FaultBook | None], None] = lambda _: None

    # -- injecting -------------------------------------------------------------------
    def inject(self, spec: FaultSpec) -> Fault:
        """Check and arm a fault (FaultError when refused)."""
        try:
            self._armed = [f for f in self._armed if f.state == "armed"]
            if len(self._armed) >= defaults.FAULTS_ARMED_MAX:
                raise FaultError(
                    Refusal.PRECONDITION,
                    f"{spec.kind.label}: {defaults.FAULTS_ARMED_MAX} faults are armed already; "
                    "let some take effect first",
                )
            fault, conn = self._arm(spec)
        except FaultError:
            self._telemetry.fault(spec.kind.label, "refused")
            raise
        self._armed.append(fault)
        self._telemetry.fault(spec.kind.label, "injected")
        log.warning(
            "fault %s armed: %s (%s) on %s", fault.id, spec.kind.label, spec.kind.description, fault.target
        )
        self._events.publish(EventKind.FAULT_INJECTED, connection_id=conn.id if conn else "", fault=fault)
        if conn is not None:
            from zds.server.faultplay import attach

            attach(conn, fault, self)
        elif spec.next_connection:
            self._next.append(fault)
        else:
            self._delivery.setdefault(spec.kind, []).append(fault)
            self.on_delivery(self)
        return fault

    def _arm(self, spec: FaultSpec) -> tuple[Fault, ZtunnelConnection | None]:
        kind = spec.kind
        if (problem := spec_problem(spec, _flag)) is not None:
            raise FaultError(Refusal.INVALID, problem)
        if (
            spec.uid
            and (kind in NEEDS_POD or kind is FaultKind.OMIT_FROM_SNAPSHOT)
            and spec.uid not in self._pods
        ):
            raise FaultError(Refusal.INVALID, f"{kind.label}: no pod with uid {spec.uid} is enrolled")
        if kind in NEEDS_POD:
            self.pod_for(spec)
        if kind.category is Category.DELIVERY:
            return Fault(self._next_id(), spec, "the node agent", spec.count), None
        if spec.next_connection:
            target = (
                "the next connection"
                if not spec.skip_connections
                else f"the connection after the next {spec.skip_connections}"
            )
            return Fault(self._next_id(), spec, target, spec.count, skips=spec.skip_connections), None
        conn = self._target(spec)
        self._check_state(spec, conn)
        return Fault(self._next_id(), spec, f"conn {conn.id}", spec.count), conn

    def _next_id(self) -> str:
        """f1, f2, ...: only faults that were armed get one."""
        return f"f{next(self._ids)}"

    def _target(self, spec: FaultSpec) -> ZtunnelConnection:
        if spec.connection_id:
            for live in self._registry.live():
                if live.id == spec.connection_id:
                    return live
            raise FaultError(
                Refusal.INVALID, f"no ztunnel connection {spec.connection_id} (see zds connections)"
            )
        newest = self._registry.newest()
        if newest is None:
            raise FaultError(
                Refusal.PRECONDITION,
                f"{spec.kind.label}: no ztunnel connection; arm it for the next one with --next-connection",
            )
        return newest

    @staticmethod
    def _check_state(spec: FaultSpec, conn: ZtunnelConnection) -> None:
        kind, done = spec.kind, conn.snapshot_complete
        if kind is FaultKind.RECORD_BEFORE_HELLO:
            raise FaultError(
                Refusal.PRECONDITION,
                f"record-before-hello: conn {conn.id} said hello already; use --next-connection",
            )
        if kind in (FaultKind.WITHHOLD_SNAPSHOT_SENT, FaultKind.OMIT_FROM_SNAPSHOT) and done:
            raise FaultError(
                Refusal.PRECONDITION,
                f"{kind.label}: conn {conn.id} has sent its snapshot already; use --next-connection",
            )
        if kind is FaultKind.SECOND_SNAPSHOT_SENT and not done:
            raise FaultError(
                Refusal.PRECONDITION,
                f"second-snapshot-sent: conn {conn.id} has not finished its first snapshot yet",
            )

    def pod_for(self, spec: FaultSpec) -> Pod:
        """The pod a record fault is made from: ``uid``, else the last one enrolled."""
        pod = (
            self._pods.get(spec.uid)
            if spec.uid
            else max(self._pods, key=lambda p: p.enrolled_at, default=None)
        )
        if pod is None:
            raise FaultError(
                Refusal.PRECONDITION,
                f"{spec.kind.label}: no pod is enrolled to take a netns from; enroll one first (zds pod add) or give --uid",
            )
        if pod.netns is None or pod.netns.closed:
            raise FaultError(Refusal.PRECONDITION, f"{spec.kind.label}: pod {pod.uid} has no open netns")
        return pod

    def pods_other_than(self, uid: str) -> list[Pod]:
        """Enrolled pods but ``uid``, the last enrolled first (wrong-netns takes one)."""
        return sorted((p for p in self._pods if p.uid != uid), key=lambda p: -p.enrolled_at)

    # -- what the node agent asks ------------------------------------------------------
    def admitted(self, conn: ZtunnelConnection, *, hello: bool) -> None:
        """A connection was accepted (``hello`` False) or said hello and is served (True): it
        takes the faults armed for the next one — record-before-hello at accept, every other
        at its hello (a connection refused then takes none)."""
        if not self._next:
            return
        from zds.server.faultplay import attach

        pending, self._next = self._next, []
        for fault in pending:
            if (fault.kind is FaultKind.RECORD_BEFORE_HELLO) == hello:
                self._next.append(fault)  # not this moment of a connection's life
                continue
            if fault.skips > 0:
                fault.skips -= 1
                self._next.append(fault)
                continue
            fault.target = f"conn {conn.id}"
            attach(conn, fault, self)

    def route_add(self, newest: ZtunnelLink | None, ready: Sequence[ZtunnelLink]) -> ZtunnelLink | None:
        """Where an AddWorkload goes (``add-to-oldest`` sends it to the oldest connection).
        Asked only while a delivery fault is armed (``on_delivery``)."""
        if newest is None or len(ready) < 2 or not self._delivery.get(FaultKind.ADD_TO_OLDEST):
            return newest
        self.consume(
            self._delivery[FaultKind.ADD_TO_OLDEST][0],
            f"an AddWorkload went to the oldest conn {ready[0].id}",
        )
        return ready[0]

    def route_del(self, ready: Sequence[ZtunnelLink]) -> Sequence[ZtunnelLink]:
        """Where a DelWorkload goes (``del-to-newest-only``: not to the older connections)."""
        if len(ready) < 2 or not self._delivery.get(FaultKind.DEL_TO_NEWEST_ONLY):
            return ready
        self.consume(
            self._delivery[FaultKind.DEL_TO_NEWEST_ONLY][0], f"a DelWorkload went to conn {ready[-1].id} only"
        )
        return ready[-1:]

    def leak(self, pod: Pod) -> bool:
        """Whether the netns fd of removed ``pod`` is to be left open (``leak-netns-fds``): then it
        is kept here, for good (Python would close it with the object; Go's GC, Istio's case, later)."""
        armed = self._delivery.get(FaultKind.LEAK_NETNS_FDS)
        if not armed:
            return False
        self.leaked.append(pod)
        self.consume(armed[0], f"the netns fd of removed pod {pod.uid} was left open")
        return True

    # -- reporting -----------------------------------------------------------------------
    def consume(self, fault: Fault, detail: str) -> None:
        """One use of ``fault`` happened; once its count is used up it is applied."""
        fault.remaining -= 1
        fault.detail = detail
        log.warning("fault %s (%s) took effect: %s", fault.id, fault.kind.label, detail)
        self._telemetry.fault(fault.kind.label, "applied")
        conn_id = fault.target.removeprefix("conn ") if fault.target.startswith("conn ") else ""
        if fault.remaining <= 0:
            fault.state = "applied"
            fault.done.set()
            armed = self._delivery.get(fault.kind)
            if armed and fault in armed:
                armed.remove(fault)
                if not any(self._delivery.values()):
                    self.on_delivery(None)
        self._events.publish(EventKind.FAULT_APPLIED, connection_id=conn_id, error=detail, fault=fault)

    def connection_closed(self, conn_id: str, reason: str) -> None:
        """Connection ``conn_id`` ended: its armed faults never take effect."""
        state = self.states.pop(conn_id, None)
        if state is not None:
            state.closed(reason)

    def armed(self) -> list[Fault]:
        """The faults armed now, in the order they were armed."""
        return [f for f in self._armed if f.state == "armed"]

    def clear(self, fault_id: str = "") -> list[Fault]:
        """Disarm the armed fault ``fault_id`` (every armed one: ""): each is dropped, as
        "cleared"; the faults cleared. FaultError when no armed fault has that id."""
        cleared = [f for f in self.armed() if not fault_id or f.id == fault_id]
        if fault_id and not cleared:
            raise FaultError(Refusal.INVALID, f"no armed fault {fault_id} (zds faults list shows them)")
        for fault in cleared:
            self.dropped(fault, "cleared (zds faults clear)")
        # (a connection's faults are taken only while armed: nothing more to do there)
        self._next = [f for f in self._next if f.state == "armed"]
        for kind, faults in list(self._delivery.items()):
            self._delivery[kind] = [f for f in faults if f.state == "armed"]
        if not any(self._delivery.values()):
            self.on_delivery(None)
        return cleared

    def dropped(self, fault: Fault, reason: str) -> None:
        """``fault`` can no longer take effect (its connection closed first, or it was cleared)."""
        if fault.state != "armed":
            return
        fault.state = "dropped"
        fault.detail = reason
        fault.done.set()
        log.warning("fault %s (%s) dropped: %s", fault.id, fault.kind.label, reason)
