"""One run of ``zds check node-agent``: its options, its connections to the node agent,
its pods, and what every check found.

Scenarios (``agentscenarios``) drive it; at the end ``results`` turns what was
found and what was exercised into one result per check. A check that found
nothing but was never exercised (no AddWorkload ever arrived, say) is an
error, not a pass: no check can hold vacuously.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

from zds import defaults
from zds.aio import cancel_and_wait, finished_within
from zds.check.agentchecks import BY_NAME
from zds.check.pods import CheckPod, PodDriver, PodFactory
from zds.check.records import ConnectionRules, Seen
from zds.check.report import CheckResult, Finding, verdict
from zds.check.strictpeer import PeerClosed, StrictConnection


@dataclass
class AgentCheckOptions:
    """What ``zds check node-agent`` was told."""

    zds_socket: str = defaults.ZDS_SOCKET
    #: None: use the command templates instead.
    control_socket: str | None = defaults.CONTROL_SOCKET
    add_cmd: str | None = None
    remove_cmd: str | None = None
    #: None: the pid SO_PEERCRED gives for the ZDS socket (a local agent).
    agent_pid: int | None = None
    #: The node agent's ack deadline (Istio's readWriteDeadline: 5 s).
    ack_deadline: float = defaults.ACK_TIMEOUT
    #: Slack the node agent gets beyond a deadline before a check calls it late.
    grace: float = 2.0
    #: How long the check waits before its hello (anything arriving meanwhile is a finding).
    hello_wait: float = 1.0
    #: How long an ack is held back while another pod is being added.
    hold: float = 1.0
    #: How long to wait for each record the node agent should send.
    timeout: float = 10.0
    #: Connect/add/remove/disconnect cycles of the fd-hygiene scenario.
    cycles: int = 20
    #: Pods in the snapshot scenario.
    pods: int = 3
    #: How long the snapshot scenario waits, once its adds returned, before it connects (an
    #: agent that takes a pod after its add command returned: nothing on the wire says when).
    settle: float = 0.0


#: What each check's evidence is called when it passes (check -> what was counted).
EVIDENCE = {
    "record-size": "records checked, none over 1024 bytes",
    "strict-decoding": "records decoded strictly",
    "canonical-encoding": "records re-encoded byte for byte",
    "no-empty-record": "records read, none empty",
    "add-one-fd": "AddWorkload records, each with exactly one fd",
    "fd-is-netns": "fds on AddWorkload records, each a network namespace",
    "add-netns-is-the-pods": "AddWorkload fds compared with the pod's own netns, all equal",
    "fd-only-on-add": "Keep/Del/SnapshotSent records, none with an fd",
    "add-workload-info": "AddWorkload records, each with workload_info",
    "no-keep-after-snapshot": "records after SnapshotSent, none a KeepWorkload",
    "one-snapshot-sent": "records after SnapshotSent, none a second SnapshotSent",
}


class TakenSnapshot(NamedTuple):
    """One connection's whole snapshot: the check it belongs to and the uids it named."""

    check: str
    conn: str
    named: set[str]
    #: Records received (on any connection) when it ended: what had arrived before it.
    seen_before: int


class AgentSession:
    """The strict ztunnel's state across scenarios."""

    def __init__(self, options: AgentCheckOptions, driver: PodDriver, factory: PodFactory) -> None:
        self.options = options
        self.driver = driver
        self.factory = factory
        self.findings: dict[str, list[Finding]] = defaultdict(list)
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.exercised: Counter[str] = Counter()
        self.seen: list[Seen] = []
        #: uids the node agent held before the check added any (its first snapshot).
        self.known: set[str] = set()
        #: Each connection's snapshot, in order.
        self.snapshots: list[TakenSnapshot] = []
        self.agent_pid: int | None = options.agent_pid
        self.actions: list[str] = []
        self._connections: list[StrictConnection] = []
        self._tasks: list[asyncio.Task[str]] = []
        #: Pods given to the node agent and not taken back yet (by uid).
        self._given: dict[str, CheckPod] = {}

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- findings --------------------------------------------------------------------
    def report(self, check: str, finding: Finding) -> None:
        self.findings[check].append(finding)

    def note(self, check: str, text: str) -> None:
        self.notes[check].append(text)

    def _netns_of(self, uid: str) -> tuple[int, int] | None:
        """The netns identity of the check's pod ``uid``, asked as its Add arrives (copied at
        connect time, a pod made later on that connection went uncompared)."""
        pod = self.factory.pods.get(uid)
        return pod.identity if pod is not None else None

    # -- connections -----------------------------------------------------------------
    async def connect(self) -> StrictConnection:
        no = len(self._connections) + 1
        rules = ConnectionRules(no, self.report, exercised=self.exercised, netns_of=self._netns_of)
        conn = await StrictConnection.open(self.options.zds_socket, no, rules, self.seen.append)
        self._connections.append(conn)
        if self.agent_pid is None:
            creds = conn.peer_credentials()
            if creds is not None and creds.pid > 0:
                self.agent_pid = creds.pid
        return conn

    async def synced(
        self, check: str = "reconnect-snapshot"
    ) -> tuple[StrictConnection, list[Seen], Seen | None]:
        """A new connection that said hello and took (answered) its whole snapshot, which
        ``check`` judges (a pod held before the check and missing from it fails that check)."""
        for attempt in range(1, 6):
            conn = await self.connect()
            try:
                await conn.hello()
                entries, sent = await conn.take_snapshot(self.options.timeout)
                if sent is not None:  # (one cut short drops nothing in ztunnel)
                    self.took_snapshot(check, conn, entries)
                return conn, entries, sent
            except PeerClosed:
                if conn.received or attempt == 5:
                    raise
            # Closed before a word: a connection limit that has not seen our last close yet
            # (zds: --max-connections). ztunnel reconnects then; so do we.
            await conn.close()
            await asyncio.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def took_snapshot(self, check: str, conn: StrictConnection, entries: list[Seen]) -> None:
        """Keep what a whole snapshot named, for ``judge_held`` at the end."""
        named = {seen.uid for seen in entries if seen.uid}
        self.snapshots.append(TakenSnapshot(check, conn.name, named, len(self.seen)))

    async def expect(
        self,
        conn: StrictConnection,
        match: Callable[[Seen], bool],
        *,
        answer: bool = True,
        within: float | None = None,
    ) -> Seen | None:
        """Answer records on ``conn`` until one matches (returned; answered unless ``answer`` is
        False) or ``within`` seconds pass (None)."""
        deadline = time.monotonic() + (self.options.timeout if within is None else within)
        while (left := deadline - time.monotonic()) > 0:
            seen = await conn.next(left)
            if seen is None:
                return None
            if match(seen):
                if answer:
                    await conn.answer(seen)
                return seen
            await conn.answer(seen)
        return None

    async def close(self, conn: StrictConnection) -> None:
        await conn.close()

    # -- pods --------------------------------------------------------------------------
    def add(self, pod: CheckPod) -> asyncio.Task[str]:
        """Start adding ``pod`` on the node agent (in the background: it waits for our ack)."""
        self._given[pod.uid] = pod
        return self._start(f"add {pod.name}", self.driver.add(pod))

    def remove(self, pod: CheckPod) -> asyncio.Task[str]:
        self._given.pop(pod.uid, None)
        return self._start(f"remove {pod.name}", self.driver.remove(pod))

    async def take_back(self, within: float = 15.0) -> None:
        """Remove from the node agent every pod the check gave it and did not remove (a run
        stopped midway): they would stay enrolled there, holding their netns."""
        given, self._given = list(self._given.values()), {}
        if not given:
            return
        await finished_within(
            asyncio.gather(*(self.driver.remove(pod) for pod in given), return_exceptions=True), within
        )

    def _start(self, what: str, call: Coroutine[Any, Any, str]) -> asyncio.Task[str]:
        task = asyncio.ensure_future(call)

        def done(t: asyncio.Task[str]) -> None:
            if not t.cancelled():
                exc = t.exception()
                self.actions.append(f"{what}: {exc if exc is not None else t.result()}")

        task.add_done_callback(done)
        self._tasks.append(task)
        return task

    async def settle(self, tasks: list[asyncio.Task[str]], within: float | None = None) -> None:
        """Wait (bounded) for adds/removes to finish."""
        pending = [t for t in tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.options.timeout if within is None else within)

    async def shutdown(self) -> None:
        for conn in self._connections:
            await conn.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            await cancel_and_wait(task)

    # -- results -------------------------------------------------------------------------
    def result(self, name: str, duration: float) -> CheckResult:
        return verdict(
            BY_NAME[name],
            findings=self.findings.get(name, []),
            notes=self.notes.get(name, []),
            exercised=self.exercised[name],
            duration=duration,
            error=self.errors.get(name),
            skipped=self.skipped.get(name),
            evidence=EVIDENCE.get(name, ""),
        )
