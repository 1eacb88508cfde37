"""Every port, path, mark and timeout zds uses, in one place.

The CLI, the node agent, the ztunnel side and the tests read them from here.
Values that mirror Istio or ztunnel say where they come from.
"""

from __future__ import annotations

# --- sockets -----------------------------------------------------------------
#: Where the node agent listens and ztunnel connects (ztunnel's INPOD_UDS).
ZDS_SOCKET = "/var/run/ztunnel/ztunnel.sock"
#: zds's gRPC control API (zds.v1.NodeAgent).
CONTROL_SOCKET = "/var/run/zds/control.sock"
#: Istio's CNI plugin event endpoint (POST /cmdadd).
CNI_SOCKET = "/var/run/istio-cni/pluginevent.sock"
#: HTTP path of the CNI plugin's add event (Istio's constants.CNIAddEventPath).
CNI_ADD_EVENT_PATH = "/cmdadd"
#: Node agent health/metrics HTTP (Istio's node agent uses port 8000).
NODE_AGENT_HTTP = "127.0.0.1:8000"
#: Mode of the node agent's socket files (ZDS, control, CNI): only root may connect (0660
#: with --socket-group: its members too).
SOCKET_MODE = 0o600

#: Where the node agent keeps its pod store (``pods.db``) and lock.
STATE_DIR = "/var/lib/zds"

# --- protocol ----------------------------------------------------------------
#: ztunnel reads each record into a buffer of this size; a longer one is truncated.
MAX_MESSAGE_SIZE = 1024
#: The largest count, size or pid zds takes: the control API's fields (and faults') are int32.
INT32_MAX = 2**31 - 1
#: Seconds the node agent waits for ztunnel's hello (Istio's readWriteDeadline).
HELLO_TIMEOUT = 5.0
#: Seconds the node agent waits for each ack (Istio's readWriteDeadline).
ACK_TIMEOUT = 5.0
#: Idle seconds after which the node agent probes a connection (Istio: 5 s).
KEEPALIVE_INTERVAL = 5.0
#: Seconds both ends poll the ZDS socket for an answer due any moment (the node agent an ack,
#: the ztunnel side the next request) before they sleep until the kernel wakes them
#: (``zds.transport.BusyPoll``; 0: never; off where the process may use one CPU only).
BUSY_POLL = 0.0005
#: While it polls, a side lets its event loop have a turn at least this often (seconds).
BUSY_POLL_SLICE = 0.001
#: ... and before every poll while its peer's answers take at least this long (seconds): the
#: loop's work waiting then (the node agent's next enrollments) overlaps the peer's instead
#: of following it.
BUSY_POLL_SLOW_PEER = 0.00005
#: Accepted ztunnel connections per second (Istio's rate.NewLimiter(5, 1)).
ACCEPTS_PER_SECOND = 5.0
#: Concurrent ztunnel connections (an old and a new one during an upgrade).
MAX_CONNECTIONS = 2
#: The node agent keeps its pods' netns fds at or above this number, leaving the lower ones to
#: code that cannot use fds past FD_SETSIZE (libnftables 1.0.6 waits for the kernel with select()).
NETNS_FD_FLOOR = 1024
#: Both sides make their fd table this large at start-up (``limits.grow_fd_table``): the node
#: agent's netns fds from NETNS_FD_FLOOR up, the ztunnel side's 7 a pod, need no growth below it.
FD_TABLE_ENTRIES = 8192
#: File descriptors the node agent keeps free: a pod whose netns fd would leave fewer is
#: refused before anything is touched. What an enrollment needs besides its netns fd comes
#: from here: iptables' pipes, the dup each queued send holds (BULK_WINDOW of them at once),
#: client and ztunnel connections. Out of fds, an install could not be taken out again.
NODE_AGENT_FD_RESERVE = 256
#: Below this RLIMIT_NOFILE (after raising it to the hard limit) the node agent refuses to
#: start: with the reserve kept free, hardly a pod could be enrolled, and a start's recovery
#: of stored pods would run out of fds checking their rules.
NODE_AGENT_MIN_FDS = NODE_AGENT_FD_RESERVE + 64
#: Enrollments one AddPods stream (the bulk path) runs at a time.
BULK_WINDOW = 64
#: Once that many run, how many must end before more start (they then start together).
BULK_REFILL = 8
#: Answers of one bulk stream not yet sent (its client reads slowly, or not at all) before
#: the node agent stops taking its requests: what a client can make it hold is bounded.
BULK_UNSENT = 1024
#: Pods in one AddPodsRequest at most (``zds pod add --from-file`` sends 64): a message of
#: empty pods decodes to ~60 times its size, so a 4 MiB one had been ~250 MB.
BULK_REQUEST_PODS = 1024
#: The largest request the control API takes (a bulk lane's frame, a gRPC message): 64 pods
#: of the largest (a 4,096-byte netns path, 16 addresses) are ~350 KB.
CONTROL_MAX_REQUEST = 1024 * 1024
#: Bulk lanes (``zds pod add --from-file`` on the control socket) open at once; each may hold
#: a frame of up to CONTROL_MAX_REQUEST and READ_AHEAD of requests. One more is answered BUSY and closed, and
#: its client sends the pods over gRPC's AddPods (flow-controlled) instead.
BULK_LANES_MAX = 16
#: The largest answer zds's own clients take from the control API (gRPC's default is 4 MiB):
#: a ListPods answer holds every pod, up to ~4 KB each (a 4,096-byte netns path, 16
#: addresses), ~1,000 of them in 4 MiB; the node agent's fds (one a pod) end before this.
CONTROL_MAX_ANSWER = 256 * 1024 * 1024
#: gRPC channel options of zds's own control API clients.
CONTROL_CLIENT_OPTIONS = (("grpc.max_receive_message_length", CONTROL_MAX_ANSWER),)
#: Answers in one AddPodsReply at most (well under a message's 4 MiB).
BULK_REPLY_RESULTS = 256
#: Events a Watch stream may have queued before it is ended for falling behind.
WATCH_QUEUE = 1024
#: ... ended then once its writer has taken none for this long (seconds): it stopped reading.
WATCH_STALL = 2.0
#: ... or at this many times WATCH_QUEUE waiting, whatever it reads.
WATCH_QUEUE_HARD = 8
#: Watch streams a node agent serves at once (each holds the current state until it is sent).
WATCHERS_MAX = 128

# --- ztunnel side --------------------------------------------------------------
#: ztunnel's reconnect backoff: first delay, cap (seconds).
RECONNECT_INITIAL = 0.01
RECONNECT_MAX = 15.0
#: ztunnel retries a workload whose proxy failed to start this often (seconds).
PENDING_RETRY_INTERVAL = 5.0
#: File descriptors the ztunnel side keeps free: a pod whose proxy would leave fewer is
#: refused (nacked, Pending) instead of the process running out (a netns fd could then no
#: longer be received, and the connection would fail for every pod).
FD_RESERVE = 64
#: The fds a pod's proxy takes (with IPv6): 3 TCP listeners, UDP+TCP DNS on 127.0.0.1 and ::1.
POD_FDS = 7
#: File descriptors the data path leaves free (twice FD_RESERVE: pods can still start): a
#: connection into a pod accepted past it is closed at once, so that a pod's connections
#: (a relay holds two fds) cannot take the fds other pods' sockets and netns fds need.
DATA_PATH_FD_RESERVE = 2 * FD_RESERVE
#: The ztunnel side serves its HTTP endpoints once the first snapshot is in, or after this
#: long (seconds) at the latest (their sockets listen from the start); its first snapshot is
#: taken before the event loop for at most this long (``zds.client.session``).
HTTP_START_DELAY = 1.0
#: In-pod listener ports (ztunnel's defaults).
OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
DNS_PORT = 15053
#: SO_MARK ztunnel puts on the sockets it creates in a pod's netns (0x539).
ZTUNNEL_MARK = 1337
#: TCP keepalive on both sockets of every relayed connection, as ztunnel's defaults
#: (config.rs SocketConfig: idle 180 s, then 9 probes 180 s apart): a peer that vanished
#: without a FIN or RST (its netns or rules gone mid-connection) frees the relay in ~30 min.
RELAY_KEEPALIVE_IDLE = 180
RELAY_KEEPALIVE_INTERVAL = 180
RELAY_KEEPALIVE_PROBES = 9
#: ztunnel's local endpoints.
ADMIN_LISTEN = "127.0.0.1:15000"
READINESS_LISTEN = "127.0.0.1:15021"
METRICS_LISTEN = "127.0.0.1:15020"

# --- pods ----------------------------------------------------------------------
#: What a pod is given when it names none (Kubernetes' own defaults).
POD_NAMESPACE = "default"
SERVICE_ACCOUNT = "default"

# --- namespaces ---------------------------------------------------------------
#: Where named network namespaces live (as with `ip netns`).
NETNS_RUN_DIR = "/var/run/netns"

# --- ztunnel side (appended by the ztunnel change) -------------------------------
#: Jitter on the reconnect backoff: each delay is scaled by 1 ± this
#: (ztunnel's randomization_factor on its announce backoff).
RECONNECT_JITTER = 0.2
#: Seconds ``zds ztunnel`` gives established connections to finish on SIGTERM
#: before closing them (the listeners close at once).
DRAIN_TIMEOUT = 5.0
#: Status of ``/healthz/ready`` while not ready: ztunnel answers 500
#: ("not ready, pending: ..."), not 503 (src/readiness/server.rs).
READINESS_NOT_READY_STATUS = 500
#: The readiness task name ztunnel's in-pod manager registers.
READINESS_TASK = "workload proxy manager"

# --- in-pod redirection (node agent) ---------------------------------------------
#: How the in-pod rules are applied: Istio's iptables rules (iptables-restore) or its native
#: nftables ones (one libnftables transaction). iptables is Istio's default too.
REDIRECT_BACKENDS = ("iptables", "nftables")
REDIRECT_BACKEND = "iptables"
#: Packet mark ztunnel's sockets carry (1337, written 0x539 in the rules), and the mask
#: the rules match it with.
INPOD_MARK = ZTUNNEL_MARK
INPOD_MASK = 0xFFF
#: Connmark for traffic ztunnel already handled (Istio's InpodTProxyMark/Mask).
INPOD_TPROXY_MARK = 0x111
INPOD_TPROXY_MASK = 0xFFF
#: Mask for restoring the connmark onto packets.
INPOD_RESTORE_MASK = 0xFFFFFFFF
#: Policy routing for in-pod mode: `ip rule fwmark 0x111/0xfff pref 32764 lookup 100`.
INPOD_ROUTE_TABLE = 100
INPOD_RULE_PRIORITY = 32764
#: Addresses kubelet health probes are SNATed from (Istio's HOST_PROBE_SNAT_IP[V6]).
HOST_PROBE_SNAT_IPV4 = "169.254.7.127"
HOST_PROBE_SNAT_IPV6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
#: Names of the chains the in-pod rules live in.
CHAIN_PREROUTING = "ISTIO_PRERT"
CHAIN_OUTPUT = "ISTIO_OUTPUT"

#: An install whose undo failed too (its rules left in the pod's netns, redirecting its traffic
#: to listeners nobody opens): the undo is tried again after this many seconds, the pause
#: doubling up to UNDO_RETRY_MAX, until the rules are out or another pod lives there.
UNDO_RETRY_INITIAL = 2.0
UNDO_RETRY_MAX = 60.0

# --- pod sources: the CNI plugin and the container engine -------------------------------
#: Istio's CNI plugin event paths on the CNI socket: ADD (Istio's), DEL and CHECK (zds's).
CNI_DEL_EVENT_PATH = "/cmddel"
CNI_CHECK_EVENT_PATH = "/cmdcheck"
#: zds-cni's STATUS asks here (GET): whether an ADD could go through now.
CNI_STATUS_PATH = "/cmdstatus"
#: The plugin's ``type`` in a conflist, and its executable's name in the CNI bin dir.
CNI_PLUGIN_TYPE = "zds-cni"
#: Where ``zds-cni`` logs (its config's ``log_file``).
CNI_PLUGIN_LOG = "/var/log/zds-cni.log"
#: Seconds ``zds-cni`` waits for the node agent's answer to an event (its config's ``timeout``).
CNI_PLUGIN_TIMEOUT = 20.0
#: Where ``zds cni install`` puts the plugin and looks for network configs (Istio's defaults;
#: Debian's Podman also searches /opt/cni/bin, after /usr/lib/cni).
CNI_BIN_DIR = "/opt/cni/bin"
CNI_CONF_DIR = "/etc/cni/net.d"
#: Istio's ambient label (istio.io/dataplane-mode) and its values.
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
#: The container label that names a container's service account.
SERVICE_ACCOUNT_LABEL = "zds.io/service-account"
#: The container label compose puts on each container: its project, zds's namespace.
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
#: Seconds a CNI event waits for the container engine to report the container it names
#: (Podman holds a container's lock while its CNI plugins run, so it cannot be inspected then:
#: its labels come from the engine's ``create`` event).
CONTAINER_LOOKUP_TIMEOUT = 10.0
#: How often the pods of CNI events are looked for a netns that is gone (seconds; 0: never,
#: the default: a removal takes a pod out of the mesh, so it is asked for).
NETNS_SWEEP = 0.0
#: Reconnecting to the container engine: first delay and cap (seconds), doubling.
ENGINE_RETRY_INITIAL = 0.5
ENGINE_RETRY_MAX = 30.0
#: A container engine's event stream that ends this long (seconds) or more after its session came
#: up is reconnected at once, the source still up (Podman ends it at each rotation of its event log).
ENGINE_RECONNECT_AT_ONCE = 1.0
#: How long a container engine has to answer a listing or a container's inspection (seconds):
#: longer than zds-cni's ADD (Podman answers neither while a container's CNI plugins run).
ENGINE_ANSWER_TIMEOUT = 30.0

#: The longest delay a fault may ask for (either end): an hour holds any test, and keeps a
#: delay a timer can take (a Duration of 2**63 s is not one).
FAULT_DELAY_MAX = 3600.0
#: Faults a node agent holds armed at once (the ztunnel side's bound too).
FAULTS_ARMED_MAX = 256

#: The most addresses a pod may have (Kubernetes gives one per family, at most 2; a CNI
#: result a few more): every pod's addresses go out in each ListPods, Watch event and reply.
MAX_POD_IPS = 16
#: The longest netns path taken (Linux's PATH_MAX): refusals quote it, and a status's
#: details must stay well under gRPC's metadata limit (8 KiB).
MAX_NETNS_PATH = 4096
#: The longest path a unix socket can be bound at or connected to (``sun_path`` less its NUL).
SUN_PATH_MAX = 107
#: The largest TLS file (PEM) read, by the node agent and by the control API's clients:
#: certificate chains are a few KiB (``/dev/zero`` was read until memory ran out).
TLS_FILE_MAX = 1024 * 1024

#: A control-socket connection must say what it is (gRPC's preface, or the bulk lane's
#: opening) within this many seconds (gRPC's own handshake, this too), and at most
#: CONTROL_SILENT_MAX may be silent at once (the oldest is closed): as the ZDS socket's
#: hello timeout and bound, so connections that say nothing cannot use up the fds.
CONTROL_OPENING_TIMEOUT = 10.0
CONTROL_SILENT_MAX = 64
#: A connection is closed for being silent (one too many, or to make room) only once it has
#: been for this long: a burst of clients is accepted before any is read, and the oldest of
#: them went while its first bytes waited to be read.
CONTROL_SILENT_GRACE = 1.0
#: A control API connection with no call under way is closed after this many seconds (its
#: client opens another for its next call), on the control socket and on TCP alike.
CONTROL_IDLE = 30.0
#: Connections the TCP control API (--grpc-listen) holds at once; one more is refused. Who
#: reaches the port and finished the handshake could otherwise hold fds without limit.
CONTROL_TCP_CONNECTIONS = 64
#: Connections the control socket holds at once besides its bulk lanes (each let through to
#: gRPC holds 3 fds; fewer where RLIMIT_NOFILE is low: at most half the fds beyond the
#: reserve); one more is closed, unless a silent one makes room. Only its allowed peers get
#: this far, but a client holding calls open (AddPods, Watch) could otherwise hold fds
#: without limit.
CONTROL_SOCKET_CONNECTIONS = 256
