"""The building blocks of ``zds check ztunnel``'s scenarios: records to send, how an
answer is judged (acked, or a nack with ztunnel's prefix), waiting on ztunnel's state,
its HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from zds.check.inpod import INPOD_PORTS, ports_of
from zds.check.pods import CheckPod
from zds.check.report import Finding
from zds.check.ztbench import SNAPSHOT_SENT as SNAPSHOT_SENT  # (the bench sends it in every snapshot)
from zds.check.ztbench import Bench
from zds.check.ztconn import Reply, ZtConn, unacked
from zds.check.ztconn import said as said  # (the scenarios say answers with it too)
from zds.protocol.messages import AddWorkload, DelWorkload, KeepWorkload, WorkloadInfo, encode_request

NO_PAYLOAD = b"\x78\x01"
UNDECODABLE = b"\x0a\xff\x01"
#: Field 15 as 1100 bytes: pushes a DelWorkload past ztunnel's 1024-byte buffer.
PADDING = b"\x7a\xcc\x08" + b"\x00" * 1100
Entry = tuple[bytes, list[int]]


def open_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def add(pod: CheckPod, netns: str | None = None, *, info: bool = True) -> Entry:
    wi = WorkloadInfo(pod.name, pod.namespace, pod.service_account) if info else None
    return encode_request(AddWorkload(pod.uid, wi)), [open_fd(netns or pod.netns)]


def delete(uid: str, fds: list[int] | None = None) -> Entry:
    return encode_request(DelWorkload(uid)), fds or []


def keep(uid: str, fds: list[int] | None = None) -> Entry:
    return encode_request(KeepWorkload(uid)), fds or []


async def request_acked(b: Bench, name: str, conn: ZtConn, entry: Entry, what: str) -> bool:
    """Send ``entry`` as a request of check ``name``: whether it was acked (``acked``)."""
    payload, fds = entry
    return acked(b, name, conn, await conn.request(payload, fds, check=name), payload, what)


def acked(b: Bench, name: str, conn: ZtConn, reply: Reply | None, sent: bytes, what: str) -> bool:
    """Whether ``reply`` acked the request (else a finding of ``name``)."""
    b.exercised[name] += 1
    if (finding := unacked(what, sent, reply, conn)) is None:
        return True
    b.report(name, finding)
    return False


async def wait_for(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], within: float
) -> tuple[bool, Any, float]:
    """Poll ``probe`` until ``done`` says yes or ``within`` seconds pass: (done, last value, seconds)."""
    start = time.monotonic()
    while True:
        value = await probe()
        if done(value) or time.monotonic() - start > within:
            return done(value), value, time.monotonic() - start
        await asyncio.sleep(0.05)


async def pod_ports(b: Bench, netns: str) -> dict[int, set[int]]:
    """The ztunnel's in-pod ports listening in a pod's ``netns`` (``ports_of``), counted on the bench."""
    ports = await ports_of(netns, b.pid)
    b.listener_looks += 1
    b.listener_signs += bool(ports)
    return ports


def ports_probe(b: Bench, netns: str) -> Callable[[], Awaitable[dict[int, set[int]]]]:
    return lambda: pod_ports(b, netns)


ALL = set(INPOD_PORTS)


async def http_status(url: str) -> int | None:
    def get() -> int | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    return await asyncio.to_thread(get)


async def http_json(url: str) -> dict[str, Any] | None:
    def get() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                doc = json.loads(resp.read())
                return doc if isinstance(doc, dict) else None
        except (OSError, ValueError):
            return None

    return await asyncio.to_thread(get)


def expect_nack(
    b: Bench, name: str, conn: ZtConn, reply: Reply | None, sent: bytes, prefix: str, fds: str = ""
) -> bool:
    """Whether ``reply`` is a nack starting ``prefix``; a finding (with what went with the
    record: ``fds``) when it is not."""
    if reply is not None and reply.ack is not None and reply.ack.error.startswith(prefix):
        return True
    b.report(
        name,
        Finding(
            f"answered {said(reply)}; expected a nack starting {prefix!r}",
            conn.name,
            sent=sent,
            received=reply.payload if reply else None,
            detail=[f"sent with {fds}"] if fds else [],
        ),
    )
    return False


def fds_said(paths: list[str]) -> str:
    """How a finding names the fds that went with a record: "2 fds: /var/run/netns/x, /dev/null"."""
    return f"{len(paths)} fd{'s' if len(paths) != 1 else ''}: {', '.join(paths)}" if paths else ""
