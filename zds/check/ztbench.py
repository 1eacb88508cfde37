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
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass

from zds import defaults, runtime
from zds.aio import cancel_and_wait, finished_within
from zds.check import keeper
from zds.check.pods import CheckSetupError, PodFactory
from zds.check.remains import CheckRecord
from zds.check.report import Finding
from zds.check.ztconn import ZtConn, unacked
from zds.netns.apps import free_port
from zds.transport import SocketFile, SocketPathTaken, bind_unix_listener, clear_socket_path

SNAPSHOT_SENT = b"\x1a\x00"
#: sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
_SUN_PATH_MAX = 107


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
    """The listening socket, the ztunnel under test, and what every check found; what it
    makes is in ``record`` before it is made."""

    def __init__(self, options: ZtunnelCheckOptions, record: CheckRecord) -> None:
        self.options = options
        self.record = record
        self.findings: dict[str, list[Finding]] = defaultdict(list)
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.exercised: Counter[str] = Counter()
        self.pods = PodFactory(record)
        self.current: ZtConn | None = None
        #: The check that stopped the ztunnel for good, and its last connection: it is restarted
        #: (or awaited) before the next check, never after the last.
        self.stopped: tuple[str, ZtConn] | None = None
        self.pid: int | None = None
        self.starts = 0
        self.exits: list[str] = []
        #: How many times a pod's netns was looked at for the ztunnel's listeners
        #: (``ztsteps.pod_ports``), and the signs that it opens some: a look that found one, an Add
        #: nacked for its port taken. Looks and no sign: a word on --protocol-only in the report.
        self.listener_looks = 0
        self.listener_signs = 0
        self._tmp = record.make_tmp()
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
        self._made_dirs: list[str] = []

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
        if (size := len(os.fsencode(self.socket_path))) > _SUN_PATH_MAX:
            raise CheckSetupError(
                f"cannot listen on {self.socket_path} (--zds-socket): the path is {size} bytes, "
                f"a unix socket's at most {_SUN_PATH_MAX}; choose a shorter one"
            )
        self._made_dirs = _missing_dirs(self.socket_path)
        try:
            self._listener = bind_unix_listener(self.socket_path, mode=defaults.SOCKET_MODE)
        except OSError as exc:  # (a file as its directory, /proc: one line, exit 2)
            said = f"{exc.strerror or exc}"
            if isinstance(exc, FileExistsError):  # (making its directory: a file is there)
                said = f"{exc.filename} is not a directory"
            raise CheckSetupError(f"cannot listen on {self.socket_path} (--zds-socket): {said}") from exc
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
            # Through its keeper, which leads the session started for it: the command's
            # processes end with the check, also when it is killed (``zds.check.keeper``).
            self._proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-I", "-S", keeper.__file__, str(os.getpid()), command),
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=self.record.peer_env(),
            )
        finally:
            os.close(log)
        self.record.peer_started(self._proc.pid)

    def exit_said(self) -> str:
        """Why the ztunnel we started is not there (for a message), "" when it runs."""
        if self._proc is None or self._proc.returncode is None:
            return ""
        return f"; it exited with status {self._proc.returncode} (its last output is shown above)"

    def never_connected(self, within: float) -> str:
        """Why the check cannot start: the ztunnel never connected (one line: no report follows)."""
        if self._proc is not None and self._proc.returncode is not None:
            last = next((line for line in reversed(self.log_tail()) if not line.startswith("--- start")), "")
            return (
                f"the ztunnel command exited with status {self._proc.returncode} before it connected to "
                f"{self.socket_path}"
                + (f"; its last output: {last.strip()}" if last.strip() else "; it printed nothing")
            )
        if self.options.cmd:
            return f"the ztunnel command runs but did not connect to {self.socket_path} within {within:g}s"
        return f"no ztunnel connected to {self.socket_path} within {within:g}s"

    async def exited(self, within: float) -> int | None:
        """The exit status of the ztunnel we started, if it exits within ``within`` seconds."""
        if self._proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                return await self._proc.wait()
        return None

    async def stop_process(self) -> None:
        """Stop the ztunnel we started and everything it started: its session's process group,
        SIGTERM, then SIGKILL for what is left after 10 s (a child that ignores SIGTERM
        outlived the /bin/sh we waited for)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is not None and not runtime.process_group(proc.pid):
            return
        _signal_group(proc.pid, signal.SIGTERM)  # the session we started for it
        stopped = False
        try:
            stopped = await _group_ended(proc, 10)
        finally:
            if not stopped:  # (also when cancelled meanwhile: nobody else will)
                _signal_group(proc.pid, signal.SIGKILL)
        if not stopped:
            await _group_ended(proc, 10)

    # -- connections --------------------------------------------------------------------------
    async def accept(self, within: float, until: Awaitable[None] | None = None) -> ZtConn | None:
        """The next connection from ztunnel, once it said hello (None when none comes, or
        ``until`` is done first)."""
        getting = asyncio.ensure_future(self._accepted.get())
        waits: set[asyncio.Future[object]] = {getting}  # type: ignore[arg-type]
        if until is not None:
            waits.add(asyncio.ensure_future(until))
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

    async def after_stop(self, old: ZtConn) -> ZtConn | None:
        """The next connection after ``old``'s ztunnel stopped for good, if one comes while the
        process that had ``old`` lives (--timeout at most): else it did not come back, and a
        connection that comes later is another process's (a supervisor's restart). Its pid
        unknown, any within --grace."""
        if not old.pid:
            return await self.accept(self.options.grace)
        return await self.accept(self.options.timeout, until=self._gone(old.pid))

    @staticmethod
    async def _gone(pid: int) -> None:
        """Return once process ``pid`` has ended (its pidfd turns readable then: no polling)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # (gone already)
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(fd, ended.set)
            try:
                await ended.wait()
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)

    def alive(self, pid: int | None) -> bool:
        """Whether process ``pid`` runs (a zombie does not; an unknown pid is not judged: False)."""
        fields = runtime.proc_stat(pid) if pid else None
        return fields[0] not in _ENDED if fields else False

    def restarted(self, old: ZtConn, new: ZtConn) -> bool:
        """Whether ``new`` comes from another process, ``old``'s gone: a restart, no reconnect."""
        return bool(old.pid and new.pid and new.pid != old.pid and not self.alive(old.pid))

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
        if conn is None and first:
            raise ZtunnelGone(self.never_connected(within))
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

    async def fresh(self, snapshot: list[tuple[bytes, list[int]]] | None, check: str = "") -> ZtConn:
        """A new connection that said hello and, unless ``snapshot`` is None, took a snapshot of
        these entries (each acked: else a finding of ``check``) and SnapshotSent."""
        conn = await self.reconnected()
        if snapshot is None:
            return conn
        for payload, fds in snapshot:
            reply = await conn.request(payload, fds, check=check)
            if (finding := unacked("a snapshot entry", payload, reply, conn)) is not None:
                self.report(check, finding)
        reply = await conn.request(SNAPSHOT_SENT, check="snapshot-sent-acked")
        self.exercised["snapshot-sent-acked"] += 1
        if (finding := unacked("SnapshotSent", SNAPSHOT_SENT, reply, conn)) is not None:
            self.report("snapshot-sent-acked", finding)
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
        for path in reversed(self._made_dirs):  # the directories binding made for it, deepest first
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self.pods.close()

    def log_tail(self, lines: int = 8) -> list[str]:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
        return []

    def remove_tmp(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class ZtunnelGone(CheckSetupError):
    """The ztunnel under test did not connect (again)."""


def _missing_dirs(path: str) -> list[str]:
    """The directories above ``path`` that are not there yet (binding makes them), outermost first."""
    missing: list[str] = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent) and not os.path.lexists(parent):
        missing.insert(0, parent)
        parent = os.path.dirname(parent)
    return missing


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


#: A process's states in /proc/PID/stat once it ended (a zombie waits for its parent to reap it).
_ENDED = (b"Z", b"X")


async def _group_ended(proc: asyncio.subprocess.Process, within: float) -> bool:
    """Whether /bin/sh (reaped here) and every process of its group are gone within ``within`` s."""
    deadline = time.monotonic() + within
    if not await finished_within(proc.wait(), within):
        return False
    for _ in range(int(within / 0.05) + 1):
        if not runtime.process_group(proc.pid):
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return False


def _open_log(path: str, header: str) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.write(fd, header.encode())
    return fd
