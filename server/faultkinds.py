"""The faults the node agent can be made to show (``zds fault``, ``--faults``), in a module of
their own so the CLI can name them without importing the node agent."""

from __future__ import annotations

import enum

from zds.errors import ZdsError
from zds.protocol.messages import AddWorkload


class MadeUpAdd(AddWorkload):
    """An AddWorkload a record fault made up with a pod's uid (``add-with-two-fds``,
    ``add-without-workload-info``): its answer says nothing of the pod's own delivery,
    whose state stays as it was."""

    __slots__ = ()


class Category(enum.Enum):
    MESSAGE = "message"
    RECORD = "record"
    CONNECTION = "connection"
    DELIVERY = "delivery"


class FaultKind(enum.Enum):
    """Every fault, with what it acts on and what it does."""

    DELAY = (
        "delay",
        Category.MESSAGE,
        "wait --delay seconds before writing each of the next --count messages",
    )
    DROP_BEFORE = (
        "drop-before",
        Category.MESSAGE,
        "close the connection instead of writing the next message",
    )
    DROP_AFTER = ("drop-after", Category.MESSAGE, "close the connection right after writing the next message")
    PIPELINE = (
        "pipeline",
        Category.MESSAGE,
        "write the next message twice, back to back, before its first ack",
    )
    NON_CANONICAL = (
        "non-canonical",
        Category.MESSAGE,
        "write the next message with its payload field twice (valid protobuf, not canonical)",
    )
    WRONG_NETNS = (
        "wrong-netns",
        Category.MESSAGE,
        "write the next AddWorkload with the netns fd of another enrolled pod",
    )
    OVERSIZE_RECORD = (
        "oversize-record",
        Category.RECORD,
        "a DelWorkload padded over ztunnel's 1024-byte buffer (unknown field 15, 1100 bytes)",
    )
    UNKNOWN_FIELD = (
        "unknown-field",
        Category.RECORD,
        "a DelWorkload with a field ztunnel does not know (15)",
    )
    NO_PAYLOAD = ("no-payload", Category.RECORD, "a WorkloadRequest with only an unknown field: no payload")
    EMPTY_RECORD = ("empty-record", Category.RECORD, "a 0-byte record (ztunnel reads it as EOF)")
    ADD_WITHOUT_FD = ("add-without-fd", Category.RECORD, "an AddWorkload with no fd")
    ADD_WITH_TWO_FDS = ("add-with-two-fds", Category.RECORD, "a pod's AddWorkload with two fds of its netns")
    ADD_WITHOUT_WORKLOAD_INFO = (
        "add-without-workload-info",
        Category.RECORD,
        "a pod's AddWorkload (with its netns fd) without workload_info",
    )
    NOT_A_NETNS_FD = ("not-a-netns-fd", Category.RECORD, "an AddWorkload whose fd is /dev/null, not a netns")
    FD_ON_DEL = ("fd-on-del", Category.RECORD, "a DelWorkload carrying an fd (/dev/null)")
    KEEP_UNKNOWN_UID = ("keep-unknown-uid", Category.RECORD, "a KeepWorkload for a uid nobody enrolled")
    DUPLICATE_ADD = ("duplicate-add", Category.RECORD, "a pod's AddWorkload (with its netns fd) once more")
    SECOND_SNAPSHOT_SENT = ("second-snapshot-sent", Category.RECORD, "a SnapshotSent after the snapshot")
    RECORD_BEFORE_HELLO = (
        "record-before-hello",
        Category.CONNECTION,
        "on the next connection, a DelWorkload before reading ztunnel's hello",
    )
    WITHHOLD_SNAPSHOT_SENT = (
        "withhold-snapshot-sent",
        Category.CONNECTION,
        "never send this snapshot's SnapshotSent",
    )
    OMIT_FROM_SNAPSHOT = ("omit-from-snapshot", Category.CONNECTION, "leave pod --uid out of the snapshot")
    ADD_TO_OLDEST = (
        "add-to-oldest",
        Category.DELIVERY,
        "the next --count AddWorkloads go to the oldest connection",
    )
    DEL_TO_NEWEST_ONLY = (
        "del-to-newest-only",
        Category.DELIVERY,
        "the next --count DelWorkloads go to the newest connection only",
    )
    LEAK_NETNS_FDS = (
        "leak-netns-fds",
        Category.DELIVERY,
        "keep the netns fds of the next --count removed pods open (as Istio leaves them to Go's GC)",
    )

    def __init__(self, label: str, category: Category, description: str) -> None:
        self.label = label
        self.category = category
        self.description = description

    @classmethod
    def named(cls, label: str) -> FaultKind:
        for kind in cls:
            if kind.label == label:
                return kind
        raise FaultError(
            Refusal.INVALID, f"unknown fault {label!r}; one of {', '.join(k.label for k in cls)}"
        )


#: Record faults made from a pod's netns (a real netns, so nothing else is wrong with them).
NEEDS_POD = frozenset(
    {FaultKind.ADD_WITH_TWO_FDS, FaultKind.ADD_WITHOUT_WORKLOAD_INFO, FaultKind.DUPLICATE_ADD}
)


class Refusal(enum.Enum):
    INVALID = "invalid"  # the request itself is wrong (gRPC INVALID_ARGUMENT)
    PRECONDITION = "precondition"  # it makes no sense in the connection's state (FAILED_PRECONDITION)


class FaultError(ZdsError):
    """A fault refused; the message says why in one line."""

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
