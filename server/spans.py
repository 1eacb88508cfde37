"""Names of the node agent's trace spans and their attributes (one place, so
the code, the tests and the README agree).

One trace per enrollment::

    zds.enroll_pod                  k8s.pod.uid, k8s.pod.name, k8s.namespace.name,
    ├── zds.open_netns              zds.connection_id, zds.ack_error
    ├── zds.install_rules
    ├── zds.send                    (AddWorkload written to the newest connection)
    └── zds.wait_ack                (until ztunnel's Ack; zds.ack_error)

one per removal (``zds.remove_pod``: ``zds.send``/``zds.wait_ack`` for each
connection, then ``zds.remove_rules``) and one per snapshot sent to a new
connection (``zds.snapshot``: ``zds.send``/``zds.wait_ack`` per entry).
"""

from __future__ import annotations

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
