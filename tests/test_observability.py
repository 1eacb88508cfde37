"""ListConnections, `zds connections` and the structured logs of a real `zds server`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness import ZDS, NodeAgentProc, pod_netns, stop_cleanly, wait_until
from tests.standins import Peers
from zds import logs
from zds.gen import nodeagent_pb2
from zds.logs import BatchingStreamHandler

pytestmark = pytest.mark.root


def list_connections(server: NodeAgentProc) -> list[nodeagent_pb2.Connection]:
    with server.control() as stub:
        return list(stub.ListConnections(nodeagent_pb2.ListConnectionsRequest(), timeout=10).connections)


# -- ListConnections ---------------------------------------------------------------------


def test_list_connections_shows_peer_hello_snapshot_counts_and_the_newest(
    server: NodeAgentProc, peers: Peers
) -> None:
    assert list_connections(server) == []
    before = time.time()
    peers.acking(server.zds_socket, nack={"u2": "failure to start proxy : port taken"})
    wait_until(lambda: [c.snapshot_complete for c in list_connections(server)] == [True], what="snapshot")
    server.add_pod("u1", pod_netns())
    with pytest.raises(grpc.RpcError):
        server.add_pod("u2", pod_netns())
    peers.acking(server.zds_socket)
    wait_until(lambda: [c.snapshot_complete for c in list_connections(server)] == [True, True], what="2nd")
    first, second = list_connections(server)

    assert (first.peer.pid, first.peer.uid, first.peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert first.hello_version == 1 and second.hello_version == 1
    assert first.state == second.state == nodeagent_pb2.CONNECTION_STATE_READY
    assert before <= first.connected_at.ToNanoseconds() / 1e9 <= second.connected_at.ToNanoseconds() / 1e9
    assert (first.newest, second.newest) == (False, True)
    m = first.messages
    # snapshot: SnapshotSent only; then u1 acked, u2 nacked
    assert (m.sent, m.acked, m.nacked) == (3, 2, 1)
    assert (m.sent_add, m.sent_keep, m.sent_del, m.sent_snapshot_sent) == (2, 0, 0, 1)
    m = second.messages  # its snapshot: both pods (u2 is cached too), then SnapshotSent
    assert (m.sent, m.acked, m.nacked, m.sent_add, m.sent_snapshot_sent) == (3, 3, 0, 2, 1)


def test_a_connection_that_has_not_said_hello_is_listed_as_awaiting_hello(
    server: NodeAgentProc, peers: Peers
) -> None:
    peers.raw(server.zds_socket)  # silent
    wait_until(lambda: list_connections(server), what="the connection")
    [conn] = list_connections(server)
    assert conn.state == nodeagent_pb2.CONNECTION_STATE_AWAITING_HELLO
    assert conn.hello_version == 0 and not conn.newest and not conn.snapshot_complete


def test_zds_connections_prints_an_aligned_table_and_json(server: NodeAgentProc, peers: Peers) -> None:
    peers.acking(server.zds_socket)
    peers.acking(server.zds_socket)
    wait_until(lambda: [c.snapshot_complete for c in list_connections(server)] == [True, True], what="both")
    ids = [c.id for c in list_connections(server)]

    out = server.cli("connections")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == [
        "ID",
        "PID",
        "UID",
        "GID",
        "VERSION",
        "CONNECTED",
        "STATE",
        "SNAPSHOT",
        "SENT",
        "ACKED",
        "NACKED",
        "NEWEST",
    ]
    assert [r.split()[0] for r in rows] == ids
    for row in rows:  # aligned: every column starts where its header does
        for column in ("PID", "VERSION", "STATE", "NEWEST"):
            start = header.index(column)
            assert row[start - 2 : start] == "  " and row[start] != " "
    assert rows[0].split()[1:5] == [str(os.getpid()), "0", "0", "V1"]
    assert rows[0].split()[6:] == ["ready", "yes", "1", "1", "0", "no"]
    assert rows[1].split()[-1] == "yes"

    out = server.cli("connections", "--json")
    assert out.returncode == 0, out.stderr
    docs = json.loads(out.stdout)
    assert [d["id"] for d in docs] == ids
    assert docs[1]["newest"] is True and docs[0]["newest"] is False
    assert docs[0]["peer"]["pid"] == os.getpid() and docs[0]["hello_version"] == 1
    assert docs[0]["messages"]["sent_snapshot_sent"] == "1"  # uint64 is a string in proto JSON


def test_zds_connections_without_a_node_agent_says_so(tmp_path: object) -> None:
    sock = os.path.join(str(tmp_path), "none.sock")
    out = subprocess.run(
        [*ZDS, "connections", "--control-socket", sock], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "cannot reach the node agent" in out.stderr and sock in out.stderr


# -- logs ------------------------------------------------------------------------------------


def test_json_logs_name_the_pod_and_the_connection_on_every_line_about_them(
    tmp_path: object, peers: Peers
) -> None:
    # --log-format/--log-level after the subcommand, as people type them
    server = NodeAgentProc(str(tmp_path), "--log-format", "json", "--log-level", "debug")
    try:
        server.wait_ready()
        peers.acking(server.zds_socket, nack={"u2": "failure to start proxy : port taken"})
        wait_until(lambda: [c.snapshot_complete for c in list_connections(server)] == [True], what="ready")
        [conn] = list_connections(server)
        server.add_pod("u1", pod_netns(), name="web", namespace="shop")
        with pytest.raises(grpc.RpcError):
            server.add_pod("u2", pod_netns(), name="db", namespace="shop")
        server.remove_pod("u1")
        server.wait_for_output('"msg": "ztunnel acked del')
    finally:
        server.stop()
    lines = [line for line in server.output().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"time", "level", "scope", "msg"} <= set(d) for d in docs)

    def about(uid: str) -> list[dict[str, Any]]:
        return [d for d in docs if d.get("uid") == uid]

    web = about("u1")
    msgs = [d["msg"] for d in web]
    assert any(m.startswith("pod enrolled") for m in msgs)
    assert any(m.startswith("ztunnel acked add") for m in msgs)
    assert "pod removed" in msgs and any(m.startswith("ztunnel acked del") for m in msgs)
    assert any(m == "sent add" for m in msgs)  # debug
    assert all(d["pod"] == "web" and d["namespace"] == "shop" for d in web)
    [nack] = [d for d in about("u2") if d["msg"].startswith("ztunnel nacked")]
    assert nack["level"] == "error" and nack["pod"] == "db" and nack["conn"] == conn.id
    # lines about the connection carry its id; lines about a message on it carry both
    conn_lines = [d for d in docs if d.get("conn") == conn.id]
    assert any(d["msg"].startswith("ztunnel connection accepted") for d in conn_lines)
    assert any(d["msg"].startswith("snapshot sent to ztunnel") for d in conn_lines)
    assert all(d.get("conn") == conn.id for d in web if d["msg"].startswith(("sent ", "ztunnel acked")))
    assert all("conn" not in d for d in docs if d["msg"].startswith("pod enrolled"))  # not about a connection


def test_text_logs_with_the_global_flags(tmp_path: object) -> None:
    log_path = os.path.join(str(tmp_path), "text.log")
    sock = os.path.join(str(tmp_path), "z.sock")
    ctl = os.path.join(str(tmp_path), "c.sock")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *ZDS,
                "--log-format",
                "text",
                "--log-level",
                "warning",
                "server",
                "--zds-socket",
                sock,
                "--control-socket",
                ctl,
                "--cni-socket",
                "off",
                "--http-listen",
                "off",
                "--no-redirect",
                "--state-dir",
                os.path.join(str(tmp_path), "state"),
                "--pods",
                os.path.join(str(tmp_path), "missing.yaml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        assert proc.wait(30) == 1
    with open(log_path) as f:
        text = f.read()
    assert "error zds.server: cannot read pods file" in text
    assert "node agent ready" not in text  # info is below --log-level warning
    assert not text.lstrip().startswith("{")


def test_a_field_a_peer_sent_with_control_characters_stays_on_its_line() -> None:
    """The ztunnel side logs the uids a node agent sends: ``u\n\x1b[31mX`` forged a second
    line and sent an escape sequence to the terminal."""
    from zds.logs import TextFormatter

    record = logging.LogRecord("zds.ztunnel", logging.INFO, __file__, 1, "proxy started", None, None)
    record.uid = "u\n\x1b[31mX"
    line = TextFormatter().format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line.endswith(' uid="u\\n\\u001b[31mX"')


def test_grpcs_error_for_a_stream_its_client_left_is_quieted_for_each_streaming_method_only() -> None:
    """GoneStreams named Watch alone: AddPods cancelled with its answers unread logged gRPC's
    error and traceback (tests/test_pod_cli.py shows it end to end). It names every method the
    proto streams answers from, and lets another method's error, or another error, through."""
    from zds.logfilters import GoneStreams

    service = nodeagent_pb2.DESCRIPTOR.services_by_name["NodeAgent"]
    assert set(GoneStreams.STREAMING) == {m.name for m in service.methods if m.server_streaming}

    def record(message: str) -> logging.LogRecord:
        failed = RuntimeError('Failed "execute_batch"')
        return logging.LogRecord(
            "grpc._cython.cygrpc", logging.ERROR, __file__, 1, message, None, (RuntimeError, failed, None)
        )

    gone = "ExecuteBatchError raised in core by servicer method [/zds.v1.NodeAgent/{}]"
    zds_logger = logging.getLogger("zds")
    level = zds_logger.level
    try:
        zds_logger.setLevel(logging.INFO)
        for method in ("AddPods", "Watch"):
            assert not GoneStreams().filter(record(gone.format(method)))
        zds_logger.setLevel(logging.DEBUG)
        quieted = record(gone.format("AddPods"))
        assert GoneStreams().filter(quieted)
        assert (quieted.levelno, quieted.levelname, quieted.exc_info) == (logging.DEBUG, "DEBUG", None)
        for message in (
            gone.format("AddPod"),
            "Unexpected [RuntimeError] raised by servicer method [/zds.v1.NodeAgent/AddPods]",
        ):
            kept = record(message)
            assert GoneStreams().filter(kept)
            assert kept.levelno == logging.ERROR and kept.exc_info is not None
    finally:
        zds_logger.setLevel(level)


def test_a_closed_stderr_never_fails_the_code_that_logs(tmp_path: Path) -> None:
    # A log line in the middle of the node agent's work (an ack's, a nack's) must not raise.
    closed = open(tmp_path / "stderr", "w")  # noqa: SIM115 (closed on purpose, at once)
    closed.close()
    handler = BatchingStreamHandler(closed)
    logger = logging.getLogger("zds.test.closed-stderr")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("ztunnel nacked AddWorkload: %s", "no")  # a warning or worse is written at once
        logger.info("pod enrolled")  # batched (no loop here: written at once too)
        handler.flush()
    finally:
        logger.removeHandler(handler)
    assert handler._pending == []  # dropped, not piling up


def test_a_stderr_nobody_reads_never_holds_the_node_agent_up(tmp_path: Path) -> None:
    """Its stderr a pipe whose reader stalled (``zds server 2>&1 | slow``): the 64 KiB the pipe
    holds filled up and the event loop blocked in write(2): no pod, no health check, no
    ack and no stop signal got through until someone read."""
    pods = tmp_path / "pods.jsonl"
    with open(pods, "w") as f:
        for i in range(1500):  # (~160 KB of lines: more than the pipe holds)
            f.write(
                json.dumps({"uid": f"u{i}", "name": f"p{i}", "namespace": "ns", "netns": pod_netns()}) + "\n"
            )
    control = str(tmp_path / "control.sock")
    server = subprocess.Popen(
        [
            *ZDS, "server", "--zds-socket", str(tmp_path / "ztunnel.sock"), "--control-socket", control,
            "--cni-socket", "off", "--http-listen", "off", "--state-dir", str(tmp_path / "state"),
            "--no-redirect", "--log-level", "debug",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # (never read until the end)
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(control) or server.poll() is not None, "the control socket")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            command = [*ZDS, *args, "--control-socket", control]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        added = cli("pod", "add", "--from-file", str(pods))
        assert added.stderr.count("the pod stays cached") == 1500, added.stderr[-2000:]
        listed = cli("pod", "list", "--json")
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1500
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert server.stderr is not None
        said = server.stderr.read()  # (what the pipe held; the rest went with the process)
    finally:
        stop_cleanly(server)
    assert b"node agent ready" in said


def test_lines_past_what_the_writer_holds_are_dropped_counted_and_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While nobody reads: LINES lines wait, the rest are dropped, and their count is said
    where they would have been once writing goes on."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    stream = os.fdopen(write_end, "w")
    monkeypatch.setattr(logs._Writer, "LINES", 10)
    monkeypatch.setattr(logs._Writer, "STUCK", 0.0)  # (stuck from its first instant)
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    received = bytearray()

    def read_until(end: bytes) -> None:
        deadline = time.monotonic() + 30
        while not received.endswith(end) and time.monotonic() < deadline:
            try:
                received.extend(os.read(read_end, 1 << 20))
            except BlockingIOError:
                time.sleep(0.01)  # (a pipe polled: nothing to wait on in this thread)

    try:
        writer = logs._Writer(handler)
        writer.put("x" * (1 << 20) + "\n", 1)  # (more than the pipe holds: the writer blocks in it)
        wait_until(lambda: writer._writing is not None, "the writer in its write")
        for i in range(20):
            writer.put(f"line {i}\n", 1)
        read_until(b"line 8\n")
        writer.put("after\n", 1)
        read_until(b"after\n")
        assert received.decode().splitlines()[1:] == [
            *(f"line {i}" for i in range(9)),
            "11 log lines dropped: stderr was not read for a while",
            "after",
        ]
    finally:
        stream.close()
        os.close(read_end)


def test_exporter_failures_are_one_line_a_logger_at_most_every_so_often_without_a_traceback() -> None:
    """A collector down or failing: OpenTelemetry's exporters logged each failed batch and each
    retry (a traceback with a gRPC collector's UNKNOWN), at the rate pods were enrolled."""
    from zds.logfilters import ExporterFailures

    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = Keep()
    handler.addFilter(ExporterFailures(every=0.3))
    exporter = logging.getLogger("opentelemetry.exporter.otlp.test")
    otel = logging.getLogger("opentelemetry")
    otel.addHandler(handler)
    otel.propagate = False
    try:
        for i in range(50):
            try:
                raise RuntimeError(f"collector\nsaid no {i}")
            except RuntimeError:
                exporter.exception("Failed to export batch code: %d", 500)
        logging.getLogger("opentelemetry.other").warning("its own line")  # (another logger: said)
        time.sleep(0.35)
        exporter.error("Failed to export batch code: %d", 503)
    finally:
        otel.removeHandler(handler)
        otel.propagate = True
    assert [r.getMessage() for r in kept] == [
        "Failed to export batch code: 500 (RuntimeError: collector said no 0)",
        "its own line",
        "Failed to export batch code: 503 (49 more from opentelemetry.exporter.otlp.test in the 0.3s "
        "before not shown)",
    ]
    assert all(r.exc_info is None for r in kept)


def test_exporter_failures_left_out_are_counted_at_the_stop_and_the_sdks_other_lines_pass(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A count left out was said only with the next line of its kind, which a stop never
    brought (a console exporter dropping 3,440 spans said it once, no number); and the SDK's
    lines on bad settings (one per bad pair) were cut to the first of each logger."""
    from zds.logfilters import ExporterFailures, say_left_out

    failures = ExporterFailures(every=60.0)
    queue = logging.LogRecord(
        "opentelemetry.sdk._shared_internal", logging.WARNING, "", 0, "Queue full", None, None
    )
    said = [failures.filter(logging.makeLogRecord(queue.__dict__)) for _ in range(5)]
    assert said == [True, False, False, False, False]
    settings = [
        logging.LogRecord(
            "opentelemetry.sdk.resources", logging.WARNING, "", 0, "Invalid pair %s", (k,), None
        )
        for k in ("k1", "k2")
    ]
    assert all(failures.filter(record) for record in settings)
    caplog.set_level(logging.WARNING, logger="zds.server.telemetry")
    say_left_out()
    assert "4 more line(s) from opentelemetry.sdk._shared_internal like 'Queue full' not shown" in caplog.text
