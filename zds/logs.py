"""Structured logging: every line about a pod or a connection carries its
uid, pod name/namespace and connection id, as text ``key=value`` or JSON.

A line logged inside a traced operation (OTEL_TRACES_EXPORTER set) also
carries ``trace_id`` and ``span_id``, to find the trace from the log.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import select
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from zds import logfilters

if TYPE_CHECKING:
    import asyncio  # (loaded where a tally first waits: ``zds pod add`` loads no asyncio)

#: Context fields that go on a log line when present (``extra={...}``).
FIELDS = ("conn", "uid", "pod", "namespace", "netns", "error", "kind", "trace_id", "span_id")


class _Seconds:
    """The ``YYYY-mm-ddTHH:MM:SS`` of the last second formatted (a line per pod in a snapshot
    of thousands: formatting the same second again is most of a line's cost)."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds()

    def format(self, record: logging.LogRecord) -> str:
        ts = self._seconds(record.created)
        ms = int(record.msecs)
        parts = [f"{ts}.{ms:03d}Z", f"{record.levelname.lower():5}", f"{record.name}:", record.getMessage()]
        for key in FIELDS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                text = str(value)
                # quoted (json escapes) when it has a space, or a control character a peer
                # sent (a uid with a newline forged a line; an escape sequence a terminal's)
                quoted = " " in text or not text or not text.isprintable()
                parts.append(f"{key}={json.dumps(text) if quoted else text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds()

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self._seconds(record.created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "scope": record.name,
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value not in (None, ""):
                # (as the text lines: json.dumps would write a NamedTuple such as a NetnsRef as a list)
                doc[key] = value if isinstance(value, (str, int, float)) else str(value)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class _Writer:
    """Writes a handler's batches on a thread of its own, in order: a reader of stderr that
    stops reading (a pipe nobody drains) blocks that thread, never the event loop (it froze
    acks, health checks, the data path and the stop). Lines are dropped only while that
    thread is stuck: past ``LINES`` lines waiting with one write(2) under way for ``STUCK``
    seconds; they are counted and the count said where they would have been, before the next
    batch that goes (ztunnel's writer thread buffers 10,000 lines too, then blocks). A writer
    merely late (the loop takes the GIL back at every system call: it can wait ~0.2 s for
    it under load) drops nothing."""

    LINES = 10_000
    STUCK = 1.0

    def __init__(self, handler: BatchingStreamHandler) -> None:
        self._handler = handler
        self._batches: collections.deque[tuple[str, int]] = collections.deque()
        self._lines = 0
        self._dropped = 0
        #: When the write under way began (None: none is).
        self._writing: float | None = None
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="zds-log-writer", daemon=True).start()

    def put(self, text: str, lines: int) -> None:
        with self._cond:
            if not self._batches and not self._dropped and len(text) <= _AT_ONCE and _room(self._handler):
                # Nothing waits and the stream takes it without blocking: written now, in order
                # (the writer thread would get the GIL only some milliseconds later).
                self._handler.write(text)
                return
            writing = self._writing
            if (
                self._lines + lines > self.LINES
                and writing is not None
                and time.monotonic() - writing >= self.STUCK
            ):
                self._dropped += lines
                return
            if self._dropped:
                text, lines = self._said_dropped() + text, lines + 1
            self._batches.append((text, lines))
            self._lines += lines
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Say what was dropped last, and wait up to ``timeout`` seconds for what is queued
        to be written (at exit)."""
        with self._cond:
            if self._dropped:
                self._batches.append((self._said_dropped(), 1))
                self._cond.notify_all()
            self._cond.wait_for(lambda: not self._batches, timeout)

    def _said_dropped(self) -> str:
        record = logging.makeLogRecord(
            {
                "name": "zds.logs",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines dropped: stderr was not read for a while",
                "args": (self._dropped,),
            }
        )
        self._dropped = 0
        return self._handler.format(record) + self._handler.terminator

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._batches))
                text, lines = self._batches[0]
                self._writing = time.monotonic()
            self._handler.write(text)
            with self._cond:
                self._writing = None
                self._batches.popleft()
                self._lines -= lines
                self._cond.notify_all()


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on an event loop's thread, writes lines in batches: a daemon
    handling thousands of pods a second logs a line per pod, and one write(2) per line (each
    waking whoever reads the other end of the pipe) cost more than the rest of the line.

    Lines logged on a running loop's thread are written at the latest ``DELAY`` seconds later
    (or at once when ``LIMIT`` bytes wait); a warning or an error flushes at once, with
    everything before it, so nothing is reordered; so does any line logged from another
    thread or with no loop running, and ``logging.shutdown()`` at exit. From the first batch
    flushed on a loop's thread on, every batch is written by a thread of its own (``_Writer``);
    ``close`` (at exit) waits up to ``DRAIN`` seconds for them."""

    DELAY = 0.005
    LIMIT = 64 * 1024
    DRAIN = 5.0

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._size = 0
        self._timer: Any = None
        self._writer: _Writer | None = None
        # A child forked without exec (pyroute2 makes namespaces so) has no writer thread.
        os.register_at_fork(after_in_child=functools.partial(_forked, weakref.ref(self)))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.LIMIT:
            self.flush()
            return
        loop = _running_loop()
        if loop is None or threading.current_thread() is not threading.main_thread():
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.DELAY, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        self.acquire()
        try:
            self.flush()
        finally:
            self.release()

    def flush(self) -> None:
        pending, self._pending, self._size = self._pending, [], 0
        if self._writer is None and _running_loop() is not None:
            self._writer = _Writer(self)  # (the loop's thread must never block on stderr)
        if self._writer is not None:
            if pending:
                self._writer.put("".join(pending), len(pending))
        elif pending:
            self.write("".join(pending))

    def write(self, text: str) -> None:
        """Write and flush ``text``. As StreamHandler's emit, a broken or closed stderr never
        fails the caller (a log line in the node agent's ack handling would otherwise leave
        an enrollment waiting)."""
        with contextlib.suppress(Exception):
            self.stream.write(text)
            self.stream.flush()

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.drain(self.DRAIN)
        super().close()


#: What is written on the caller's thread when the stream has room: a pipe with room for a
#: page takes up to PIPE_BUF bytes without blocking.
_AT_ONCE = select.PIPE_BUF


def _room(handler: logging.StreamHandler) -> bool:  # type: ignore[type-arg]
    """Whether the handler's stream can take a write now (a full pipe: no; no fd: no)."""
    try:
        poller = select.poll()
        poller.register(handler.stream.fileno(), select.POLLOUT)
        return any(events & select.POLLOUT for _, events in poller.poll(0))
    except Exception:
        return False


def _forked(handler: weakref.ref[BatchingStreamHandler]) -> None:
    if (alive := handler()) is not None:
        alive._writer = None  # (its lines written as before the loop: at once)


def flush() -> None:
    """Write out every line waiting in a batch now (before the event loop's thread blocks)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def _running_loop() -> Any:
    asyncio = sys.modules.get("asyncio")  # never imported here: a client command has none
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send zds's logs to stderr at ``level`` as ``text`` or ``json``."""
    # Neither format shows them: no pid, thread or caller lookup for every line (the caller
    # lookup walks the stack; logging documents _srcfile = None as the way to skip it).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BatchingStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(logfilters.QuietLibraries(("pyroute2",)))  # first: a dropped line costs nothing more
    handler.addFilter(logfilters.GoneStreams())
    handler.addFilter(logfilters.BadRequests())
    handler.addFilter(logfilters.ExporterFailures())
    handler.addFilter(logfilters.TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp are chatty at debug; keep them at warning unless asked.
    for noisy in ("grpc", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Tally:
    """Something that happens to many at once (connections, watchers), said in one warning
    line of ``logger``'s at most every ``every`` seconds, with how many times it happened:
    the first at once, the rest when the ``every`` seconds are up (on the running loop)."""

    def __init__(self, every: float, logger: logging.Logger) -> None:
        self.every = every
        self.logger = logger
        self._said = -every
        self._count = 0
        self._line: tuple[str, tuple[object, ...]] = ("", ())
        self._timer: asyncio.TimerHandle | None = None

    def add(self, text: str, *args: object) -> None:
        """Count one; ``text`` takes the count, then ``args`` (the latest are said)."""
        self._count += 1
        self._line = (text, args)
        wait = self._said + self.every - time.monotonic()
        if wait <= 0:
            self._say()
        elif self._timer is None:
            import asyncio

            self._timer = asyncio.get_running_loop().call_later(wait, self._say)

    def flush(self) -> None:
        """Say what is counted and not said yet, now (at a stop: the timer would die with the loop)."""
        if self._timer is not None:
            self._say()  # (which cancels the timer)

    def _say(self) -> None:
        if self._timer is not None:  # (said by ``add`` before its timer came: that timer goes)
            self._timer.cancel()
            self._timer = None
        if not self._count:
            return
        text, args = self._line
        self.logger.warning(text, self._count, *args)
        self._said, self._count = time.monotonic(), 0
