"""The rules ``zds check`` judges by, on the socket-free core (a socket pair where only a socket
shows it): a strict ztunnel's reading of each record, the answers real ztunnel would give, the
reports, check selection, and the faults' own validation. No root, no process."""

from __future__ import annotations

import array
import os
import socket
import xml.etree.ElementTree as ET

import pytest

from zds.check.cli import select
from zds.check.records import ConnectionRules, Seen, receive, strict_decode, ztunnel_answer
from zds.check.report import CheckResult, CheckSpec, Finding, Report, Status, verdict
from zds.check.sources import ZT_NO_CONTROL_MESSAGE
from zds.check.strictpeer import StrictConnection
from zds.client.faults import ZtunnelFaultError, ZtunnelFaults
from zds.protocol.messages import (
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    SnapshotSent,
    WorkloadInfo,
    encode_request,
)
from zds.protocol.records import Record
from zds.transport import SeqpacketConnection

INFO = WorkloadInfo("a", "ns", "sa")
ADD = encode_request(AddWorkload("u1", INFO))


def rules(**kw: object) -> tuple[ConnectionRules, list[tuple[str, Finding]]]:
    found: list[tuple[str, Finding]] = []
    r = ConnectionRules(1, lambda name, finding: found.append((name, finding)), **kw)  # type: ignore[arg-type]
    r.hello_sent = True
    return r, found


def seen(payload: bytes, fds: list[int] | None = None, flags: int = 0, index: int = 1) -> Seen:
    return receive(1, index, 0.0, payload, fds or [], flags)


def devnull() -> int:
    return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)


def own_netns() -> int:
    return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def names(found: list[tuple[str, Finding]]) -> list[str]:
    return [name for name, _ in found]


def test_a_clean_add_breaks_no_rule_and_exercises_them() -> None:
    r, found = rules()
    r.inspect(seen(ADD, [own_netns()]))
    assert found == []
    assert r.exercised["add-one-fd"] == r.exercised["fd-is-netns"] == 1


def test_a_record_before_the_hello_and_one_before_the_ack_are_findings() -> None:
    r, found = rules()
    r.hello_sent = False
    r.inspect(seen(encode_request(SnapshotSent())))
    r.inspect(seen(encode_request(SnapshotSent()), index=2))
    assert names(found)[:2] == ["hello-first", "hello-first"]
    assert "one-in-flight" in names(found)
    assert "one-snapshot-sent" in names(found)


def test_an_add_needs_exactly_one_netns_fd_and_nothing_else_carries_one() -> None:
    r, found = rules()
    r.inspect(seen(ADD))
    r.answered()
    r.inspect(seen(ADD, [own_netns(), own_netns()]))
    r.answered()
    r.inspect(seen(ADD, [devnull()]))
    r.answered()
    r.inspect(seen(encode_request(DelWorkload("u1")), [devnull()]))
    assert names(found) == ["add-one-fd", "add-one-fd", "fd-is-netns", "fd-only-on-add"]
    assert "ztunnel: 'No control message'" in found[0][1].detail
    assert "not a namespace /dev/null" in found[2][1].message


def test_the_fd_must_be_the_pods_own_netns() -> None:
    fd = own_netns()
    st = os.fstat(fd)
    r, found = rules(netns_of={"u1": (st.st_dev, st.st_ino + 1)}.get)
    r.inspect(seen(ADD, [fd]))
    assert names(found) == ["add-netns-is-the-pods"]


def test_size_strictness_and_canonical_form() -> None:
    r, found = rules()
    del_ = encode_request(DelWorkload("u1"))
    r.inspect(seen(del_ + b"\x7a\xcc\x08" + b"\x00" * 1100))
    r.answered()
    r.inspect(seen(del_ + del_, index=2))
    assert names(found) == ["record-size", "strict-decoding", "canonical-encoding", "canonical-encoding"]
    assert "is 1109 bytes" in found[0][1].message
    assert found[3][1].detail == [f"canonical ({len(del_)} bytes): {del_.hex(' ')}"]


def test_a_del_with_its_uid_in_field_1_is_named_for_what_it_is() -> None:
    request, why = strict_decode(bytes.fromhex("12030a0175"))  # DelWorkload{field 1: "u"}
    assert request == DelWorkload("")
    assert "DelWorkload's uid is field 2, not 1" in why


def test_no_payload_and_garbage_are_not_requests() -> None:
    assert strict_decode(b"\x78\x01") == (None, "a WorkloadRequest with no payload (ztunnel: 'no payload')")
    assert strict_decode(b"\x0a\xff\x01")[1].startswith("not a WorkloadRequest")


def test_state_rules_after_the_snapshot() -> None:
    r, found = rules()
    r.inspect(seen(encode_request(SnapshotSent())))
    r.answered()
    r.inspect(seen(encode_request(KeepWorkload("u1")), index=2))
    r.answered()
    r.inspect(seen(encode_request(AddWorkload("u2", None)), [own_netns()], index=3))
    assert names(found) == ["no-keep-after-snapshot", "add-workload-info"]


@pytest.mark.parametrize(
    ("payload", "fds", "flags", "snapshot_done", "answer"),
    [
        (ADD, 2, 0, False, "failure to read message : Expected 1 FD, got 2"),
        # (ztunnel's control buffer holds two: a third is cut, MSG_CTRUNC at ztunnel, although
        # this strict ztunnel's larger buffer took it whole)
        (ADD, 3, 0, False, "failure to read message : ENOBUFS: No buffer space available"),
        (
            encode_request(DelWorkload("u")),
            3,
            0,
            False,
            "failure to read message : ENOBUFS: No buffer space available",
        ),
        # More than fit (the rest cut: MSG_CTRUNC), or none installable (EMFILE): ztunnel's nix
        # (>= 0.29) will not walk a cut control buffer
        (ADD, 2, socket.MSG_CTRUNC, False, "failure to read message : ENOBUFS: No buffer space available"),
        (ADD, 0, socket.MSG_CTRUNC, False, "failure to read message : ENOBUFS: No buffer space available"),
        (
            ADD,
            1,
            socket.MSG_TRUNC | socket.MSG_CTRUNC,
            False,
            "failure to read message : ENOBUFS: No buffer space available",
        ),
        (ADD, 1, socket.MSG_TRUNC, False, "failure to read message : received truncated message"),
        (b"\x78\x01", 0, 0, False, "failure to read message : no payload"),
        (ADD, 0, 0, False, "failure to read message : No control message"),
        (
            encode_request(DelWorkload("u")),
            1,
            0,
            False,
            "failure to read message : Unexpected control message",
        ),
        (encode_request(KeepWorkload("u")), 0, 0, True, 'ProtocolError("pod keep received after snapshot")'),
        (encode_request(SnapshotSent()), 0, 0, True, 'ProtocolError("pod snapshot received already")'),
        (encode_request(KeepWorkload("u")), 0, 0, False, ""),
    ],
)
def test_the_strict_ztunnel_answers_as_real_ztunnel_does(
    payload: bytes, fds: int, flags: int, snapshot_done: bool, answer: str
) -> None:
    record = seen(payload, [own_netns() for _ in range(fds)], flags)
    assert (
        ztunnel_answer(record, snapshot_done).endswith(answer)
        if answer
        else not ztunnel_answer(record, snapshot_done)
    )


def test_every_received_fd_is_closed_once_described() -> None:
    fd = own_netns()
    record = seen(ADD, [fd])
    assert record.fds[0].is_netns
    with pytest.raises(OSError):
        os.fstat(fd)


async def test_a_0_byte_record_with_an_fd_is_an_empty_record_as_ztunnel_reads_it_not_a_request() -> None:
    """ztunnel's read_message takes any 0-byte read for EOF, fds or not; the strict ztunnel
    read one with an fd as a WorkloadRequest with no payload, and answered it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, found = rules()
    conn = StrictConnection(1, SeqpacketConnection(ours), r, lambda _: None)
    try:
        fd = devnull()
        try:
            theirs.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
        theirs.send(encode_request(SnapshotSent()))
        after = await conn.next(5)
    finally:
        await conn.close()
        theirs.close()
    assert after is not None and (after.kind, after.index) == ("snapshot_sent", 2)  # (it alone was queued)
    assert names(found) == ["no-empty-record"]
    assert found[0][1].message.startswith("a 0-byte record carrying 1 fd(s): ztunnel reads it as EOF")
    assert found[0][1].detail == ["fd: not a namespace /dev/null"]


# -- reports and selection ------------------------------------------------------------------------
SPEC = CheckSpec("add-one-fd", "an Add carries one fd", "one fd per Add", (ZT_NO_CONTROL_MESSAGE,))


def test_a_check_that_was_never_exercised_is_an_error_not_a_pass() -> None:
    result = verdict(SPEC, findings=[], notes=[], exercised=0, duration=0)
    assert result.status is Status.ERROR and "not exercised" in result.notes[0]
    assert verdict(SPEC, findings=[], notes=[], exercised=3, duration=0, evidence="Adds").notes == ["3 Adds"]


def test_reports_carry_the_rule_the_bytes_and_the_source_in_every_form() -> None:
    failing = CheckResult(SPEC, Status.FAIL, [Finding("carried 0 fds", "conn 2, record 3", received=ADD)])
    report = Report("node-agent", "/run/z.sock", [failing, CheckResult(SPEC, Status.SKIP, notes=["why"])])
    text = report.render_text()
    assert "FAIL  add-one-fd" in text and "rule: one fd per Add" in text
    assert f"received ({len(ADD)} bytes): {ADD.hex(' ')}" in text
    assert "source: istio/ztunnel src/inpod/protocol.rs:164 get_workload_data (62d82653)" in text
    doc = report.as_dict()
    assert doc["ok"] is False and doc["checks"][0]["findings"][0]["received_hex"] == ADD.hex()
    assert doc["checks"][0]["sources"][0]["url"].endswith("src/inpod/protocol.rs#L164")
    suite = ET.fromstring(report.render_junit().split("\n", 1)[1])
    assert suite.get("failures") == "1" and suite.get("skipped") == "1"
    assert suite.find("testcase/failure").get("message") == "carried 0 fds"  # type: ignore[union-attr]


def test_the_junit_suite_takes_the_runs_wall_time_not_its_checks_added_up() -> None:
    """The checks one scenario exercises each have its whole time: a 29 s run said 58 s."""
    shared = [CheckResult(SPEC, Status.PASS, duration=29.0), CheckResult(SPEC, Status.PASS, duration=29.0)]
    report = Report("node-agent", "/run/z.sock", shared)
    report.clock_started -= 30.0  # (a run that took 30 s)
    report.finish()
    suite = ET.fromstring(report.render_junit().split("\n", 1)[1])
    assert 30.0 <= float(suite.get("time", "")) < 31.0


def test_a_junit_report_of_what_a_peer_said_in_control_characters_still_parses() -> None:
    """ElementTree writes them as they are: the file a CI reads did not parse."""
    said = "uid x\x1b[2J\x07\x00 \ud800 and \ufffe"
    failing = CheckResult(SPEC, Status.FAIL, [Finding(said, "conn 1")], notes=[said])
    report = Report("node-agent", f"/run/{said}", [failing, CheckResult(SPEC, Status.ERROR, notes=[said])])
    suite = ET.fromstring(report.render_junit().split("\n", 1)[1])
    message = suite.find("testcase/failure").get("message")  # type: ignore[union-attr]
    assert message == "uid x\\x1b[2J\\x07\\x00 \\ud800 and \\ufffe", message
    assert suite.find("testcase/error").get("message") == message  # type: ignore[union-attr]


def test_the_text_report_writes_what_a_peer_said_in_control_characters_as_escapes() -> None:
    """It went to the terminal as it was: a peer's escape sequences cleared the screen, its
    newline forged a report line."""
    said = "uid x\x1b[2J\x07\nPASS  forged \ud800"
    failing = CheckResult(SPEC, Status.FAIL, [Finding(said, "conn 1", detail=[said])])
    text = Report(
        "node-agent", f"/run/{said}", [failing, CheckResult(SPEC, Status.ERROR, notes=[said])]
    ).render_text()
    assert text.isascii() and "\x1b" not in text and "\x07" not in text and "\ud800" not in text
    assert not [line for line in text.splitlines() if line.startswith("PASS")], text
    assert "uid x\\x1b[2J\\x07\\nPASS  forged \\ud800" in text


def test_only_and_skip_select_by_name_in_catalogue_order() -> None:
    assert select(["a", "b", "c"], ["c,a"], []) == ["a", "c"]
    assert select(["a", "b", "c"], [], ["b"]) == ["a", "c"]
    with pytest.raises(ValueError, match="unknown check 'd'; see --list"):
        select(["a"], ["d"], [])


def test_a_choice_of_checks_that_names_none_or_leaves_none_is_refused() -> None:
    """``--only ,`` ran every check; ``--only a --skip a`` ran none and passed."""
    with pytest.raises(ValueError, match="--only ',' names no check; see --list"):
        select(["a", "b"], [","], [])
    with pytest.raises(ValueError, match="--skip ' ' names no check"):
        select(["a", "b"], [], [" "])
    with pytest.raises(ValueError, match="--only/--skip leave no check to run"):
        select(["a", "b"], ["a"], ["a"])
    with pytest.raises(ValueError, match="--only/--skip leave no check to run"):
        select(["a", "b"], [], ["a,b"])


# -- the ztunnel side's faults -----------------------------------------------------------------------
def test_ztunnel_faults_are_checked_when_armed() -> None:
    faults = ZtunnelFaults()
    with pytest.raises(ZtunnelFaultError, match="unknown fault 'nope'"):
        faults.arm({"kind": "nope"})
    with pytest.raises(ZtunnelFaultError, match="delay-acks: give a delay"):
        faults.arm({"kind": "delay-acks"})
    with pytest.raises(ZtunnelFaultError, match="unknown field"):
        faults.arm({"kind": "never-ack", "when": "now"})


def test_the_unasked_record_faults_act_count_times_as_the_readme_says() -> None:
    """second-hello and unsolicited-ack: one now, then one after each next hello; bad-hello:
    the next ``count`` hellos (README, the ztunnel side's faults)."""
    faults = ZtunnelFaults()
    faults.arm({"kind": "bad-hello", "count": 2})
    assert [faults.hello() for _ in range(3)] == [b"\x08\x02", b"\x08\x02", b"\x08\x01"]
    faults.arm({"kind": "second-hello", "count": 2})
    faults.arm({"kind": "unsolicited-ack"})
    assert [len(faults.extras()) for _ in range(3)] == [2, 1, 0]


def test_a_ztunnel_fault_waits_for_its_after_records() -> None:
    faults = ZtunnelFaults()
    faults.arm({"kind": "ack-blindly", "after": 1})
    first, second = Record(payload=b"\x1a\x00"), Record(payload=b"\x78\x01")
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        assert faults.intercept(first, pair[0]) is None
        assert faults.intercept(second, pair[0]) == b"\x0a\x00"
        assert faults.intercept(Record(payload=b"\x1a\x00"), pair[0]) is None  # used up
    finally:
        for s in pair:
            s.close()
