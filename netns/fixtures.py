"""Namespaces to test and demo with: named netns, and "pods" on a bridge.

Everything here goes through pyroute2 (netlink and its netns helpers), never
the ``ip`` command. What a fixture creates it also removes, on error too:
a half-made namespace or pod is undone before the error reaches the caller.

pyroute2's synchronous ``IPRoute`` drives its own asyncio loop and so cannot
run in a thread where a loop is already running; these functions are
synchronous and move their netlink work to a short-lived worker thread when
called from such a thread (from a coroutine, say).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns
from pyroute2.process import ChildProcess

from zds import defaults

from .handle import NetnsError, in_netns, open_netns

log = logging.getLogger(__name__)

T = TypeVar("T")

# linux/if_addr.h: usable at once, no duplicate address detection.
IFA_F_NODAD = 0x02
# linux/if.h IFNAMSIZ (16) minus the NUL.
IFNAME_MAX = 15

# Namespace names become file names and interface-name parts: keep them plain.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


def _off_event_loop(fn: Callable[[], T]) -> T:
    """Run ``fn`` here, or in a worker thread when an asyncio loop runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="zds-netns") as pool:
        return pool.submit(fn).result()


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise NetnsError(
            f'bad netns name "{name}": use letters, digits, ".", "_" and "-", starting with a letter or digit'
        )


def netns_path(name: str) -> str:
    """Where the named namespace ``name`` lives (``/var/run/netns/NAME``)."""
    return os.path.join(defaults.NETNS_RUN_DIR, name)


# --- named namespaces ---------------------------------------------------------------


def _exists_message(name: str, path: str) -> str:
    return (
        f'netns {name} exists already ({path}); delete it with "zds netns delete {name}" or pick another name'
    )


def _remove_entry(path: str) -> None:
    """Unmount and unlink ``path`` (pyroute2's netns.remove); a missing path is fine."""
    with suppress(FileNotFoundError):
        pyroute2_netns.remove(path)


def _set_link_up(ifname: str) -> None:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        ipr.link("set", index=index, state="up")


def _create_named(name: str, path: str) -> None:
    try:
        # What pyroute2.netns.create does (a forked child unshares and bind-mounts
        # its netns on path), but with the child always reaped: netns.create
        # leaves a zombie behind when the child reports an error.
        with ChildProcess(target=pyroute2_netns._create, args=[path, None]) as child:
            child.communicate()
    except FileExistsError:
        raise NetnsError(_exists_message(name, path)) from None
    except Exception as e:
        _remove_entry(path)
        hint = "; run as root (needs CAP_SYS_ADMIN)" if getattr(e, "errno", None) == errno.EPERM else ""
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise NetnsError(f"cannot create netns {name}: {reason}{hint}") from None
    try:
        with open_netns(path) as handle, in_netns(handle):
            _set_link_up("lo")
    except BaseException as e:
        _remove_entry(path)
        if isinstance(e, NetlinkError):
            raise NetnsError(f"cannot bring loopback up in new netns {name}: {e}") from None
        raise


def create_netns(name: str) -> str:
    """Create the named network namespace ``/var/run/netns/NAME`` with loopback up; return its path."""
    _check_name(name)
    path = netns_path(name)
    if os.path.lexists(path):
        raise NetnsError(_exists_message(name, path))
    _off_event_loop(lambda: _create_named(name, path))
    log.debug("created netns", extra={"netns": path})
    return path


def delete_netns(name: str, *, missing_ok: bool = False) -> None:
    """Delete the named network namespace (unmount and unlink ``/var/run/netns/NAME``).

    The namespace itself lives on while some fd or process still holds it.
    A missing one is an error unless ``missing_ok``.
    """
    _check_name(name)
    path = netns_path(name)
    if not os.path.lexists(path):
        if missing_ok:
            return
        raise NetnsError(f'cannot delete netns {name}: {path} does not exist; see "zds netns list"')
    try:
        pyroute2_netns.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            raise NetnsError(f"cannot delete netns {name}: {path} vanished meanwhile") from None
    except OSError as e:
        hint = "; run as root (needs CAP_SYS_ADMIN)" if e.errno in (errno.EPERM, errno.EACCES) else ""
        raise NetnsError(f"cannot delete netns {name}: {e.strerror}{hint}") from None
    log.debug("deleted netns", extra={"netns": path})


def list_netns() -> list[str]:
    """The names in ``/var/run/netns``, sorted (as ``ip netns list`` shows them)."""
    return sorted(pyroute2_netns.listnetns(defaults.NETNS_RUN_DIR))


# --- pods on a bridge ----------------------------------------------------------------


@dataclass
class PodFixture:
    """One pod made by ``PodNetwork.add_pod``: its netns, its addresses and its host-side veth."""

    name: str
    netns_path: str
    ipv4: str
    ipv6: str
    veth_host: str


def _ifname(prefix: str, name: str) -> str:
    """An interface name for ``name`` within IFNAMSIZ: readable when it fits, hashed when not."""
    if len(prefix) + len(name) <= IFNAME_MAX:
        return prefix + name
    digest = hashlib.sha256(name.encode()).hexdigest()
    keep = IFNAME_MAX - len(prefix) - 7
    return f"{prefix}{name[:keep]}-{digest[:6]}"


def _link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _delete_link(ifname: str) -> None:
    """Delete a host link; one already gone is fine."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", ifname=ifname)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


def _eth0_addresses(path: str) -> list[str]:
    """The addresses on a netns's eth0 (none if it has no eth0)."""
    with open_netns(path) as handle, in_netns(handle), IPRoute() as ipr:
        index = _link_index(ipr, "eth0")
        if index is None:
            return []
        # Global addresses only: link-local ones say nothing about the pod network.
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index) if a["scope"] == 0]


def _used_host_indices(net4: ipaddress.IPv4Network) -> set[int]:
    """Host indices in ``net4`` that a named netns's eth0 already has."""
    used: set[int] = set()
    for name in list_netns():
        try:
            addresses = _eth0_addresses(netns_path(name))
        except (NetnsError, OSError):
            continue
        for address in addresses:
            with suppress(ValueError):
                ip = ipaddress.ip_address(address)
                if ip in net4:
                    used.add(int(ip) - int(net4.network_address))
    return used


def pod_addresses(path: str) -> list[str]:
    """A pod's eth0 addresses (for ``zds netns list``); empty for a bare namespace."""
    try:
        return _eth0_addresses(path)
    except (NetnsError, OSError):
        return []


def create_pods_on_bridge(names: list[str], bridge: str, subnet4: str, subnet6: str) -> list[PodFixture]:
    """Pods that outlive this process (``zds netns create --bridge``): the bridge is made or
    reused, each pod gets the next free addresses. On a failure, what this call made is undone."""

    def make() -> list[PodFixture]:
        net = PodNetwork(bridge=bridge, subnet4=subnet4, subnet6=subnet6)
        net.adopt_bridge()
        try:
            for name in names:
                net._add_pod(name)
        except BaseException:
            net._close()
            raise
        return net.detach()

    return _off_event_loop(make)


def delete_pod(name: str, *, missing_ok: bool = False) -> None:
    """Delete a pod made by ``create_pods_on_bridge``: its host veth first (a netns dies
    asynchronously, and its end of the pair with it), then the netns."""
    _off_event_loop(lambda: _delete_link(_ifname("zv-", name)))
    delete_netns(name, missing_ok=missing_ok)


def remove_bridge_if_unused(bridge: str) -> bool:
    """Delete ``bridge`` if no interface is attached to it any more; True if it was deleted."""
    with IPRoute() as ipr:
        index = _link_index(ipr, bridge)
        if index is None:
            return False
        if any(link.get_attr("IFLA_MASTER") == index for link in ipr.get_links()):
            return False
    _delete_link(bridge)
    return True


class PodNetwork:
    """Pods (named netns) joined by veth pairs to a bridge in the host netns.

    The bridge gets the first address of each subnet (.1 and ::1) and is each
    pod's default gateway; pods get the next free addresses. IPv6 addresses
    are added without duplicate address detection so they work at once.
    The bridge is made with the first pod. ``close()`` removes every pod,
    veth and the bridge; it also runs at interpreter exit if nobody called it.
    """

    def __init__(
        self,
        bridge: str = "zds-br0",
        subnet4: str = "10.177.0.0/24",
        subnet6: str = "fd00:177::/64",
    ) -> None:
        if not bridge or len(bridge) > IFNAME_MAX or "/" in bridge or bridge.strip() != bridge:
            raise NetnsError(f'bad bridge name "{bridge}": 1 to {IFNAME_MAX} characters, no "/" or spaces')
        try:
            self._net4 = ipaddress.IPv4Network(subnet4)
            self._net6 = ipaddress.IPv6Network(subnet6)
        except ValueError as e:
            raise NetnsError(f"bad pod subnet: {e}") from None
        if self._net4.num_addresses < 4 or self._net6.num_addresses < 4:
            raise NetnsError(f"pod subnets {subnet4} and {subnet6} are too small for a gateway and a pod")
        self.bridge = bridge
        self._pods: dict[str, tuple[PodFixture, int]] = {}
        self._bridge_made = False
        #: The bridge existed before (``adopt_bridge``): use it, never delete it.
        self._bridge_adopted = False
        #: Host indices taken by pods this object did not make.
        self._reserved: set[int] = set()
        self._lock = threading.RLock()

    @property
    def gateway4(self) -> str:
        """The bridge's IPv4 address: the pods' default gateway."""
        return str(self._net4[1])

    @property
    def gateway6(self) -> str:
        """The bridge's IPv6 address: the pods' default gateway."""
        return str(self._net6[1])

    @property
    def pods(self) -> list[PodFixture]:
        """The pods made so far and not removed."""
        with self._lock:
            return [pod for pod, _ in self._pods.values()]

    # --- making -------------------------------------------------------------------

    def _free_host_index(self) -> int:
        used = {index for _, index in self._pods.values()} | self._reserved
        index = 2
        while index in used:
            index += 1
        if index >= min(self._net4.num_addresses - 1, self._net6.num_addresses):
            raise NetnsError(f"no free address left in {self._net4} for another pod")
        return index

    def adopt_bridge(self) -> bool:
        """Use the bridge if it exists already (made by an earlier ``zds netns create --bridge``):
        check its gateway address, reserve the addresses of the pods already on it. It is
        never deleted by this object. False if there is no such bridge yet."""
        with IPRoute() as ipr:
            index = _link_index(ipr, self.bridge)
            if index is None:
                return False
            addresses = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index)}
        if self.gateway4 not in addresses:
            raise NetnsError(
                f"bridge {self.bridge} exists but does not have {self.gateway4}: it is not a pod "
                "bridge for this subnet; pick another --bridge or --subnet4"
            )
        self._bridge_made = self._bridge_adopted = True
        self._reserved |= _used_host_indices(self._net4)
        return True

    def detach(self) -> list[PodFixture]:
        """Forget the pods and the bridge without removing them (they outlive this process)."""
        with self._lock:
            pods = [pod for pod, _ in self._pods.values()]
            self._pods.clear()
            if self._bridge_made and not self._bridge_adopted:
                atexit.unregister(self.close)
            self._bridge_made = False
            return pods

    def _make_bridge(self) -> None:
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=self.bridge, kind="bridge")
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise NetnsError(
                        f"bridge {self.bridge} exists already: another PodNetwork is using it or a"
                        " previous run left it behind; pick another bridge name, or delete that"
                        " link if it is stale"
                    ) from None
                raise NetnsError(f"cannot create bridge {self.bridge}: {e}") from None
            self._bridge_made = True
            index = _link_index(ipr, self.bridge)
            ipr.addr("add", index=index, address=self.gateway4, prefixlen=self._net4.prefixlen)
            ipr.addr(
                "add",
                index=index,
                address=self.gateway6,
                prefixlen=self._net6.prefixlen,
                flags=IFA_F_NODAD,
            )
            ipr.link("set", index=index, state="up")
        # Until close() is called, interpreter exit cleans up (bound methods compare equal,
        # so close() can unregister this very registration).
        atexit.register(self.close)

    def _wire_pod(self, pod: PodFixture, undo: ExitStack) -> None:
        with open_netns(pod.netns_path) as handle:
            with IPRoute() as ipr:
                bridge_index = _link_index(ipr, self.bridge)
                try:
                    # The peer is born inside the pod's netns as eth0: no name clash in the host.
                    ipr.link(
                        "add",
                        ifname=pod.veth_host,
                        kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": handle.fileno()},
                    )
                except NetlinkError as e:
                    raise NetnsError(f"cannot create veth {pod.veth_host} for pod {pod.name}: {e}") from None
                undo.callback(_delete_link, pod.veth_host)
                host_index = _link_index(ipr, pod.veth_host)
                ipr.link("set", index=host_index, master=bridge_index, state="up")
            with in_netns(handle), IPRoute() as ipr:
                eth0 = _link_index(ipr, "eth0")
                ipr.addr("add", index=eth0, address=pod.ipv4, prefixlen=self._net4.prefixlen)
                ipr.addr(
                    "add", index=eth0, address=pod.ipv6, prefixlen=self._net6.prefixlen, flags=IFA_F_NODAD
                )
                ipr.link("set", index=eth0, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=self.gateway4)
                ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=self.gateway6)

    def _add_pod(self, name: str) -> PodFixture:
        with self._lock:
            _check_name(name)
            if name in self._pods:
                raise NetnsError(f"pod {name} exists already in this PodNetwork")
            index = self._free_host_index()
            if not self._bridge_made:
                try:
                    self._make_bridge()
                except NetlinkError as e:
                    raise NetnsError(f"cannot set up bridge {self.bridge}: {e}") from None
            pod = PodFixture(
                name=name,
                netns_path=netns_path(name),
                ipv4=str(self._net4[index]),
                ipv6=str(self._net6[index]),
                veth_host=_ifname("zv-", name),
            )
            with ExitStack() as undo:
                create_netns(name)
                undo.callback(delete_netns, name, missing_ok=True)
                try:
                    self._wire_pod(pod, undo)
                except NetlinkError as e:
                    raise NetnsError(f"cannot set up the network of pod {name}: {e}") from None
                undo.pop_all()
            self._pods[name] = (pod, index)
            log.debug("pod added", extra={"pod": name, "netns": pod.netns_path})
            return pod

    def add_pod(self, name: str) -> PodFixture:
        """Create pod ``name``: its netns, a veth into the bridge, addresses, routes; all up."""
        return _off_event_loop(lambda: self._add_pod(name))

    # --- removing ---------------------------------------------------------------------

    def _remove_pod(self, name: str) -> None:
        with self._lock:
            if name not in self._pods:
                raise NetnsError(f"no pod {name} in this PodNetwork (on bridge {self.bridge})")
            pod, _ = self._pods[name]
            # The veth first: a netns dies asynchronously, and its end of the pair with it.
            _delete_link(pod.veth_host)
            delete_netns(name, missing_ok=True)
            del self._pods[name]

    def remove_pod(self, name: str) -> None:
        """Remove pod ``name``: its veth pair and its netns."""
        _off_event_loop(lambda: self._remove_pod(name))

    def _close(self) -> None:
        with self._lock:
            failures: list[str] = []
            for name in list(self._pods):
                try:
                    self._remove_pod(name)
                except Exception as e:
                    failures.append(f"pod {name}: {e}")
                    self._pods.pop(name, None)
            if self._bridge_made and not self._bridge_adopted:
                try:
                    _delete_link(self.bridge)
                except Exception as e:
                    failures.append(f"bridge {self.bridge}: {e}")
                self._bridge_made = False
            atexit.unregister(self.close)
            if failures:
                raise NetnsError("PodNetwork cleanup failed: " + "; ".join(failures))

    def close(self) -> None:
        """Remove every pod made here, their veths and the bridge; calling it again does nothing."""
        _off_event_loop(self._close)

    def __enter__(self) -> PodNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PodNetwork(bridge={self.bridge!r}, {self._net4}, {self._net6}, pods={list(self._pods)})"
