"""What the node agent knows about a pod: who it is (``PodSpec``, from the API,
a pods file or the CNI plugin), where it came from and what became of it. (Its cache
entry, ``Pod``, is the pod cache's: ``podcache``.)

No dataclass here: ``zds pod add`` reads its pods through this module, and ``dataclasses``
alone is ~5 ms of its start-up (it imports ``inspect``).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from zds import defaults
from zds.errors import ZdsError
from zds.netns import NetnsRef
from zds.server import names

if TYPE_CHECKING:
    # (Loaded where used: ``zds pod add`` makes PodSpecs and never encodes one, ~3 ms.)
    from zds.protocol.messages import AddWorkload, WorkloadInfo


class PodState(enum.Enum):
    PENDING = "pending"  # cached, not (yet) acked by a ztunnel; one known without its netns stays so
    ACKED = "acked"  # the last AddWorkload was acked cleanly
    FAILED = "failed"  # the last AddWorkload was nacked (see last_error)


class PodSource(enum.Enum):
    """Where a pod came from: which source may replace or remove it."""

    API = "api"  # zds pod add, the gRPC API
    PODS_FILE = "pods-file"  # zds server --pods
    CNI = "cni"  # zds-cni's event: a container's (it names the container)
    ISTIO_CNI = "istio-cni"  # an event as Istio's plugin sends it (no container named)
    CONTAINER_ENGINE = "container-engine"  # zds server --container-engine

    @property
    def container(self) -> bool:
        """A pod of a container (its uid is the container id): the container sources own it together."""
        return self in (PodSource.CNI, PodSource.CONTAINER_ENGINE)

    @property
    def cni(self) -> bool:
        """A pod a CNI plugin event may replace or remove (DEL): a container's, or one an
        event as Istio's plugin sends it enrolled. (The container engine never looks at
        the latter: no container of its has that uid.)"""
        return self.container or self is PodSource.ISTIO_CNI


class PodSpecError(ZdsError, ValueError):
    """A pod description that cannot be enrolled (empty uid, too large, bad entry)."""


class PodNameError(PodSpecError):
    """A uid, name, namespace or service account Kubernetes would refuse."""


def is_address(value: object) -> bool:
    """Whether ``value`` is an IPv4 or IPv6 address in text. Without a zone (``fe80::1%eth0``):
    Python takes any text after the ``%``, so an address was any size and any bytes, out in
    every ListPods and Watch; Go's ``net.ParseIP`` (Istio's CNI event) takes none."""
    import ipaddress  # (here: most pods come without, and ``zds pod add`` starts without it)

    if not isinstance(value, str) or "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _too_many_ips(count: int) -> str:
    return f"{count} addresses, over {defaults.MAX_POD_IPS} (Kubernetes gives a pod one per family)"


def check_ips(ips: Sequence[object]) -> tuple[str, ...]:
    """A pod's addresses as its source gives them: each an IPv4 or IPv6 address in text, or
    PodSpecError naming the first that is not. Checked where a pod comes in (the API, a pods
    file; a CNI event checks its own): the pod store keeps what an older zds was given."""
    if len(ips) > defaults.MAX_POD_IPS:
        raise PodSpecError(f"ips: {_too_many_ips(len(ips))}")
    checked = []
    for index, ip in enumerate(ips):
        if not isinstance(ip, str):
            raise PodSpecError(f"ips[{index}] must be an address string, not {type(ip).__name__}")
        if not is_address(ip):
            shown = ip if len(ip) <= 45 else ip[:45] + "..."
            raise PodSpecError(f"ips[{index}] {shown!r} is not an IP address")
        checked.append(ip)
    return tuple(checked)


class _PodSpecFields(NamedTuple):
    uid: str
    name: str
    namespace: str
    service_account: str
    netns: NetnsRef
    #: The pod's addresses, when its source knows them (the CNI event, a pods file, the API).
    ips: tuple[str, ...] = ()
    #: Where it came from (not part of what ztunnel is told).
    source: PodSource = PodSource.API


class PodSpec(_PodSpecFields):
    """A pod to enroll: who it is and where its netns is (immutable; a subclass of its
    fields' NamedTuple, so that ``add_workload`` and its bytes have an instance dict to be kept in).

    Build it with ``PodSpec.create``, the one place the defaults are applied,
    whatever the pod came from (CLI, gRPC, pods file, CNI plugin).
    """

    def __setattr__(self, name: str, value: object) -> None:
        # (The instance dict is only for the cached AddWorkload and its bytes, which cached_property
        # writes there.)
        raise AttributeError(f"a PodSpec is immutable: cannot set {name!r}")

    @classmethod
    def create(
        cls,
        uid: str,
        netns: NetnsRef,
        *,
        name: str = "",
        namespace: str = "",
        service_account: str = "",
        ips: tuple[str, ...] = (),
        source: PodSource = PodSource.API,
    ) -> PodSpec:
        """A spec with the defaults filled in: the name is the uid, the namespace and
        service account ``default`` (as Kubernetes names them when none is given)."""
        return cls(
            uid=uid,
            name=name or uid,
            namespace=namespace or defaults.POD_NAMESPACE,
            service_account=service_account or defaults.SERVICE_ACCOUNT,
            netns=netns,
            ips=ips,
            source=source,
        )

    @property
    def info(self) -> WorkloadInfo:
        from zds.protocol.messages import WorkloadInfo

        return WorkloadInfo(name=self.name, namespace=self.namespace, service_account=self.service_account)

    @property
    def log_extra(self) -> dict[str, str]:
        """The fields a log line about this pod carries."""
        return {"uid": self.uid, "pod": self.name, "namespace": self.namespace}

    @functools.cached_property
    def add_workload(self) -> AddWorkload:
        """The pod's AddWorkload, made once (immutable, as the spec is): encoded for the checks
        and sent with its bytes, it was built twice a pod."""
        from zds.protocol.messages import AddWorkload

        return AddWorkload(uid=self.uid, info=self.info)

    @functools.cached_property
    def add_workload_bytes(self) -> bytes:
        """The pod's AddWorkload on the wire, encoded once (checked, sent, and sent again in snapshots)."""
        from zds.protocol.messages import encode_request

        return encode_request(self.add_workload)

    def validate(self) -> None:
        """Refuse what Kubernetes would refuse (the uid, name, namespace and service
        account rules of ``names``), and what ztunnel would: an AddWorkload over its
        1024-byte buffer (first: names that long break Kubernetes' rules too, and this says
        what ztunnel would do with them). The same check on every path a pod comes in by."""
        try:
            size = len(self.add_workload_bytes)
        except UnicodeEncodeError:  # (a lone surrogate: the names' rules refuse it below)
            size = 0
        if size > defaults.MAX_MESSAGE_SIZE:
            # Istio's agent sends it anyway and ztunnel rejects it as truncated; refuse it here instead.
            raise PodSpecError(
                f"pod {names.cut(self.uid) if self.uid.isprintable() else names.shown(self.uid)}: "
                f"its AddWorkload would be {size} bytes, over ztunnel's "
                f"{defaults.MAX_MESSAGE_SIZE}-byte receive buffer; shorten its uid, name, namespace "
                "or service account"
            )
        problem = names.pod_problem(self.uid, self.name, self.namespace, self.service_account)
        if problem:
            raise PodNameError(problem)
        if len(self.ips) > defaults.MAX_POD_IPS:
            raise PodSpecError(f"pod {self.uid}: {_too_many_ips(len(self.ips))}")
        path = self.netns.location
        if len(path.encode()) > defaults.MAX_NETNS_PATH:
            raise PodSpecError(
                f"pod {self.uid}: its netns path is {len(path.encode())} bytes, over {defaults.MAX_NETNS_PATH}"
            )
