"""Where each rule comes from: a place in Istio's or ztunnel's source, at the commits zds
was checked against (the same as ``../shared/peers`` and ``/work/notes/upstream-facts.md``).

A finding prints its sources as ``istio/ztunnel src/inpod/protocol.rs:164 get_workload_data
(62d82653)`` and, in the JSON report, with a GitHub link to that exact line.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The upstream commits the line numbers below are from.
COMMITS = {
    "istio/istio": "86c9f01fd735fb01d8192f5bcaf0d424afb7f14c",
    "istio/ztunnel": "62d826530e5ce85764e309170205b293efcbc80b",
}


@dataclass(frozen=True)
class Source:
    """One place in upstream source: repository, file, function, first line."""

    repo: str
    path: str
    symbol: str
    line: int
    #: Last line of the passage (0: just ``line``).
    end: int = 0

    @property
    def commit(self) -> str:
        return COMMITS[self.repo]

    @property
    def lines(self) -> str:
        return f"{self.line}-{self.end}" if self.end else str(self.line)

    @property
    def url(self) -> str:
        anchor = f"#L{self.line}" + (f"-L{self.end}" if self.end else "")
        return f"https://github.com/{self.repo}/blob/{self.commit}/{self.path}{anchor}"

    def __str__(self) -> str:
        return f"{self.repo} {self.path}:{self.lines} {self.symbol} ({self.commit[:8]})"

    def as_dict(self) -> dict[str, str]:
        return {
            "repo": self.repo,
            "path": self.path,
            "symbol": self.symbol,
            "lines": self.lines,
            "url": self.url,
        }


def ztunnel(path: str, symbol: str, line: int, end: int = 0) -> Source:
    return Source("istio/ztunnel", path, symbol, line, end)


def istio(path: str, symbol: str, line: int, end: int = 0) -> Source:
    return Source("istio/istio", path, symbol, line, end)


# -- ztunnel (src/inpod/) ------------------------------------------------------------------
ZT_SEND_HELLO = ztunnel("src/inpod/protocol.rs", "WorkloadStreamProcessor::send_hello", 40, 45)
ZT_SEND_ACK = ztunnel("src/inpod/protocol.rs", "WorkloadStreamProcessor::send_ack/send_nack", 47, 62)
ZT_READ_BUFFER = ztunnel("src/inpod/protocol.rs", "WorkloadStreamProcessor::read_message", 82)
ZT_READ_EOF = ztunnel("src/inpod/protocol.rs", "WorkloadStreamProcessor::read_message", 112, 113)
ZT_TRUNCATED = ztunnel("src/inpod/protocol.rs", "get_workload_data", 143, 151)
ZT_DECODE = ztunnel("src/inpod/protocol.rs", "get_info_from_data", 175, 177)
ZT_NO_PAYLOAD = ztunnel("src/inpod/protocol.rs", "get_workload_data", 154)
ZT_NO_CONTROL_MESSAGE = ztunnel("src/inpod/protocol.rs", "get_workload_data", 164)
ZT_UNEXPECTED_CONTROL = ztunnel("src/inpod/protocol.rs", "get_workload_data", 165, 166)
ZT_FD_COUNT = ztunnel("src/inpod/protocol.rs", "maybe_get_fd", 207, 210)
ZT_VALIDATE_NS = ztunnel("src/inpod/protocol.rs", "validate_ns", 222, 249)
ZT_VALIDATE_NS_LOGGED = ztunnel("src/inpod/protocol.rs", "maybe_get_fd", 212, 217)
ZT_PROCESS = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::process", 302, 362)
ZT_HELLO_FIRST = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::process", 303, 306)
ZT_READ_NACK = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::process", 314, 324)
ZT_START_NACK = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::process", 338, 348)
ZT_PROCESS_NACK = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::process", 349, 359)
ZT_RETRY = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::schedule_retry", 364, 369)
ZT_RETRY_DURATION = ztunnel("src/inpod/workloadmanager.rs", "RETRY_DURATION", 28)
ZT_RECONNECT = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManager::run_internal", 182, 239)
ZT_STOP_FOR_GOOD = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManager::run_internal", 227, 231)
ZT_CONNECT = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyNetworkHandler::connect", 106, 129)
ZT_CHECK_READY = ztunnel(
    "src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::check_ready", 371, 377
)
ZT_NEW_CONNECTION = ztunnel("src/inpod/workloadmanager.rs", "WorkloadProxyManagerProcessor::new", 246, 256)
ZT_EXIT_ON_ERROR = ztunnel("src/app.rs", "init_inpod_proxy_mgr", 366, 373)
ZT_WORKLOAD_INFO = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::process_msg", 131, 135)
ZT_KEEP_AFTER_SNAPSHOT = ztunnel(
    "src/inpod/statemanager.rs", "WorkloadProxyManagerState::process_msg", 161, 166
)
ZT_KEEP_MARKS = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::process_msg", 156, 169)
ZT_DEL_BEFORE_SNAPSHOT = ztunnel(
    "src/inpod/statemanager.rs", "WorkloadProxyManagerState::process_msg", 175, 190
)
ZT_SECOND_SNAPSHOT = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::process_msg", 196, 198)
ZT_RECONCILE = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::reconcile", 209, 218)
ZT_RESET_SNAPSHOT = ztunnel(
    "src/inpod/statemanager.rs", "WorkloadProxyManagerState::reset_snapshot", 108, 112
)
ZT_PENDING = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::add_workload", 248, 253)
ZT_READD = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::add_workload_inner", 263, 277)
ZT_READY = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::ready", 346, 349)
ZT_DEL = ztunnel("src/inpod/statemanager.rs", "WorkloadProxyManagerState::del_workload", 365, 376)
ZT_SOCKET_FACTORY = ztunnel("src/inpod/config.rs", "InPodConfig::socket_factory", 37, 48)
ZT_RUN_IN_NS = ztunnel("src/inpod/config.rs", "InPodSocketFactory::run_in_ns", 81, 83)
ZT_PROXIES = ztunnel("src/proxyfactory.rs", "ProxyFactory::new_proxies_from_factory", 116)
ZT_READINESS_500 = ztunnel("src/readiness/server.rs", "readiness handler", 75, 77)

# -- Istio's node agent (cni/pkg/nodeagent/) -------------------------------------------------
IS_DEADLINE = istio("cni/pkg/nodeagent/ztunnelserver.go", "readWriteDeadline", 36)
IS_LATEST_CONN = istio("cni/pkg/nodeagent/ztunnelserver.go", "connMgr.LatestConn", 74, 83)
IS_SINGLE_WRITER = istio("cni/pkg/nodeagent/ztunnelserver.go", "handleConn", 165, 169)
IS_HELLO_FIRST = istio("cni/pkg/nodeagent/ztunnelserver.go", "handleConn", 179, 188)
IS_ACK_TIMEOUT_KEPT = istio("cni/pkg/nodeagent/ztunnelserver.go", "handleConn", 198, 218)
IS_KEEPALIVE = istio("cni/pkg/nodeagent/ztunnelserver.go", "handleConn", 226, 246)
IS_SEND_SNAPSHOT = istio("cni/pkg/nodeagent/ztunnelserver.go", "sendSnapshot", 265, 319)
IS_POD_DELETED = istio("cni/pkg/nodeagent/ztunnelserver.go", "PodDeleted", 353, 381)
IS_READ_PROTO = istio("cni/pkg/nodeagent/ztunnelserver_linux.go", "readProto", 104, 134)
IS_SEND_WITH_FD = istio("cni/pkg/nodeagent/ztunnelserver_linux.go", "sendDataAndWaitForAck", 197, 214)
IS_MARSHAL = istio("cni/pkg/nodeagent/ztunnelserver_linux.go", "SendMsgAndWaitForAck", 189, 195)
IS_POD_ADDED = istio("cni/pkg/nodeagent/ztunnelserver_linux.go", "PodAdded", 252, 291)
IS_ADD_TO_MESH = istio("cni/pkg/nodeagent/net_linux.go", "NetServer.AddPodToMesh", 113, 150)
IS_CACHE_TAKE = istio("cni/pkg/nodeagent/pod_cache.go", "podNetnsCache.Take", 130, 145)
IS_CACHE_FINALIZER = istio("cni/pkg/nodeagent/pod_cache.go", "podNetnsCache.addToCacheUnderLock", 114, 121)
