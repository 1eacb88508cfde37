"""Structured logging: every line about a pod or a connection carries its
uid, pod name/namespace and connection id, as text ``key=value`` or JSON.

A line logged inside a traced operation (OTEL_TRACES_EXPORTER set) also
carries ``trace_id`` and ``span_id``, to find the trace from the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Context fields that go on a log line when present (``extra={...}``).
FIELDS = ("conn", "uid", "pod", "namespace", "netns", "error", "kind", "trace_id", "span_id")


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
                parts.append(f"{key}={json.dumps(text) if ' ' in text or not text else text}")
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
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send zds's logs to stderr at ``level`` as ``text`` or ``json``."""
    # Neither format shows them: no pid, thread or caller lookup for every line (the caller
    # lookup walks the stack; logging documents _srcfile = None as the way to skip it).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc and aiohttp are chatty at debug; keep them at warning unless asked.
    for noisy in ("grpc", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
