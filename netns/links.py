"""The host links ``zds netns`` makes for pods (a bridge, veth pairs), told apart from
anyone else's by their alias (deleted only if ours), and the addresses on a pod's eth0."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
from contextlib import suppress
from typing import Any

from pyroute2 import NetlinkError

from .enter import in_netns
from .errors import NetnsError
from .fixtures import iproute, list_netns, netns_path
from .handle import open_netns

# linux/if.h IFNAMSIZ (16) minus the NUL.
IFNAME_MAX = 15


def ifname_for(prefix: str, name: str) -> str:
    """An interface name for ``name`` within IFNAMSIZ: readable when it fits, hashed when not."""
    if len(prefix) + len(name) <= IFNAME_MAX:
        return prefix + name
    digest = hashlib.sha256(name.encode()).hexdigest()
    keep = IFNAME_MAX - len(prefix) - 7
    return f"{prefix}{name[:keep]}-{digest[:6]}"


def link_index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


#: The alias ``zds netns create --bridge`` gives the links it makes in the host netns (the
#: bridge, each pod's veth): ``zds netns delete`` deletes a link by name only if it has it.
LINK_ALIAS = "zds netns"


def kind_and_alias(ipr: Any, index: int) -> tuple[str | None, str | None]:
    """The link ``index``'s kind (bridge, veth, ...; None for a plain device or none) and alias."""
    links = ipr.get_links(index)
    if not links:
        return None, None
    info = links[0].get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return kind, links[0].get_attr("IFLA_IFALIAS")


def is_ours(ipr: Any, index: int, kind: str) -> bool:
    """The link ``index`` is a ``kind`` (bridge, veth) ``zds netns`` made (its alias says so)."""
    return kind_and_alias(ipr, index) == (kind, LINK_ALIAS)


def delete_link(ifname: str) -> None:
    """Delete a host link; one already gone is fine."""
    with iproute() as ipr:
        try:
            ipr.link("del", ifname=ifname)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise


def delete_our_veth(ifname: str) -> None:
    """Delete the host end of a pod's veth if ``zds netns`` made it (a link of that name that
    is not ours stays; the pair of ours goes with the pod's netns anyway)."""
    with iproute() as ipr:
        index = link_index(ipr, ifname)
        if index is None or not is_ours(ipr, index, "veth"):
            return
    try:
        delete_link(ifname)
    except NetlinkError as e:  # (one already gone is fine: delete_link says nothing then)
        raise NetnsError(f"cannot delete veth {ifname}: {os.strerror(e.code)}") from None


def remove_bridge_if_unused(bridge: str, *, index: int | None = None) -> bool:
    """Delete ``bridge`` if no interface is attached to it any more and it is ours: ``zds
    netns`` made it (its alias says so), or, given ``index``, a record made as it was made
    says it is that link (which has no alias yet if its maker died at once); True if deleted."""
    with iproute() as ipr:
        found = link_index(ipr, bridge)
        if found is None:
            return False
        if index is None and not is_ours(ipr, found, "bridge"):
            return False
        if index is not None and (found != index or kind_and_alias(ipr, found)[0] != "bridge"):
            return False
        if any(link.get_attr("IFLA_MASTER") == found for link in ipr.get_links()):
            return False
    delete_link(bridge)
    return True


def eth0_addresses(path: str) -> list[str]:
    """The addresses on a netns's eth0 (none if it has no eth0)."""
    with open_netns(path) as handle, in_netns(handle), iproute() as ipr:
        index = link_index(ipr, "eth0")
        if index is None:
            return []
        # Global addresses only: link-local ones say nothing about the pod network.
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index) if a["scope"] == 0]


def used_host_indices(net4: ipaddress.IPv4Network) -> set[int]:
    """Host indices in ``net4`` that a named netns's eth0 already has."""
    used: set[int] = set()
    for name in list_netns():
        try:
            addresses = eth0_addresses(netns_path(name))
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
        return eth0_addresses(path)
    except (NetnsError, OSError):
        return []
