"""Every line of the golden wire vectors encodes and decodes byte-exactly."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from tests.harness import wire_vectors
from zds.errors import CodecError, NoPayload
from zds.gen import zds_pb2
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
)

#: The same messages as zds values, by vector name.
EXPECTED = {
    "hello_v1": Hello(version=1),
    "add": AddWorkload(
        uid="pod-uid-1",
        info=WorkloadInfo(
            name="productpage-v1", namespace="bookinfo", service_account="bookinfo-productpage"
        ),
    ),
    "keep": KeepWorkload(uid="pod-uid-2"),
    "del": DelWorkload(uid="pod-uid-1"),
    "snapshot_sent": SnapshotSent(),
    "ack_ok": Ack(),
    "ack_err": Ack(error="failed to start proxy"),
}

VECTOR_ROWS = wire_vectors()


def test_every_vector_has_an_expectation() -> None:
    assert sorted(name for name, *_ in VECTOR_ROWS) == sorted(EXPECTED)


@pytest.mark.parametrize(("name", "message", "text", "wire"), VECTOR_ROWS, ids=[r[0] for r in VECTOR_ROWS])
def test_vector_round_trips(name: str, message: str, text: str, wire: bytes) -> None:
    value = EXPECTED[name]
    if message == "ZdsHello":
        assert isinstance(value, Hello)
        assert encode_hello(value) == wire
        assert decode_hello(wire) == value
    elif message == "WorkloadRequest":
        assert isinstance(value, AddWorkload | KeepWorkload | DelWorkload | SnapshotSent)
        assert encode_request(value) == wire
        assert decode_request(wire) == value
    else:
        assert message == "WorkloadResponse"
        assert isinstance(value, Ack)
        assert encode_ack(value) == wire
        assert decode_ack(wire) == value


@pytest.mark.parametrize(("name", "message", "text", "wire"), VECTOR_ROWS, ids=[r[0] for r in VECTOR_ROWS])
def test_vector_text_format_matches_the_generated_schema(
    name: str, message: str, text: str, wire: bytes
) -> None:
    """The text_format column parses against our schema into exactly the vector's bytes."""
    msg = getattr(zds_pb2, message)()
    text_format.Parse(text, msg)
    assert msg.SerializeToString() == wire


def test_delete_uses_field_number_two() -> None:
    # 0x12 = field 2, wire type 2 inside DelWorkload; a field-1 uid would be 0x0a.
    assert encode_request(DelWorkload(uid="x")) == bytes.fromhex("1203") + bytes.fromhex("1201") + b"x"


def test_no_request_encodes_to_an_empty_record() -> None:
    # ztunnel reads a 0-byte record as EOF.
    for request in (
        SnapshotSent(),
        KeepWorkload(uid=""),
        DelWorkload(uid=""),
        AddWorkload(uid="", info=None),
    ):
        assert encode_request(request) != b""


def test_add_without_workload_info_decodes_as_none() -> None:
    assert decode_request(encode_request(AddWorkload(uid="u", info=None))) == AddWorkload(uid="u", info=None)


def test_an_add_with_every_workload_info_field_empty_still_carries_the_workload_info() -> None:
    """Present but empty is not absent: ztunnel tells an Add without ``workload_info`` from one
    with an empty one (the ``add-without-workload-info`` fault sends the former on purpose)."""
    empty = AddWorkload(uid="u", info=WorkloadInfo(name="", namespace="", service_account=""))
    # WorkloadRequest.add (field 1) holding uid (field 1) and an empty workload_info (field 2)
    assert encode_request(empty) == bytes.fromhex("0a05") + bytes.fromhex("0a0175") + bytes.fromhex("1200")
    assert decode_request(encode_request(empty)) == empty
    assert encode_request(AddWorkload(uid="u", info=None)) == bytes.fromhex("0a03") + bytes.fromhex("0a0175")


def test_request_without_payload_is_refused() -> None:
    with pytest.raises(NoPayload, match="no payload"):
        decode_request(b"")


def test_garbage_is_refused() -> None:
    with pytest.raises(CodecError, match="cannot decode WorkloadRequest"):
        decode_request(b"\x0a\xff\xff")


@pytest.mark.parametrize(
    ("hexbytes", "where"),
    [
        ("0805", "WorkloadRequest field 1"),  # add as a varint
        ("0a0408051200", "AddWorkload field 1"),  # uid as a varint
        ("0a050a01751001", "AddWorkload field 2"),  # workload_info as a varint
        ("0a070a017512020801", "WorkloadInfo field 1"),  # the name as a varint
        ("12021001", "DelWorkload field 2"),  # uid as a varint
        ("2a020801", "KeepWorkload field 1"),  # uid as a varint
        # in a member a later one replaced (upb drops it with what it held; prost fails)
        ("0a020803" + "12030a0178", "AddWorkload field 1"),  # add{uid as a varint}, then del
        ("0a080a027531120208012a030a016b", "WorkloadInfo field 1"),  # add{info{name as a varint}}, then keep
        ("0a020801" + "1a00", "AddWorkload field 1"),  # add{uid as a varint}, then snapshot_sent
    ],
)
def test_a_known_field_with_another_wire_type_is_refused_as_ztunnel_refuses_it(
    hexbytes: str, where: str
) -> None:
    # upb keeps such a field aside as unknown (Go too); ztunnel's prost fails the message
    with pytest.raises(CodecError, match=f"{where} has the wrong wire type"):
        decode_request(bytes.fromhex(hexbytes))


def test_fields_the_schema_lacks_are_skipped_as_prost_skips_them() -> None:
    # AddWorkload{uid: "u", field 9: varint 1}
    assert decode_request(bytes.fromhex("0a050a01754801")) == AddWorkload(uid="u", info=None)


def test_response_without_ack_is_refused() -> None:
    with pytest.raises(NoPayload, match="no ack"):
        decode_ack(b"")


@pytest.mark.parametrize("error", ["e" * 1018, "e" * 1019, "\\x7f" * 300, "é" * 600, "€" * 5000])
def test_a_nack_is_cut_to_fit_the_record_a_node_agent_reads_it_into(error: str) -> None:
    """A node agent reads an ack into 1,024 bytes (Istio's and zds's): a longer one was a
    truncated message there and the connection lost, again on the next connection."""
    data = encode_ack(Ack(error))
    assert len(data) <= 1024
    said = decode_ack(data).error
    if len(error.encode()) <= 1018:
        assert said == error
    else:
        assert said.endswith("...") and error.startswith(said.removesuffix("...")) and len(data) >= 1021
    # Whole, for `zds check ztunnel` to compare with what another ztunnel sent (upstream's is never cut).
    assert decode_ack(encode_ack(Ack(error), whole=True)).error == error
