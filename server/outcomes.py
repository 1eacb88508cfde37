"""How an enrollment or removal ended, as the node agent's callers (the control API, the CNI
endpoint, the container engine's events) see it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from zds.errors import ZdsError
from zds.server.podcache import Pod

#: What an enrollment answered without ztunnel's ack says of its pod (it was stored and
#: cached: a node agent's stop keeps it, and it comes back when it starts again).
CACHED = "(the pod stays cached and goes out in the next snapshot)"
COMES_BACK = "(the pod is stored: it comes back when the node agent starts again)"
NOT_CONNECTED = f"no ztunnel connection {CACHED}"
STOPPING = "node agent shutting down; the pod is stored: it comes back when the node agent starts again"


class EnrollmentOutcome(enum.Enum):
    """How an enrollment ended (the control API maps each to a gRPC status)."""

    ACKED = "acked"
    #: A netns that cannot be opened or is no netns, an AddWorkload too large: nothing was cached.
    INVALID = "invalid"
    #: Refused: the node's own netns, a netns from a place not allowed, names Kubernetes would
    #: refuse. Nothing was cached, nothing touched.
    REFUSED = "refused"
    #: Cached; delivered in the next ztunnel's snapshot.
    NO_CONNECTION = "no_connection"
    #: ztunnel answered with an error; cached.
    NACKED = "nacked"
    #: The connection closed before the ack; cached.
    LOST = "lost"
    #: No ack within the ack timeout: the connection was closed; cached.
    TIMEOUT = "timeout"
    #: The redirection rules could not be installed: nothing cached, nothing sent.
    RULES = "rules"
    #: The pod could not be written to the pod store: its rules were taken out again, nothing cached.
    STORE = "store"
    #: The node agent is out of fds (``NODE_AGENT_FD_RESERVE``): nothing cached, nothing touched.
    EXHAUSTED = "exhausted"


class RemovalNotRecorded(ZdsError):
    """The pod store cannot record that a removal begins: nothing was removed (removed now,
    the pod would come back at the next start, its rules installed again)."""


class PodChanged(ZdsError):
    """Once its turn came, the pod of the uid was not the one the caller had decided on (another
    source enrolled, replaced or removed it meanwhile): nothing was done; look again."""


class Expect(enum.Enum):
    """``expect`` of an enrollment or removal that acts on whatever pod holds the uid then."""

    ANY_POD = "any pod"


ANY_POD = Expect.ANY_POD


class EnrollmentError(ZdsError):
    """Enrollment did not end with a clean ack; ``outcome`` says how."""

    def __init__(self, outcome: EnrollmentOutcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class Enrolled:
    pod: Pod
    conn_id: str


@dataclass
class DeleteResult:
    conn_id: str
    error: str
