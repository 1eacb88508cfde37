"""``zds pod add --from-file``: from exec to its first request, as a node agent receives it.

In a live run the node agent's first ``pod enrolled`` line comes after the first request
*and* the first enrollment (netns opened and checked, the pod stored, the line batched),
so the client's own start-up is timed here against a stand-in: a unix socket in the bench
process speaking the control socket's bulk lane (``zds.server.bulkwire``: what ``zds pod
add --from-file`` uses on a unix control socket) with zds's own generated messages, that
notes when the first ``AddPodsRequest`` arrives and answers every pod as enrolled. The
client cannot tell it from the node agent (the same socket, the same bytes), and the timing
has nothing of the node agent's in it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from procs import BenchError

from zds.gen import nodeagent_pb2
from zds.server.bulkwire import MAGIC, MAGIC_JSON, Deframer, frame

_SOCKETS = itertools.count()


class _StandIn:
    """The bulk lane on ``path``: every pod enrolled at once; when the first request came."""

    def __init__(self, path: str) -> None:
        self.first: float | None = None
        self.error: str | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # closed before the client came
        with conn:
            try:
                self._answer(conn)
            except (OSError, ValueError) as exc:
                self.error = f"the stand-in: {exc}"

    def _answer(self, conn: socket.socket) -> None:
        opening = b""
        while len(opening) < len(MAGIC):
            data = conn.recv(len(MAGIC) - len(opening))
            if not data:
                raise ValueError("the client closed before the lane's opening")
            opening += data
        if opening not in (MAGIC, MAGIC_JSON):
            raise ValueError(f"the client opened with {opening!r}")
        conn.sendall(opening)  # as the node agent: it speaks the lane (in either form)
        deframer, index = Deframer(), 0
        while data := conn.recv(256 * 1024):
            for message in deframer.feed(data):
                if self.first is None:
                    self.first = time.perf_counter()
                if opening == MAGIC_JSON:
                    count = len(json.loads(message))
                    answers = [
                        {"index": i, "code": 0, "connection_id": "bench-stand-in"}
                        for i in range(index, index + count)
                    ]
                    conn.sendall(frame(json.dumps(answers).encode()))
                    index += count
                    continue
                results = []
                for pod in nodeagent_pb2.AddPodsRequest.FromString(message).pods:
                    response = nodeagent_pb2.AddPodResponse(connection_id="bench-stand-in")
                    results.append(nodeagent_pb2.AddPodsResult(index=index, uid=pod.uid, response=response))
                    index += 1
                conn.sendall(frame(nodeagent_pb2.AddPodsReply(results=results).SerializeToString()))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() if no client came
        self._listener.close()
        self._thread.join(10)


@dataclass
class FirstRequest:
    """One timed ``zds pod add --from-file``."""

    #: exec -> the stand-in has the first AddPodsRequest.
    first_request_ms: float
    #: exec -> the client exited (every pod answered and printed).
    exit_ms: float


def measure(
    argv_for: Callable[[str], list[str]], pods_file: str, n: int, directory: str, env: dict[str, str]
) -> FirstRequest:
    """Start ``argv_for(socket)`` (a ``zds pod add --from-file pods_file`` of ``n`` pods)
    against a fresh stand-in; BenchError if it fails or does not print ``n`` enrollments."""
    sock = os.path.join(directory, f"stand-in-{next(_SOCKETS)}.sock")
    stand_in = _StandIn(sock)
    try:
        t0 = time.perf_counter()
        done = subprocess.run(argv_for(sock), env=env, capture_output=True, text=True, timeout=120)
        ended = time.perf_counter()
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"zds pod add --from-file {pods_file} against the stand-in took over 120 s") from exc
    finally:
        stand_in.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    enrolled = done.stdout.count(" enrolled: ")
    if done.returncode != 0 or enrolled != n or stand_in.first is None:
        tail = stand_in.error or (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
        raise BenchError(
            f"zds pod add --from-file {pods_file} against the stand-in exited {done.returncode} "
            f"with {enrolled} of {n} pods enrolled: {tail}"
        )
    return FirstRequest(first_request_ms=(stand_in.first - t0) * 1e3, exit_ms=(ended - t0) * 1e3)
