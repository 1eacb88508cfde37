"""What the control API's clients print of a node agent's answers: values a newer (or a
hostile) node agent sends are shown, never a traceback, and nothing in them reaches the
terminal as a control sequence."""

from __future__ import annotations

from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from zds.gen import nodeagent_pb2
from zds.server.bulkadd import cut
from zds.server.faultcli import _kind
from zds.server.inspectctl import _when, connection_row, event_details, kind_name
from zds.server.podctl import message_dict, pod_dict, table

#: A terminal's title set and its screen cleared.
ESCAPES = "\x1b]0;x\x07\x1b[2J"


def test_an_enum_value_this_client_does_not_know_is_its_number() -> None:
    """It was ValueError out of ``EnumTypeWrapper.Name`` (KeyError for a fault kind)."""
    assert kind_name(99) == "99"
    conn = nodeagent_pb2.Connection(id="c1", state=cast("nodeagent_pb2.ConnectionState", 77))
    assert connection_row(conn)[6] == "77"
    event = nodeagent_pb2.Event(kind=nodeagent_pb2.EVENT_KIND_POD_ENROLLED, uid="u1")
    event.pod.state = cast("nodeagent_pb2.PodState", 55)  # (proto3 keeps a value it does not know)
    assert "state=55" in event_details(event)
    assert _kind(4242) == "4242"
    assert kind_name(nodeagent_pb2.EVENT_KIND_POD_ENROLLED) == "pod enrolled"


def test_a_time_no_date_holds_is_its_seconds() -> None:
    assert _when(Timestamp(seconds=2**62)) == f"{2**62}s"
    assert _when(Timestamp(seconds=0, nanos=5_000_000)) == "1970-01-01T00:00:00.005Z"


def test_json_writes_a_time_no_date_holds_as_its_seconds_and_the_rest_as_ever() -> None:
    """``--json`` raised json_format's SerializeToJsonError (a traceback) on such a time."""
    event = nodeagent_pb2.Event(kind=nodeagent_pb2.EVENT_KIND_POD_ENROLLED, uid="u1")
    event.time.seconds = 1_700_000_000
    event.pod.uid = "u1"
    event.pod.enrolled_at.seconds = 2**62
    doc = message_dict(event)
    assert doc["pod"] == {"uid": "u1", "enrolled_at": f"{2**62}s"}
    assert doc["time"] == "2023-11-14T22:13:20Z" and doc["uid"] == "u1"
    assert event.pod.enrolled_at.seconds == 2**62  # (its own message left as it was)
    pod = pod_dict(nodeagent_pb2.Pod(uid="u2", enrolled_at=Timestamp(seconds=-(2**40))))
    assert pod["enrolled_at"] == f"{-(2**40)}s" and pod["state"] == "POD_STATE_UNSPECIFIED"
    fault = nodeagent_pb2.Fault(id="f1")
    fault.delay.seconds = 2**62
    assert message_dict(fault) == {"id": "f1", "delay": f"{2**62}s"}
    assert message_dict(nodeagent_pb2.Pod(uid="u3", enrolled_at=Timestamp(seconds=5))) == {
        "uid": "u3",
        "enrolled_at": "1970-01-01T00:00:05Z",
    }


def test_what_is_not_printable_is_written_as_its_escape() -> None:
    printed = table(["UID", "ERROR"], [["u1", f"bad{ESCAPES}"]])
    assert "\x1b" not in printed and "\x07" not in printed and "\\x1b]0;x\\x07\\x1b[2J" in printed
    event = nodeagent_pb2.Event(
        kind=nodeagent_pb2.EVENT_KIND_POD_SOURCE_DOWN, pod_source="engine", error=ESCAPES
    )
    details = event_details(event)
    assert "\x1b" not in details and details.startswith("source=engine reason=")
    event = nodeagent_pb2.Event(kind=nodeagent_pb2.EVENT_KIND_SNAPSHOT_COMPLETE, connection_id=f"c{ESCAPES}")
    assert "\x1b" not in event_details(event)


def test_a_status_details_is_cut_by_its_bytes() -> None:
    """gRPC's limit is on bytes (each percent-encoded as 3): 1,024 characters of emoji were
    ~12 KiB of status details, over it, and the refusal reached the caller as another error."""
    assert cut("u" * 1024) == "u" * 1024
    assert cut("u" * 1025) == "u" * 1024 + "..."
    said = cut("/var/run/netns/" + "\U0001f600" * 1000)
    assert len(said.encode()) <= 1024 + 3 and said.endswith("\U0001f600...")
    assert cut("é" * 511 + "x") == "é" * 511 + "x"  # (1,023 bytes)
