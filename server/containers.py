"""What the node agent needs to know of a container, from a Docker-compatible engine's JSON.

A container is a pod: its uid is the container id (the CNI plugin is told the
same id, so both sources name one pod), its name the container's name (as a
DNS-1123 name, as Kubernetes' are: lower case, ``_`` becomes ``-``), its
namespace the compose project (``com.docker.compose.project``; ``default``
outside a project), its service account the ``zds.io/service-account`` label
(``default``), its addresses the engine's. Its netns is that of its process
(``/proc/PID/ns/net``), checked against the engine's own record of it
(``NetworkSettings.SandboxKey``, where Podman's CNI network namespaces and
Docker's live): the same netns, or no pod. The pod names it by the SandboxKey
where the node agent takes namespaces from there (Podman's ``/run/netns``), else
by the process (Docker's ``/var/run/docker/netns/ID`` is under no allowed root).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zds import defaults
from zds.netns import NetnsError, NetnsIdentity, NetnsRef, open_netns
from zds.server.names import dns_name
from zds.server.netnspolicy import NetnsPolicy
from zds.server.pods import PodSource, PodSpec, is_address
from zds.server.selection import Selection, select

#: Keys Podman and Docker put into a container event's attributes beside its labels.
EVENT_ATTRIBUTES = frozenset({"name", "image", "containerExitCode", "podId", "exitCode", "signal"})


@dataclass(frozen=True)
class ContainerFacts:
    """Who a container is (what does not change over its life): enough to select it
    and name its pod, known from a ``create`` event before its CNI plugins run."""

    id: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ContainerFacts | None:
        """From a container event (``Actor.Attributes`` holds its labels and its name)."""
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        attributes = actor.get("Attributes") or {}
        if not cid or not isinstance(attributes, dict):
            return None
        labels = {k: str(v) for k, v in attributes.items() if k not in EVENT_ATTRIBUTES}
        return cls(id=cid, name=str(attributes.get("name") or cid), labels=labels)

    @classmethod
    def from_inspect(cls, info: Mapping[str, Any]) -> ContainerFacts:
        config = info.get("Config") or {}
        host = info.get("HostConfig") or {}
        return cls(
            id=str(info["Id"]),
            name=str(info.get("Name") or info["Id"]).lstrip("/"),
            labels=dict(config.get("Labels") or {}),
            host_network=host.get("NetworkMode") == "host",
        )

    @property
    def pod_name(self) -> str:
        return dns_name(self.name, 253)

    @property
    def namespace(self) -> str:
        project = self.labels.get(defaults.COMPOSE_PROJECT_LABEL)
        return dns_name(project, 63).replace(".", "-") if project else defaults.POD_NAMESPACE

    @property
    def service_account(self) -> str:
        return self.labels.get(defaults.SERVICE_ACCOUNT_LABEL) or defaults.SERVICE_ACCOUNT

    @property
    def selection(self) -> Selection:
        return select(self.labels, host_network=self.host_network)

    def pod_spec(self, netns: NetnsRef, ips: tuple[str, ...], source: PodSource) -> PodSpec:
        return PodSpec.create(
            self.id,
            netns,
            name=self.pod_name,
            namespace=self.namespace,
            service_account=self.service_account,
            ips=ips,
            source=source,
        )


@dataclass(frozen=True)
class ContainerNetns:
    """Where a running container's netns is, and which netns it is."""

    ref: NetnsRef
    identity: NetnsIdentity


class NetnsMismatch(NetnsError):
    """The container's process is not in the netns the engine says is the container's."""


def running(info: Mapping[str, Any]) -> bool:
    state = info.get("State") or {}
    return bool(state.get("Running")) and int(state.get("Pid") or 0) > 0


def shares_netns(info: Mapping[str, Any]) -> bool:
    """It joined another container's netns (``--network container:X``, a pod member): that one is the pod."""
    mode = str((info.get("HostConfig") or {}).get("NetworkMode") or "")
    return mode.startswith("container:")


def addresses(info: Mapping[str, Any]) -> tuple[str, ...]:
    """The container's addresses on its networks (what is not an address is left out)."""
    found: list[str] = []
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    for network in networks.values():
        for key in ("IPAddress", "GlobalIPv6Address"):
            ip = (network or {}).get(key)
            if ip and ip not in found and is_address(ip):
                found.append(ip)
    return tuple(found)


def container_netns(info: Mapping[str, Any], policy: NetnsPolicy | None = None) -> ContainerNetns | None:
    """The netns of a running container's process, checked against the engine's SandboxKey;
    None when it is not running. NetnsMismatch when the two are not the same netns. The
    reference is the SandboxKey if ``policy`` allows its place (no policy: any place), else
    the process's ``/proc/PID/ns/net``."""
    if not running(info):
        return None
    pid = int(info["State"]["Pid"])
    sandbox = str((info.get("NetworkSettings") or {}).get("SandboxKey") or "")
    by_key: NetnsIdentity | None = None
    unseen = ""
    if sandbox:
        try:
            with open_netns(sandbox) as handle:
                by_key = handle.identity
        except NetnsError as exc:
            unseen = str(exc)  # not visible here (another mount namespace): the process's netns decides
    key_allowed = bool(sandbox) and (policy is None or policy.allows_place(NetnsRef.of_path(sandbox)))
    try:
        with open_netns(f"/proc/{pid}/ns/net") as handle:
            by_pid = handle.identity
    except NetnsError as exc:
        if unseen:  # (the engine's file could not be opened either)
            # (a node agent in a container sees the engine's namespaces made after its start
            # only if their directory is a shared mount on the host)
            raise type(exc)(
                f"{exc}; the engine's SandboxKey: {unseen} (a node agent in a container: is the "
                "engine's netns directory a shared mount on the host? mount --make-shared)"
            ) from None
        if by_key is None or not key_allowed:
            raise
        # The process is not ours to look at (another user, more capabilities: no CAP_SYS_PTRACE
        # here); the engine's own netns file is the container's.
        return ContainerNetns(NetnsRef.of_path(sandbox), by_key)
    if by_key is None:
        return ContainerNetns(NetnsRef.of_pid(pid), by_pid)
    if by_key != by_pid:
        raise NetnsMismatch(
            f"container {str(info.get('Id', ''))[:12]}: its process {pid} is in netns {by_pid}, "
            f"not in {sandbox} ({by_key}); not enrolled"
        )
    return ContainerNetns(NetnsRef.of_path(sandbox) if key_allowed else NetnsRef.of_pid(pid), by_key)
