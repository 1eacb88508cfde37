"""The bulk lane's wire and client (zds.server.bulkwire), against stand-in node agents on
real unix sockets; the node agent's end is tested in test_pod_cli.py."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest

from tests.harness import ZDS
from zds.gen import nodeagent_pb2
from zds.server.bulkwire import (
    HEADER,
    MAGIC,
    MAGIC_JSON,
    MAX_MESSAGE,
    Deframer,
    LaneError,
    LaneUnsupported,
    connect,
    exchange,
    exchange_json,
    frame,
)


def test_the_deframer_gives_whole_messages_however_the_bytes_are_cut() -> None:
    messages = [b"", b"a", b"x" * 70_000, b"last"]
    stream = b"".join(frame(m) for m in messages)
    for step in (1, 3, 5, 4096, len(stream)):
        deframer, got = Deframer(), []
        for i in range(0, len(stream), step):
            got += deframer.feed(stream[i : i + step])
        assert got == messages and deframer.pending == 0
    partial = Deframer()
    assert partial.feed(stream[:7]) == [b""] and partial.pending == 2


@pytest.mark.parametrize(
    ("header", "error"),
    [((1, 0), "a frame with flag 1"), ((0, MAX_MESSAGE + 1), f"the limit is {MAX_MESSAGE}")],
)
def test_the_deframer_refuses_what_no_zds_end_sends(header: tuple[int, int], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Deframer().feed(HEADER.pack(*header))


@contextmanager
def stand_in(tmp_path: object, *serve: Callable[[socket.socket], None]) -> Iterator[str]:
    """A node agent's control socket that runs each of ``serve`` on a connection, in turn."""
    path = os.path.join(str(tmp_path), "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def run() -> None:
        for each in serve:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed before a client came
            with conn:
                each(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        with suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept() if no client came
        listener.close()
        thread.join(10)
        os.unlink(path)


def add_pods(
    path: str, batches: list[nodeagent_pb2.AddPodsRequest], timeout: float
) -> Iterator[nodeagent_pb2.AddPodsReply]:
    return exchange(connect(path, timeout), batches, timeout)


def read_requests(conn: socket.socket, each: Callable[[nodeagent_pb2.AddPodsRequest], None]) -> None:
    """As a node agent: the opening checked and answered, then each request to ``each``."""
    assert conn.recv(len(MAGIC), socket.MSG_WAITALL) == MAGIC
    conn.sendall(MAGIC)
    deframer = Deframer()
    while data := conn.recv(65536):
        for message in deframer.feed(data):
            each(nodeagent_pb2.AddPodsRequest.FromString(message))


def batches(pods: int, per: int = 64) -> list[nodeagent_pb2.AddPodsRequest]:
    requests = [
        nodeagent_pb2.AddPodRequest(uid=f"pod-{i:05d}", netns_path=f"/var/run/netns/p{i}")
        for i in range(pods)
    ]
    return [nodeagent_pb2.AddPodsRequest(pods=requests[i : i + per]) for i in range(0, pods, per)]


def test_the_client_reads_answers_while_it_still_writes(tmp_path: object) -> None:
    """A node agent answers each batch as it reads it and stops reading while its answers
    are unread: a client that wrote everything before reading would never finish. Here
    ~1.4 MB of requests go one way and ~6 MB of answers the other (several times what
    the sockets' buffers hold; the stand-in's own are made small)."""
    index = 0

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)

        def answer(request: nodeagent_pb2.AddPodsRequest) -> None:
            nonlocal index
            results = []
            for pod in request.pods:
                pod_msg = nodeagent_pb2.Pod(uid=pod.uid, last_error="e" * 100)
                response = nodeagent_pb2.AddPodResponse(connection_id="c", pod=pod_msg)
                results.append(nodeagent_pb2.AddPodsResult(index=index, uid=pod.uid, response=response))
                index += 1
            conn.sendall(frame(nodeagent_pb2.AddPodsReply(results=results).SerializeToString()))

        read_requests(conn, answer)

    sent = batches(40_000)
    with stand_in(tmp_path, serve) as path:
        answers = [r for reply in add_pods(path, sent, timeout=60) for r in reply.results]
    assert [a.index for a in answers] == list(range(40_000))
    assert [a.uid for a in answers] == [p.uid for b in sent for p in b.pods]


def test_the_client_says_when_the_node_agent_breaks_the_lane(tmp_path: object) -> None:
    def serve(conn: socket.socket) -> None:
        read_requests(conn, lambda _: None)
        conn.sendall(HEADER.pack(0, 10) + b"cut")

    with (
        stand_in(tmp_path, serve) as path,
        pytest.raises(LaneError, match="closed the connection within a message"),
    ):
        list(add_pods(path, batches(1), timeout=60))

    def garbage(conn: socket.socket) -> None:
        read_requests(conn, lambda _: None)
        conn.sendall(frame(b"\xff\xff\xff"))

    with stand_in(tmp_path, garbage) as path, pytest.raises(LaneError, match="not an AddPodsReply"):
        list(add_pods(path, batches(1), timeout=60))


def test_the_client_gives_up_at_its_deadline(tmp_path: object) -> None:
    done = threading.Event()

    def serve(conn: socket.socket) -> None:
        done.wait(30)  # reads nothing, answers nothing until the client gave up

    with stand_in(tmp_path, serve) as path:
        try:
            with pytest.raises(LaneError, match=r"DEADLINE_EXCEEDED: the stream did not end within 0\.2 s"):
                list(add_pods(path, batches(1), timeout=0.2))
        finally:
            done.set()


def test_the_client_names_each_status_as_grpc_does() -> None:
    """``zds pod add`` over the lane says ``INVALID_ARGUMENT: ...`` as over gRPC, without grpc:
    the first form by the code's number, the JSON form by the name the node agent sends."""
    import grpc

    from zds.server.bulklane import STATUS_NAMES
    from zds.server.podadd import status_name

    names = {code.value[0]: code.name for code in grpc.StatusCode}
    assert {code: status_name(code) for code in names} == names == STATUS_NAMES
    assert status_name(99) == "99"


def test_a_node_agent_from_before_the_lane_is_told_apart(tmp_path: object) -> None:
    """It passes the opening to gRPC, which answers in HTTP/2 (its SETTINGS frame) and
    closes, having taken nothing: the client says so, so that ``zds pod add`` can use
    AddPods instead."""
    settings = bytes.fromhex("000000040000000000")

    def grpc_like(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(settings)

    with (
        stand_in(tmp_path, grpc_like) as path,
        pytest.raises(LaneUnsupported, match="does not take the bulk lane"),
    ):
        list(add_pods(path, batches(3), timeout=60))

    def turned_away(conn: socket.socket) -> None:
        pass  # closed without a byte: a peer the node agent does not let in (not "unsupported")

    with stand_in(tmp_path, turned_away) as path:
        assert list(add_pods(path, batches(3), timeout=60)) == []


def json_pods(count: int) -> list[list[dict[str, Any]]]:
    return [[{"uid": f"pod-{i}", "netns_path": f"/var/run/netns/p{i}"} for i in range(count)]]


def test_the_json_form_goes_out_and_its_answers_come_back_as_sent(tmp_path: object) -> None:
    """The JSON form: the same frames, each a JSON array, answered with each pod's position,
    status code and name, message or connection."""
    got: list[Any] = []

    def serve(conn: socket.socket) -> None:
        assert conn.recv(len(MAGIC_JSON), socket.MSG_WAITALL) == MAGIC_JSON
        conn.sendall(MAGIC_JSON)
        deframer = Deframer()
        while data := conn.recv(65536):
            got.extend(json.loads(m) for m in deframer.feed(data))
        answers = [
            {"index": 0, "code": 0, "connection_id": "c1"},
            {"index": 1, "code": 3, "status": "INVALID_ARGUMENT", "message": "no"},
        ]
        conn.sendall(frame(json.dumps(answers).encode()))

    with stand_in(tmp_path, serve) as path:
        [answers] = list(exchange_json(connect(path, 60), json_pods(2), 60))
    assert got == json_pods(2)
    assert [(a.index, a.code, a.status, a.message, a.connection_id) for a in answers] == [
        (0, 0, "", "", "c1"),
        (1, 3, "INVALID_ARGUMENT", "no", ""),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        b"{",
        b"{}",
        b"[5]",
        b'[{"index": -1, "code": 0}]',
        b'[{"index": true, "code": 0}]',
        b'[{"index": 0, "code": 0, "message": 5}]',
    ],
)
def test_the_json_form_refuses_an_answer_no_node_agent_sends(tmp_path: object, answer: bytes) -> None:
    def serve(conn: socket.socket) -> None:
        conn.recv(len(MAGIC_JSON), socket.MSG_WAITALL)
        conn.sendall(MAGIC_JSON + frame(answer))

    with stand_in(tmp_path, serve) as path, pytest.raises(LaneError, match="not a JSON array of answers"):
        list(exchange_json(connect(path, 60), json_pods(1), 60))


def test_a_node_agent_from_before_the_json_form_is_told_apart_and_zds_pod_add_uses_the_first(
    tmp_path: pathlib.Path,
) -> None:
    """One from before the JSON form closes at its opening without a byte (a wrong opening
    breaks the lane at once), having taken nothing: ``zds pod add`` says the same pods over the
    lane's first form, which it answers."""

    def old_node_agent(conn: socket.socket) -> None:
        conn.recv(len(MAGIC_JSON), socket.MSG_WAITALL)  # not its opening: closed

    with stand_in(tmp_path, old_node_agent) as path, pytest.raises(LaneUnsupported):
        list(exchange_json(connect(path, 60), json_pods(1), 60))

    def first_form(conn: socket.socket) -> None:
        index = 0

        def answer(request: nodeagent_pb2.AddPodsRequest) -> None:
            nonlocal index
            results = []
            for pod in request.pods:
                response = nodeagent_pb2.AddPodResponse(connection_id="c7")
                results.append(nodeagent_pb2.AddPodsResult(index=index, uid=pod.uid, response=response))
                index += 1
            conn.sendall(frame(nodeagent_pb2.AddPodsReply(results=results).SerializeToString()))

        read_requests(conn, answer)

    pods = tmp_path / "pods.jsonl"
    pods.write_text(
        "".join(json.dumps({"uid": f"u{i}", "netns": f"/var/run/netns/n{i}"}) + "\n" for i in range(3))
    )
    with stand_in(tmp_path, old_node_agent, first_form) as path:
        out = subprocess.run(
            [*ZDS, "pod", "add", "--from-file", str(pods), "--control-socket", path],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == [
        f"pod u{i} (default/u{i}) enrolled: acked by ztunnel connection c7" for i in range(3)
    ]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b'[{"' + b"k" * (MAX_MESSAGE // 4) + b'": 1}]', 'has no "kkk'),
        (b'[{"netns_pid": ' + b"9" * 4000 + b"}]", "Value out of range: 999"),
    ],
    ids=["long-key", "long-number"],
)
def test_the_json_forms_reason_for_a_pod_refused_is_a_line_of_bounded_length(
    message: bytes, reason: str
) -> None:
    """Protobuf's reason quotes an unknown field's name or a number whole: a client's 1 MiB key
    had made the node agent's log line 1 MiB long."""
    from zds.server.bulklane import json_request

    with pytest.raises(ValueError, match=reason) as refused:
        json_request(message)
    assert len(str(refused.value)) < 512


def test_the_json_form_refuses_an_object_as_ips() -> None:
    """A JSON object as ``ips`` was taken by its keys (protobuf iterates it), as a text was
    letter by letter."""
    from zds.server.bulklane import json_request

    with pytest.raises(ValueError, match="ips is a JSON dict, not a list"):
        json_request(b'[{"uid": "a", "netns_path": "/x", "ips": {"10.0.0.1": 1}}]')
