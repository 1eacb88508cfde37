"""The checks of ``zds check ztunnel``: what a ztunnel must do with each message of DESIGN §1's
table, as ztunnel's own ``src/inpod/`` does it, and where in its source each rule comes from.

``FATAL`` checks stop the ztunnel for good (a ProtocolError): they run last, each but the last
followed by a restart. ``LISTENERS`` checks need a ztunnel that opens listeners
(skipped with --protocol-only).
"""

from __future__ import annotations

from zds.check import sources as src
from zds.check.report import CheckSpec

_READ = "answered 'failure to read message : ...', then ztunnel closes the connection and reconnects at once"
_FATAL = (
    "answered 'failure to process message : ProtocolError(...)', then the connection closes and the in-pod "
    "manager stops for good (ztunnel exits 1): no reconnect"
)

CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec(
        "hello",
        "the first record on a connection is ZdsHello{version: V1}: exactly 08 01",
        "ztunnel says hello as soon as it connects, before reading anything",
        (src.ZT_SEND_HELLO, src.ZT_HELLO_FIRST),
    ),
    CheckSpec(
        "replies-canonical",
        "every answer is one WorkloadResponse{ack} in canonical bytes (0a 00 for success), with no fd, "
        "at most 1024 bytes",
        "ztunnel answers each request with exactly one WorkloadResponse{ack: Ack{error}} (prost encoding); "
        "Istio's node agent reads an answer into 1024 bytes and refuses a longer one",
        (src.ZT_SEND_ACK, src.ZT_PROCESS, src.IS_READ_PROTO),
    ),
    CheckSpec(
        "speaks-only-when-asked",
        "nothing arrives but the hello and one answer per request (watched after every answer)",
        "ztunnel never speaks unprompted; Istio's keepalive probe takes any record as 'ztunnel protocol error, "
        "unexpected message' and drops the connection",
        (src.IS_KEEPALIVE, src.ZT_PROCESS),
    ),
    CheckSpec(
        "reconnect",
        "after the node agent closes the connection, ztunnel connects again at once (within --grace) and says hello",
        "on EOF ztunnel's manager loops back to connect(), whose first attempt is immediate",
        (src.ZT_RECONNECT, src.ZT_CONNECT),
    ),
    CheckSpec(
        "snapshot-sent-acked",
        "an empty snapshot (SnapshotSent alone) is acked",
        "SnapshotSent reconciles ztunnel's state with the snapshot and is acked",
        (src.ZT_RECONCILE, src.ZT_PROCESS),
    ),
    CheckSpec(
        "add-acked",
        "an AddWorkload with the pod's netns fd is acked",
        "an Add whose proxy starts is acked (a proxy that cannot start is answered 'failure to start proxy : ...')",
        (src.ZT_PROCESS, src.ZT_READD),
    ),
    CheckSpec(
        "listeners-in-pod",
        "after the Add, ztunnel listens on 15001, 15006 and 15008 inside the pod's netns",
        "ztunnel opens the workload's listeners inside the pod's netns (setns in, bind, setns back)",
        (src.ZT_SOCKET_FACTORY, src.ZT_RUN_IN_NS, src.ZT_PROXIES),
    ),
    CheckSpec(
        "no-listeners-on-host",
        "ztunnel has no listener on 15001, 15006 or 15008 in its own (the host's) netns",
        "the in-pod listeners exist only in pods: on the host they would capture the node's traffic",
        (src.ZT_SOCKET_FACTORY, src.ZT_RUN_IN_NS),
    ),
    CheckSpec(
        "listeners-closed-on-del",
        "after the DelWorkload, the pod's listeners close",
        "a deleted workload's proxy is drained (asynchronously: the ack may come first)",
        (src.ZT_DEL,),
    ),
    CheckSpec(
        "del-unknown-uid",
        "a DelWorkload for a uid ztunnel does not hold is acked, and the connection stays",
        "deleting an unknown workload is a no-op, for idempotency",
        (src.ZT_DEL,),
    ),
    CheckSpec(
        "readd-same-netns",
        "an Add of a held uid with the same netns is acked and changes nothing (same listeners)",
        "same uid, same netns (st_dev, st_ino): idempotent, no error",
        (src.ZT_READD,),
    ),
    CheckSpec(
        "readd-new-netns",
        "an Add of a held uid with another netns is acked and moves its listeners to the new netns",
        "same uid, another netns (a re-created sandbox): the old proxy is drained and a new one started",
        (src.ZT_READD,),
    ),
    CheckSpec(
        "reconcile",
        "after a reconnect, a snapshot of Keep A, Add C, Del C keeps A untouched and drops B and C",
        "each connection starts a fresh snapshot; Add and Keep mark uids to keep, a Del before SnapshotSent "
        "unmarks; SnapshotSent drops every workload not marked",
        (src.ZT_RESET_SNAPSHOT, src.ZT_KEEP_MARKS, src.ZT_DEL_BEFORE_SNAPSHOT, src.ZT_RECONCILE),
    ),
    CheckSpec(
        "proxy-start-failure",
        "an Add whose fd is not a netns is nacked 'failure to start proxy : ...', the connection stays, the "
        "workload is pending until a Del, and ready after it (readiness while pending is noted, not judged: "
        "ztunnel's nack path leaves it as it was)",
        "a proxy that cannot start is a transient error: nack, keep the connection, keep the workload pending and "
        "retry it; readiness is looked at again only when a message is acked or a retry runs",
        (src.ZT_START_NACK, src.ZT_PENDING, src.ZT_READY, src.ZT_CHECK_READY),
    ),
    CheckSpec(
        "pending-retry",
        "an Add whose port is taken in the pod is nacked; once the port is free, the retry brings it up",
        "pending workloads are retried every 5 s (RETRY_DURATION) until they start",
        (src.ZT_RETRY, src.ZT_RETRY_DURATION, src.ZT_PENDING),
    ),
    CheckSpec(
        "readiness",
        "the readiness probe answers not ready (500) before the snapshot and ready (200) after it",
        "ztunnel is ready only once a snapshot was received and nothing is pending; not ready answers 500",
        (src.ZT_READY, src.ZT_CHECK_READY, src.ZT_READINESS_500),
    ),
    CheckSpec(
        "oversize-record",
        "a record over 1024 bytes is refused: " + _READ,
        "ztunnel reads into 1024 bytes; MSG_TRUNC is 'received truncated message'",
        (src.ZT_READ_BUFFER, src.ZT_TRUNCATED, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "undecodable-record",
        "bytes that are not a WorkloadRequest are refused: " + _READ,
        "a protobuf decode error is a read failure",
        (src.ZT_DECODE, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "no-payload",
        "a WorkloadRequest with no payload (78 01: only an unknown field) is refused: " + _READ,
        "'no payload' is a read failure",
        (src.ZT_NO_PAYLOAD, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "add-without-fd",
        "an AddWorkload with no fd is refused: " + _READ,
        "'No control message' is a read failure",
        (src.ZT_NO_CONTROL_MESSAGE, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "add-with-two-fds",
        "an AddWorkload with two fds is refused: " + _READ,
        "'Expected 1 FD, got 2' is a read failure (and both fds are closed)",
        (src.ZT_FD_COUNT, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "fd-on-non-add",
        "a DelWorkload, a KeepWorkload and a SnapshotSent each carrying an fd are refused: " + _READ,
        "'Unexpected control message' is a read failure",
        (src.ZT_UNEXPECTED_CONTROL, src.ZT_READ_NACK),
    ),
    CheckSpec(
        "empty-record",
        "a 0-byte record is read as EOF: no answer, ztunnel closes and reconnects",
        "a 0-byte read is EOF (Ok(None)): the stream ends and ztunnel connects again",
        (src.ZT_READ_EOF, src.ZT_RECONNECT),
    ),
    CheckSpec(
        "add-without-workload-info",
        "an AddWorkload without workload_info is " + _FATAL,
        "workload_info is required: a ProtocolError",
        (src.ZT_WORKLOAD_INFO, src.ZT_PROCESS_NACK, src.ZT_STOP_FOR_GOOD, src.ZT_EXIT_ON_ERROR),
    ),
    CheckSpec(
        "keep-after-snapshot",
        "a KeepWorkload after SnapshotSent is " + _FATAL,
        "'pod keep received after snapshot' is a ProtocolError",
        (src.ZT_KEEP_AFTER_SNAPSHOT, src.ZT_PROCESS_NACK, src.ZT_STOP_FOR_GOOD, src.ZT_EXIT_ON_ERROR),
    ),
    CheckSpec(
        "second-snapshot-sent",
        "a second SnapshotSent is " + _FATAL,
        "'pod snapshot received already' is a ProtocolError",
        (src.ZT_SECOND_SNAPSHOT, src.ZT_PROCESS_NACK, src.ZT_STOP_FOR_GOOD, src.ZT_EXIT_ON_ERROR),
    ),
)

BY_NAME = {spec.name: spec for spec in CHECKS}
FATAL = frozenset({"add-without-workload-info", "keep-after-snapshot", "second-snapshot-sent"})
LISTENERS = frozenset(
    {"listeners-in-pod", "no-listeners-on-host", "listeners-closed-on-del", "pending-retry"}
)
