"""Test harness: real `zds` processes and a raw-socket ZDS peer.

Everything started here is stopped by PID in ``close()``/fixtures, also on
failure; sockets live under the test's tmp dir.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.protocol.messages import Ack, Request, decode_request, encode_ack, encode_hello

ZDS = [sys.executable, "-m", "zds"]

#: The repository's root, the test data copied into it, and ../shared (absent in a lone clone).
ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared"


def wire_vectors() -> list[tuple[str, str, str, bytes]]:
    """The golden wire vectors (tests/data/zds-wire.tsv): name, message, text form, bytes."""
    rows = []
    for line in (DATA / "zds-wire.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, message, text, hexbytes = line.split("\t")
        rows.append((name, message, text, bytes.fromhex(hexbytes)))
    return rows


def wire_vector(name: str) -> bytes:
    """The golden bytes of one vector, by name."""
    for row in wire_vectors():
        if row[0] == name:
            return row[3]
    raise KeyError(name)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ZdsProcess:
    """A `zds ...` subprocess with its output captured to a file."""

    def __init__(self, args: list[str], log_path: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([*ZDS, *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 10.0) -> None:
        wait_until(
            lambda: text in self.output() or self.proc.poll() is not None, timeout, f"{text!r} in output"
        )
        assert text in self.output(), (
            f"process exited ({self.proc.returncode}) without printing {text!r}:\n{self.output()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class NodeAgentProc(ZdsProcess):
    """``zds server`` on sockets under ``tmp``."""

    def __init__(
        self, tmp: str, *extra: str, name: str = "server", redirect: bool = False, env_path: str | None = None
    ) -> None:
        self.zds_socket = os.path.join(tmp, "ztunnel", "ztunnel.sock")
        self.control_socket = os.path.join(tmp, "zds", "control.sock")
        self.cni_socket = os.path.join(tmp, "cni", "pluginevent.sock")
        args = [
            "server",
            "--zds-socket",
            self.zds_socket,
            "--control-socket",
            self.control_socket,
            "--cni-socket",
            self.cni_socket,
            "--http-listen",
            "off",
            *([] if redirect else ["--no-redirect"]),
            *extra,
        ]
        env = {**os.environ, "PATH": env_path} if env_path is not None else None
        super().__init__(args, os.path.join(tmp, f"{name}.log"), env)

    def wait_ready(self) -> NodeAgentProc:
        self.wait_for_output("node agent ready")
        return self

    @contextlib.contextmanager
    def control(self) -> Iterator[Any]:
        with grpc.insecure_channel(f"unix:{self.control_socket}") as channel:
            yield nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]

    def add_pod(self, uid: str, netns: str, name: str = "", namespace: str = "ns", sa: str = "sa") -> Any:
        with self.control() as stub:
            return stub.AddPod(
                nodeagent_pb2.AddPodRequest(
                    uid=uid, name=name or uid, namespace=namespace, service_account=sa, netns_path=netns
                ),
                timeout=30,
            )

    def remove_pod(self, uid: str) -> Any:
        with self.control() as stub:
            return stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=uid), timeout=30)

    def list_pods(self) -> list[Any]:
        with self.control() as stub:
            return list(stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=30).pods)


@dataclass
class Received:
    payload: bytes
    fds: list[int] = field(default_factory=list)
    flags: int = 0

    @property
    def request(self) -> Request:
        return decode_request(self.payload)

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class RawPeer:
    """A ztunnel stand-in made of a bare SOCK_SEQPACKET socket (blocking calls, with timeouts)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(path)

    def send(self, payload: bytes) -> None:
        self.sock.send(payload)

    def hello(self) -> None:
        self.send(encode_hello())

    def ack(self, error: str = "") -> None:
        self.send(encode_ack(Ack(error=error)))

    def recv(self, timeout: float = 10.0) -> Received | None:
        """The next record, or None if nothing arrives within ``timeout``."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, fds, flags, _ = socket.recv_fds(self.sock, 1024, 4, socket.MSG_CMSG_CLOEXEC)
        return Received(payload=data, fds=list(fds), flags=flags)

    def expect(self, timeout: float = 10.0) -> Received:
        got = self.recv(timeout)
        assert got is not None, f"nothing received within {timeout}s"
        assert got.payload, "connection closed by the node agent"
        return got

    def expect_closed(self, timeout: float = 10.0) -> None:
        """The node agent closes the connection (EOF) within ``timeout``."""
        got = self.recv(timeout)
        assert got is not None, f"connection still open after {timeout}s"
        got.close_fds()
        assert got.payload == b"", f"expected EOF, got {got.payload.hex()}"

    def take_snapshot(self) -> list[Received]:
        """Ack every snapshot entry and the SnapshotSent; return the entries (fds still open)."""
        entries = []
        while True:
            got = self.expect()
            self.ack()
            if got.payload == bytes.fromhex("1a00"):
                return entries
            entries.append(got)

    def close(self) -> None:
        self.sock.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Istio's CNI plugin talks to the node agent like this)."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def post_unix(path: str, url: str, body: bytes) -> tuple[int, str]:
    conn = UnixHTTPConnection(path)
    try:
        conn.request("POST", url, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def own_netns() -> str:
    """A netns path every test can use without creating one: this process's."""
    return f"/proc/{os.getpid()}/ns/net"


def send_signal_kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


class AckingPeer:
    """A ztunnel stand-in that says hello and answers every request from a thread.

    ``nack`` maps a uid to the error its AddWorkload is answered with; ``received``
    lists every request in order (``kinds`` their oneof names).
    """

    def __init__(self, path: str, nack: dict[str, str] | None = None, delay: float = 0.0) -> None:
        import threading

        self.raw = RawPeer(path)
        self.nack = nack or {}
        #: Seconds to wait before each ack (a slow ztunnel).
        self.delay = delay
        self.received: list[Request] = []
        self._stop = threading.Event()
        self.raw.hello()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def kinds(self) -> list[str]:
        from zds.protocol.messages import request_kind

        return [request_kind(r) for r in list(self.received)]

    def _run(self) -> None:
        from zds.protocol.messages import AddWorkload

        while not self._stop.is_set():
            got = self.raw.recv(timeout=0.1)
            if got is None:
                continue
            got.close_fds()
            if not got.payload:
                return
            request = got.request
            self.received.append(request)
            if self.delay:
                time.sleep(self.delay)
            self.raw.ack(self.nack.get(request.uid, "") if isinstance(request, AddWorkload) else "")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.raw.close()
