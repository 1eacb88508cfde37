"""ZDS messages as plain Python values, and their protobuf wire codec.

The wire bytes must equal Istio's (``tests/data/zds-wire.tsv``); the
protobuf runtime does the encoding, these types keep the rest of zds free of
generated classes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple, cast

from google.protobuf.message import DecodeError, Message

from zds import defaults
from zds.errors import CUT_MARK, CodecError, NoPayload, cut_to_bytes
from zds.gen import zds_pb2
from zds.values import frozen

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

#: ``Version.V1``, the only version ztunnel speaks.
VERSION_V1 = zds_pb2.V1


@frozen
class Hello(NamedTuple):
    """``ZdsHello``: the first record ztunnel sends."""

    version: int = VERSION_V1


@frozen
class WorkloadInfo(NamedTuple):
    """Who a workload is: ``WorkloadInfo`` (name, namespace, service account)."""

    name: str
    namespace: str
    service_account: str


@frozen
class AddWorkload(NamedTuple):
    """``AddWorkload``: start serving a pod; its netns fd travels with it.

    ``info`` is None only when a peer sent an Add without ``workload_info``
    (a protocol error ztunnel refuses).
    """

    uid: str
    info: WorkloadInfo | None


@frozen
class KeepWorkload(NamedTuple):
    """``KeepWorkload``: snapshot only; keep the workload although no fd comes with it."""

    uid: str


@frozen
class DelWorkload(NamedTuple):
    """``DelWorkload``: stop serving a pod."""

    uid: str


@frozen
class SnapshotSent(NamedTuple):
    """``SnapshotSent``: the snapshot is complete; drop what it did not name."""


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


@frozen
class Ack(NamedTuple):
    """``Ack``: the answer to every request; an empty error means success."""

    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def request_kind(request: Request) -> str:
    """The oneof field name of a request: add, keep, del or snapshot_sent."""
    match request:
        case AddWorkload():
            return "add"
        case KeepWorkload():
            return "keep"
        case DelWorkload():
            return "del"
        case SnapshotSent():
            return "snapshot_sent"
    raise TypeError(f"not a ZDS request: {request!r}")


def request_label(request: Request) -> str:
    """How a message names a request: ``AddWorkload uid=u1``, ``SnapshotSent``."""
    uid = getattr(request, "uid", "")
    return f"{type(request).__name__} uid={uid}" if uid else type(request).__name__


def encode_hello(hello: Hello | None = None) -> bytes:
    """The hello's bytes (``Hello()``, version 1, when none is given)."""
    version = VERSION_V1 if hello is None else hello.version
    return bytes(zds_pb2.ZdsHello(version=version).SerializeToString())  # type: ignore[arg-type]


def decode_hello(payload: bytes) -> Hello:
    msg = zds_pb2.ZdsHello()
    _parse(msg, payload, "ZdsHello")
    return Hello(version=int(msg.version))


def _to_proto(request: Request) -> zds_pb2.WorkloadRequest:
    match request:
        case AddWorkload(uid=uid, info=info):
            # Written in place (each part set even when empty, as a copy of it would be): built
            # apart, each was copied into the next, on every pod's enrollment.
            msg = zds_pb2.WorkloadRequest()
            add = msg.add
            add.SetInParent()
            add.uid = uid
            if info is not None:
                workload_info = add.workload_info
                workload_info.SetInParent()
                workload_info.name = info.name
                workload_info.namespace = info.namespace
                workload_info.service_account = info.service_account
            return msg
        case KeepWorkload(uid=uid):
            return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid))
        case DelWorkload(uid=uid):
            msg = zds_pb2.WorkloadRequest()
            getattr(msg, "del").uid = uid  # "del" is a Python keyword
            return msg
        case SnapshotSent():
            return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent())
    raise TypeError(f"not a ZDS request: {request!r}")


def encode_request(request: Request) -> bytes:
    """``WorkloadRequest`` bytes for a request (never empty: a 0-byte record reads as EOF)."""
    return bytes(_to_proto(request).SerializeToString())


def decode_request(payload: bytes) -> Request:
    """Parse a ``WorkloadRequest`` as ztunnel (prost) does; raise CodecError if it is
    malformed (also a known field sent with another wire type) or has no payload."""
    msg = zds_pb2.WorkloadRequest()
    _parse(msg, payload, "WorkloadRequest")
    request = _request_of(msg)
    msg.DiscardUnknownFields()
    if request is None or msg.ByteSize() != len(payload):  # bytes kept aside or dropped: look closer
        # (every payload member kept: upb drops one a later member replaced, with whatever it held)
        every = _every_member()()
        every.ParseFromString(payload)
        for descriptor, number in kept_aside(every):
            if number in descriptor.fields_by_number:
                # upb (and Go) keep such a field aside, unknown; prost fails the whole message
                raise CodecError(
                    f"cannot decode WorkloadRequest ({len(payload)} bytes): "
                    f"{descriptor.name} field {number} has the wrong wire type"
                )
    if request is None:
        raise NoPayload("WorkloadRequest has no payload")
    return request


@functools.cache
def _every_member() -> type[Message]:
    """``WorkloadRequest`` with its payload's members as fields of their own, not one oneof:
    upb (and Go) drop a member a later one replaces, and a known field in it sent with
    another wire type with it, where ztunnel's prost checks every field as it reads it and
    fails the whole message. The schema's own descriptor, copied into a pool of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    schema = descriptor_pb2.FileDescriptorProto()
    zds_pb2.DESCRIPTOR.CopyToProto(schema)
    (request,) = (m for m in schema.message_type if m.name == "WorkloadRequest")
    for field in request.field:
        field.ClearField("oneof_index")
    del request.oneof_decl[:]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{schema.package}.WorkloadRequest"))


def kept_aside(msg: Message) -> list[tuple[Descriptor, int]]:
    """(message type, field number) of each field the parser kept as unknown, in ``msg`` and
    the messages in it: numbers the schema lacks, or has with another wire type."""
    from google.protobuf import unknown_fields  # (rare: not on the start-up path)

    descriptor = cast("Descriptor", msg.DESCRIPTOR)
    found = [(descriptor, f.field_number) for f in unknown_fields.UnknownFieldSet(msg)]  # type: ignore[attr-defined]
    for field, value in msg.ListFields():
        if field.message_type is not None:
            found += kept_aside(value)
    return found


def _request_of(msg: zds_pb2.WorkloadRequest) -> Request | None:
    which = msg.WhichOneof("payload")
    if which == "add":
        info = None
        if msg.add.HasField("workload_info"):
            wi = msg.add.workload_info
            info = WorkloadInfo(name=wi.name, namespace=wi.namespace, service_account=wi.service_account)
        return AddWorkload(uid=msg.add.uid, info=info)
    if which == "keep":
        return KeepWorkload(uid=msg.keep.uid)
    if which == "del":
        return DelWorkload(uid=getattr(msg, "del").uid)
    if which == "snapshot_sent":
        return SnapshotSent()
    return None


#: ``WorkloadResponse{ack: Ack{}}``: field 1, length-delimited, empty (the vectors' clean ack).
CLEAN_ACK = b"\n\x00"
_CLEAN = Ack()


def encode_ack(ack: Ack, *, whole: bool = False) -> bytes:
    """``WorkloadResponse{ack}`` bytes (``0a 00`` for a clean ack: every pod's, written once).
    An error text too long for the reader's 1,024-byte record is cut to fit, ``...`` at its
    end: a node agent reads an ack into that much (Istio's and zds's), and one longer was a
    truncated message there, the connection lost, and the same nack again on the next.
    ``whole``: never cut (the canonical bytes of what another ztunnel sent, to compare)."""
    if not ack.error:
        return CLEAN_ACK
    data = _ack_bytes(ack.error)
    if len(data) > defaults.MAX_MESSAGE_SIZE and not whole:
        framing = len(data) - len(ack.error.encode())  # (the tags and lengths around the text)
        data = _ack_bytes(cut_to_bytes(ack.error, defaults.MAX_MESSAGE_SIZE - framing - len(CUT_MARK)))
    return data


def _ack_bytes(error: str) -> bytes:
    return bytes(zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString())


def decode_ack(payload: bytes) -> Ack:
    """Parse a ``WorkloadResponse``; raise CodecError if it is malformed or not an ack."""
    if payload == CLEAN_ACK:
        return _CLEAN  # every pod's answer: the same bytes, the same (immutable) ack
    msg = zds_pb2.WorkloadResponse()
    _parse(msg, payload, "WorkloadResponse")
    if msg.WhichOneof("payload") != "ack":
        raise NoPayload("WorkloadResponse has no ack")
    return Ack(error=msg.ack.error)


def _parse(msg: object, payload: bytes, name: str) -> None:
    try:
        msg.ParseFromString(payload)  # type: ignore[attr-defined]
    except DecodeError as exc:
        raise CodecError(f"cannot decode {name} ({len(payload)} bytes): {exc}") from exc
