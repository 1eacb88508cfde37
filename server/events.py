"""What the node agent does, as a stream of events for ``Watch`` watchers.

Publishing never waits: each watcher has a bounded queue, and one whose queue
is full while its client reads nothing is ended (the control API answers
RESOURCE_EXHAUSTED) instead of holding the node agent back or growing without bound. A watcher starts with
the current state (handed to ``subscribe`` by the node agent in the same
synchronous step that registers it, so nothing falls between the two).
"""

from __future__ import annotations

import asyncio
import copy
import enum
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zds import defaults
from zds.errors import ZdsError
from zds.logs import Tally
from zds.server.eventkinds import EventKind

if TYPE_CHECKING:  # kept light: the CLI imports this module for the event kinds
    from zds.server.connrecords import ConnectionInfo
    from zds.server.faults import Fault
    from zds.server.podcache import Pod

log = logging.getLogger("zds.server.watch")

#: Events a watcher may have queued before it is ended for falling behind.
DEFAULT_WATCH_QUEUE = defaults.WATCH_QUEUE


@dataclass(frozen=True)
class AgentEvent:
    """One thing that happened; ``pod``/``connection`` are copies taken when it happened."""

    kind: EventKind
    time: float
    sequence: int = 0
    current_state: bool = False
    uid: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    connection_id: str = ""
    message_type: str = ""
    error: str = ""
    ack_latency: float | None = None
    pod: Pod | None = None
    connection: ConnectionInfo | None = None
    snapshot_pods: int = 0
    #: POD_SOURCE_UP / POD_SOURCE_DOWN: which source.
    pod_source: str = ""
    fault: FaultView | None = None


@dataclass(frozen=True)
class FaultView:
    """A fault as it was when an event about it was published (its state changes later)."""

    id: str
    kind: str
    target: str
    count: int
    delay: float
    uid: str
    after_snapshot: bool
    state: str
    detail: str

    @classmethod
    def of(cls, fault: Fault) -> FaultView:
        spec = fault.spec
        return cls(
            fault.id,
            spec.kind.label,
            fault.target,
            spec.count,
            spec.delay,
            spec.uid,
            spec.after_snapshot,
            fault.state,
            fault.detail,
        )


class WatchEnding(enum.Enum):
    """Why a watch ended."""

    #: The watcher's queue overflowed: it was not reading fast enough.
    FELL_BEHIND = "fell-behind"
    #: The node agent is shutting down (or the stream was closed).
    SHUTDOWN = "shutdown"
    #: ``defaults.WATCHERS_MAX`` watchers are watching already.
    TOO_MANY = "too-many"


class WatchEnded(ZdsError):
    """The watch is over; ``reason`` says why, ``detail`` is for the user."""

    def __init__(self, reason: WatchEnding, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Watcher:
    """One watcher: its current-state events, then a bounded queue of live ones."""

    def __init__(
        self,
        bus: EventBus,
        initial: Iterable[AgentEvent],
        *,
        kinds: frozenset[EventKind] | None,
        uid: str,
        limit: int,
        stall: float = defaults.WATCH_STALL,
    ) -> None:
        self._bus = bus
        self.kinds = kinds
        self.uid = uid
        self.limit = limit
        self.stall = stall
        self._initial = deque(e for e in initial if self.wants(e))
        self._queue: deque[AgentEvent] = deque()
        self._wakeup = asyncio.Event()
        #: When its writer last took an event (it reads on, or not).
        self._taken_at = time.monotonic()
        #: Its writer waits in ``next`` for an event (woken, not yet run: not stalled).
        self._waiting = False
        self._stall_check: asyncio.TimerHandle | None = None
        #: Set when the watcher fell behind: a write to it that is still pending
        #: must be abandoned (the client is not reading).
        self.fell_behind = asyncio.Event()
        self._end: WatchEnded | None = None

    def wants(self, event: AgentEvent) -> bool:
        if event.kind is EventKind.CURRENT_STATE_END:
            return True
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        return not self.uid or event.uid == self.uid

    def offer(self, event: AgentEvent) -> None:
        """Queue ``event`` if wanted; never waits. A full queue ends the watch once its writer
        has taken no event for ``stall`` seconds (its client stopped reading), or at
        ``WATCH_QUEUE_HARD`` times the limit: a bulk enrollment or a snapshot makes events
        faster than a watcher that reads on is sent them (400 pods ended every one)."""
        if self._end is not None or not self.wants(event):
            return
        if len(self._queue) >= self.limit:
            if len(self._queue) >= self.limit * defaults.WATCH_QUEUE_HARD or self._stalled():
                self._fall_behind()
                return
            if self._stall_check is None:
                self._stall_check = asyncio.get_running_loop().call_later(self.stall, self._check_stall)
        self._queue.append(event)
        self._wakeup.set()

    def _stalled(self) -> bool:
        return not self._waiting and time.monotonic() - self._taken_at >= self.stall

    def _check_stall(self) -> None:
        self._stall_check = None
        if self._end is not None or len(self._queue) < self.limit:
            return
        if self._stalled():
            self._fall_behind()
        else:
            left = max(self.stall - (time.monotonic() - self._taken_at), 0.1)  # (its writer woken, not run)
            self._stall_check = asyncio.get_running_loop().call_later(left, self._check_stall)

    def _no_stall_check(self) -> None:
        if self._stall_check is not None:
            self._stall_check.cancel()
            self._stall_check = None

    def _fall_behind(self) -> None:
        waiting = len(self._queue)
        why = (
            f"it took none for {self.stall:g}s"
            if self._stalled()
            else f"{defaults.WATCH_QUEUE_HARD}x --watch-queue {self.limit}: the node agent made them faster "
            "than this stream takes them (watch fewer kinds, or raise --watch-queue)"
        )
        self.finish(
            WatchEnded(
                WatchEnding.FELL_BEHIND,
                f"watcher fell behind: {waiting} events were waiting to be sent ({why}); watch again "
                "to get the current state",
            )
        )

    def finish(self, end: WatchEnded) -> None:
        """End the watch: ``next`` raises ``end`` — at once when the watcher fell
        behind (what is queued is dropped), else once the queue is drained."""
        if self._end is not None:
            return
        self._end = end
        self._bus.unsubscribe(self)
        self._no_stall_check()
        if end.reason is WatchEnding.FELL_BEHIND:
            self._queue.clear()
            self._initial.clear()
            self.fell_behind.set()
            self._bus.fell_behind.add("ended %d watcher(s): %s", end.detail)
        self._wakeup.set()

    @property
    def end(self) -> WatchEnded | None:
        return self._end

    async def next(self) -> AgentEvent:
        """The next event, waiting for one; raises WatchEnded once the watch is over."""
        while True:
            self._taken_at = time.monotonic()
            if self._initial:
                return self._initial.popleft()
            if self._queue:
                return self._queue.popleft()
            if self._end is not None:
                raise self._end
            self._wakeup.clear()
            self._waiting = True
            try:
                await self._wakeup.wait()
            finally:
                self._waiting = False

    def close(self) -> None:
        """The watcher went away (stream cancelled or over)."""
        self._bus.unsubscribe(self)
        self._no_stall_check()
        self._queue.clear()
        self._initial.clear()
        if self._end is None:
            self._end = WatchEnded(WatchEnding.SHUTDOWN, "closed")


class EventBus:
    """Fans events out to watchers; numbers every event, watched or not."""

    def __init__(
        self, watch_queue: int = DEFAULT_WATCH_QUEUE, watch_stall: float = defaults.WATCH_STALL
    ) -> None:
        self.watch_queue = watch_queue
        self.watch_stall = watch_stall
        self.sequence = 0
        self._watchers: set[Watcher] = set()
        self._closed: WatchEnded | None = None
        #: Watchers ended for falling behind, said in a line every 10 s at most (they fall
        #: behind together, and one that watches again in a loop falls behind again).
        self.fell_behind = Tally(10.0, log)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def publish(
        self,
        kind: EventKind,
        *,
        pod: Pod | None = None,
        connection: ConnectionInfo | None = None,
        uid: str = "",
        connection_id: str = "",
        message_type: str = "",
        error: str = "",
        ack_latency: float | None = None,
        snapshot_pods: int = 0,
        pod_name: str = "",
        pod_namespace: str = "",
        pod_source: str = "",
        fault: Fault | None = None,
    ) -> None:
        """Tell every watcher; costs next to nothing when nobody watches."""
        self.sequence += 1
        if not self._watchers:
            return
        if pod is not None:
            pod = copy.copy(pod)  # the state it has now, not when a watcher reads it
            uid = uid or pod.uid
            pod_name = pod_name or pod.spec.name
            pod_namespace = pod_namespace or pod.spec.namespace
        if connection is not None:
            connection_id = connection_id or connection.id
        event = AgentEvent(
            kind=kind,
            time=time.time(),
            sequence=self.sequence,
            uid=uid,
            pod_name=pod_name,
            pod_namespace=pod_namespace,
            connection_id=connection_id,
            message_type=message_type,
            error=error,
            ack_latency=ack_latency,
            pod=pod,
            connection=connection,
            snapshot_pods=snapshot_pods,
            pod_source=pod_source,
            fault=FaultView.of(fault) if fault is not None else None,
        )
        for watcher in list(self._watchers):
            watcher.offer(event)

    def subscribe(
        self,
        current_state: Iterable[AgentEvent],
        *,
        kinds: frozenset[EventKind] | None = None,
        uid: str = "",
    ) -> Watcher:
        """A new watcher: ``current_state``, the end-of-current-state marker, then live events.

        Call it in the same synchronous step that computed ``current_state``.
        """
        refused = self._closed
        if refused is None and len(self._watchers) >= defaults.WATCHERS_MAX:
            # Each holds its current state until sent, and a client may read none of it.
            refused = WatchEnded(
                WatchEnding.TOO_MANY,
                f"{defaults.WATCHERS_MAX} watchers are watching already; watch again once one ends",
            )
        # A refused watcher is told at once, with nothing before (it was sent the whole current
        # state first, and held it as long as its client did not read it: no bound at all).
        marker = AgentEvent(kind=EventKind.CURRENT_STATE_END, time=time.time(), sequence=self.sequence)
        initial = [] if refused is not None else [*current_state, marker]
        watcher = Watcher(self, initial, kinds=kinds, uid=uid, limit=self.watch_queue, stall=self.watch_stall)
        if refused is not None:
            watcher.finish(refused)
        else:
            self._watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def close(self, detail: str) -> None:
        """End every watch (shutdown); later subscribers are ended at once. Watchers ended for
        falling behind and not said yet are said now."""
        self._closed = WatchEnded(WatchEnding.SHUTDOWN, detail)
        for watcher in list(self._watchers):
            watcher.finish(self._closed)
        self.fell_behind.flush()
