"""Istio's in-pod policy routing, the same for both rule backends (``iptables_linux.go``'s
``AddInpodMarkIPRule`` and ``AddLoopbackRoutes``), through netlink (pyroute2), called from a
worker thread inside the pod's netns:

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route replace local 0.0.0.0/0 dev lo table 100      (and ::/0 where the pod has IPv6)

Replies to connections the inbound relay made with the client's source address
(IP_TRANSPARENT) are delivered locally through table 100.
"""

from __future__ import annotations

import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from zds import defaults
from zds.errors import ZdsError


class PolicyRoutingError(ZdsError):
    """The policy routing could not be changed; the message has netlink's words."""


def has_ipv6() -> bool:
    """Whether the current netns has IPv6 enabled with a non-link-local address (call inside the netns)."""
    try:
        # /proc/net follows the main thread; this thread may be in another netns.
        with open("/proc/thread-self/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                # scope 00 = global; skip loopback (::1, scope 10) and link-local (20)
                if len(fields) >= 4 and fields[3] == "00":
                    return True
    except OSError:
        return False
    return False


def policy_routing(add: bool, *, ipv6: bool | None = None) -> None:
    """Add (or remove) the rule and the local route, for IPv4 and, where the pod has it,
    IPv6; removal ignores what is already gone."""
    ipv6 = has_ipv6() if ipv6 is None else ipv6
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family in [socket.AF_INET] + ([socket.AF_INET6] if ipv6 else []):
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            rule = {
                "family": family,
                "table": defaults.INPOD_ROUTE_TABLE,
                "priority": defaults.INPOD_RULE_PRIORITY,
                "fwmark": defaults.INPOD_TPROXY_MARK,
                "fwmask": defaults.INPOD_TPROXY_MASK,
            }
            route = {
                "dst": dst,
                "type": "local",
                "scope": 254,
                "table": defaults.INPOD_ROUTE_TABLE,
                "oif": lo,
            }
            try:
                if add:
                    ipr.route("replace", family=family, **route)
                    ipr.rule("add", **rule)
                else:
                    ipr.rule("del", **rule)
            except NetlinkError as exc:
                if exc.code not in (17, 2):  # EEXIST on add, ENOENT on del
                    raise PolicyRoutingError(f"policy routing in pod netns: {exc}") from exc
            if not add:
                try:
                    ipr.route("del", family=family, **route)
                except NetlinkError as exc:
                    if exc.code not in (2, 3):  # ENOENT / ESRCH: already gone
                        raise PolicyRoutingError(f"policy routing in pod netns: {exc}") from exc


def policy_routing_present() -> bool:
    """Whether our IPv4 fwmark rule is there (call inside the netns)."""
    with IPRoute() as ipr:
        rules = ipr.get_rules(family=socket.AF_INET, table=defaults.INPOD_ROUTE_TABLE)
        return any(r.get_attr("FRA_FWMARK") == defaults.INPOD_TPROXY_MARK for r in rules)
