"""What the log handler adds to a line (the trace it was logged in) and what it quiets:
libraries that log every message, the tracebacks gRPC and aiohttp log for what they
answered already (one warning line instead), and OpenTelemetry's exporters' failures."""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id``/``span_id`` of the current span, if one is being recorded."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Without OpenTelemetry loaded there is no span (and a client command need not load it).
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:
            return True
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class QuietLibraries(logging.Filter):
    """Drops the debug and info lines of libraries that log every message they handle
    (pyroute2: every netlink message). Their loggers' levels cannot be set beforehand:
    pyroute2 sets its own when it is imported, which is lazily, after ``configure``."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self._names = names
        self._prefixes = tuple(name + "." for name in names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not (record.name in self._names or record.name.startswith(self._prefixes))


class GoneStreams(logging.Filter):
    """gRPC's own error, with its traceback, when it ends a stream of answers (``Watch``,
    ``AddPods``) whose client went away mid-write (or stopped reading, its write abandoned):
    the stream is over either way (it was a traceback for 62 of 300 watchers cancelled, and
    for AddPods calls cancelled while their answers waited unread). Kept at debug."""

    #: zds.v1.NodeAgent's methods that stream answers (a test holds this to the proto).
    STREAMING = ("AddPods", "Watch")
    GONE = tuple(
        f"ExecuteBatchError raised in core by servicer method [/zds.v1.NodeAgent/{method}]"
        for method in STREAMING
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "grpc._cython.cygrpc" or not record.getMessage().startswith(self.GONE):
            return True
        if logging.getLogger("zds").getEffectiveLevel() > logging.DEBUG:
            return False
        record.levelno, record.levelname, record.exc_info, record.exc_text = (
            logging.DEBUG,
            "DEBUG",
            None,
            None,
        )
        return True


class BadRequests(logging.Filter):
    """aiohttp's error and traceback for a request it could not parse (a header over 8 KB,
    bytes that are no HTTP): it answered 400 already; one warning line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "aiohttp.server" and record.exc_info and record.levelno >= logging.ERROR:
            exc = record.exc_info[1]
            if type(exc).__module__.startswith("aiohttp") and "BadHttpMessage" in {
                c.__name__ for c in type(exc).__mro__
            }:
                record.msg, record.args = (
                    f"%s: %s ({type(exc).__name__}); answered 400",
                    (record.getMessage(), " ".join(str(exc).split())),
                )
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                record.exc_info, record.exc_text = None, None
        return True


class ExporterFailures(logging.Filter):
    """OpenTelemetry's exporters log every export that failed (each batch of spans, each
    retry, and for a gRPC collector's ``UNKNOWN`` a traceback of 16 lines), and its span
    queue every span it drops: a collector down or failing filled the node agent's log at
    the rate pods were enrolled. Those loggers' lines (not the SDK's others: a bad setting
    is said each time) are one line a kind at most every ``every`` seconds, without the
    traceback (its exception in the line), saying how many were left out since; what is
    left out at the stop is said then (``say_left``)."""

    EVERY = 10.0
    #: What the line keeps of the exception's text (a gRPC error's runs long).
    EXCEPTION_TEXT = 300
    #: The loggers of the exporters and of the span and metric export queues.
    LOGGERS = (
        "opentelemetry.exporter.",
        "opentelemetry.sdk._shared_internal",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.sdk.metrics._internal.export",
    )

    def __init__(self, every: float = EVERY) -> None:
        super().__init__()
        self.every = every
        self._lock = threading.Lock()  # (the exporters log from threads of their own)
        #: By logger and message (before its arguments): when last said, how many left out.
        self._said: dict[tuple[str, object], float] = {}
        self._left: dict[tuple[str, object], int] = {}
        _FILTERS.add(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self.LOGGERS):
            return True
        kind, now = (record.name, record.msg), time.monotonic()
        with self._lock:
            said = self._said.get(kind)
            if said is not None and now - said < self.every:
                self._left[kind] = self._left.get(kind, 0) + 1
                return False
            self._said[kind] = now
            left = self._left.pop(kind, 0)
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = " ".join(str(exc).split())[: self.EXCEPTION_TEXT]
            message += f" ({type(exc).__name__}: {text})" if text else f" ({type(exc).__name__})"
        if left:
            message += f" ({left} more from {record.name} in the {self.every:g}s before not shown)"
        record.msg, record.args, record.exc_info, record.exc_text = message, None, None, None
        return True

    def say_left(self) -> None:
        """Say how many lines were left out since each kind was last said (at the stop)."""
        with self._lock:
            left, self._left = self._left, {}
        for (name, msg), count in left.items():
            logging.getLogger("zds.server.telemetry").warning(
                "%d more line(s) from %s like %r not shown in the last %gs",
                count,
                name,
                str(msg)[:120],
                self.every,
            )


#: The filters made (one per log handler set up): their counts are said at the stop.
_FILTERS: weakref.WeakSet[ExporterFailures] = weakref.WeakSet()


def say_left_out() -> None:
    """Every ``ExporterFailures``' ``say_left``."""
    for kept in list(_FILTERS):
        kept.say_left()
