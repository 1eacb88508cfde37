"""The OTEL_* environment as the node agent reads it: the exporters each variable names, the
resource (zds's service name unless one is given), and the checks of the values the SDK
would take badly; each refusal a TelemetryConfigError in one line."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Mapping

from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

from zds.errors import ZdsError

SERVICE_NAME = "zds-node-agent"


class TelemetryConfigError(ZdsError):
    """The OTEL_* settings ask for something zds cannot do; the message says what to change."""


def _exporter_names(environ: Mapping[str, str], var: str) -> list[str]:
    names = [n.strip().lower() for n in environ.get(var, "none").split(",") if n.strip()]
    return [n for n in names if n != "none"]


def _otlp_protocol(environ: Mapping[str, str], signal: str) -> str:
    protocol = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol not in ("grpc", "http/protobuf"):
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use grpc or http/protobuf"
        )
    return protocol


#: The longest OTLP export timeout taken (seconds): a day. gRPC ended a call with a deadline
#: much further (10**10 s, or infinite) at once, DEADLINE_EXCEEDED.
OTLP_TIMEOUT_MAX = 86400.0


def check_otlp_timeout(environ: Mapping[str, str], signal: str) -> None:
    """TelemetryConfigError unless the OTLP exporter's timeout for ``signal`` (TRACES,
    METRICS), when set, is a number of seconds it can wait (the Python SDK's unit): the SDK
    takes any float, and NaN made each export retry for ~30 s against a deadline never met, a
    negative one or 0 failed each at once (gRPC: DEADLINE_EXCEEDED; HTTP: refused by its
    client), one it could not read was the gRPC exporter's ValueError, the HTTP one's 10 s."""
    name = f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"
    if not environ.get(name, "").strip():  # (empty: unset, as the spec has every variable)
        name = "OTEL_EXPORTER_OTLP_TIMEOUT"
    text = environ.get(name, "")
    if not text.strip():
        return
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= OTLP_TIMEOUT_MAX:
        raise TelemetryConfigError(
            f"{name}={text!r}: give the seconds an OTLP export may take (a number over 0, at most "
            f"{OTLP_TIMEOUT_MAX:g}, a day)"
        )


def _missing_otlp(exc: ImportError) -> TelemetryConfigError:
    return TelemetryConfigError(
        f"the OTLP exporter is not installed ({exc.name}); install it with pip install 'zds[otlp]' "
        "or set OTEL_TRACES_EXPORTER/OTEL_METRICS_EXPORTER to console or none"
    )


#: How soon the console exporter prints the spans that ended (ms): batched too, written by
#: the batch's thread (written on the loop as each span ended, a stdout nobody read stopped
#: every enrollment, and the stop).
CONSOLE_SPAN_DELAY_MS = 200


def span_exporters_from_env(environ: Mapping[str, str]) -> list[tuple[SpanExporter, int | None]]:
    """(exporter, its batch's delay in ms: None for the SDK's, OTEL_BSP_SCHEDULE_DELAY or 5 s)
    for each name in OTEL_TRACES_EXPORTER."""
    exporters: list[tuple[SpanExporter, int | None]] = []
    for name in _exporter_names(environ, "OTEL_TRACES_EXPORTER"):
        if name == "console":
            exporters.append((ConsoleSpanExporter(), CONSOLE_SPAN_DELAY_MS))
        elif name == "otlp":
            check_otlp_timeout(environ, "TRACES")
            try:
                if _otlp_protocol(environ, "TRACES") == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                else:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                        OTLPSpanExporter,
                    )
            except ImportError as exc:
                raise _missing_otlp(exc) from exc
            exporters.append((OTLPSpanExporter(), None))
        else:
            raise TelemetryConfigError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; use otlp, console or none"
            )
    return exporters


def metric_exporters_from_env(environ: Mapping[str, str]) -> list[MetricExporter]:
    """Push exporters for each name in OTEL_METRICS_EXPORTER (prometheus: served at /metrics)."""
    exporters: list[MetricExporter] = []
    for name in _exporter_names(environ, "OTEL_METRICS_EXPORTER"):
        if name == "prometheus":
            continue
        if name == "console":
            exporters.append(ConsoleMetricExporter())
        elif name == "otlp":
            check_otlp_timeout(environ, "METRICS")
            try:
                if _otlp_protocol(environ, "METRICS") == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
                else:
                    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                        OTLPMetricExporter,
                    )
            except ImportError as exc:
                raise _missing_otlp(exc) from exc
            exporters.append(OTLPMetricExporter())
        else:
            raise TelemetryConfigError(
                f"OTEL_METRICS_EXPORTER: unknown exporter {name!r}; use otlp, console, prometheus or none"
            )
    return exporters


def resource_from(environ: Mapping[str, str]) -> Resource:
    """The resource zds's telemetry is of; TelemetryConfigError for variables that are not
    printable UTF-8 (they went into every /metrics page: each scrape a 500, the start said
    nothing)."""
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        if not environ.get(name, "").isprintable():  # (bytes that are not UTF-8, a newline)
            raise TelemetryConfigError(f"{name}: give printable UTF-8 text")
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name; empty, they name
    # nothing (the SDK ignores an empty OTEL_SERVICE_NAME: it was "unknown_service:python";
    # one of spaces it takes, as it is).
    attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    named = bool(environ.get("OTEL_SERVICE_NAME")) or any(
        key.strip() == "service.name" and value.strip()
        for key, _, value in (attribute.partition("=") for attribute in attributes)
    )
    return Resource.create({} if named else {"service.name": SERVICE_NAME})


def check_export_interval(environ: Mapping[str, str]) -> None:
    """TelemetryConfigError unless OTEL_METRIC_EXPORT_INTERVAL (when set) is a number of
    milliseconds the exporter's thread can wait: the SDK exported nothing at all for an
    infinite one (or NaN), fell back to a minute for one it could not read, and its thread
    died at the first wait for one over ``threading.TIMEOUT_MAX`` seconds (0 or a negative
    one it refuses itself: said here in the same words)."""
    text = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "")
    if not text.strip():  # (empty: unset, as the OpenTelemetry spec has every variable)
        return
    try:
        millis = float(text)
    except ValueError:
        millis = math.nan
    if not 0 < millis <= threading.TIMEOUT_MAX * 1000:
        raise TelemetryConfigError(
            f"OTEL_METRIC_EXPORT_INTERVAL={text!r}: give the milliseconds between metric exports "
            f"(a number over 0, at most {threading.TIMEOUT_MAX * 1000:.3g})"
        )


@contextlib.contextmanager
def sdk_not_disabled() -> Iterator[None]:
    """``OTEL_SDK_DISABLED`` hidden from the SDK while the meter provider is made: with it the
    SDK hands out no-op meters, and ``/metrics`` (served by the node agent itself, not pushed)
    lost every zds series. The variable turns off the exporters (``from_environment``)."""
    saved = os.environ.pop("OTEL_SDK_DISABLED", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["OTEL_SDK_DISABLED"] = saved
