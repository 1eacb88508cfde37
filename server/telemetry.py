"""OpenTelemetry for the node agent: traces and metrics, set up from the
standard ``OTEL_*`` environment variables, and Prometheus text for ``/metrics``.

Metrics go through OpenTelemetry's Prometheus exporter into a registry of our
own (not prometheus_client's global one, so several node agents can live in
one process). The exporter turns OpenTelemetry names into Prometheus names —
a counter gets ``_total``, unit ``s`` becomes ``_seconds`` — so the
instruments below are named to come out as these series:

=======================================  ========  =====================================
``ztunnel_connected``                    gauge     ztunnel connections that said hello
                                                   (Istio's name)
``zds_pods_enrolled{state}``             gauge     pods in the cache by state
                                                   (pending, acked, failed)
``zds_messages_total{type,outcome}``     counter   ZDS requests sent: type add, keep,
                                                   del, snapshot_sent; outcome acked,
                                                   nacked, unanswered
``zds_ack_latency_seconds{type}``        histo     from writing a request to its ack
``zds_pod_enrollments_total{outcome}``   counter   AddPod/CNI enrollments: acked,
                                                   nacked, no_connection, lost,
                                                   timeout, invalid, refused, rules,
                                                   store, exhausted
``istio_cni_plugin_requests_total``      counter   CNI plugin ``/cmdadd`` requests by
``{response_code}``                                response_code (Istio's name)
``zds_cni_events_total``                 counter   CNI plugin events answered: add,
``{event,response_code}``                          del, check
``zds_watchers``                         gauge     open Watch streams
``zds_ztunnel_connections_refused_total`` counter   ZDS connections refused or dropped:
``{reason}``                                       not_allowed (peer credentials),
                                                   limit (--max-connections),
                                                   crowded (more than 64 waiting for
                                                   their hello)
``zds_faults_total{kind,outcome}``       counter   faults on demand: injected, applied,
                                                   refused
=======================================  ========  =====================================

plus ``target_info`` (the OpenTelemetry resource) and prometheus_client's
``process_*`` series (fds, memory, CPU).

Exporters: ``OTEL_TRACES_EXPORTER`` and ``OTEL_METRICS_EXPORTER`` take a
comma-separated list of ``otlp``, ``console``, ``none`` (and, for metrics,
``prometheus``, which ``/metrics`` always serves anyway). Unlike the
OpenTelemetry default (``otlp``) both default to ``none``: a node agent sends
nothing anywhere unless told to. OTLP needs the ``otlp`` extra
(``pip install 'zds[otlp]'``); ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or
``..._TRACES_PROTOCOL``/``..._METRICS_PROTOCOL``) picks ``grpc`` (the default)
or ``http/protobuf``; endpoints, headers and timeouts are read by the
exporters themselves. ``OTEL_SDK_DISABLED=true`` turns both off.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder

from zds import __version__, logfilters
from zds.server.otelenv import (
    SERVICE_NAME,
    TelemetryConfigError,
    check_export_interval,
    metric_exporters_from_env,
    resource_from,
    sdk_not_disabled,
    span_exporters_from_env,
)
from zds.server.outcomes import EnrollmentOutcome

SCOPE = "zds.server"
#: The longest a stop waits for the exporters to flush.
SHUTDOWN_WAIT = 5.0

log = logging.getLogger("zds.server.telemetry")

#: Ack latency buckets (seconds): a local ztunnel acks in well under a
#: millisecond; the ack timeout is 5 s.
ACK_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

POD_STATES = ("pending", "acked", "failed")


class Telemetry:
    """The node agent's tracer and metric instruments, and the Prometheus registry behind /metrics.

    ``span_processors`` (tests: an in-memory exporter) turn tracing on; with none
    the tracer is a no-op and costs nothing. ``from_environment`` builds one from OTEL_*.
    """

    def __init__(
        self,
        *,
        span_processors: Iterable[SpanProcessor] = (),
        metric_readers: Iterable[MetricReader] = (),
        resource: Resource | None = None,
    ) -> None:
        resource = resource or Resource.create({"service.name": SERVICE_NAME})
        processors = list(span_processors)
        self._tracer_provider: TracerProvider | None = None
        if processors:
            # Shut down by ``shutdown`` (bounded), not again at exit (unbounded: 20 s with a
            # collector that accepts and never answers).
            self._tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
            for processor in processors:
                self._tracer_provider.add_span_processor(processor)
            self.tracer: trace.Tracer = self._tracer_provider.get_tracer(SCOPE, __version__)
        else:
            self.tracer = trace.NoOpTracer()

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        prometheus = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        with sdk_not_disabled():
            self._meter_provider = MeterProvider(
                resource=resource, metric_readers=[prometheus, *metric_readers], shutdown_on_exit=False
            )
        meter = self._meter_provider.get_meter(SCOPE, __version__)

        self._connected: Callable[[], int] = lambda: 0
        self._pods_by_state: Callable[[], Mapping[str, int]] = dict
        self._watchers: Callable[[], int] = lambda: 0

        meter.create_observable_gauge(
            "ztunnel_connected",
            callbacks=[lambda _: [Observation(self._connected())]],
            description="number of connections to ztunnel",
        )
        meter.create_observable_gauge(
            "zds_pods_enrolled",
            callbacks=[self._observe_pods],
            description="pods the node agent holds, by state (pending, acked, failed)",
        )
        meter.create_observable_gauge(
            "zds_watchers",
            callbacks=[lambda _: [Observation(self._watchers())]],
            description="open Watch streams on the control API",
        )
        # Counted in plain dicts on the per-message path, read by OpenTelemetry at each
        # collection: a synchronous Counter.add costs ~6 µs a call, this ~0.1 µs.
        self._message_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._enrollment_counts: collections.Counter[str] = collections.Counter()
        meter.create_observable_counter(
            "zds_messages",
            callbacks=[self._observe_messages],
            description="ZDS requests the node agent sent, by type (add, keep, del, snapshot_sent) "
            "and outcome (acked, nacked, unanswered)",
        )
        self._ack_latency = meter.create_histogram(
            "zds_ack_latency",
            unit="s",
            description="time from writing a ZDS request to ztunnel's ack, by type",
            explicit_bucket_boundaries_advisory=ACK_LATENCY_BUCKETS,
        )
        meter.create_observable_counter(
            "zds_pod_enrollments",
            callbacks=[self._observe_enrollments],
            description=f"pod enrollments by outcome ({', '.join(o.value for o in EnrollmentOutcome)})",
        )
        self._cni_requests = meter.create_counter(
            "istio_cni_plugin_requests",
            description="The total number of CNI plugin requests handled by the node agent.",
        )
        self._cni_events = meter.create_counter(
            "zds_cni_events",
            description="CNI plugin events (add, del, check) answered, by HTTP response code",
        )
        self._refused = meter.create_counter(
            "zds_ztunnel_connections_refused",
            description="ZDS connections refused or dropped, by reason (not_allowed: peer credentials, "
            "limit: --max-connections, crowded: too many waiting for their hello)",
        )
        self._faults = meter.create_counter(
            "zds_faults",
            description="faults on demand (zds fault, --faults) by kind and outcome (injected, applied, refused)",
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Telemetry:
        """Exporters from OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER (default: none)."""
        env = os.environ if environ is None else environ
        resource = resource_from(env)
        try:
            if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
                return cls(resource=resource)
            processors: list[SpanProcessor] = [
                BatchSpanProcessor(exporter, schedule_delay_millis=delay)
                for exporter, delay in span_exporters_from_env(env)
            ]
            exporters = metric_exporters_from_env(env)
            if exporters:
                check_export_interval(env)
            readers = [PeriodicExportingMetricReader(e) for e in exporters]
            return cls(span_processors=processors, metric_readers=readers, resource=resource)
        except TelemetryConfigError:
            raise
        except Exception as exc:  # the SDK reads its OTEL_* values here, each its own way
            given = ", ".join(sorted(k for k in env if k.startswith("OTEL_")))
            if not given:
                raise  # (none set: a bug, not a setting)
            raise TelemetryConfigError(
                f"an OTEL_* setting the SDK refuses ({type(exc).__name__}: {exc}); set here: {given}"
            ) from exc

    @property
    def tracing(self) -> bool:
        return self._tracer_provider is not None

    def observe(
        self,
        *,
        connected: Callable[[], int],
        pods_by_state: Callable[[], Mapping[str, int]],
        watchers: Callable[[], int],
    ) -> None:
        """Where the gauges read their values (the node agent's state) at each collection."""
        self._connected = connected
        self._pods_by_state = pods_by_state
        self._watchers = watchers

    def hold_pods(self) -> None:
        """The node agent stops: its pods are counted as they are now from here on (its cache is
        emptied as it closes, and the exporters' last push at the stop said every pod gone)."""
        counts = dict(self._pods_by_state())
        self._pods_by_state = lambda: counts

    def _observe_messages(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"type": kind, "outcome": outcome})
            for (kind, outcome), n in list(self._message_counts.items())
        ]

    def _observe_enrollments(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {"outcome": outcome}) for outcome, n in list(self._enrollment_counts.items())]

    def _observe_pods(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = self._pods_by_state()
        return [Observation(counts.get(state, 0), {"state": state}) for state in POD_STATES]

    # -- recording -------------------------------------------------------------------
    def message(self, message_type: str, outcome: str, latency: float | None = None) -> None:
        self._message_counts[message_type, outcome] += 1
        if latency is not None:
            self._ack_latency.record(latency, {"type": message_type})

    def enrollment(self, outcome: str) -> None:
        self._enrollment_counts[outcome] += 1

    def cni_event(self, event: str, code: int) -> None:
        """A CNI plugin event answered: ``event`` add, del or check. Istio's counter is of
        ``/cmdadd`` only (its other paths are zds's)."""
        if event == "add":
            self._cni_requests.add(1, {"response_code": str(code)})
        self._cni_events.add(1, {"event": event, "response_code": str(code)})

    def connection_refused(self, reason: str) -> None:
        self._refused.add(1, {"reason": reason})

    def fault(self, kind: str, outcome: str) -> None:
        self._faults.add(1, {"kind": kind, "outcome": outcome})

    # -- exposition --------------------------------------------------------------------
    def prometheus(self, accept: str = "") -> tuple[bytes, str]:
        """The registry as Prometheus text (or OpenMetrics, if ``accept`` asks for it), and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def shutdown(self) -> None:
        """Flush and stop the exporters, off the event loop, for at most ``SHUTDOWN_WAIT``
        seconds: a collector that accepts and never answers held the node agent's exit for 20 s
        (each provider the exporter's timeout). What is not flushed by then is dropped, in a
        warning line; the stopping thread is a daemon's, so the exit does not wait for it."""
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()

        def stop() -> None:
            try:
                if self._tracer_provider is not None:
                    self._tracer_provider.shutdown()
                self._meter_provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(stopped.set_result, None)  # (shielded: never cancelled)

        threading.Thread(target=stop, name="zds-telemetry-stop", daemon=True).start()
        try:
            async with asyncio.timeout(SHUTDOWN_WAIT):
                await asyncio.shield(stopped)
        except TimeoutError:
            log.warning(
                "OpenTelemetry exporters still flushing after %gs; what they hold is dropped", SHUTDOWN_WAIT
            )
        logfilters.say_left_out()  # (their failures' lines left out since last said)
