"""Properties of the ZDS wire codec (zds.protocol.messages), for any uid, name or bytes.

The golden vectors pin a handful of messages byte for byte (tests/test_codec.py);
these pin the rest: every request and ack survives a round trip whatever text it
carries, nothing encodes to the 0-byte record ztunnel reads as EOF, and no input
makes a decoder raise anything but CodecError.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import wire_vectors
from zds.errors import CodecError, NoPayload
from zds.protocol.messages import (
    Ack,
    AddWorkload,
    DelWorkload,
    Hello,
    KeepWorkload,
    Request,
    SnapshotSent,
    WorkloadInfo,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_hello,
    encode_request,
    request_kind,
)

PROPERTY_SETTINGS = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Any text protobuf can carry: every code point UTF-8 can encode (no lone surrogates).
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)

INFOS = st.builds(WorkloadInfo, name=TEXT, namespace=TEXT, service_account=TEXT)

REQUESTS: st.SearchStrategy[Request] = st.one_of(
    st.builds(AddWorkload, uid=TEXT, info=INFOS),
    st.builds(AddWorkload, uid=TEXT, info=st.none()),
    st.builds(KeepWorkload, uid=TEXT),
    st.builds(DelWorkload, uid=TEXT),
    st.just(SnapshotSent()),
)

ACKS = st.builds(Ack, error=TEXT)

#: Field numbers neither WorkloadRequest nor WorkloadResponse defines (1, 2, 3 and 5 are taken).
UNKNOWN_FIELDS = st.integers(min_value=6, max_value=2**29 - 1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _unknown_varint_field(number: int, value: int) -> bytes:
    """One field of wire type 0 (varint) that no ZDS message knows."""
    return _varint(number << 3) + _varint(value)


@PROPERTY_SETTINGS
@given(REQUESTS)
def test_every_request_survives_a_round_trip(request: Request) -> None:
    assert decode_request(encode_request(request)) == request


@PROPERTY_SETTINGS
@given(REQUESTS)
def test_no_request_encodes_to_the_empty_record_ztunnel_reads_as_eof(request: Request) -> None:
    assert encode_request(request)


@PROPERTY_SETTINGS
@given(REQUESTS)
def test_the_decoded_request_has_the_kind_that_was_encoded(request: Request) -> None:
    assert request_kind(decode_request(encode_request(request))) == request_kind(request)


@PROPERTY_SETTINGS
@given(st.builds(AddWorkload, uid=TEXT, info=INFOS))
def test_an_add_with_empty_workload_info_still_carries_it(request: AddWorkload) -> None:
    # ztunnel refuses an Add without workload_info (a fatal ProtocolError): an info
    # whose fields are all empty must still be on the wire, present.
    decoded = decode_request(encode_request(request))
    assert isinstance(decoded, AddWorkload)
    assert decoded.info is not None


@PROPERTY_SETTINGS
@given(ACKS)
def test_every_ack_survives_a_round_trip_and_is_never_empty(ack: Ack) -> None:
    data = encode_ack(ack)
    assert data
    assert decode_ack(data) == ack
    assert decode_ack(data).ok == (ack.error == "")


@PROPERTY_SETTINGS
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_every_hello_version_survives_a_round_trip(version: int) -> None:
    assert decode_hello(encode_hello(Hello(version=version))) == Hello(version=version)


@PROPERTY_SETTINGS
@given(st.binary(max_size=80))
def test_decoding_any_bytes_as_a_request_gives_a_request_or_a_codec_error(data: bytes) -> None:
    try:
        request = decode_request(data)
    except CodecError:
        return
    # What decodes is a request again after a round trip (unknown fields are dropped).
    assert decode_request(encode_request(request)) == request


@PROPERTY_SETTINGS
@given(st.binary(max_size=80))
def test_decoding_any_bytes_as_an_ack_gives_an_ack_or_a_codec_error(data: bytes) -> None:
    try:
        ack = decode_ack(data)
    except CodecError:
        return
    assert decode_ack(encode_ack(ack)) == ack


@PROPERTY_SETTINGS
@given(st.binary(max_size=80))
def test_decoding_any_bytes_as_a_hello_gives_a_hello_or_a_codec_error(data: bytes) -> None:
    try:
        hello = decode_hello(data)
    except CodecError:
        return
    assert decode_hello(encode_hello(hello)) == hello  # (what was read is a hello it can say again)


@PROPERTY_SETTINGS
@given(REQUESTS, st.binary(min_size=1, max_size=8))
def test_a_request_cut_short_or_with_noise_around_it_fails_only_with_codec_error(
    request: Request, noise: bytes
) -> None:
    data = encode_request(request)
    for candidate in (data[:-1], data + noise, noise + data):
        with contextlib.suppress(CodecError):
            decode_request(candidate)


def test_an_empty_workload_request_has_no_payload() -> None:
    with pytest.raises(NoPayload):
        decode_request(b"")
    with pytest.raises(NoPayload):
        decode_ack(b"")


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(UNKNOWN_FIELDS, st.integers(min_value=0, max_value=2**63)), max_size=4))
def test_a_request_of_only_unknown_fields_has_no_payload(fields: list[tuple[int, int]]) -> None:
    data = b"".join(_unknown_varint_field(number, value) for number, value in fields)
    with pytest.raises(NoPayload):
        decode_request(data)
    with pytest.raises(NoPayload):
        decode_ack(data)


@pytest.mark.parametrize("vector", wire_vectors(), ids=lambda v: v[0])
def test_every_golden_vector_decodes_and_reencodes_byte_exactly(vector: tuple[str, str, str, bytes]) -> None:
    _name, message, _text, data = vector
    if message == "ZdsHello":
        assert encode_hello(decode_hello(data)) == data
    elif message == "WorkloadRequest":
        assert encode_request(decode_request(data)) == data
    elif message == "WorkloadResponse":
        assert encode_ack(decode_ack(data)) == data
    else:  # pragma: no cover - a new kind of vector needs a line here
        pytest.fail(f"unknown message type {message!r} in the wire vectors")
