"""Pods to test and demo with: named network namespaces on a bridge, as a CNI would make them.

A pod is a named netns with loopback up, a veth pair into a host bridge, IPv4
and IPv6 addresses and default routes via the bridge, so pods reach each
other. Everything goes through pyroute2 (netlink), never the ``ip`` command;
what is made is removed again, on error too.
"""

from __future__ import annotations

import atexit
import errno
import functools
import ipaddress
import logging
import os
import random
import socket
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from pyroute2 import NetlinkError

from zds import runtime

from .enter import in_netns, netns_cookie
from .errors import NetnsError
from .fixtures import check_name, create_netns, delete_netns, iproute, netns_path, off_event_loop
from .handle import NetnsHandle, open_netns
from .links import (
    IFNAME_MAX,
    LINK_ALIAS,
    delete_link,
    delete_our_veth,
    ifname_for,
    kind_and_alias,
    link_index,
    used_host_indices,
)

log = logging.getLogger(__name__)

# linux/if_addr.h: usable at once, no duplicate address detection.
IFA_F_NODAD = 0x02


@dataclass
class PodFixture:
    """One pod made by ``PodNetwork.add_pod``: its netns, its addresses and its host-side veth."""

    name: str
    netns_path: str
    ipv4: str
    ipv6: str
    veth_host: str


def create_pods_on_bridge(
    names: list[str],
    bridge: str,
    subnet4: str,
    subnet6: str,
    announce: Callable[[list[PodFixture]], None] = lambda pods: None,
) -> list[PodFixture]:
    """Pods that outlive this process (``zds netns create --bridge``): the bridge is made or
    reused, each pod gets the next free addresses. On a failure or an interrupt, what this
    call made is undone; once all are made, ``announce`` tells of them in the same held
    section that lets them go (an interrupt then waits for it: all made and told, or none)."""

    def make() -> list[PodFixture]:
        net = PodNetwork(bridge=bridge, subnet4=subnet4, subnet6=subnet6)
        net.adopt_bridge()
        try:
            for name in names:
                net._add_pod(name)
            with runtime.interrupts_held():
                pods = net.detach()
                announce(pods)
        except BaseException:
            with runtime.interrupts_held():  # (a second interrupt waits for the clean-up)
                net._close()
            raise
        return pods

    return off_event_loop(make)


#: What proves a pod's netns is the one made for it: (st_dev, st_ino, cookie); cookie -1
#: where the kernel gives none (then dev and ino alone).
Fingerprint = tuple[int, int, int]


def _fingerprint_of(handle: NetnsHandle) -> Fingerprint:
    cookie = netns_cookie(handle)
    return (handle.identity.dev, handle.identity.ino, -1 if cookie is None else cookie)


def _same_netns(path: str, made: Fingerprint) -> bool | None:
    """Whether the namespace at ``path`` is the one ``made`` names (None: none is there)."""
    try:
        handle = open_netns(path)
    except NetnsError:
        return None
    with handle:
        now = _fingerprint_of(handle)
    return now == made if made[2] != -1 and now[2] != -1 else now[:2] == made[:2]


def delete_pod(name: str, *, missing_ok: bool = False) -> None:
    """Delete a pod made by ``create_pods_on_bridge``: its host veth first (a netns dies
    asynchronously, and its end of the pair with it), then the netns."""
    off_event_loop(lambda: delete_our_veth(ifname_for("zv-", name)))
    delete_netns(name, missing_ok=missing_ok)


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
        *,
        made: Callable[[str, str, str | int], None] | None = None,
    ) -> None:
        """``made(kind, name, where)``: told of each bridge and netns before it is made or named,
        for a record of what is whose: a netns before it has its name (``where``: a path that
        names it then), the bridge before it is made (``where``: the ifindex it is made with)."""
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
        #: What each pod's netns and host veth were when made here (fingerprint, ifindex):
        #: removal takes out only what is still that (a name reused since is someone else's).
        self._made_ids: dict[str, tuple[Fingerprint, int | None]] = {}
        self._bridge_made = False
        #: The bridge existed before (``adopt_bridge``): use it, never delete it.
        self._bridge_adopted = False
        #: Host indices taken by pods this object did not make.
        self._reserved: set[int] = set()
        self._lock = threading.RLock()
        self._made = made

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
        with iproute() as ipr:
            index = link_index(ipr, self.bridge)
            if index is None:
                return False
            kind, alias = kind_and_alias(ipr, index)
            addresses = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index)}
        if kind != "bridge":
            raise NetnsError(
                f"{self.bridge} exists and is not a bridge (a {kind or 'device'}); pick another --bridge"
            )
        if alias != LINK_ALIAS:  # (someone else's bridge, whatever its addresses: not ours to use)
            raise NetnsError(
                f"bridge {self.bridge} exists and zds netns did not make it; pick another --bridge"
            )
        if self.gateway4 not in addresses:
            raise NetnsError(
                f"bridge {self.bridge} exists but does not have {self.gateway4}: it is not a pod "
                "bridge for this subnet; pick another --bridge or --subnet4"
            )
        self._bridge_made = self._bridge_adopted = True
        self._reserved |= used_host_indices(self._net4)
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

    def _subnet_taken(self, ipr: Any) -> tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
        """An address of this host inside the pods' subnets (another bridge on them: a second
        gateway, pods given addresses already in use), said as "ADDRESS on LINK", and the
        subnet it is in. Not one on a link named as the bridge: that bridge exists (its own
        message says what to do)."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for entry in ipr.get_addr():
            if names.get(entry["index"]) == self.bridge:
                continue
            text = entry.get_attr("IFA_ADDRESS") or entry.get_attr("IFA_LOCAL")
            if not text:
                continue
            address = ipaddress.ip_address(text)
            for net in (self._net4, self._net6):
                if address in net:
                    return f"{address} on {names.get(entry['index'], entry['index'])}", net
        return None

    def _make_bridge(self) -> None:
        with iproute() as ipr:  # (made and noted at once: an interrupt waits)
            if (taken := self._subnet_taken(ipr)) is not None:
                address, which = taken
                raise NetnsError(
                    f"the pod subnet {which} is in use on this host ({address}); pick another"
                    f" (--subnet{which.version})"
                )
            try:
                self._add_bridge(ipr)
            except NetlinkError as e:
                if e.code == errno.EEXIST:
                    raise NetnsError(
                        f"bridge {self.bridge} exists already: another PodNetwork is using it or a"
                        " previous run left it behind; pick another bridge name, or delete that"
                        f" link if it is stale (ip link del {self.bridge})"
                    ) from None
                raise NetnsError(f"cannot create bridge {self.bridge}: {os.strerror(e.code)}") from None
            self._bridge_made = True
            index = link_index(ipr, self.bridge)
            ipr.link("set", index=index, ifalias=LINK_ALIAS)
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

    def _add_bridge(self, ipr: Any) -> None:
        """The bridge link; with a ``made`` hook, at an ifindex told to it before the link is
        made (a record then names it, name and index, before anyone can find it)."""
        if self._made is None:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            return
        for _ in range(8):
            index = random.randrange(1 << 20, 1 << 30)
            self._made("bridge", self.bridge, index)
            try:
                ipr.link("add", ifname=self.bridge, kind="bridge", index=index)
                return
            except NetlinkError as e:
                if e.code != errno.EEXIST or link_index(ipr, self.bridge) is not None:
                    raise  # (EEXIST of the name: said by the caller)
        raise NetnsError(f"cannot create bridge {self.bridge}: no free interface index found")

    def _wire_pod(self, pod: PodFixture, undo: ExitStack) -> None:
        with open_netns(pod.netns_path) as handle:
            self._made_ids[pod.name] = (_fingerprint_of(handle), None)
            with iproute() as ipr:  # (the veth made and its undo noted at once: an interrupt waits)
                bridge_index = link_index(ipr, self.bridge)
                try:
                    # The peer is born inside the pod's netns as eth0: no name clash in the host.
                    ipr.link(
                        "add",
                        ifname=pod.veth_host,
                        kind="veth",
                        peer={"ifname": "eth0", "net_ns_fd": handle.fileno()},
                    )
                except NetlinkError as e:
                    raise NetnsError(
                        f"cannot create veth {pod.veth_host} for pod {pod.name}: {os.strerror(e.code)}"
                    ) from None
                undo.callback(delete_link, pod.veth_host)
                host_index = link_index(ipr, pod.veth_host)
                self._made_ids[pod.name] = (self._made_ids[pod.name][0], host_index)
                ipr.link("set", index=host_index, ifalias=LINK_ALIAS)
                ipr.link("set", index=host_index, master=bridge_index, state="up")
            with in_netns(handle), iproute() as ipr:
                eth0 = link_index(ipr, "eth0")
                ipr.addr("add", index=eth0, address=pod.ipv4, prefixlen=self._net4.prefixlen)
                ipr.addr(
                    "add", index=eth0, address=pod.ipv6, prefixlen=self._net6.prefixlen, flags=IFA_F_NODAD
                )
                ipr.link("set", index=eth0, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=self.gateway4)
                ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=self.gateway6)

    def _add_pod(self, name: str) -> PodFixture:
        with self._lock:
            check_name(name)
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
                veth_host=ifname_for("zv-", name),
            )
            with ExitStack() as undo:
                # Each thing made is noted in the same held section (an interrupt, Ctrl-C or
                # SIGTERM, waits for its end): one landing in between left it for good.
                with runtime.interrupts_held():
                    told = None if self._made is None else functools.partial(self._made, "netns", name)
                    create_netns(name, told=told)
                    undo.callback(delete_netns, name, missing_ok=True)
                undo.callback(self._made_ids.pop, name, None)
                try:
                    self._wire_pod(pod, undo)
                except NetlinkError as e:
                    raise NetnsError(f"cannot set up the network of pod {name}: {e}") from None
                with runtime.interrupts_held():
                    undo.pop_all()
                    self._pods[name] = (pod, index)
            log.debug("pod added", extra={"pod": name, "netns": pod.netns_path})
            return pod

    def add_pod(self, name: str) -> PodFixture:
        """Create pod ``name``: its netns, a veth into the bridge, addresses, routes; all up."""
        return off_event_loop(lambda: self._add_pod(name))

    # --- removing ---------------------------------------------------------------------

    def _remove_pod(self, name: str) -> None:
        with self._lock:
            if name not in self._pods:
                raise NetnsError(f"no pod {name} in this PodNetwork (on bridge {self.bridge})")
            pod, _ = self._pods[name]
            made = self._made_ids.get(name)
            # The veth first: a netns dies asynchronously, and its end of the pair with it.
            # Only what is still what this object made: a name someone reused since (their
            # own netns, a link of theirs) stays.
            with iproute() as ipr:
                index = link_index(ipr, pod.veth_host)
            if made is None or made[1] is None or index == made[1]:
                delete_link(pod.veth_host)
            elif index is not None:
                log.warning(
                    "link %s is not the veth made for pod %s any more: left as it is", pod.veth_host, name
                )
            if made is None or _same_netns(pod.netns_path, made[0]) is not False:
                delete_netns(name, missing_ok=True)
            else:
                log.warning("netns %s is not the one made for this pod any more: left as it is", name)
            self._made_ids.pop(name, None)
            del self._pods[name]

    def remove_pod(self, name: str) -> None:
        """Remove pod ``name``: its veth pair and its netns."""
        off_event_loop(lambda: self._remove_pod(name))

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
                    delete_link(self.bridge)
                except Exception as e:
                    failures.append(f"bridge {self.bridge}: {e}")
                self._bridge_made = False
            atexit.unregister(self.close)
            if failures:
                raise NetnsError("PodNetwork cleanup failed: " + "; ".join(failures))

    def close(self) -> None:
        """Remove every pod made here, their veths and the bridge; calling it again does nothing."""
        off_event_loop(self._close)

    def __enter__(self) -> PodNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PodNetwork(bridge={self.bridge!r}, {self._net4}, {self._net6}, pods={list(self._pods)})"
