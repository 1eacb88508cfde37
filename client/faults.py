"""Faults on demand in the ztunnel side: make ``zds ztunnel`` misbehave, to test a node agent.

Armed at start-up (``zds ztunnel --faults FILE``: YAML or JSON lines, one
``{kind, count, delay, text, after}`` per entry) or while it runs (``POST /faults``
on the admin endpoint, a JSON body with the same fields; ``GET /faults`` lists
them). ``after: N`` lets N records pass as usual before the fault acts. Each is logged and counted (``zds_ztunnel_faults_total{kind,outcome}``).

The ZDS client asks ``intercept`` about each record before the protocol sees
it, ``reply`` about each answer before it is written, and ``hello`` for the
bytes of its hello; the cost when nothing is armed is one check per record.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import socket
from collections.abc import Callable
from typing import Any

from zds import defaults
from zds.entryfile import EntryFileError, read_entries, real_number, whole_number
from zds.errors import ZdsError
from zds.protocol.messages import Ack, AddWorkload, encode_ack, encode_hello
from zds.protocol.reading import START_FAILURE
from zds.protocol.records import Record
from zds.protocol.workloads import SendReply
from zds.seqpacket import peer_hung_up

log = logging.getLogger("zds.ztunnel.faults")


class ZtunnelFaultKind(enum.Enum):
    """Every ztunnel-side fault and what it does."""

    NACK_ADDS = (
        "nack-adds",
        "answer the next --count AddWorkloads with --text (default: a start failure) and drop them",
    )
    DELAY_ACKS = (
        "delay-acks",
        "answer each of the next --count requests --delay seconds late (past a deadline)",
    )
    NEVER_ACK = ("never-ack", "process the next --count requests but never answer them")
    DISCONNECT_IN_SNAPSHOT = (
        "disconnect-in-snapshot",
        "close the connection after answering --count snapshot entries, before SnapshotSent",
    )
    SECOND_HELLO = ("second-hello", "send ZdsHello again (now, or right after the next connection's hello)")
    UNSOLICITED_ACK = ("unsolicited-ack", "send an Ack nobody asked for (now, or right after the next hello)")
    STOP_READING = (
        "stop-reading",
        "stop reading from the node agent (after --count more answers, default 0) for --delay seconds (0: for good)",
    )
    BAD_HELLO = (
        "bad-hello",
        "say ZdsHello{version: 2}, a version there is not, on the next connection (Istio's node agent serves it as V1)",
    )
    ACK_BLINDLY = (
        "ack-blindly",
        "answer the next --count records with an empty Ack without reading them (a ztunnel that checks nothing)",
    )
    NON_CANONICAL_ACK = (
        "non-canonical-ack",
        "answer the next --count requests with their Ack field written twice (valid protobuf, not canonical)",
    )

    def __init__(self, label: str, description: str) -> None:
        self.label = label
        self.description = description

    @classmethod
    def named(cls, label: str) -> ZtunnelFaultKind:
        for kind in cls:
            if kind.label == label:
                return kind
        raise ZtunnelFaultError(f"unknown fault {label!r}; one of {', '.join(k.label for k in cls)}")


class ZtunnelFaultError(ZdsError, ValueError):
    """A fault that cannot be armed; the message says why."""


class ZtunnelFault:
    """One armed fault, and what became of it (GET /faults shows ``as_dict``)."""

    __slots__ = ("count", "delay", "detail", "id", "kind", "passed", "remaining", "state", "text")

    def __init__(
        self,
        id: str,
        kind: ZtunnelFaultKind,
        count: int,
        delay: float,
        text: str,
        remaining: int,
        passed: int,
    ) -> None:
        self.id = id
        self.kind = kind
        self.count = count
        self.delay = delay
        self.text = text
        self.remaining = remaining
        #: Records (counted from the start of zds ztunnel) that must have passed before it acts:
        #: those seen when it was armed, plus ``after``.
        self.passed = passed
        self.state = "armed"
        self.detail = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.label,
            "count": self.count,
            "delay": self.delay,
            "text": self.text,
            "remaining": self.remaining,
            "after_records": self.passed,
            "state": self.state,
            "detail": self.detail,
        }


#: What a fault entry may say.
FIELDS = ("kind", "count", "delay", "text", "after")
#: The longest nack text a fault may give, and the most faults armed at once (each record
#: looks at every armed one; a POST /faults client could otherwise grow the ztunnel without end).
MAX_TEXT = 1024
MAX_ARMED = defaults.FAULTS_ARMED_MAX
#: A ZdsHello no node agent speaks: version 2 (Istio only logs the version; zds refuses it).
BAD_HELLO = b"\x08\x02"


class ZtunnelFaults:
    """The faults of one ``zds ztunnel``."""

    def __init__(
        self,
        on_count: Callable[[str, str], None] | None = None,
        on_nack: Callable[[str], None] | None = None,
    ) -> None:
        #: Told (kind, outcome) for every fault injected or applied (the metrics).
        self.on_count = on_count
        #: Told the text of every AddWorkload a fault nacked (the requests and nacks metrics).
        self.on_nack = on_nack
        self.faults: list[ZtunnelFault] = []
        self._ids = itertools.count(1)
        #: Answers given in the current snapshot (disconnect-in-snapshot counts them).
        self.snapshot_answers = 0
        #: Records received since zds ztunnel started (``after`` counts from here).
        self.records = 0
        #: The stop-reading in effect, and what ends it early (``clear``).
        self._stopped: ZtunnelFault | None = None
        self._resume: asyncio.Event | None = None

    @property
    def armed(self) -> bool:
        return any(f.state == "armed" for f in self.faults)

    def arm(self, entry: dict[str, Any]) -> ZtunnelFault:
        """Arm one fault from ``{kind, count, delay, text, after}`` (ZtunnelFaultError when it is wrong)."""
        if not isinstance(entry, dict):
            raise ZtunnelFaultError("a fault is an object with kind, count, delay, text, after")
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise ZtunnelFaultError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
        label = entry.get("kind", "")
        kind = ZtunnelFaultKind.named(label if isinstance(label, str) else repr(label))
        # As written, or refused (as the node agent's faults files): 1.7 was 1, "5" 5, true 1.
        stop_reading = kind is ZtunnelFaultKind.STOP_READING
        count = _whole(entry, "count", kind, 0 if stop_reading else 1, least=0 if stop_reading else 1)
        after = _whole(entry, "after", kind, 0, least=0)
        delay, text = entry.get("delay", 0.0), entry.get("text", "")
        if not real_number(delay):
            raise ZtunnelFaultError(f"{kind.label}: delay must be a number of seconds")
        if not 0 <= delay <= defaults.FAULT_DELAY_MAX:  # (also NaN)
            raise ZtunnelFaultError(f"{kind.label}: delay must be 0 to {defaults.FAULT_DELAY_MAX:g} seconds")
        if kind is ZtunnelFaultKind.DELAY_ACKS and delay <= 0:
            raise ZtunnelFaultError("delay-acks: give a delay in seconds (more than 0)")
        if delay and kind not in (ZtunnelFaultKind.DELAY_ACKS, ZtunnelFaultKind.STOP_READING):
            raise ZtunnelFaultError(f"{kind.label} takes no delay")
        if not isinstance(text, str) or not text.isprintable():
            raise ZtunnelFaultError(f"{kind.label}: text must be one line of printable text")
        if text and kind is not ZtunnelFaultKind.NACK_ADDS:
            raise ZtunnelFaultError(f"{kind.label} takes no text")
        if len(text) > MAX_TEXT:  # it goes out in an Ack: ztunnel's own texts are one line
            raise ZtunnelFaultError(f"{kind.label}: text is {len(text)} characters, over {MAX_TEXT}")
        remaining = 1 if kind is ZtunnelFaultKind.DISCONNECT_IN_SNAPSHOT else count
        if len([f for f in self.faults if f.state == "armed"]) >= MAX_ARMED:
            raise ZtunnelFaultError(f"{MAX_ARMED} faults are armed already; let some take effect first")
        # Those that took effect are kept for GET /faults, the last MAX_ARMED of them.
        done = [f for f in self.faults if f.state != "armed"]
        for old in done[: max(0, len(done) - MAX_ARMED)]:
            self.faults.remove(old)
        fault = ZtunnelFault(
            f"z{next(self._ids)}", kind, count, float(delay), text, remaining, self.records + after
        )
        self.faults.append(fault)
        log.warning("fault %s armed: %s (%s)", fault.id, kind.label, kind.description)
        self._count(kind, "injected")
        return fault

    def _take(self, kind: ZtunnelFaultKind, *, on_record: bool = True) -> ZtunnelFault | None:
        """The first armed fault of ``kind`` whose ``after`` records have passed (not counting the
        record being handled now, when ``on_record``)."""
        seen = self.records - 1 if on_record else self.records
        return next(
            (f for f in self.faults if f.state == "armed" and f.kind is kind and seen >= f.passed), None
        )

    def _used(self, fault: ZtunnelFault, detail: str) -> None:
        fault.remaining -= 1
        fault.detail = detail
        if fault.remaining <= 0:
            fault.state = "applied"
        log.warning("fault %s (%s) took effect: %s", fault.id, fault.kind.label, detail)
        self._count(fault.kind, "applied")

    def _count(self, kind: ZtunnelFaultKind, outcome: str) -> None:
        if self.on_count is not None:
            self.on_count(kind.label, outcome)

    # -- hooks of the ZDS client ------------------------------------------------------------
    def hello(self) -> bytes:
        """The hello to say on a new connection."""
        self.snapshot_answers = 0
        if fault := self._take(ZtunnelFaultKind.BAD_HELLO, on_record=False):
            self._used(fault, "said ZdsHello{version: 2}")
            return BAD_HELLO
        return encode_hello()

    def extras(self) -> list[bytes]:
        """Records to write now, unasked (second hello, an unsolicited ack)."""
        out = []
        if fault := self._take(ZtunnelFaultKind.SECOND_HELLO, on_record=False):
            self._used(fault, "sent a second ZdsHello")
            out.append(encode_hello())
        if fault := self._take(ZtunnelFaultKind.UNSOLICITED_ACK, on_record=False):
            self._used(fault, "sent an Ack nobody asked for")
            out.append(encode_ack(Ack()))
        return out

    def intercept(self, record: Record, sock: socket.socket) -> bytes | None:
        """Answer a record here instead of processing it (ack-blindly, nack-adds): the bytes of the
        answer, its fds closed; None: the record goes to the protocol as usual. The node agent
        closing the connection is no record (a real 0-byte record is: ack-blindly answers it)."""
        if record.is_eof and peer_hung_up(sock):
            return None
        self.records += 1
        if fault := self._take(ZtunnelFaultKind.ACK_BLINDLY):
            record.close_fds()
            self._used(fault, f"acked a {len(record.payload)}-byte record without reading it")
            return encode_ack(Ack())
        fault = self._take(ZtunnelFaultKind.NACK_ADDS)
        if fault is not None and _is_add(record):
            record.close_fds()
            text = fault.text or f"{START_FAILURE}nack requested (zds ztunnel fault {fault.id})"
            self._used(fault, f"nacked an AddWorkload: {text}")
            if self.on_nack is not None:
                self.on_nack(text)
            return encode_ack(Ack(text))
        return None

    async def reply(self, reply: SendReply, in_snapshot: bool) -> str:
        """Before an answer is written: "send", "skip" (never-ack) or "close" (after it, the
        snapshot is cut). Sleeps here for delay-acks."""
        if fault := self._take(ZtunnelFaultKind.NEVER_ACK):
            self._used(fault, f"left a request unanswered ({_what(reply)})")
            return "skip"
        if fault := self._take(ZtunnelFaultKind.DELAY_ACKS):
            await asyncio.sleep(fault.delay)
            self._used(fault, f"answered {_what(reply)} {fault.delay:g}s late")
        if fault := self._take(ZtunnelFaultKind.NON_CANONICAL_ACK):
            self._used(fault, f"answered {_what(reply)} with its Ack field twice")
            return "twice"
        stop = self._take(ZtunnelFaultKind.STOP_READING)
        if stop is not None and stop.remaining > 0:
            stop.remaining -= 1
        if in_snapshot and reply.request is not None and _what(reply) != "snapshot_sent":
            self.snapshot_answers += 1
            fault = self._take(ZtunnelFaultKind.DISCONNECT_IN_SNAPSHOT)
            if fault is not None and self.snapshot_answers >= fault.count:
                self._used(fault, f"closed the connection after {self.snapshot_answers} snapshot entries")
                return "close"
        return "send"

    async def wait_to_read(self) -> None:
        """Hold the reader while stop-reading is in effect."""
        fault = self._take(ZtunnelFaultKind.STOP_READING, on_record=False)
        if fault is None or fault.remaining > 0:
            return
        fault.remaining = 1  # _used takes it to 0: applied
        self._used(fault, "stopped reading" + (f" for {fault.delay:g}s" if fault.delay else " for good"))
        self._stopped, self._resume = fault, asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(fault.delay or None):  # (0: until it is cleared)
                    await self._resume.wait()
        finally:
            self._stopped = self._resume = None

    def clear(self, fault_id: str = "") -> list[ZtunnelFault]:
        """Disarm the armed fault ``fault_id`` (every armed one: "") and end the stop-reading
        in effect it names (any, with ""); the faults cleared. ZtunnelFaultError when there is
        no such fault."""
        cleared = [
            f
            for f in self.faults
            if (f.state == "armed" or f is self._stopped) and (not fault_id or f.id == fault_id)
        ]
        if fault_id and not cleared:
            raise ZtunnelFaultError(f"no armed fault {fault_id} (GET /faults lists them)")
        for fault in cleared:
            fault.state, fault.detail = "cleared", "cleared (DELETE /faults)"
            log.warning("fault %s (%s) cleared", fault.id, fault.kind.label)
            if fault is self._stopped and self._resume is not None:
                self._resume.set()
        return cleared


def _is_add(record: Record) -> bool:
    from zds.errors import CodecError
    from zds.protocol.messages import decode_request

    try:
        return isinstance(decode_request(record.payload), AddWorkload)
    except CodecError:
        return False


def _what(reply: SendReply) -> str:
    from zds.protocol.messages import request_kind

    return request_kind(reply.request) if reply.request is not None else "a record"


def _whole(entry: dict[str, Any], name: str, kind: ZtunnelFaultKind, default: int, *, least: int) -> int:
    """``entry[name]``: a whole number from ``least`` to INT32_MAX (not a bool, a float, a string)."""
    value = entry.get(name, default)
    if not whole_number(value, least):
        raise ZtunnelFaultError(
            f"{kind.label}: {name} must be a whole number from {least} to {defaults.INT32_MAX}"
        )
    return int(value)


def load_faults(path: str, faults: ZtunnelFaults) -> list[ZtunnelFault]:
    """Arm every fault of a faults file (YAML list, ``faults:`` holding one, or JSON lines)."""
    try:
        entries = read_entries(path, key="faults", what="fault", max_entries=MAX_ARMED)
    except EntryFileError as exc:
        raise ZtunnelFaultError(str(exc)) from exc
    armed = []
    for entry, where in entries:
        try:
            armed.append(faults.arm(entry))
        except ZtunnelFaultError as exc:
            raise ZtunnelFaultError(f"{where}: {exc}") from None
    return armed
