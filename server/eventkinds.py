"""The kinds of event the node agent publishes (Watch), in a module of their own so
the CLI can name them without importing the node agent."""

from __future__ import annotations

import enum


class EventKind(enum.Enum):
    POD_ENROLLED = "pod_enrolled"
    POD_REMOVED = "pod_removed"
    ZTUNNEL_CONNECTED = "ztunnel_connected"
    ZTUNNEL_DISCONNECTED = "ztunnel_disconnected"
    MESSAGE_SENT = "message_sent"
    MESSAGE_ACKED = "message_acked"
    MESSAGE_NACKED = "message_nacked"
    SNAPSHOT_COMPLETE = "snapshot_complete"
    CURRENT_STATE_END = "current_state_end"
    POD_SOURCE_UP = "pod_source_up"
    POD_SOURCE_DOWN = "pod_source_down"
    FAULT_INJECTED = "fault_injected"
    FAULT_APPLIED = "fault_applied"


#: What ``zds watch --kind`` accepts: every kind but the end-of-current-state marker.
WATCHABLE = tuple(k.value for k in EventKind if k is not EventKind.CURRENT_STATE_END)
