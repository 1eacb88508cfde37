"""The ztunnel side's metrics, in the OpenMetrics text format, as ztunnel writes them.

The four in-pod metrics keep ztunnel's names: ztunnel registers them in
``src/inpod/metrics.rs`` under the ``workload_manager`` prefix (``app.rs``),
so they read ``workload_manager_active_proxy_count``,
``workload_manager_pending_proxy_count``,
``workload_manager_proxies_started_total`` and
``workload_manager_proxies_stopped_total``. zds's own additions carry the
``zds_ztunnel_`` prefix (connections, requests, nacks, the data path's
connections and bytes per workload). A handful of numbers, so the text is written here
directly, as ztunnel's ``prometheus-client`` crate writes it: a counter family named
without ``_total`` in its HELP and TYPE lines (its sample with it), a full stop after each
help text, whole numbers without a fraction, ``# EOF`` at the end. ztunnel writes that
text whatever is asked for and says ``application/openmetrics-text`` only to a client whose
``Accept`` names it (``content_type``, as ``src/metrics/server.rs``'s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: The Content-Type of /metrics unless the client accepts OpenMetrics (ztunnel's words).
PLAIN_TEXT = "text/plain; charset=utf-8"
#: The Content-Type of /metrics for a client whose Accept names OpenMetrics (ztunnel's words).
OPENMETRICS = "application/openmetrics-text;charset=utf-8;version=1.0.0"


def content_type(accept: Iterable[str]) -> str:
    """The Content-Type ztunnel answers /metrics with, given the request's ``Accept`` headers:
    OpenMetrics if an entry (split on commas, not trimmed, lowercased) is
    ``application/openmetrics-text`` before its first ``;``, else plain text."""
    for header in accept:
        for entry in header.split(","):
            if entry.lower().split(";", 1)[0] == "application/openmetrics-text":
                return OPENMETRICS
    return PLAIN_TEXT


class _Family:
    __slots__ = ("help", "kind", "labeled", "name", "read", "values")

    def __init__(self, name: str, kind: str, help: str, *, labeled: bool = False) -> None:
        self.name = name
        self.kind = kind  # "counter" | "gauge"
        self.help = help
        self.labeled = labeled
        self.values: dict[tuple[tuple[str, str], ...], float] = {}
        self.read: Callable[[], float] | None = None


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # (OpenMetrics's)


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class ZtunnelMetrics:
    """Counters and gauges of ``zds ztunnel``; ``render()`` gives the /metrics text."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        # ztunnel's in-pod metrics (help texts as ztunnel's).
        self._gauge(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
        )
        self._gauge(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
        )
        self._counter(
            "workload_manager_proxies_started_total",
            "The total number of proxies that were started (unstable)",
        )
        self._counter(
            "workload_manager_proxies_stopped_total",
            "The total number of proxies that were stopped (unstable)",
        )
        # zds's own.
        self._gauge("zds_ztunnel_connected", "1 while connected to the node agent, else 0")
        self._gauge("zds_ztunnel_ready", "1 while ready (connected, snapshot reconciled, nothing pending)")
        self._counter("zds_ztunnel_connections_total", "Connections made to the node agent")
        self._counter(
            "zds_ztunnel_requests_total", "Requests received from the node agent, by kind", labeled=True
        )
        self._counter(
            "zds_ztunnel_nacks_total",
            "Nacks sent to the node agent, by reason (read, process, start)",
            labeled=True,
        )
        self._counter(
            "zds_ztunnel_faults_total",
            "Faults on demand (--faults, POST /faults), by kind and outcome (injected, applied)",
            labeled=True,
        )

        self._counter(
            "zds_ztunnel_proxied_connections_total",
            "Connections relayed by the data path, by workload uid and direction (outbound 15001, inbound 15006)",
            labeled=True,
        )
        self._counter(
            "zds_ztunnel_proxied_bytes_total",
            "Bytes relayed by the data path, by workload uid, direction and flow "
            "(sent: from the connecting client, received: back to it)",
            labeled=True,
        )

    def _gauge(self, name: str, help: str) -> None:
        self._families[name] = _Family(name, "gauge", help)

    def _counter(self, name: str, help: str, *, labeled: bool = False) -> None:
        assert name.endswith("_total"), name  # (its sample's name; the family's is without)
        self._families[name] = _Family(name, "counter", help, labeled=labeled)

    # -- updates --------------------------------------------------------------
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` (with ``labels``)."""
        family = self._families[name]
        if family.kind != "counter":
            raise TypeError(f"{name} is a {family.kind}, not a counter")
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = tuple(sorted(labels.items()))
        family.values[key] = family.values.get(key, 0.0) + amount

    def set_total(self, name: str, value: float, **labels: str) -> None:
        """Set counter ``name`` from a running total kept elsewhere (it must not go down)."""
        family = self._families[name]
        if family.kind != "counter":
            raise TypeError(f"{name} is a {family.kind}, not a counter")
        key = tuple(sorted(labels.items()))
        if value < family.values.get(key, 0.0):
            raise ValueError(f"{name}{labels} would go down")
        family.values[key] = value

    def forget(self, name: str, **labels: str) -> None:
        """Drop every series of ``name`` whose labels include ``labels`` (a workload that is gone)."""
        family = self._families[name]
        wanted = set(labels.items())
        for key in [k for k in family.values if wanted <= set(k)]:
            del family.values[key]

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name`` (with ``labels``) to ``value``."""
        family = self._families[name]
        if family.kind != "gauge":
            raise TypeError(f"{name} is a {family.kind}, not a gauge")
        family.values[tuple(sorted(labels.items()))] = value

    def observe(self, name: str, read: Callable[[], float]) -> None:
        """Make gauge ``name`` read its value from ``read()`` at every render."""
        family = self._families[name]
        if family.kind != "gauge":
            raise TypeError(f"{name} is a {family.kind}, not a gauge")
        family.read = read

    def value(self, name: str, **labels: str) -> float:
        """The current value of a metric (0 if never set)."""
        family = self._families[name]
        if family.read is not None and not labels:
            return family.read()
        return family.values.get(tuple(sorted(labels.items())), 0.0)

    # -- exposition --------------------------------------------------------------
    def render(self) -> str:
        """Every metric in the OpenMetrics text format (ztunnel's, see the module's doc)."""
        lines: list[str] = []
        for family in self._families.values():
            name = family.name.removesuffix("_total") if family.kind == "counter" else family.name
            lines.append(f"# HELP {name} {_escape_help(family.help)}.")
            lines.append(f"# TYPE {name} {family.kind}")
            values = dict(family.values)
            if family.read is not None:
                values[()] = family.read()
            if not values and not family.labeled:
                values[()] = 0.0
            for key, value in sorted(values.items()):
                if key:
                    labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in key)
                    lines.append(f"{family.name}{{{labels}}} {_format_value(value)}")
                else:
                    lines.append(f"{family.name} {_format_value(value)}")
        lines.append("# EOF")
        return "\n".join(lines) + "\n"
