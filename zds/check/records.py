"""A strict ztunnel's reading of what a node agent sends, sans-I/O.

Each record is described once (``Seen``: bytes, fds, flags, the request it
decodes to) and checked against the rules ztunnel and Istio's node agent live
by, per connection (``ConnectionRules``): nothing before the hello, one request
in flight, at most 1024 bytes, strict and canonical protobuf, exactly one netns
fd on an Add and none elsewhere, ``workload_info`` on every Add, nothing but
updates after SnapshotSent. ``ztunnel_answer`` says what real ztunnel would
answer, so the node agent under test hears what it would hear in production.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from zds import defaults
from zds.check.report import Finding
from zds.errors import CodecError, NoPayload
from zds.gen import zds_pb2
from zds.netns.kernel import CLONE_NEWNET, NS_GET_NSTYPE
from zds.protocol.messages import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Request,
    SnapshotSent,
    decode_request,
    encode_request,
    kept_aside,
    request_kind,
    request_label,
)
from zds.protocol.reading import PROCESS_FAILURE, READ_FAILURE, START_FAILURE

_NS_NAMES = {0x00020000: "mnt", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc"}
_NS_NAMES |= {0x10000000: "user", 0x20000000: "pid", 0x40000000: "net", 0x00000080: "time"}

_FD_SIZE = array.array("i").itemsize  # (a RawFd)
#: The fds ztunnel's read_message can receive: its control buffer is ``cmsg_space!(RawFd)``,
#: which alignment makes room for two on 64-bit; the kernel closes the rest (MSG_CTRUNC).
ZTUNNEL_FD_ROOM = (socket.CMSG_SPACE(_FD_SIZE) - socket.CMSG_LEN(0)) // _FD_SIZE


@dataclass(frozen=True)
class FdInfo:
    """What one received fd is: a network namespace (and which), or something else."""

    #: "net" for a network namespace, another namespace type, or "" for no namespace at all.
    nstype: str
    #: (st_dev, st_ino) of what the fd refers to.
    identity: tuple[int, int]
    #: readlink of the fd ("net:[4026532897]", "/dev/null").
    target: str

    @property
    def is_netns(self) -> bool:
        return self.nstype == "net"

    def __str__(self) -> str:
        kind = (
            "netns" if self.is_netns else (f"{self.nstype} namespace" if self.nstype else "not a namespace")
        )
        return f"{kind} {self.target}"


def describe_fd(fd: int) -> FdInfo:
    """Ask the kernel what ``fd`` is: ``ioctl(NS_GET_NSTYPE)``, as ztunnel's ``validate_ns``."""
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        name = "net" if nstype == CLONE_NEWNET else _NS_NAMES.get(nstype, f"type {nstype:#x}")
    except OSError as exc:
        name = "" if exc.errno in (errno.ENOTTY, errno.EINVAL) else f"unknown ({exc.strerror})"
    st = os.fstat(fd)
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = f"fd {fd}"
    return FdInfo(nstype=name, identity=(st.st_dev, st.st_ino), target=target)


@dataclass
class Seen:
    """One record a node agent sent, as the strict ztunnel received it (its fds already closed)."""

    conn: int
    index: int
    at: float
    payload: bytes
    fds: list[FdInfo]
    flags: int
    request: Request | None = None
    #: Why the bytes are not a strict WorkloadRequest ("" when they are).
    decode_error: str = ""
    #: What real ztunnel would answer ("" is a clean ack), decided when it arrived.
    answer: str = ""

    @property
    def where(self) -> str:
        return f"conn {self.conn}, record {self.index}"

    @property
    def kind(self) -> str:
        return request_kind(self.request) if self.request is not None else "undecodable record"

    @property
    def uid(self) -> str:
        return getattr(self.request, "uid", "")

    @property
    def label(self) -> str:
        """``AddWorkload uid=...`` (how findings name a record)."""
        return request_label(self.request) if self.request is not None else self.kind

    @property
    def truncated(self) -> bool:
        return bool(self.flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))


def receive(conn: int, index: int, at: float, payload: bytes, fds: list[int], flags: int) -> Seen:
    """Describe a received record, closing its fds (only what they are is kept)."""
    seen = Seen(conn=conn, index=index, at=at, payload=payload, fds=take_fds(fds), flags=flags)
    seen.request, seen.decode_error = strict_decode(payload)
    return seen


def take_fds(fds: list[int]) -> list[FdInfo]:
    """What each received fd is, every one of them closed."""
    infos = []
    for fd in fds:
        try:
            infos.append(describe_fd(fd))
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return infos


def strict_decode(payload: bytes) -> tuple[Request | None, str]:
    """The request in ``payload`` and why it is not strict ("" when it is): what ztunnel
    cannot read (a protobuf error, a known field with another wire type), no payload, a
    field ztunnel does not know (prost drops it without a word)."""
    try:
        request = decode_request(payload)
    except NoPayload:
        return None, "a WorkloadRequest with no payload (ztunnel: 'no payload')"
    except CodecError as exc:
        return None, f"not a WorkloadRequest: {exc.__cause__ or exc}"
    msg = zds_pb2.WorkloadRequest()
    msg.ParseFromString(payload)
    unknown = [f"{descriptor.name} field {number}" for descriptor, number in kept_aside(msg)]
    if unknown:
        hint = ""
        if isinstance(request, DelWorkload) and "DelWorkload field 1" in unknown:
            hint = " (DelWorkload's uid is field 2, not 1: ztunnel reads an empty uid)"
        return request, f"fields ztunnel does not know: {', '.join(unknown)}{hint}"
    return request, ""


def canonical(seen: Seen) -> bytes | None:
    """The canonical bytes of the record's request (None when it does not decode)."""
    return encode_request(seen.request) if seen.request is not None else None


def ztunnel_answer(seen: Seen, snapshot_done: bool) -> str:
    """What real ztunnel answers this record with ("" is a clean ack): its read checks
    (protocol.rs), then its state rules (statemanager.rs)."""
    if _fds_cut(seen):
        return f"{READ_FAILURE}ENOBUFS: No buffer space available"
    if len(seen.fds) > 1:
        return f"{READ_FAILURE}{_too_many_fds(seen)}"
    if seen.truncated or len(seen.payload) > defaults.MAX_MESSAGE_SIZE:
        return f"{READ_FAILURE}received truncated message"
    request = seen.request
    if request is None:
        return READ_FAILURE + ("no payload" if "no payload" in seen.decode_error else seen.decode_error)
    if isinstance(request, AddWorkload) and not seen.fds:
        return f"{READ_FAILURE}No control message"
    if not isinstance(request, AddWorkload) and seen.fds:
        return f"{READ_FAILURE}Unexpected control message"
    if isinstance(request, AddWorkload) and request.info is None:
        return f'{PROCESS_FAILURE}ProtocolError("workload_info is required but not present")'
    if isinstance(request, KeepWorkload) and snapshot_done:
        return f'{PROCESS_FAILURE}ProtocolError("pod keep received after snapshot")'
    if isinstance(request, SnapshotSent) and snapshot_done:
        return f'{PROCESS_FAILURE}ProtocolError("pod snapshot received already")'
    if isinstance(request, AddWorkload) and not seen.fds[0].is_netns:
        return f'{START_FAILURE}Io(Os {{ code: 22, kind: InvalidInput, message: "Invalid argument" }})'
    return ""


def _fds_cut(seen: Seen) -> bool:
    """Whether ztunnel's own control buffer would have been cut (MSG_CTRUNC): more fds than
    its room for two (this strict ztunnel reads with a larger buffer, so it sees them all),
    or our own buffer cut."""
    return bool(seen.flags & socket.MSG_CTRUNC) or len(seen.fds) > ZTUNNEL_FD_ROOM


def _too_many_fds(seen: Seen) -> str:
    """ztunnel's read error for more than one fd: 'Expected 1 FD, got 2' while they fit its
    buffer; past that its nix (0.31) refuses the cut control buffer (RecvMsg::cmsgs: ENOBUFS)."""
    if _fds_cut(seen):
        return "ENOBUFS: No buffer space available"
    return f"Expected 1 FD, got {len(seen.fds)}"


#: Called with (check name, finding) for every departure a record shows.
Report = Callable[[str, Finding], None]


@dataclass
class ConnectionRules:
    """The record rules of one connection, applied to each record as it arrives."""

    conn: int
    report: Report
    #: What each rule was exercised on (check name -> records), for the evidence.
    exercised: Counter[str] = field(default_factory=Counter)
    hello_sent: bool = False
    snapshot_done: bool = False
    #: The record still waiting for our answer.
    unanswered: Seen | None = None
    #: A record was already waiting when ``answered`` was: it was sent before our answer to
    #: this one (the reader has not read it yet; it is judged when it is).
    overtaken: Seen | None = None
    #: The ack of ``unanswered`` is withheld on purpose (the ack-deadline scenario): a record
    #: arriving meanwhile is judged by that scenario, not by the one-in-flight rule.
    withholding: bool = False
    #: The netns identity of the pod the check made with this uid (None: not one of its pods),
    #: looked up as each Add arrives: a pod made after the connection opened is compared too.
    netns_of: Callable[[str], tuple[int, int] | None] = lambda uid: None

    def inspect(self, seen: Seen) -> None:
        """Check one record; departures go to ``report``."""
        if not self.hello_sent:
            self.report(
                "hello-first",
                Finding(f"{seen.label} arrived before ztunnel's hello", seen.where, received=seen.payload),
            )
        before = self.unanswered or self.overtaken
        self.overtaken = None
        if before is not None and not self.withholding:
            self.unanswered = before
            self.report(
                "one-in-flight",
                Finding(
                    f"{seen.label} arrived while {self.unanswered.label} ({self.unanswered.where}) was not acked yet",
                    seen.where,
                    received=seen.payload,
                    detail=[
                        "acks correlate by order only: ztunnel's next ack would be taken for the wrong request"
                    ],
                ),
            )
        self._inspect_bytes(seen)
        self._inspect_fds(seen)
        seen.answer = ztunnel_answer(seen, self.snapshot_done)
        self._inspect_state(seen)
        self.unanswered = seen

    def answered(self, *, more_waiting: bool = False) -> None:
        """Our answer to ``unanswered`` is going out; ``more_waiting``: the socket held another
        record already (sent before it could have seen our answer)."""
        if more_waiting and self.unanswered is not None:
            self.overtaken = self.unanswered
        self.unanswered = None

    def _inspect_bytes(self, seen: Seen) -> None:
        for name in ("record-size", "strict-decoding", "canonical-encoding"):
            self.exercised[name] += 1
        if len(seen.payload) > defaults.MAX_MESSAGE_SIZE or seen.flags & socket.MSG_TRUNC:
            self.report(
                "record-size",
                Finding(
                    f"{seen.label} is {len(seen.payload)} bytes; ztunnel reads {defaults.MAX_MESSAGE_SIZE} "
                    "and refuses the rest: 'failure to read message : received truncated message'",
                    seen.where,
                    received=seen.payload,
                ),
            )
        if seen.decode_error:
            self.report(
                "strict-decoding",
                Finding(f"{seen.label}: {seen.decode_error}", seen.where, received=seen.payload),
            )
        expected = canonical(seen)
        if expected is not None and expected != seen.payload:
            self.report(
                "canonical-encoding",
                Finding(
                    f"{seen.label} is not in canonical form ({len(seen.payload)} bytes, canonical {len(expected)})",
                    seen.where,
                    received=seen.payload,
                    detail=[f"canonical ({len(expected)} bytes): {expected.hex(' ')}"],
                ),
            )

    def _inspect_fds(self, seen: Seen) -> None:
        if isinstance(seen.request, AddWorkload):
            self.exercised["add-one-fd"] += 1
            if len(seen.fds) != 1:
                self.report(
                    "add-one-fd",
                    Finding(
                        f"{seen.label} carried {len(seen.fds)} fds"
                        + (" (more than fit: MSG_CTRUNC)" if seen.flags & socket.MSG_CTRUNC else ""),
                        seen.where,
                        received=seen.payload,
                        detail=[f"fd: {info}" for info in seen.fds]
                        + [
                            "ztunnel: "
                            + (
                                "'No control message'"
                                if not seen.fds and not _fds_cut(seen)
                                else f"'{_too_many_fds(seen)}'"
                            )
                        ],
                    ),
                )
            for info in seen.fds:
                self.exercised["fd-is-netns"] += 1
                if not info.is_netns:
                    self.report(
                        "fd-is-netns",
                        Finding(
                            f"{seen.label} carried an fd that is not a network namespace: {info}",
                            seen.where,
                            received=seen.payload,
                        ),
                    )
                    continue
                expected = self.netns_of(seen.uid)
                if expected is not None:
                    self.exercised["add-netns-is-the-pods"] += 1
                    if info.identity != expected:
                        self.report(
                            "add-netns-is-the-pods",
                            Finding(
                                f"{seen.label} carried {info}, not the pod's own netns "
                                f"(dev {expected[0]}, ino {expected[1]})",
                                seen.where,
                                received=seen.payload,
                            ),
                        )
        elif seen.request is not None:
            self.exercised["fd-only-on-add"] += 1
            if seen.fds:
                self.report(
                    "fd-only-on-add",
                    Finding(
                        f"{seen.label} carried {len(seen.fds)} fd(s); only AddWorkload may "
                        "(ztunnel: 'Unexpected control message')",
                        seen.where,
                        received=seen.payload,
                        detail=[f"fd: {info}" for info in seen.fds],
                    ),
                )

    def _inspect_state(self, seen: Seen) -> None:
        request = seen.request
        if isinstance(request, AddWorkload):
            self.exercised["add-workload-info"] += 1
            if request.info is None:
                self.report(
                    "add-workload-info",
                    Finding(f"{seen.label} has no workload_info", seen.where, received=seen.payload),
                )
        if self.snapshot_done:
            self.exercised["no-keep-after-snapshot"] += 1
            self.exercised["one-snapshot-sent"] += 1
            if isinstance(request, KeepWorkload):
                self.report(
                    "no-keep-after-snapshot",
                    Finding(f"{seen.label} after SnapshotSent", seen.where, received=seen.payload),
                )
            if isinstance(request, SnapshotSent):
                self.report(
                    "one-snapshot-sent",
                    Finding("a second SnapshotSent on this connection", seen.where, received=seen.payload),
                )
        if isinstance(request, SnapshotSent):
            self.snapshot_done = True
