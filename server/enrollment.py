"""Enrollment and removal of pods (Istio's ``net_linux.go`` + ``PodAdded``/``PodDeleted``):
the rules, then the cache, then ztunnel.

Socket-free and clock-free: it reaches ztunnel only through the connections the
registry holds (anything with an ``id`` and an async ``deliver``), so the rules
of delivery are unit-tested with stand-in connections, no root and no process:

- an Add goes to the newest connection that said hello; a Del to every one;
- a pod is cached before it is delivered and stays cached whatever ztunnel
  answers (no connection, a nack, a lost connection, an ack timeout): the next
  ztunnel gets it in its snapshot;
- a removal is done whatever ztunnel answers, even with no ztunnel connected;
  its rules come out first, so no connection is redirected to closing listeners;
- an enrollment or removal, once begun, completes even if its caller gives up;
- one enrollment or removal of a uid at a time, in the order they came (as Istio's
  informer hands it a pod's events one after another): a removal never takes the
  record or the place of the pod that re-enrolled under its uid meanwhile;
- a pod counts as living in its netns from the moment its rules go in, before it
  is cached: the removal of another pod there leaves the rules in place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace

from zds import defaults, runtime
from zds.errors import ZdsError
from zds.netns import (
    NetnsError,
    NetnsHandle,
    NetnsIdentity,
    OutOfFds,
    netns_cookie,
    netns_identity_of_path,
    open_netns_ref,
)
from zds.protocol.messages import Ack, DelWorkload
from zds.server import spans
from zds.server.eventkinds import EventKind
from zds.server.events import EventBus
from zds.server.link import ConnectionLost, Connections
from zds.server.locks import KeyedLocks
from zds.server.netnspolicy import NetnsPolicy, NetnsRefused
from zds.server.podcache import PodCache
from zds.server.podrules import PodRules, RulesError
from zds.server.pods import Pod, PodNameError, PodSpec, PodSpecError
from zds.server.store import PodStore, StoredPod, StoreError
from zds.server.tasks import TaskOwner
from zds.server.telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry import context as otel_context

    from zds.server.faults import FaultBook

log = logging.getLogger("zds.server")


class EnrollmentOutcome(enum.Enum):
    """How an enrollment ended (the control API maps each to a gRPC status)."""

    ACKED = "acked"
    #: A netns that cannot be opened or is no netns, an AddWorkload too large: nothing was cached.
    INVALID = "invalid"
    #: Refused: the node's own netns, a netns from a place not allowed, names Kubernetes would
    #: refuse. Nothing was cached, nothing touched.
    REFUSED = "refused"
    #: Cached; delivered in the next ztunnel's snapshot.
    NO_CONNECTION = "no_connection"
    #: ztunnel answered with an error; cached.
    NACKED = "nacked"
    #: The connection closed before the ack; cached.
    LOST = "lost"
    #: No ack within the ack timeout: the connection was closed; cached.
    TIMEOUT = "timeout"
    #: The redirection rules could not be installed: nothing cached, nothing sent.
    RULES = "rules"
    #: The pod could not be written to the pod store: its rules were taken out again, nothing cached.
    STORE = "store"
    #: The node agent is out of fds (``NODE_AGENT_FD_RESERVE``): nothing cached, nothing touched.
    EXHAUSTED = "exhausted"


class RemovalNotRecorded(ZdsError):
    """The pod store cannot record that a removal begins: nothing was removed (removed now,
    the pod would come back at the next start, its rules installed again)."""


class EnrollmentError(ZdsError):
    """Enrollment did not end with a clean ack; ``outcome`` says how."""

    def __init__(self, outcome: EnrollmentOutcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class Enrolled:
    pod: Pod
    conn_id: str


@dataclass
class DeleteResult:
    conn_id: str
    error: str


class Enrollment:
    """Adds and removes pods: the rules, the cache, the delivery to ztunnel."""

    def __init__(
        self,
        cache: PodCache,
        registry: Connections,
        rules: PodRules | None,
        events: EventBus,
        telemetry: Telemetry,
        tasks: TaskOwner,
        store: PodStore | None = None,
        policy: NetnsPolicy | None = None,
    ) -> None:
        self.cache = cache
        #: Which netns may be a pod's (never the node's); None only in unit tests.
        self.policy = policy
        #: Where pods are kept across restarts (None: nowhere, e.g. in unit tests).
        self.store = store
        self.registry = registry
        #: None with --no-redirect.
        self.rules = rules
        self.events = events
        self.telemetry = telemetry
        self.tasks = tasks
        self.tracer = telemetry.tracer
        #: Set only while a fault that bends delivery is armed (add-to-oldest, del-to-newest-only,
        #: leak-netns-fds): otherwise delivery does not even ask.
        self.faults: FaultBook | None = None
        #: One enrollment or removal of a uid at a time, in the order they came.
        self._uids: KeyedLocks[str] = KeyedLocks()
        #: Pods whose rules went in (or are going in) and that are not cached yet, by netns.
        self._enrolling: collections.Counter[NetnsIdentity] = collections.Counter()
        #: Netns where rules a failed install or removal could not take out are tried again,
        #: and the uids whose rows say so (True: a pod row marked removing; False: an install
        #: row) (``_undo_later``).
        self._undoing: dict[NetnsIdentity, dict[str, bool]] = {}

    def bend_delivery(self, faults: FaultBook | None) -> None:
        """Let ``faults`` bend delivery from now on (None: deliver by the rules again)."""
        self.faults = faults

    # -- start-up ---------------------------------------------------------------------
    async def load(self, spec: PodSpec) -> Pod:
        """Cache a pod without delivering it (start-up ``--pods``).

        A pod whose netns cannot be opened stays known without one and goes out
        as KeepWorkload, as after a node-agent restart in Istio.
        """
        spec.validate()
        with spans.span(self.tracer, spans.ENROLL_POD, _attributes(spec)) as span:
            try:
                netns = self._open_netns(spec)
            except NetnsRefused as exc:
                spans.failed(span, exc)
                raise EnrollmentError(EnrollmentOutcome.REFUSED, str(exc)) from exc
            except NetnsError as exc:
                log.warning(
                    "netns unavailable; the pod stays known and is sent as KeepWorkload: %s",
                    exc,
                    extra=spec.log_extra,
                )
                span.set_attribute(spans.OUTCOME, "loaded_without_netns")
                pod = Pod(spec=spec, netns=None)
                await self._record(pod)
                return self._cache(pod)
            try:
                pod = await self._install_and_keep(Pod(spec=spec, netns=netns))
            except EnrollmentError as exc:
                spans.failed(span, exc)
                raise
            span.set_attribute(spans.OUTCOME, "loaded")
            return pod

    def restore(self, pod: Pod) -> None:
        """Cache a pod recovered from the store (it is stored already; nothing is sent)."""
        self._cache(pod)

    # -- enrollment -------------------------------------------------------------------
    async def add(self, spec: PodSpec) -> Enrolled:
        """Enroll a pod: open its netns, install the rules, cache it, deliver AddWorkload +
        fd to the newest ztunnel and wait for the ack. One trace (``zds.enroll_pod``)."""
        return await self.tasks.run(self._add(spec))

    def start(self, spec: PodSpec) -> asyncio.Task[Enrolled]:
        """Begin ``add``: the enrollment as an owned task (it completes whoever waits for it)."""
        return self.tasks.spawn(self._add(spec))

    async def _add(self, spec: PodSpec) -> Enrolled:
        async with self._uids.hold(spec.uid):
            with spans.span(self.tracer, spans.ENROLL_POD, _attributes(spec)) as span:
                try:
                    enrolled = await self._enroll(spec, span)
                except EnrollmentError as exc:
                    span.set_attribute(spans.OUTCOME, exc.outcome.value)
                    spans.failed(span, exc)
                    self.telemetry.enrollment(exc.outcome.value)
                    raise
                span.set_attribute(spans.OUTCOME, EnrollmentOutcome.ACKED.value)
                self.telemetry.enrollment(EnrollmentOutcome.ACKED.value)
                return enrolled

    async def _enroll(self, spec: PodSpec, span: trace.Span) -> Enrolled:
        try:
            spec.validate()
            netns = self._open_netns(spec)
        except (PodNameError, NetnsRefused) as exc:
            raise EnrollmentError(EnrollmentOutcome.REFUSED, str(exc)) from exc
        except OutOfFds as exc:
            raise EnrollmentError(EnrollmentOutcome.EXHAUSTED, str(exc)) from exc
        except (PodSpecError, NetnsError) as exc:
            raise EnrollmentError(EnrollmentOutcome.INVALID, str(exc)) from exc
        pod = await self._install_and_keep(Pod(spec=spec, netns=netns))
        log.info("pod enrolled (netns %s)", netns.identity, extra=spec.log_extra)
        conn = self.registry.newest()
        if self.faults is not None:
            conn = self.faults.route_add(conn, self.registry.ready())
        if conn is None:
            pod.last_error = "no ztunnel connection"
            raise EnrollmentError(
                EnrollmentOutcome.NO_CONNECTION,
                "no ztunnel connection (the pod stays cached and goes out in the next snapshot)",
            )
        span.set_attribute(spans.CONNECTION_ID, conn.id)
        try:
            ack = await conn.deliver(
                spec.add_workload,
                netns.dup(),
                payload=spec.add_workload_bytes,
                trace_context=spans.trace_context(span),
            )
        except ConnectionLost as lost:
            if self.cache.get(spec.uid) is pod:
                pod.last_error = str(lost)
            outcome = EnrollmentOutcome.TIMEOUT if lost.ack_timeout else EnrollmentOutcome.LOST
            raise EnrollmentError(outcome, str(lost)) from lost
        span.set_attribute(spans.ACK_ERROR, ack.error)
        if ack.error:
            raise EnrollmentError(EnrollmentOutcome.NACKED, ack.error)
        return Enrolled(pod=pod, conn_id=conn.id)

    def _open_netns(self, spec: PodSpec) -> NetnsHandle:
        with spans.span(self.tracer, spans.OPEN_NETNS, {spans.NETNS_PATH: str(spec.netns)}) as span:
            try:
                netns = (
                    self.policy.open(spec.netns) if self.policy is not None else open_netns_ref(spec.netns)
                )
            except NetnsError as exc:
                spans.failed(span, exc)
                raise
            netns.move_above(defaults.NETNS_FD_FLOOR)  # held for the pod's life: out of select()'s way
            span.set_attribute(spans.NETNS_INODE, netns.identity.ino)
            # Below the floor it found no room above it: count then.
            highest = netns.fileno() if netns.fileno() >= defaults.NETNS_FD_FLOOR else None
            shortage = runtime.fd_shortage(defaults.NODE_AGENT_FD_RESERVE, highest=highest)
            if shortage is not None:
                netns.close()
                in_use, limit = shortage
                raise OutOfFds(
                    f"fd budget exhausted: the node agent has {in_use} of {limit} fds open "
                    f"(RLIMIT_NOFILE), a pod takes 1 and {defaults.NODE_AGENT_FD_RESERVE} are kept "
                    "free (rules, connections, sends); raise the limit (ulimit -n, LimitNOFILE) "
                    "or enroll fewer pods with this node agent"
                )
            return netns

    async def _install_and_keep(self, pod: Pod) -> Pod:
        """Install the pod's rules, commit it to the store and cache it. Until it is cached
        it counts as living in its netns (``_enrolling``): a removal of another pod there
        meanwhile keeps the rules this one just installed."""
        with self._claim(pod):
            await self._intend(pod)
            await self._install_rules(pod)
            await self._record(pod)
            return self._cache(pod)

    @contextlib.contextmanager
    def _claim(self, pod: Pod) -> Iterator[None]:
        identity = pod.netns.identity if pod.netns is not None else None
        if identity is None:
            yield
            return
        self._enrolling[identity] += 1
        try:
            yield
        finally:
            self._enrolling[identity] -= 1
            if not self._enrolling[identity]:
                del self._enrolling[identity]

    def _in_use(self, identity: NetnsIdentity, *, claims: int = 0) -> bool:
        """A cached pod lives in this netns, or more than ``claims`` pods being enrolled do
        (``claims=1``: one being enrolled asks about the others)."""
        return self.cache.uses_netns(identity) or self._enrolling[identity] > claims

    async def _intend(self, pod: Pod) -> None:
        """Before the rules go in, commit the pod's install row: a crash before its own row
        is committed leaves rules no pod row records, and the next start takes them out."""
        if self.rules is None or self.store is None or pod.netns is None:
            return
        try:
            await self.store.intend_soon(self._stored(pod, rules=self.rules.name))
        except asyncio.CancelledError:
            pod.close()
            raise
        except StoreError as exc:
            log.error("cannot store the pod: %s", exc, extra=pod.spec.log_extra)
            pod.close()
            raise EnrollmentError(EnrollmentOutcome.STORE, str(exc)) from exc

    async def _install_rules(self, pod: Pod) -> None:
        """Install the in-pod rules; on failure close the netns and refuse the enrollment
        (nothing is sent; what went in came out, and its install row goes)."""
        if self.rules is None:
            return
        try:
            await self.rules.install(pod, lambda identity: self._in_use(identity, claims=1))
        except asyncio.CancelledError:
            pod.close()
            raise
        except RulesError as exc:
            if exc.undone:
                pod.close()
                self._forget_install(pod)
                raise EnrollmentError(EnrollmentOutcome.RULES, str(exc)) from exc
            self._undo_later(pod)  # its install row stays (the next start takes the rules out)
            raise EnrollmentError(
                EnrollmentOutcome.RULES, f"{exc}: tried again in the background (and at the next start)"
            ) from exc

    def _undo_later(self, pod: Pod, *, removal: bool = False) -> None:
        """A failed install whose undo failed too (or a removal whose rules could not be
        taken out: ``removal``) left rules that redirect the pod's traffic to listeners nobody
        opens: taking them out is tried again (``_retry_undo``), one task a netns (a second
        such pod there joins the first's, and lets its netns fd go)."""
        assert pod.netns is not None
        uids = self._undoing.get(pod.netns.identity)
        if uids is not None:
            uids[pod.uid] = removal
            pod.close()
            return
        self._undoing[pod.netns.identity] = {pod.uid: removal}
        what = "rules a failed removal left" if removal else "rules a failed install left"
        self.tasks.spawn(self._retry_undo(pod, what), name=f"undo-{pod.uid}")

    async def _retry_undo(self, pod: Pod, what: str) -> None:
        """The pause growing (UNDO_RETRY_*), until the rules are out (the rows that record
        them go: install rows for this netns, pod rows marked removing; not one of a uid
        enrolled again or being enrolled or removed right now), the netns is no longer at its
        path (the kernel takes them out with it once this fd lets it go; the rows go), a pod
        is cached in that netns (they are its rules now; the rows stay for the next start,
        which keeps them), or the node agent stops (the rows stay: the next start takes them
        out). A pod being enrolled there, not cached yet, defers the try."""
        assert self.rules is not None and pod.netns is not None
        identity = pod.netns.identity
        pause = defaults.UNDO_RETRY_INITIAL
        try:
            while True:
                await asyncio.sleep(pause)
                pause = min(pause * 2, defaults.UNDO_RETRY_MAX)
                if not _still_at_its_path(pod):
                    log.info(
                        "%s go with their netns: it is no longer at %s",
                        what,
                        pod.spec.netns,
                        extra=pod.spec.log_extra,
                    )
                    break
                if self.cache.uses_netns(identity):
                    log.info(
                        "%s are kept: another pod lives in its netns now",
                        what,
                        extra=pod.spec.log_extra,
                    )
                    return
                if await self.rules.undo_again(pod, self._in_use):
                    log.info("%s are taken out now", what, extra=pod.spec.log_extra)
                    break
            for uid, removal in sorted(self._undoing[identity].items()):
                if uid in self._uids or uid in self.cache:  # (its row is its own now)
                    continue
                if removal:
                    self._unrecord(uid, identity)
                else:
                    self._forget_install(pod, uid=uid)
        finally:
            del self._undoing[identity]
            pod.close()

    def _forget_install(self, pod: Pod, *, uid: str = "") -> None:
        """Take out the install row of ``pod`` (or of ``uid`` for ``pod``'s netns only)."""
        if self.store is None:
            return
        try:
            if uid:
                self.store.forget_install(uid, pod.netns.identity if pod.netns is not None else None)
            else:
                self.store.forget_install(pod.uid)
        except StoreError as exc:  # the next start takes out rules that are already out
            log.warning("cannot update the pod store: %s", exc, extra=pod.spec.log_extra)

    async def _record(self, pod: Pod) -> None:
        """Commit the pod to the store (before anyone hears "enrolled"); if that fails, take
        its rules out again and refuse: a namespace is never left half-configured."""
        if self.store is None:
            return
        try:
            # Committed with the others enrolled in this turn of the loop (the bulk path's).
            await self.store.put_soon(
                self._stored(
                    pod, rules=self.rules.name if self.rules is not None and pod.rules_installed else ""
                )
            )
        except asyncio.CancelledError:
            pod.close()  # (shutting down: the pod, if committed, comes back on the next start)
            raise
        except StoreError as exc:
            log.error("cannot store the pod: %s", exc, extra=pod.spec.log_extra)
            try:
                await self._remove_rules(pod, claims=1)
            finally:
                pod.close()
            if not pod.rules_installed:  # out (or kept for another pod there): nothing left to do
                self._forget_install(pod)
            raise EnrollmentError(EnrollmentOutcome.STORE, str(exc)) from exc

    @staticmethod
    def _stored(pod: Pod, *, rules: str) -> StoredPod:
        return StoredPod(
            pod.spec,
            pod.netns.identity if pod.netns is not None else None,
            rules=rules,
            rules_digest=pod.rules_digest,
            removing=False,
            enrolled_at=pod.enrolled_at,
            cookie=netns_cookie(pod.netns) if pod.netns is not None else None,
        )

    def _cache(self, pod: Pod) -> Pod:
        """Cache the pod (releasing the one it replaces) and tell the watchers."""
        old = self.cache.put(pod)
        if old is not None:
            if (
                old.rules_installed
                and old.netns is not None
                and pod.netns is not None
                and old.netns.identity != pod.netns.identity
            ):
                # Replaced by a pod in another netns: take our rules out of the old one too.
                self.tasks.spawn(self._remove_rules_and_close(old))
            else:
                old.close()  # replaced: its fd goes now (queued sends hold their own dups)
        self.events.publish(EventKind.POD_ENROLLED, pod=pod)
        return pod

    # -- removal ----------------------------------------------------------------------
    async def remove(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        """Forget a pod, remove its rules, send DelWorkload to every connection, close its
        netns fd; after the enrollment or removal of ``uid`` under way, if any. Raises
        KeyError for an unknown uid."""
        if uid not in self.cache and uid not in self._uids:
            raise KeyError(uid)
        return await self.tasks.run(self._remove(uid))

    async def _remove(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        async with self._uids.hold(uid):
            if uid not in self.cache:
                raise KeyError(uid)  # its enrollment failed, or another removal took it
            return await self._remove_cached(uid)

    async def _remove_cached(self, uid: str) -> tuple[Pod, list[DeleteResult]]:
        if self.store is not None:
            try:
                self.store.mark_removing(uid)
            except StoreError as exc:
                raise RemovalNotRecorded(
                    f"cannot record the removal of pod {uid} in the pod store: {exc}; "
                    "nothing was removed (the pod stays enrolled)"
                ) from exc
        pod = self.cache.pop(uid)
        log.info("pod removed", extra=pod.spec.log_extra)
        self.events.publish(EventKind.POD_REMOVED, pod=pod)
        retried = False
        try:
            with spans.span(self.tracer, spans.REMOVE_POD, _attributes(pod.spec)) as span:
                await self._remove_rules(pod)
                if self.rules is not None and pod.rules_installed and pod.netns is not None:
                    # Its rules could not be taken out: its row stays marked removing (the next
                    # start finishes the removal), and they are tried again meanwhile.
                    self._undo_later(pod, removal=True)
                    retried = True
                else:
                    self._unrecord(uid)
                results = await self._broadcast_del(uid, spans.trace_context(span))
        finally:
            self.cache.removed(uid)
            if not retried and (self.faults is None or not self.faults.leak(pod)):
                pod.close()
        return pod, results

    async def release_unknown(self, uid: str) -> list[DeleteResult]:
        """DelWorkload to every connection for a uid no pod has, as Istio's RemovePodFromMesh
        sends it whatever its cache holds: a ztunnel still serving such a workload lets it
        go; to the others it is a no-op. Nothing else changes."""
        return await self.tasks.run(self._release_unknown(uid))

    async def _release_unknown(self, uid: str) -> list[DeleteResult]:
        async with self._uids.hold(uid):  # (an Add of this uid under way goes first, and stands)
            if uid in self.cache:
                raise ValueError(f"pod {uid} is enrolled; remove it")
            log.info("DelWorkload for a pod not enrolled", extra={"uid": uid})
            return await self._broadcast_del(uid, None)

    async def _broadcast_del(
        self, uid: str, trace_context: otel_context.Context | None
    ) -> list[DeleteResult]:
        conns = self.registry.ready()
        if self.faults is not None:
            conns = self.faults.route_del(conns)
        answers = await asyncio.gather(
            *(c.deliver(DelWorkload(uid=uid), trace_context=trace_context) for c in conns),
            return_exceptions=True,
        )
        return [
            DeleteResult(conn.id, answer.error if isinstance(answer, Ack) else str(answer))
            for conn, answer in zip(conns, answers, strict=True)
        ]

    def _unrecord(self, uid: str, identity: NetnsIdentity | None = None) -> None:
        """The removal is done: its row goes (with ``identity``: only the removal's row for
        that netns). A failure is logged: the row stays marked removing, and the next start
        finishes the removal (Istio's rule: a delete is done whatever happens; marking it is
        what ``_remove_cached`` could not do without)."""
        if self.store is None:
            return
        try:
            self.store.delete(uid, identity)
        except StoreError as exc:
            log.error("cannot record the removal in the pod store: %s", exc, extra={"uid": uid})

    async def _remove_rules(self, pod: Pod, *, claims: int = 0) -> None:
        """Take the pod's rules out unless another pod lives in its netns (``_in_use``)."""
        if self.rules is not None:
            await self.rules.remove(pod, lambda identity: self._in_use(identity, claims=claims))

    async def _remove_rules_and_close(self, pod: Pod) -> None:
        try:
            await self._remove_rules(pod)
        finally:
            pod.close()


def _attributes(spec: PodSpec) -> dict[str, str]:
    return spans.pod_attributes(spec.uid, spec.name, spec.namespace)


def _still_at_its_path(pod: Pod) -> bool:
    """Whether the pod's netns path still leads to the netns ``pod`` holds."""
    assert pod.netns is not None
    return netns_identity_of_path(str(pod.spec.netns)) == pod.netns.identity
