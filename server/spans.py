"""The node agent's trace spans: their names and attributes (one place, so the
code, the tests and the README agree), and the helpers that open them.

One trace per enrollment::

    zds.enroll_pod       k8s.pod.uid, k8s.pod.name, k8s.namespace.name, zds.connection_id,
    │                    zds.ack_error, zds.outcome
    ├── zds.open_netns   zds.netns.path, zds.netns.inode
    ├── zds.install_rules
    ├── zds.send         AddWorkload written to the newest connection (zds.message_type)
    └── zds.wait_ack     until ztunnel's Ack (zds.ack_error; status ERROR on a nack)

one per removal (``zds.remove_pod``: ``zds.remove_rules``, then ``zds.send``/``zds.wait_ack``
for each connection) and one per snapshot sent to a new connection (``zds.snapshot``,
``zds.snapshot.pods``: ``zds.send``/``zds.wait_ack`` per entry, then SnapshotSent).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

# -- span names ------------------------------------------------------------------
ENROLL_POD = "zds.enroll_pod"
REMOVE_POD = "zds.remove_pod"
SNAPSHOT = "zds.snapshot"
OPEN_NETNS = "zds.open_netns"
INSTALL_RULES = "zds.install_rules"
REMOVE_RULES = "zds.remove_rules"
SEND = "zds.send"
WAIT_ACK = "zds.wait_ack"

# -- attributes (Kubernetes semantic conventions where one exists) -----------------
POD_UID = "k8s.pod.uid"
POD_NAME = "k8s.pod.name"
POD_NAMESPACE = "k8s.namespace.name"
CONNECTION_ID = "zds.connection_id"
MESSAGE_TYPE = "zds.message_type"
ACK_ERROR = "zds.ack_error"
NETNS_PATH = "zds.netns.path"
NETNS_INODE = "zds.netns.inode"
SNAPSHOT_PODS = "zds.snapshot.pods"
OUTCOME = "zds.outcome"


# -- helpers ------------------------------------------------------------------------
def span(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int]
) -> AbstractContextManager[trace.Span]:
    """A span named ``name``; the caller sets its status (exceptions are not recorded twice).
    With tracing off (a no-op tracer) nothing at all: not even the trace context is touched
    (a shared no-op, not a generator made and run for each of an enrollment's spans)."""
    if isinstance(tracer, trace.NoOpTracer):
        return _NO_SPAN
    return _span(tracer, name, attributes)


@contextmanager
def _span(tracer: trace.Tracer, name: str, attributes: Mapping[str, str | int]) -> Iterator[trace.Span]:
    with tracer.start_as_current_span(
        name, attributes=dict(attributes), record_exception=False, set_status_on_exception=False
    ) as current:
        yield current


def failed(current: trace.Span, error: object) -> None:
    """Mark ``current`` as failed with ``error``'s text."""
    current.set_status(Status(StatusCode.ERROR, str(error)))


def trace_context(current: trace.Span) -> otel_context.Context | None:
    """The current trace context, for another task to continue the trace (None: not traced)."""
    return otel_context.get_current() if current.is_recording() else None


def pod_attributes(uid: str, name: str, namespace: str) -> dict[str, str]:
    return {POD_UID: uid, POD_NAME: name, POD_NAMESPACE: namespace}


def within(parent: otel_context.Context | None) -> AbstractContextManager[object]:
    """``parent`` made current (nothing when None: not traced, on every ack, so a shared no-op):
    a log line written in it names its trace, also where it is written later than the span's
    own work (an ack reported once the next request is on its way)."""
    return _UNTRACED if parent is None else _Within(parent)


_UNTRACED: AbstractContextManager[object] = nullcontext()
_NO_SPAN: AbstractContextManager[trace.Span] = nullcontext(trace.INVALID_SPAN)


class _Within(AbstractContextManager[object]):
    def __init__(self, parent: otel_context.Context) -> None:
        self._parent = parent
        self._token: object = None

    def __enter__(self) -> object:
        self._token = otel_context.attach(self._parent)
        return None

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


def child_span(
    tracer: trace.Tracer, name: str, parent: otel_context.Context | None, attributes: dict[str, str]
) -> AbstractContextManager[trace.Span]:
    """A child span in ``parent``'s trace, made current; nothing when ``parent`` is None (not
    traced). Exceptions are neither recorded nor turned into its status (the caller says)."""
    if parent is None:
        return nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(
        name, context=parent, attributes=attributes, record_exception=False, set_status_on_exception=False
    )
