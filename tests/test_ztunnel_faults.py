"""Faults on demand in the ztunnel side (zds ztunnel --faults, POST /faults), used the way they
are meant to be: to test a node agent — here zds's own, whose answer to each is pinned."""

from __future__ import annotations

import json
import pathlib
import socket
from typing import Any

import pytest

from tests.harness import (
    NodeAgentProc,
    StartServer,
    ZtunnelProc,
    faults_file,
    http_delete_json,
    http_get,
    http_post_json,
    wait_until,
)

pytestmark = pytest.mark.root


def ztunnel(server: NodeAgentProc, tmp_path: pathlib.Path, *faults: dict[str, Any]) -> ZtunnelProc:
    extra = ["--no-listeners", "--faults-api"]
    if faults:
        extra += ["--faults", faults_file(tmp_path / "zfaults.jsonl", *faults)]
    return ZtunnelProc(server.zds_socket, str(tmp_path / "ztunnel.log"), *extra)


def test_nacked_adds_leave_the_pod_cached_as_failed(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    server = start_server()
    zt = ztunnel(server, tmp_path, {"kind": "nack-adds", "text": "failure to start proxy : port taken"})
    try:
        wait_until(lambda: server.connected_count() == 1, "the ztunnel")
        done = server.cli("pod", "add", "--uid", "u1", "--netns", make_pod().path)
        assert done.returncode == 1
        assert "failure to start proxy : port taken" in done.stderr
        [pod] = server.list_pods()
        assert pod.last_error == "failure to start proxy : port taken"
        assert '"state": "applied"' in http_get(f"http://{zt.address('admin')}/faults")[1].replace(": ", ": ")
        # The nack is counted as any other (it was in neither counter).
        metrics = zt.metrics()
        assert metrics['zds_ztunnel_requests_total{kind="add"}'] == 1
        assert metrics['zds_ztunnel_nacks_total{reason="start"}'] == 1
    finally:
        zt.stop()


def test_acks_past_the_deadline_make_the_node_agent_drop_the_connection_and_resend_everything(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    server = start_server("--ack-timeout", "1")
    zt = ztunnel(
        server, tmp_path, {"kind": "delay-acks", "delay": 2, "after": 1}
    )  # the first SnapshotSent is on time
    try:
        wait_until(lambda: server.connected_count() == 1, "the ztunnel")
        done = server.cli("pod", "add", "--uid", "u1", "--netns", make_pod().path)
        assert done.returncode == 1 and "DEADLINE_EXCEEDED" in done.stderr
        zt.wait_for_output(
            "snapshot reconciled: 1 workload(s) held"
        )  # reconnected: the pod came in the snapshot
    finally:
        zt.stop()


def test_a_disconnect_in_the_middle_of_a_snapshot_gets_a_whole_new_one(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    pods = tmp_path / "pods.jsonl"
    pods.write_text("".join(f'{{"uid": "u{i}", "netns": "{make_pod().path}"}}\n' for i in range(3)))
    server = start_server("--pods", str(pods))
    zt = ztunnel(server, tmp_path, {"kind": "disconnect-in-snapshot", "count": 1})
    try:
        zt.wait_for_output("snapshot reconciled: 3 workload(s) held, 0 dropped")
        assert "closed the connection after 1 snapshot entries" in zt.output()
        # An INFO line, written with its batch within a few ms: waited for, not raced.
        server.wait_for_output("snapshot sent to ztunnel (3 pods)")
    finally:
        zt.stop()


def test_unasked_records_are_refused_by_the_node_agent_and_a_bad_hello_served_as_by_istio(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    server = start_server()
    zt = ztunnel(server, tmp_path, {"kind": "bad-hello"})
    try:
        server.wait_for_output("ztunnel's hello names version 2, not V1")
        wait_until(lambda: server.connected_count() == 1, "the ztunnel served")
        admin = f"http://{zt.address('admin')}/faults"
        for kind, says in (
            ("second-hello", "unexpected message from ztunnel"),
            ("unsolicited-ack", "unexpected message"),
        ):
            before = server.output().count(says)
            status, fault = http_post_json(admin, {"kind": kind})
            assert status == 200 and fault["state"] == "applied", fault

            def refused(says: str = says, before: int = before) -> bool:
                return server.output().count(says) > before

            wait_until(refused, f"the node agent to refuse {kind}")
            wait_until(lambda: server.connected_count() == 1, "the ztunnel to reconnect")
    finally:
        zt.stop()


def test_a_ztunnel_that_stops_reading_times_out_on_the_node_agent(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    server = start_server("--ack-timeout", "1")
    zt = ztunnel(server, tmp_path)
    try:
        wait_until(lambda: server.connected_count() == 1, "the ztunnel")
        status, fault = http_post_json(f"http://{zt.address('admin')}/faults", {"kind": "stop-reading"})
        assert status == 200, fault
        done = server.cli("pod", "add", "--uid", "u1", "--netns", make_pod().path)
        assert done.returncode == 1 and "DEADLINE_EXCEEDED" in done.stderr
        assert "stopped reading for good" in zt.output()
    finally:
        zt.stop()


def test_post_faults_is_served_only_when_asked_for_and_refuses_what_it_cannot_read(
    tmp_path: pathlib.Path,
) -> None:
    """Off by default (whoever reaches the admin port could make a ztunnel nack pods); with
    --faults-api, a body in a charset Python lacks, a count past a float's range, a text of a
    megabyte, or more than 256 armed faults are each a 400 in one line, never a 500."""
    import urllib.error
    import urllib.request

    from tests.standins import FakeNodeAgent  # (a node agent that never answers: faults stay armed)

    agent = FakeNodeAgent(str(tmp_path / "zds.sock"))
    plain = ZtunnelProc(agent.path, str(tmp_path / "plain.log"), "--no-listeners")
    try:
        status, body = http_post_json(f"http://{plain.address('admin')}/faults", {"kind": "nack-adds"})
        assert status == 404 and "--faults-api" in body["error"]
    finally:
        plain.stop()
    zt = ZtunnelProc(agent.path, str(tmp_path / "api.log"), "--no-listeners", "--faults-api")
    try:
        admin = f"http://{zt.address('admin')}/faults"
        odd = urllib.request.Request(
            admin, data=b'{"kind": "nack-adds"}', headers={"Content-Type": "application/json; charset=foo"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(odd, timeout=10)
        assert refused.value.code == 400
        for entry, says in (
            ({"kind": "nack-adds", "count": 1e400}, "nack-adds: count must be a whole number from 1"),
            ({"kind": "nack-adds", "count": 1.7}, "nack-adds: count must be a whole number from 1"),
            ({"kind": "nack-adds", "count": "5"}, "nack-adds: count must be a whole number from 1"),
            ({"kind": "nack-adds", "count": True}, "nack-adds: count must be a whole number from 1"),
            ({"kind": "nack-adds", "after": 2.9}, "nack-adds: after must be a whole number from 0"),
            ({"kind": "stop-reading", "delay": "2"}, "stop-reading: delay must be a number of seconds"),
            ({"kind": "nack-adds", "text": {"a": 1}}, "nack-adds: text must be one line of printable text"),
            (
                {"kind": "nack-adds", "text": "two\nlines"},
                "nack-adds: text must be one line of printable text",
            ),
            ({"kind": "second-hello", "delay": 1}, "second-hello takes no delay"),
            ({"kind": "never-ack", "text": "no"}, "never-ack takes no text"),
            (
                {"kind": "nack-adds", "text": "x" * 1_000_000},
                "nack-adds: text is 1000000 characters, over 1024",
            ),
        ):
            status, body = http_post_json(admin, entry)
            assert status == 400 and body["error"].startswith(says), body
        for _ in range(256):
            assert http_post_json(admin, {"kind": "nack-adds"})[0] == 200
        status, body = http_post_json(admin, {"kind": "nack-adds"})
        assert status == 400 and "256 faults are armed already" in body["error"]
        assert "Traceback" not in zt.output()
    finally:
        zt.stop()
        agent.close()


def test_faults_are_cleared_one_or_all_and_a_reader_stopped_for_good_reads_again(
    start_server: StartServer, make_pod: Any, tmp_path: pathlib.Path
) -> None:
    """stop-reading with no delay stopped zds ztunnel reading for good: a restart was the way out."""
    server = start_server()
    zt = ztunnel(server, tmp_path)
    try:
        wait_until(lambda: server.connected_count() == 1, "the ztunnel")
        faults = f"http://{zt.address('admin')}/faults"
        assert http_post_json(faults, {"kind": "nack-adds"})[0] == 200
        assert http_post_json(faults, {"kind": "stop-reading"})[0] == 200
        zt.wait_for_output("fault z2 (stop-reading) took effect: stopped reading for good")
        assert http_delete_json(f"{faults}/z1") == (200, [_as(zt, "z1", "nack-adds")])
        assert http_delete_json(f"{faults}/z1")[0] == 404  # cleared already
        status, cleared = http_delete_json(faults)
        assert status == 200 and [f["id"] for f in cleared] == ["z2"] and cleared[0]["state"] == "cleared"
        done = server.cli("pod", "add", "--uid", "u1", "--netns", make_pod().path)
        assert done.returncode == 0, done.stderr  # read, and not nacked
        assert http_delete_json(faults) == (200, [])
    finally:
        zt.stop()


def _as(zt: ZtunnelProc, fault_id: str, kind: str) -> dict[str, Any]:
    """How GET /faults shows a cleared fault."""
    listed: list[dict[str, Any]] = json.loads(http_get(f"http://{zt.address('admin')}/faults")[1])
    [fault] = [f for f in listed if f["id"] == fault_id]
    assert (
        fault["kind"] == kind
        and fault["state"] == "cleared"
        and fault["detail"] == "cleared (DELETE /faults)"
    )
    return fault


def test_faults_that_anyone_who_reaches_the_admin_address_can_arm_are_said_at_start(
    start_server: StartServer, tmp_path: pathlib.Path
) -> None:
    """As zds server's --grpc-insecure: served as asked, and said once (POST /faults on
    0.0.0.0 let any host on the network stop this ztunnel answering)."""
    server = start_server()
    zt = ZtunnelProc(server.zds_socket, str(tmp_path / "open.log"), "--no-listeners", "--faults-api",
                     "--admin-listen", "0.0.0.0:0")  # fmt: skip
    local = ztunnel(server, tmp_path)
    try:
        zt.wait_for_output("faults can be armed and cleared on 0.0.0.0:")
        assert (
            http_get(f"http://{local.address('admin')}/faults")[0] == 200
        )  # (served: past the warning's place)
        assert "faults can be armed and cleared" not in local.output()
    finally:
        zt.stop()
        local.stop()


def post_faults_raw(tmp_path: pathlib.Path, head: bytes, *, end_stream: bool) -> tuple[bytes, ZtunnelProc]:
    """Send ``head`` (and then, with ``end_stream``, the end of the stream) to the admin
    endpoint of a ztunnel side armed with --faults-api; everything it answers until it closes,
    and the ztunnel side (still running: the caller stops it)."""
    from tests.standins import FakeNodeAgent

    agent = FakeNodeAgent(str(tmp_path / "zds.sock"))
    zt = ZtunnelProc(agent.path, str(tmp_path / "api.log"), "--no-listeners", "--faults-api")
    try:
        host, port = zt.address("admin").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(head)
            if end_stream:
                conn.shutdown(socket.SHUT_WR)  # (its answer can still be read)
            answer = b""
            while chunk := conn.recv(4096):  # (without a deadline for the body: a timeout here)
                answer += chunk
        return answer, zt
    except BaseException:
        zt.stop()
        raise
    finally:
        agent.close()


def test_a_request_body_that_does_not_arrive_in_time_is_answered_408(tmp_path: pathlib.Path) -> None:
    """Headers, then a body a byte at a time: the head's 10 s deadline ended with the head, and
    the handler's read of the body had none (the connection was held for good). The body must
    follow within as long again: 408, closed, one line in the log."""
    head = b"POST /faults HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n{"
    answer, zt = post_faults_raw(tmp_path, head, end_stream=False)
    try:
        assert answer.startswith(b"HTTP/1.1 408"), answer  # and closed: recv saw the end
        zt.wait_for_output("request(s) answered 408: body not in within 10s")
        assert http_post_json(f"http://{zt.address('admin')}/faults", {"kind": "nack-adds"})[0] == 200
    finally:
        zt.stop()


def test_a_request_body_that_breaks_off_is_one_warning_line(tmp_path: pathlib.Path) -> None:
    """A body shorter than its Content-Length, then the client's end of the stream: the body's
    read raised inside the endpoint (an error with a traceback in the log)."""
    head = b"POST /faults HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}"
    answer, zt = post_faults_raw(tmp_path, head, end_stream=True)
    try:
        assert not answer.startswith(b"HTTP/1.1 500"), answer
        zt.wait_for_output("HTTP: 1 request(s) closed: body broken off or malformed (Connection lost)")
        assert "Traceback" not in zt.output() and " error " not in zt.output(), zt.output()
    finally:
        zt.stop()
