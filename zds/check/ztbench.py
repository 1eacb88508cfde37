"""The strict node agent of ``zds check ztunnel``: its socket, the ztunnel under test (started
and restarted from a command template, or connecting by itself), its connections (``ztconn``),
and what every check found.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from zds import defaults
from zds.aio import cancel_and_wait, finished_within
from zds.check.pods import CheckSetupError, PodFactory
from zds.check.report import Finding
from zds.check.ztconn import ZtConn
from zds.netns.apps import free_port
from zds.transport import SocketFile, SocketPathTaken, bind_unix_listener, clear_socket_path


@dataclass
class ZtunnelCheckOptions:
    """What ``zds check ztunnel`` was told."""

    cmd: str | None = None
    zds_socket: str | None = None
    ready_url: str | None = None
    config_dump_url: str | None = None
    protocol_only: bool = False
    retry_interval: float = defaults.PENDING_RETRY_INTERVAL
    connect_timeout: float = 30.0
    timeout: float = 5.0
    grace: float = 2.0


class Bench:
    """The listening socket, the ztunnel under test, and what every check found."""

    def __init__(self, options: ZtunnelCheckOptions) -> None:
        self.options = options
        self.findings: dict[str, list[Finding]] = defaultdict(list)
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.exercised: Counter[str] = Counter()
        self.pods = PodFactory()
        self.current: ZtConn | None = None
        self.pid: int | None = None
        self.starts = 0
        self.exits: list[str] = []
        self._tmp = tempfile.mkdtemp(prefix="zds-check-")
        self.socket_path = options.zds_socket or os.path.join(self._tmp, "ztunnel.sock")
        self.log_path = os.path.join(self._tmp, "ztunnel.log")
        self.values = {"socket": self.socket_path} | {
            f"{n}_port": str(free_port()) for n in ("admin", "readiness", "metrics")
        }
        self._listener: socket.socket | None = None
        self._socket_file: SocketFile | None = None
        self._accepted: asyncio.Queue[ZtConn] = asyncio.Queue()
        self._accepting: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._conns: list[ZtConn] = []

    def report(self, check: str, finding: Finding) -> None:
        self.findings[check].append(finding)

    def note(self, check: str, text: str) -> None:
        self.notes[check].append(text)

    def url(self, template: str | None) -> str | None:
        return template.format_map(self.values) if template else None

    # -- the socket and the process ---------------------------------------------------------
    async def start(self) -> None:
        try:
            # A stale socket goes; a served one, or anything that is no socket, stays.
            clear_socket_path(self.socket_path)
        except SocketPathTaken as exc:
            raise CheckSetupError(f"{exc} (--zds-socket)") from exc
        self._listener = bind_unix_listener(self.socket_path, mode=defaults.SOCKET_MODE)
        self._socket_file = SocketFile.of(self.socket_path)
        self._accepting = asyncio.ensure_future(self._accept())
        if self.options.cmd:
            await self.launch()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            conn = ZtConn(len(self._conns) + 1, sock, self)
            self._conns.append(conn)
            if conn.pid:
                self.pid = conn.pid
            await self._accepted.put(conn)

    async def launch(self) -> None:
        assert self.options.cmd is not None
        command = self.options.cmd.format_map(self.values)
        self.starts += 1
        log = _open_log(self.log_path, f"--- start {self.starts}: {command}\n")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", command, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            os.close(log)

    def exit_said(self) -> str:
        """Why the ztunnel we started is not there (for a message), "" when it runs."""
        if self._proc is None or self._proc.returncode is None:
            return ""
        return f"; it exited with status {self._proc.returncode} (its last output is shown above)"

    async def exited(self, within: float) -> int | None:
        """The exit status of the ztunnel we started, if it exits within ``within`` seconds."""
        if self._proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                return await self._proc.wait()
        return None

    async def stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started for it
        try:
            stopped = await finished_within(proc.wait(), 10)
        finally:
            if proc.returncode is None:  # (also when cancelled meanwhile: nobody else will)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if not stopped:
            await proc.wait()

    # -- connections --------------------------------------------------------------------------
    async def accept(self, within: float) -> ZtConn | None:
        """The next connection from ztunnel, once it said hello (None when none comes)."""
        getting = asyncio.ensure_future(self._accepted.get())
        waits: set[asyncio.Future[object]] = {getting}  # type: ignore[arg-type]
        if self._proc is not None and self._proc.returncode is None:
            waits.add(asyncio.ensure_future(self._proc.wait()))  # a ztunnel that dies will not connect
        done, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        if getting not in done:
            return None
        conn = getting.result()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.timeout):
                await conn.hello_seen.wait()
        if conn.hello_at is None and conn.closed_at is None:
            self.report(
                "hello", Finding(f"no hello within {self.options.timeout:g}s of connecting", conn.name)
            )
        self.current = conn
        return conn

    async def reconnected(self, first: bool = False) -> ZtConn:
        """Close the current connection (if ztunnel has not) and take the next one."""
        old = self.current
        if old is not None:
            await old.close()
        closed_by_us = time.monotonic()  # (after close's linger: the close itself)
        within = self.options.connect_timeout if first or old is None else self.options.timeout
        conn = await self.accept(within)
        if conn is None and old is not None:
            self.report(
                "reconnect",
                Finding(
                    f"no connection within {within:g}s after the node agent closed {old.name}: ztunnel connects again at once",
                    old.name,
                ),
            )
        if conn is None:
            raise ZtunnelGone(f"no connection from the ztunnel within {within:g}s" + self.exit_said())
        if old is not None and old.closed_at is None:
            self.exercised["reconnect"] += 1
            after = max(0.0, conn.accepted_at - closed_by_us)
            came = f"{conn.name} came {after * 1000:.1f} ms after the node agent closed {old.name}"
            if after > self.options.grace:
                self.report("reconnect", Finding(f"{came}; ztunnel connects again at once", old.name))
            else:
                self.note("reconnect", came)
        return conn

    async def fresh(self, snapshot: list[tuple[bytes, list[int]]] | None) -> ZtConn:
        """A new connection that said hello and, unless ``snapshot`` is None, took a snapshot of
        these entries (each acked) and SnapshotSent."""
        conn = await self.reconnected()
        if snapshot is None:
            return conn
        for payload, fds in snapshot:
            await conn.request(payload, fds)
        reply = await conn.request(b"\x1a\x00")
        self.exercised["snapshot-sent-acked"] += 1
        if reply is None or reply.ack is None or reply.ack.error:
            said = (
                "nothing" if reply is None else repr(reply.ack.error if reply.ack else reply.payload.hex(" "))
            )
            self.report(
                "snapshot-sent-acked",
                Finding(
                    f"SnapshotSent was answered with {said}",
                    conn.name,
                    sent=b"\x1a\x00",
                    received=reply.payload if reply else None,
                ),
            )
        return conn

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()
        if self._accepting is not None:
            await cancel_and_wait(self._accepting)
        if self._listener is not None:
            self._listener.close()
        await self.stop_process()
        if self._socket_file is not None:
            self._socket_file.remove()  # only the socket it bound: never what it refused
        self.pods.close()

    def log_tail(self, lines: int = 8) -> list[str]:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
        return []

    def remove_tmp(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class ZtunnelGone(CheckSetupError):
    """The ztunnel under test did not connect (again)."""


def _open_log(path: str, header: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.write(fd, header.encode())
    return fd
