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
import logging
from typing import TYPE_CHECKING

from opentelemetry import trace

from zds.netns import NetnsError, NetnsHandle, OutOfFds, open_netns_ref
from zds.protocol.messages import Ack, DelWorkload
from zds.server import spans
from zds.server.eventkinds import EventKind
from zds.server.events import EventBus
from zds.server.leftovers import Leftovers, delete_pod_row, forget_install_row
from zds.server.link import ConnectionLost, Connections
from zds.server.locks import KeyedLocks
from zds.server.netnspolicy import NetnsPolicy, NetnsRefused, hold_for_the_pod
from zds.server.outcomes import (
    ANY_POD,
    CACHED,
    COMES_BACK,
    NOT_CONNECTED,
    STOPPING,
    DeleteResult,
    Enrolled,
    EnrollmentError,
    EnrollmentOutcome,
    Expect,
    PodChanged,
    RemovalNotRecorded,
)
from zds.server.podcache import Pod, PodCache
from zds.server.podrules import PodRules, RulesError
from zds.server.pods import PodNameError, PodSpec, PodSpecError
from zds.server.store import PodStore
from zds.server.storefile import StoreError
from zds.server.storerows import StoredPod
from zds.server.tasks import TaskOwner
from zds.server.telemetry import Telemetry

if TYPE_CHECKING:
    from opentelemetry import context as otel_context

    from zds.server.faults import FaultBook
    from zds.server.inpodrules import RedirectConfig

log = logging.getLogger("zds.server")


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
        earlier: RedirectConfig | None = None,
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
        #: The node agent is stopping (its ztunnel connections closed): an enrollment that
        #: finds none says so, not that the pod goes out in the next snapshot.
        self.stopping = False
        #: Rules a failed install or removal could not take out (with --no-redirect: an
        #: earlier run's, found at start), tried again.
        self.leftovers = Leftovers(
            rules, cache, store, tasks, under_way=self._uids.__contains__, policy=policy, earlier=earlier
        )

    def use_store(self, store: PodStore) -> None:
        """Keep pods in ``store`` from now on (set once at start-up, before recovery)."""
        self.store = store
        self.leftovers.store = store

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
        async with self._uids.hold(spec.uid):
            return await self._load(spec)

    async def _load(self, spec: PodSpec) -> Pod:
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
    async def add(self, spec: PodSpec, *, expect: Pod | Expect | None = ANY_POD) -> Enrolled:
        """Enroll a pod: open its netns, install the rules, cache it, deliver AddWorkload +
        fd to the newest ztunnel and wait for the ack. One trace (``zds.enroll_pod``).
        ``expect``: only if this is the uid's pod (None: no pod) when its turn comes, else
        PodChanged (a source that decided on what it saw: the CNI plugin, the engine)."""
        return await self.tasks.run(self._add(spec, expect))

    def start(self, spec: PodSpec) -> asyncio.Task[Enrolled]:
        """Begin ``add``: the enrollment as an owned task (it completes whoever waits for it)."""
        return self.tasks.spawn(self._add(spec, ANY_POD))

    def _check_expected(self, uid: str, expect: Pod | Expect | None) -> None:
        if expect is not ANY_POD and self.cache.get(uid) is not expect:
            raise PodChanged(f"the pod of {uid} changed meanwhile")

    async def _add(self, spec: PodSpec, expect: Pod | Expect | None) -> Enrolled:
        async with self._uids.hold(spec.uid):
            self._check_expected(spec.uid, expect)
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
                EnrollmentOutcome.NO_CONNECTION, STOPPING if self.stopping else NOT_CONNECTED
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
            raise EnrollmentError(outcome, f"{lost} {COMES_BACK if self.stopping else CACHED}") from lost
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
            span.set_attribute(spans.NETNS_INODE, netns.identity.ino)
            hold_for_the_pod(netns)
            return netns

    async def _install_and_keep(self, pod: Pod) -> Pod:
        """Install the pod's rules, commit it to the store and cache it. Until it is cached
        it counts as living in its netns (``PodCache.claim``): a removal of another pod there
        meanwhile keeps the rules this one just installed."""
        with self.cache.claim(pod):
            await self._intend(pod)
            await self._install_rules(pod)
            await self._record(pod)
            return self._cache(pod)

    async def _intend(self, pod: Pod) -> None:
        """Before the rules go in, commit the pod's install row: a crash before its own row
        is committed leaves rules no pod row records, and the next start takes them out."""
        if self.rules is None or self.store is None or pod.netns is None:
            return
        try:
            await self.store.intend_soon(StoredPod.of(pod, rules=self.rules.name))
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
            await self.rules.install(pod, lambda identity: self.cache.in_use(identity, besides=pod))
        except asyncio.CancelledError:
            pod.close()
            raise
        except RulesError as exc:
            log.warning("%s", exc, extra=pod.spec.log_extra)  # (the caller's answer says it too)
            if exc.undone:
                pod.close()
                forget_install_row(self.store, pod.uid, log_extra=pod.spec.log_extra)
                outcome = EnrollmentOutcome.REFUSED if exc.refused else EnrollmentOutcome.RULES
                raise EnrollmentError(outcome, str(exc)) from exc
            self.leftovers.retry(pod, removal=False)  # (recorded: the next start takes them out)
            raise EnrollmentError(
                EnrollmentOutcome.RULES, f"{exc}: tried again in the background (and at the next start)"
            ) from exc

    async def _record(self, pod: Pod) -> None:
        """Commit the pod to the store (before anyone hears "enrolled"); if that fails, take
        its rules out again and refuse: a namespace is never left half-configured."""
        if self.store is None:
            return
        old = self.cache.get(pod.uid)
        try:
            # Committed with the others enrolled in this turn of the loop (the bulk path's),
            # with the record of the rules a pod it replaces leaves (a stop between the two
            # would leave them recorded nowhere).
            await self.store.put_soon(
                StoredPod.of(
                    pod, rules=self.rules.name if self.rules is not None and pod.rules_installed else ""
                ),
                left=self.leftovers.left_by_replacing(old, pod) if old is not None else None,
            )
        except asyncio.CancelledError:
            pod.close()  # (shutting down: the pod, if committed, comes back on the next start)
            raise
        except StoreError as exc:
            log.error("cannot store the pod: %s", exc, extra=pod.spec.log_extra)
            try:
                await self._remove_rules(pod, besides=pod)
            except BaseException:
                pod.close()
                raise
            # Rules still in: recorded as left there (the next start takes them out), and
            # tried again meanwhile.
            if not self.leftovers.take_if_left(pod, removal=False):
                pod.close()  # out (or kept for another pod there): nothing left to do
                forget_install_row(self.store, pod.uid, log_extra=pod.spec.log_extra)
            raise EnrollmentError(EnrollmentOutcome.STORE, str(exc)) from exc

    def _cache(self, pod: Pod) -> Pod:
        """Cache the pod (releasing the one it replaces) and tell the watchers."""
        old = self.cache.put(pod)
        if old is not None:
            self.leftovers.replaced(old, pod)
        self.events.publish(EventKind.POD_ENROLLED, pod=pod)
        return pod

    # -- removal ----------------------------------------------------------------------
    async def remove(self, uid: str, *, expect: Pod | Expect = ANY_POD) -> tuple[Pod, list[DeleteResult]]:
        """Forget a pod, remove its rules, send DelWorkload to every connection, close its
        netns fd; after the enrollment or removal of ``uid`` under way, if any. Raises
        KeyError for an unknown uid; ``expect`` as for ``add``."""
        if expect is ANY_POD and uid not in self.cache and uid not in self._uids:
            raise KeyError(uid)
        return await self.tasks.run(self._remove(uid, expect))

    async def _remove(self, uid: str, expect: Pod | Expect) -> tuple[Pod, list[DeleteResult]]:
        async with self._uids.hold(uid):
            self._check_expected(uid, expect)
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
        self.events.publish(EventKind.POD_REMOVED, pod=pod)
        retried = False
        try:
            with spans.span(self.tracer, spans.REMOVE_POD, _attributes(pod.spec)) as span:
                log.info("pod removed", extra=pod.spec.log_extra)  # (in its trace, as "pod enrolled")
                await self._remove_rules(pod)
                # Rules that could not be taken out: its row becomes a record of them (the
                # next start takes them out), and they are tried again meanwhile.
                retried = self.leftovers.take_if_left(pod, removal=True)
                if pod.netns is None and pod.rules_installed:
                    # (recovered without opening its netns, or with it nowhere: its row, marked
                    # removing, records its rules for a start that can open it; in leftovers if
                    # it knows that netns, where a re-add of the uid leaves it alone)
                    said = "stay where they are" if pod.unopened else "went with its netns, or stay"
                    log.warning("its rules %s, recorded", said, extra=pod.spec.log_extra)
                    if pod.unopened is not None:
                        self.leftovers.keep_row(StoredPod.of(pod, rules=pod.rules_backend, removing=True))
                elif not retried:
                    delete_pod_row(self.store, uid)
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

    async def _remove_rules(self, pod: Pod, *, besides: Pod | None = None) -> None:
        """Take the pod's rules out unless another pod lives in its netns (``PodCache.in_use``;
        ``besides``: the pod itself, being enrolled, does not count)."""
        if self.rules is not None:
            await self.rules.remove(pod, lambda identity: self.cache.in_use(identity, besides=besides))


def _attributes(spec: PodSpec) -> dict[str, str]:
    return spans.pod_attributes(spec.uid, spec.name, spec.namespace)
