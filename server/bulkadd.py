"""The bulk path of the control API: ``AddPods``, and the control socket's bulk lane
(bulklane.py), and the gRPC status of each enrollment outcome."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from zds import defaults
from zds.errors import cut_to_bytes
from zds.gen import nodeagent_pb2
from zds.server.agent import NodeAgent
from zds.server.bulkwire import too_many_pods
from zds.server.controlwire import fill_add_pod_response, pod_spec
from zds.server.outcomes import STOPPING, Enrolled, EnrollmentError, EnrollmentOutcome
from zds.server.pods import PodSpec
from zds.server.storefile import StoreError

log = logging.getLogger("zds.server.control")

#: AddPods answers wait this long (seconds) for others to go in the same message.
BULK_REPLY_DELAY = 0.005

STATUS = {
    EnrollmentOutcome.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    EnrollmentOutcome.REFUSED: grpc.StatusCode.INVALID_ARGUMENT,
    EnrollmentOutcome.NO_CONNECTION: grpc.StatusCode.UNAVAILABLE,
    EnrollmentOutcome.NACKED: grpc.StatusCode.FAILED_PRECONDITION,
    EnrollmentOutcome.LOST: grpc.StatusCode.UNAVAILABLE,
    EnrollmentOutcome.RULES: grpc.StatusCode.INTERNAL,
    EnrollmentOutcome.STORE: grpc.StatusCode.INTERNAL,
    EnrollmentOutcome.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EnrollmentOutcome.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}


#: The longest status details (or answer text, or echoed uid) sent: gRPC refuses metadata past
#: 8-16 KiB, so a refusal that quotes a caller's long value (a uid, a path) would reach it as
#: a protocol error instead, and a bulk answer echoing it could outgrow a message.
DETAILS_MAX = 1024


#: What a pod the node agent's stop kept from enrolling is told.
NOT_ENROLLED = "node agent shutting down; the pod was not enrolled"


def cut(text: str) -> str:
    """``text`` cut to DETAILS_MAX bytes of UTF-8 (gRPC's limit is on the bytes, each sent as
    3 when percent-encoded: 1,024 characters of emoji had been ~12 KiB), ``...`` at its end."""
    return cut_to_bytes(text, DETAILS_MAX)


class TooManyPods(Exception):
    """An AddPodsRequest of more than ``BULK_REQUEST_PODS`` pods: the call ends INVALID_ARGUMENT."""


async def at_most_pods(
    requests: AsyncIterator[nodeagent_pb2.AddPodsRequest],
) -> AsyncIterator[nodeagent_pb2.AddPodsRequest]:
    """``requests``, refused at one of more than ``BULK_REQUEST_PODS`` pods (``too_many_pods``)."""
    async for request in requests:
        if (refused := too_many_pods(len(request.pods))) is not None:
            raise TooManyPods(refused)
        yield request


async def bulk_add(
    agent: NodeAgent, requests: AsyncIterator[nodeagent_pb2.AddPodsRequest], *, brief: bool = False
) -> AsyncGenerator[nodeagent_pb2.AddPodsReply, None]:
    """The bulk path (``AddPods``, and the control socket's bulk lane: bulklane.py):
    enrollments run concurrently (up to ``BULK_WINDOW``), each answered as it ends; their
    AddWorkloads queue on the ztunnel connection in the order they are ready, so the node
    agent opens and stores the next pods while ztunnel works. Pods come and go in batches: a
    message per pod would cost more than enrolling it. Requests are taken only while fewer
    than ``BULK_UNSENT`` answers wait to be sent: a client that does not read its answers
    holds the node agent to that much (the transport's flow control does the rest).
    ``brief``: an enrolled pod's answer is the connection that acked it, without the pod (the
    bulk lane's JSON form sends no more)."""
    answers: asyncio.Queue[nodeagent_pb2.AddPodsResult | None] = asyncio.Queue()
    #: Every answer of the call is in ``answers`` (the last one goes out at once).
    finished = asyncio.Event()
    window = _Window(defaults.BULK_WINDOW, defaults.BULK_REFILL)
    #: A request taken holds one until its answer is sent.
    unsent = asyncio.Semaphore(defaults.BULK_UNSENT)
    running: set[asyncio.Future[Any]] = set()

    def answer(
        index: int,
        uid: str,
        outcome: asyncio.Future[Enrolled] | tuple[grpc.StatusCode, str],
        spec: PodSpec | None = None,
    ) -> None:
        window.give()
        enrolled = None
        if isinstance(outcome, tuple):
            code, message = outcome
        elif outcome.cancelled():
            assert spec is not None  # (a task's: started from a spec)
            code, message = grpc.StatusCode.UNAVAILABLE, shutting_down(agent, spec)
        elif isinstance(error := outcome.exception(), EnrollmentError):
            code, message = STATUS[error.outcome], str(error)
        elif error is not None:  # a bug: said as AddPod would (an INTERNAL status)
            log.error("enrollment failed unexpectedly: %r", error, extra={"uid": uid})
            code, message = grpc.StatusCode.INTERNAL, f"unexpected error: {error!r}"
        else:
            code, message, enrolled = grpc.StatusCode.OK, "", outcome.result()
        result = nodeagent_pb2.AddPodsResult(
            index=index, uid=cut(uid), code=code.value[0], message=cut(message)
        )
        if enrolled is not None:
            if brief:
                result.response.connection_id = enrolled.conn_id
            else:
                fill_add_pod_response(result.response, enrolled)  # (in place, not copied)
        answers.put_nowait(result)

    async def read() -> None:
        try:
            index = 0
            async for batch in requests:
                for request in batch.pods:
                    await unsent.acquire()
                    await window.take()
                    spec = pod_spec(request)
                    if agent.enrollment.stopping:
                        # The stop began: nothing new starts. (Its cancels give their places in
                        # the window back: the rest of the stream came in, each enrolled.)
                        said = shutting_down(agent, spec) if isinstance(spec, PodSpec) else NOT_ENROLLED
                        answer(index, request.uid, (grpc.StatusCode.UNAVAILABLE, said))
                    elif isinstance(spec, PodSpec):
                        # The enrollment's own task (it completes even if this call ends).
                        task = agent.start_add(spec)
                        running.add(task)
                        task.add_done_callback(running.discard)
                        task.add_done_callback(functools.partial(answer, index, request.uid, spec=spec))
                    else:
                        agent.telemetry.enrollment(EnrollmentOutcome.INVALID.value)
                        answer(index, request.uid, spec)
                    index += 1
        finally:
            # Ended or refused (a message over the limit, undecodable: raised above), the pods
            # taken before answer first: a refusal put ahead of them lost their answers, or,
            # with one coming during the reply delay, hung the call to its deadline. (Not
            # once the call ended: nothing more goes out then.)
            current = asyncio.current_task()
            while running and not (current is not None and current.cancelling()):
                await asyncio.wait(set(running))
            answers.put_nowait(None)
            finished.set()

    reader = asyncio.create_task(read())
    try:
        done = False
        while not done:
            batch = [await answers.get()]
            if batch[0] is not None and not finished.is_set():
                # Let more end first, unless the last one does meanwhile: a message per
                # answer costs both ends more than the answer (~100 us of gRPC machinery
                # each in the client alone).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BULK_REPLY_DELAY):
                        await finished.wait()
            while not answers.empty() and len(batch) < defaults.BULK_REPLY_RESULTS:
                batch.append(answers.get_nowait())  # the answers ready now go in one message
            done = batch[-1] is None
            results = [answer for answer in batch if answer is not None]
            if results:
                yield nodeagent_pb2.AddPodsReply(results=results)
                for _ in results:
                    unsent.release()
        await reader  # a failed read of the requests ends the call with its error
    finally:
        reader.cancel()


class _Window:
    """How many of an AddPods stream's enrollments may run at once: ``size``. Once full, it
    opens again only when ``refill`` of them have ended, so the next ones start together in
    one turn of the loop (and the pod store commits them in one transaction) instead of one
    by one as each ack comes in."""

    def __init__(self, size: int, refill: int) -> None:
        self.size = size
        self.refill = min(refill, size)
        self.free = size
        self._open = asyncio.Event()
        self._open.set()

    async def take(self) -> None:
        while self.free == 0:
            self._open.clear()
            await self._open.wait()
        self.free -= 1

    def give(self) -> None:
        self.free += 1
        if self.free >= self.refill:
            self._open.set()


def shutting_down(agent: NodeAgent, spec: PodSpec) -> str:
    """Why an enrollment the node agent's stop cut short has no answer, and whether the pod
    comes back when it starts again (its row committed) or was not enrolled (an earlier pod
    of the uid, stored, is not this one)."""
    store = agent.enrollment.store
    try:
        row = store.row(spec.uid) if store is not None else None
    except (sqlite3.Error, StoreError):
        return "node agent shutting down; whether the pod was stored is not known (zds pod list tells)"
    if row is not None and row.spec == spec and not row.removing:
        return STOPPING
    return NOT_ENROLLED
