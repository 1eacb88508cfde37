"""``zds pod add --from-file``: from exec to its first request, as a node agent receives it.

In a live run the node agent's first ``pod enrolled`` line comes after the first request
*and* the first enrollment (netns opened and checked, the pod stored, the line batched),
so the client's own start-up is timed here against a stand-in: a gRPC server in the bench
process on a unix socket, serving the control API's ``AddPods`` from zds's own generated
code, that notes when the first ``AddPodsRequest`` arrives and answers every pod as
enrolled. The client cannot tell it from the node agent (the same socket, the same
messages), and the timing has nothing of the node agent's in it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from procs import BenchError

from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc

_SOCKETS = itertools.count()


class _StandIn(nodeagent_pb2_grpc.NodeAgentServicer):
    """AddPods: every pod enrolled at once; when the first request of a call came."""

    def __init__(self) -> None:
        self.first: float | None = None
        self._lock = threading.Lock()

    def AddPods(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        index = 0
        for request in requests:
            now = time.perf_counter()
            with self._lock:
                if self.first is None:
                    self.first = now
            results = []
            for pod in request.pods:
                response = nodeagent_pb2.AddPodResponse(connection_id="bench-stand-in")
                results.append(nodeagent_pb2.AddPodsResult(index=index, uid=pod.uid, response=response))
                index += 1
            yield nodeagent_pb2.AddPodsReply(results=results)


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
    # A socket of its own each time: gRPC unlinks a stopped server's socket file itself.
    sock = os.path.join(directory, f"stand-in-{next(_SOCKETS)}.sock")
    stand_in = _StandIn()
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        server = grpc.server(pool)
        nodeagent_pb2_grpc.add_NodeAgentServicer_to_server(stand_in, server)
        server.add_insecure_port(f"unix:{sock}")
        server.start()
        try:
            t0 = time.perf_counter()
            done = subprocess.run(argv_for(sock), env=env, capture_output=True, text=True, timeout=120)
            ended = time.perf_counter()
        except subprocess.TimeoutExpired as exc:
            raise BenchError(
                f"zds pod add --from-file {pods_file} against the stand-in took over 120 s"
            ) from exc
        finally:
            server.stop(None).wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    enrolled = done.stdout.count(" enrolled: ")
    if done.returncode != 0 or enrolled != n or stand_in.first is None:
        tail = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
        raise BenchError(
            f"zds pod add --from-file {pods_file} against the stand-in exited {done.returncode} "
            f"with {enrolled} of {n} pods enrolled: {tail}"
        )
    return FirstRequest(first_request_ms=(stand_in.first - t0) * 1e3, exit_ms=(ended - t0) * 1e3)
