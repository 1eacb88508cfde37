"""How faults play out on one ztunnel connection.

``ZtunnelConnection._exchange`` hands every message to ``ConnectionFaults.exchange``
while a fault is armed on the connection (the only cost otherwise is the check
that none is). This module works with the connection's insides on purpose: a
fault *is* the connection misbehaving — writing what the protocol object would
refuse, writing twice, closing early — while keeping its bookkeeping right (one
request in flight, every ack read, every fd closed), so the connection goes on
afterwards whenever ztunnel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING

from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    encode_request,
    request_kind,
)
from zds.protocol.nodeagent import AckReceived, ConnectionState
from zds.server.faultkinds import Category, FaultError, FaultKind, MadeUpAdd
from zds.server.faults import Fault, FaultBook
from zds.server.link import ConnectionLost

if TYPE_CHECKING:
    from zds.server.connection import ZtunnelConnection
    from zds.server.connrecords import Delivery

#: Never written: queued to wake an idle connection's writer for a record fault.
WAKE = KeepWorkload(uid="\x00zds-fault-wake")
#: Who the made-up pods of record faults are.
FAULT_INFO = WorkloadInfo(name="zds-fault", namespace="zds-fault", service_account="zds-fault")
#: A field number WorkloadRequest does not have (varint 1): ``78 01``.
UNKNOWN_FIELD = b"\x78\x01"
#: Field 15 as 1100 bytes (length-delimited, length 1100 = cc 08).
OVERSIZE_PADDING = b"\x7a\xcc\x08" + b"\x00" * 1100


class ConnectionFaults:
    """The faults armed on one connection."""

    def __init__(self, book: FaultBook) -> None:
        self.book = book
        self.faults: list[Fault] = []
        self.wakes = 0
        #: record-before-hello was written; its ack is read after the hello.
        self.early: Request | None = None

    @property
    def armed(self) -> bool:
        return any(f.state == "armed" for f in self.faults)

    def _take(self, kind: FaultKind, uid: str = "", *, in_snapshot: bool = False) -> Fault | None:
        """The first armed fault of ``kind`` (for ``uid``); one asked to wait for the snapshot's
        end (``after_snapshot``) is not taken while ``in_snapshot``."""
        for fault in self.faults:
            if fault.state != "armed" or fault.kind is not kind or (uid and fault.spec.uid != uid):
                continue
            if in_snapshot and fault.spec.after_snapshot:
                continue
            return fault
        return None

    # -- hooks -------------------------------------------------------------------------
    async def before_hello(self, conn: ZtunnelConnection) -> None:
        fault = self._take(FaultKind.RECORD_BEFORE_HELLO)
        if fault is None:
            return
        request = DelWorkload(uid="zds-fault-before-hello")
        await _write(conn, request, encode_request(request), [])
        self.early = request
        self.book.consume(fault, f"DelWorkload written on conn {conn.id} before its hello")

    async def exchange(self, conn: ZtunnelConnection, delivery: Delivery) -> Ack:
        try:
            if self.early is not None:
                request, self.early = self.early, None
                conn.protocol.sent_unchecked(request, time.monotonic())
                await _wait_ack(conn, request)
            await self._records(conn)
            if delivery.request is WAKE:
                self.wakes -= 1
                if not delivery.result.done():
                    delivery.result.set_result(Ack())
                return Ack()
            return await self._message(conn, delivery)
        except ConnectionLost as lost:
            delivery.drop(lost)
            self.closed(lost.reason)
            raise
        finally:
            conn.faults = self if (self.armed or self.wakes) else None
            if conn.faults is None:
                self.book.states.pop(conn.id, None)

    def closed(self, reason: str) -> None:
        """The connection is gone: what is still armed on it never takes effect."""
        for fault in self.faults:
            self.book.dropped(fault, f"the connection closed first: {reason}")

    # -- records of their own --------------------------------------------------------------
    async def _records(self, conn: ZtunnelConnection) -> None:
        for fault in list(self.faults):
            if fault.state != "armed" or fault.kind.category is not Category.RECORD:
                continue
            later = fault.spec.after_snapshot or fault.kind is FaultKind.SECOND_SNAPSHOT_SENT
            if later and not conn.snapshot_complete:
                continue  # the wake queued with it comes after the snapshot
            while fault.state == "armed":
                try:
                    request, payload, fds = make_record(fault, self.book)
                except FaultError as exc:
                    self.book.dropped(fault, str(exc))
                    break
                what = f"{fault.kind.label} ({len(payload)} bytes, {len(fds)} fds) sent on conn {conn.id}"
                await _write(conn, request, payload, fds)
                try:
                    ack = await _wait_ack(conn, request)
                except ConnectionLost as lost:
                    self.book.consume(
                        fault, f"{what}: the connection closed before an answer ({lost.reason})"
                    )
                    raise
                said = f"ztunnel answered {ack.error!r}" if ack.error else "ztunnel acked it"
                self.book.consume(fault, f"{what}: {said}")

    # -- the next message ------------------------------------------------------------------
    async def _message(self, conn: ZtunnelConnection, delivery: Delivery) -> Ack:
        request = delivery.request
        kind = request_kind(request)
        in_snapshot = conn.protocol.state is ConnectionState.SNAPSHOT
        if (
            in_snapshot
            and isinstance(request, SnapshotSent)
            and (f := self._take(FaultKind.WITHHOLD_SNAPSHOT_SENT))
        ):
            self.book.consume(f, f"SnapshotSent withheld on conn {conn.id}: its snapshot never ends")
            return _settle(delivery, Ack())
        uid = getattr(request, "uid", "")
        if in_snapshot and uid and (f := self._take(FaultKind.OMIT_FROM_SNAPSHOT, uid)):
            delivery.close_fd()
            self.book.consume(f, f"pod {uid} left out of conn {conn.id}'s snapshot")
            return _settle(delivery, Ack())
        if f := self._take(FaultKind.DELAY, in_snapshot=in_snapshot):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(f.spec.delay):
                    await f.done.wait()  # (set while it waits only when it is cleared, or dropped)
            if f.state == "armed":
                self.book.consume(f, f"{kind} on conn {conn.id} written {f.spec.delay:g}s late")
        if f := self._take(FaultKind.DROP_BEFORE, in_snapshot=in_snapshot):
            self.book.consume(f, f"conn {conn.id} closed instead of writing {kind}")
            raise _close(conn, f"fault {f.id} drop-before: closed instead of writing {kind}")
        if f := self._take(FaultKind.NON_CANONICAL, in_snapshot=in_snapshot):
            payload = delivery.payload if delivery.payload is not None else encode_request(request)
            delivery.payload = payload + payload  # the payload field twice: protobuf merges, same request
            self.book.consume(
                f, f"{kind} written on conn {conn.id} in non-canonical form ({len(payload) * 2} bytes)"
            )
        if isinstance(request, AddWorkload) and (
            f := self._take(FaultKind.WRONG_NETNS, in_snapshot=in_snapshot)
        ):
            other = next(
                (
                    p
                    for p in self.book.pods_other_than(request.uid)
                    if p.netns is not None and not p.netns.closed
                ),
                None,
            )
            if other is not None and other.netns is not None:
                delivery.close_fd()
                delivery.fd = other.netns.dup()
                self.book.consume(
                    f,
                    f"AddWorkload for {request.uid} written on conn {conn.id} with the netns of pod {other.uid}",
                )
        if f := self._take(FaultKind.PIPELINE, in_snapshot=in_snapshot):
            return await self._twice(conn, delivery, f)
        if f := self._take(FaultKind.DROP_AFTER, in_snapshot=in_snapshot):
            payload = conn.protocol.send(request, time.monotonic(), payload=delivery.payload)
            await _write(conn, request, payload, _take_fd(delivery), bookkept=True)
            self.book.consume(f, f"conn {conn.id} closed right after writing {kind}, before its ack")
            raise _close(conn, f"fault {f.id} drop-after: closed after writing {kind}")
        conn.faults = None  # the message itself goes as usual
        try:
            return await conn._exchange(delivery)
        finally:
            conn.faults = self

    async def _twice(self, conn: ZtunnelConnection, delivery: Delivery, fault: Fault) -> Ack:
        request = delivery.request
        payload = conn.protocol.send(request, time.monotonic(), payload=delivery.payload)
        fds = _take_fd(delivery)
        second = [os.dup(fd) for fd in fds]
        await _write(conn, request, payload, fds, bookkept=True)
        await _write(conn, request, payload, second, bookkept=True)
        first = await _wait_ack(conn, request)
        conn.protocol.sent_unchecked(request, time.monotonic())
        again = await _wait_ack(conn, request)
        self.book.consume(
            fault,
            f"{request_kind(request)} written twice on conn {conn.id} before its ack: answers "
            f"{first.error or 'ack'!r}, {again.error or 'ack'!r}",
        )
        return _settle(delivery, first)


def attach(conn: ZtunnelConnection, fault: Fault, book: FaultBook) -> None:
    """Arm ``fault`` on ``conn``; a record fault also wakes the connection's writer."""
    state = (
        conn.faults if conn.faults is not None else book.states.setdefault(conn.id, ConnectionFaults(book))
    )
    # Those that took effect or were dropped go: a connection lives long, faults come and go.
    state.faults = [f for f in state.faults if f.state == "armed"]
    state.faults.append(fault)
    conn.faults = state
    if conn.closed:
        book.dropped(fault, f"conn {conn.id} is closed")
        return
    if fault.kind.category is Category.RECORD:
        state.wakes += 1
        waking = asyncio.ensure_future(conn.deliver(WAKE))
        waking.add_done_callback(lambda t: t.cancelled() or t.exception())


def make_record(fault: Fault, book: FaultBook) -> tuple[Request, bytes, list[int]]:
    """The record a record fault writes: (a request standing for it, its bytes, its fds)."""
    kind, spec = fault.kind, fault.spec
    if kind is FaultKind.OVERSIZE_RECORD:
        # A DelWorkload padded past 1024 bytes with an unknown field (15, 1100 bytes): the uid
        # stays short in every log, and ztunnel never gets past its 1024th byte anyway.
        request: Request = DelWorkload(uid="zds-fault-oversize")
        return request, encode_request(request) + OVERSIZE_PADDING, []
    if kind is FaultKind.UNKNOWN_FIELD:
        request = DelWorkload(uid="zds-fault-unknown-field")
        return request, encode_request(request) + UNKNOWN_FIELD, []
    if kind in (FaultKind.NO_PAYLOAD, FaultKind.EMPTY_RECORD):
        return DelWorkload(uid=""), UNKNOWN_FIELD if kind is FaultKind.NO_PAYLOAD else b"", []
    if kind is FaultKind.ADD_WITHOUT_FD:
        request = AddWorkload(uid="zds-fault-add-without-fd", info=FAULT_INFO)
        return request, encode_request(request), []
    if kind is FaultKind.NOT_A_NETNS_FD:
        request = AddWorkload(uid="zds-fault-not-a-netns", info=FAULT_INFO)
        return request, encode_request(request), [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)]
    if kind is FaultKind.FD_ON_DEL:
        request = DelWorkload(uid="zds-fault-fd-on-del")
        return request, encode_request(request), [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)]
    if kind is FaultKind.KEEP_UNKNOWN_UID:
        request = KeepWorkload(uid=f"zds-fault-unknown-{fault.id}")
        return request, encode_request(request), []
    if kind is FaultKind.SECOND_SNAPSHOT_SENT:
        return SnapshotSent(), encode_request(SnapshotSent()), []
    pod = book.pod_for(spec)
    assert pod.netns is not None
    if kind is FaultKind.ADD_WITHOUT_WORKLOAD_INFO:
        request = MadeUpAdd(uid=pod.uid, info=None)
        return request, encode_request(request), [pod.netns.dup()]
    if kind is FaultKind.ADD_WITH_TWO_FDS:
        request = MadeUpAdd(uid=pod.uid, info=pod.spec.info)
        return request, pod.spec.add_workload_bytes, [pod.netns.dup(), pod.netns.dup()]
    return pod.spec.add_workload, pod.spec.add_workload_bytes, [pod.netns.dup()]


async def _write(
    conn: ZtunnelConnection, request: Request, payload: bytes, fds: list[int], *, bookkept: bool = False
) -> None:
    """Write one record (even an empty one) with its fds, which are closed here; unless
    ``bookkept``, the protocol object is told a request is in flight (when it is not the hello's turn)."""
    try:
        if not bookkept and conn.protocol.state is not ConnectionState.AWAITING_HELLO:
            conn.protocol.sent_unchecked(request, time.monotonic())
        if payload:
            # (as ZtunnelConnection._write: a ztunnel that does not read is not waited for)
            await conn.sock.send(payload, fds, within=conn.protocol.ack_timeout)
        else:
            conn.sock.socket.send(b"")  # the transport refuses to write an empty record; a fault does
    except OSError as exc:
        raise _close(conn, f"write failed: {exc}") from exc
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    kind = request_kind(request)
    conn.stats.sent += 1
    conn.stats.by_kind[kind] = conn.stats.by_kind.get(kind, 0) + 1
    conn._observer.sent(conn, request)


async def _wait_ack(conn: ZtunnelConnection, request: Request) -> Ack:
    try:
        while True:
            for event in await conn._receive():
                if isinstance(event, AckReceived):
                    return event.ack
    except ConnectionLost as lost:
        conn._observer.unanswered(conn, request, lost.reason)
        raise


def _take_fd(delivery: Delivery) -> list[int]:
    fd, delivery.fd = delivery.fd, None
    return [fd] if fd is not None else []


def _settle(delivery: Delivery, ack: Ack) -> Ack:
    if not delivery.result.done():
        delivery.result.set_result(ack)
    return ack


def _close(conn: ZtunnelConnection, reason: str) -> ConnectionLost:
    conn.close(reason)
    return ConnectionLost(conn.id, reason)
