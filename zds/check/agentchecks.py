"""The checks of ``zds check node-agent``: what a node agent must do, as ztunnel and Istio's
own node agent do it, and where in their source each rule comes from.

Record checks judge every record of every scenario; scenario checks judge one
scenario each. ``SCENARIO`` says which scenario exercises a check, so that
``--only`` runs just what is needed.
"""

from __future__ import annotations

from zds.check import sources as src
from zds.check.report import CheckSpec

CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "hello-first",
        "nothing arrives before ztunnel's hello (the check waits before saying it)",
        "ztunnel speaks first: it sends ZdsHello, then reads; the node agent sends nothing before the hello",
        (src.ZT_HELLO_FIRST, src.IS_HELLO_FIRST),
    ),
    CheckSpec(
        "one-in-flight",
        "no second request before the ack of the first (an ack is held back while another pod is added)",
        "one request in flight per connection: acks correlate by order only, so the next request waits for the ack",
        (src.IS_SINGLE_WRITER, src.ZT_PROCESS),
    ),
    CheckSpec(
        "record-size",
        "every record fits ztunnel's 1024-byte receive buffer",
        "a record over 1024 bytes is cut (MSG_TRUNC) and refused: 'failure to read message : received truncated "
        "message', then ztunnel reconnects",
        (src.ZT_READ_BUFFER, src.ZT_TRUNCATED, src.IS_READ_PROTO),
    ),
    CheckSpec(
        "strict-decoding",
        "every record is a WorkloadRequest that decodes strictly: a payload, no field ztunnel does not know",
        "ztunnel decodes each record as a WorkloadRequest with prost: an error or no payload is refused, an "
        "unknown field is silently dropped",
        (src.ZT_DECODE, src.ZT_NO_PAYLOAD),
    ),
    CheckSpec(
        "canonical-encoding",
        "every record is the canonical encoding of its request (decoded, re-encoded, compared byte for byte)",
        "the bytes are what Istio's proto.Marshal and ztunnel's prost write: each field once, in field-number order",
        (src.IS_MARSHAL,),
    ),
    CheckSpec(
        "no-empty-record",
        "no 0-byte record",
        "ztunnel reads a 0-byte record as EOF and reconnects: never send an empty message",
        (src.ZT_READ_EOF,),
    ),
    CheckSpec(
        "add-one-fd",
        "every AddWorkload carries exactly one fd (SCM_RIGHTS on the same sendmsg)",
        "an Add with no fd is 'No control message', with two 'Expected 1 FD, got 2', with more "
        "'ENOBUFS' (ztunnel's buffer holds two: the rest are cut): refused, ztunnel reconnects",
        (src.ZT_NO_CONTROL_MESSAGE, src.ZT_FD_COUNT, src.IS_SEND_WITH_FD),
    ),
    CheckSpec(
        "fd-is-netns",
        "every fd on an AddWorkload is a network namespace (ioctl NS_GET_NSTYPE == CLONE_NEWNET)",
        "the fd must be a netns; ztunnel only logs validate_ns, then setns fails and the pod stays pending "
        "('failure to start proxy : ...')",
        (src.ZT_VALIDATE_NS, src.ZT_VALIDATE_NS_LOGGED),
    ),
    CheckSpec(
        "add-netns-is-the-pods",
        "the netns fd of each AddWorkload is the pod's own (same st_dev/st_ino as the path it was added with)",
        "ztunnel opens the pod's listeners in whatever netns the fd names: the wrong one captures another "
        "pod's traffic (or the node's)",
        (src.ZT_READD, src.IS_SEND_WITH_FD),
    ),
    CheckSpec(
        "fd-only-on-add",
        "KeepWorkload, DelWorkload and SnapshotSent carry no fd",
        "an fd on anything but an Add is 'Unexpected control message': refused, ztunnel reconnects",
        (src.ZT_UNEXPECTED_CONTROL,),
    ),
    CheckSpec(
        "add-workload-info",
        "every AddWorkload carries workload_info",
        "an Add without workload_info is a ProtocolError: ztunnel's in-pod manager stops for good and ztunnel exits",
        (src.ZT_WORKLOAD_INFO, src.ZT_PROCESS_NACK, src.ZT_EXIT_ON_ERROR),
    ),
    CheckSpec(
        "no-keep-after-snapshot",
        "no KeepWorkload after SnapshotSent on a connection",
        "KeepWorkload only belongs to the snapshot; after SnapshotSent it is a ProtocolError and ztunnel exits",
        (src.ZT_KEEP_AFTER_SNAPSHOT, src.ZT_EXIT_ON_ERROR),
    ),
    CheckSpec(
        "one-snapshot-sent",
        "one SnapshotSent per connection",
        "a second SnapshotSent is a ProtocolError ('pod snapshot received already') and ztunnel exits",
        (src.ZT_SECOND_SNAPSHOT, src.ZT_EXIT_ON_ERROR),
    ),
    CheckSpec(
        "snapshot-complete",
        "pods added while no ztunnel was connected are in the next connection's snapshot, then SnapshotSent",
        "a new connection gets every known pod (Add + fd, or Keep when its netns is unknown), then SnapshotSent; "
        "a pod whose delivery failed stays known; ztunnel drops whatever the snapshot does not name",
        (src.IS_SEND_SNAPSHOT, src.IS_ADD_TO_MESH, src.ZT_RECONCILE),
    ),
    CheckSpec(
        "reconnect-snapshot",
        "after the connection drops, the new connection's snapshot names every pod again",
        "ztunnel resets its snapshot state on each connection and drops every workload the new snapshot does "
        "not name: the snapshot must be complete every time",
        (src.ZT_NEW_CONNECTION, src.ZT_RESET_SNAPSHOT, src.ZT_RECONCILE, src.IS_SEND_SNAPSHOT),
    ),
    CheckSpec(
        "adds-to-newest",
        "with two connections, a new pod's AddWorkload goes to the newest only",
        "AddWorkload goes to the latest connection (a new ztunnel takes new pods while an old one drains)",
        (src.IS_POD_ADDED, src.IS_LATEST_CONN),
    ),
    CheckSpec(
        "deletes-to-all",
        "with two connections, a removed pod's DelWorkload goes to both",
        "DelWorkload goes to every connection, so a draining ztunnel releases the pod too",
        (src.IS_POD_DELETED,),
    ),
    CheckSpec(
        "ack-deadline",
        "an ack that never comes ends the request within the deadline: the connection is closed, no request "
        "follows on it, and both pods are in the next snapshot",
        "after the ack deadline the connection is untrustworthy (a late ack would be read as the next request's): "
        "close it; ztunnel reconnects and gets a full snapshot. Istio keeps the connection and sends the next "
        "request on it",
        (src.IS_DEADLINE, src.IS_ACK_TIMEOUT_KEPT, src.IS_SINGLE_WRITER),
    ),
    CheckSpec(
        "fd-hygiene",
        "over many connect/add/remove/disconnect cycles the node agent's fds (/proc/PID/fd) come back: no fd "
        "on a removed pod's netns, no socket left behind",
        "a removed pod's netns fd is closed at once and a closed connection's socket too (Istio leaves netns "
        "fds to Go's garbage collector, so its fd count grows with churn)",
        (src.IS_CACHE_TAKE, src.IS_CACHE_FINALIZER),
    ),
)

BY_NAME = {spec.name: spec for spec in CHECKS}

#: Which scenario exercises each check (record checks: the exchange, but every scenario feeds them).
SCENARIO = {
    "hello-first": "hello-wait",
    "one-in-flight": "exchange",
    "snapshot-complete": "snapshot",
    "reconnect-snapshot": "snapshot",
    "adds-to-newest": "two-connections",
    "deletes-to-all": "two-connections",
    "ack-deadline": "ack-deadline",
    "fd-hygiene": "fd-hygiene",
}
RECORD_CHECKS = tuple(spec.name for spec in CHECKS if spec.name not in SCENARIO)
SCENARIOS = ("hello-wait", "exchange", "snapshot", "two-connections", "ack-deadline", "fd-hygiene")


def scenario_of(name: str) -> str:
    return SCENARIO.get(name, "exchange")
