"""Istio's in-pod policy routing, the same for both rule backends (``iptables_linux.go``'s
``AddInpodMarkIPRule`` and ``AddLoopbackRoutes``), through netlink (pyroute2), called from a
worker thread inside the pod's netns:

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route replace local 0.0.0.0/0 dev lo table 100      (and ::/0 unless --no-ipv6)

Replies to connections the inbound relay made with the client's source address
(IP_TRANSPARENT) are delivered locally through table 100.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_DELRULE, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from zds import defaults
from zds.errors import ZdsError

NETLINK_ROUTE = 0
#: What Istio's routes carry (netlink's default; `ip route` leaves it out): a removal's
#: request names none, so it matches a route whoever made it, as ``ip route del`` does.
RTPROT_BOOT = 3
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
_NLMSGHDR = struct.Struct("=IHHII")
_ERRNO = struct.Struct("=i")
_SEQ = struct.Struct("=I")  # nlmsghdr.nlmsg_seq, at offset 8


class PolicyRoutingError(ZdsError):
    """The policy routing could not be changed; the message has netlink's words."""


def _families(ipv6: bool) -> list[socket.AddressFamily]:
    """IPv4 and, with ``ipv6`` (the node agent's, not the pod's addresses: as Istio), IPv6."""
    return [socket.AF_INET] + ([socket.AF_INET6] if ipv6 else [])


def _has_local_route(family: int) -> bool:
    """Whether table 100 gets its local route in ``family``: IPv6 on, but not on lo, has none
    (the kernel refuses ::/0 there), the rule all the same (Istio's forEachLoopbackRoute skips
    the route alike)."""
    return family == socket.AF_INET or not _lo_ipv6_disabled()


def _lo_ipv6_disabled() -> bool:
    """Whether IPv6 is disabled on this thread's netns's lo (/proc/sys/net follows the calling
    thread); unreadable: not disabled, and the route is tried (as Istio does)."""
    try:
        with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def policy_routing(add: bool, *, ipv6: bool) -> None:
    """Add (or remove) the rule and the local route, for IPv4 and, with ``ipv6``, IPv6 (no
    IPv6 route where the pod's ``lo`` has IPv6 off, as Istio); removal ignores what is
    already gone.

    pyroute2's message classes over one plain netlink socket made here (so in the pod's
    netns): its ``IPRoute`` runs an event loop of its own per instance, ~0.8 ms a pod,
    which with thousands of pods was most of what installing the rules cost."""
    lo = socket.if_nametoindex("lo")  # in this thread's netns (a netlink dump costs 30x as much)
    with _Rtnl() as rtnl:
        for family in _families(ipv6):
            if add:
                if _has_local_route(family):
                    rtnl.request(_encoded(RTM_NEWROUTE, family, lo), (), "add the local route")
                rtnl.request(_encoded(RTM_NEWRULE, family, lo), (errno.EEXIST,), "add the fwmark rule")
            else:
                gone = (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT)  # (no IPv6 in this kernel)
                rtnl.request(_encoded(RTM_DELRULE, family, lo), gone, "delete the fwmark rule")
                rtnl.request(_encoded(RTM_DELROUTE, family, lo), gone, "delete the local route")


@functools.cache
def _encoded(kind: int, family: int, lo: int) -> bytes:
    """One request, encoded once (by pyroute2) for every pod: they only differ in the
    sequence number, which ``_Rtnl.request`` sets."""
    flags = {
        RTM_NEWROUTE: NLM_F_CREATE | NLM_F_REPLACE,
        RTM_NEWRULE: NLM_F_CREATE | NLM_F_EXCL,
    }.get(kind, 0)
    msg: nlmsg = (
        _route(family, lo, kind == RTM_NEWROUTE) if kind in (RTM_NEWROUTE, RTM_DELROUTE) else _rule(family)
    )
    msg["header"]["type"] = kind
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg.encode()
    return bytes(msg.data)


def _route(family: int, lo: int, add: bool) -> rtmsg:
    """``local 0.0.0.0/0 (::/0) dev lo table 100 scope host`` (proto boot when added)."""
    msg = rtmsg()
    msg["family"] = family
    msg["dst_len"] = 0
    msg["table"] = defaults.INPOD_ROUTE_TABLE
    msg["proto"] = RTPROT_BOOT if add else 0
    msg["scope"] = RT_SCOPE_HOST
    msg["type"] = RTN_LOCAL
    msg["attrs"] = [("RTA_TABLE", defaults.INPOD_ROUTE_TABLE), ("RTA_OIF", lo)]
    return msg


def _rule(family: int) -> fibmsg:
    """``fwmark 0x111/0xfff pref 32764 lookup 100``."""
    msg = fibmsg()
    msg["family"] = family
    msg["table"] = defaults.INPOD_ROUTE_TABLE
    msg["action"] = FR_ACT_TO_TBL
    msg["attrs"] = [
        ("FRA_TABLE", defaults.INPOD_ROUTE_TABLE),
        ("FRA_PRIORITY", defaults.INPOD_RULE_PRIORITY),
        ("FRA_FWMARK", defaults.INPOD_TPROXY_MARK),
        ("FRA_FWMASK", defaults.INPOD_TPROXY_MASK),
    ]
    return msg


class _Rtnl:
    """A NETLINK_ROUTE socket in the calling thread's netns: one request, one ack at a time."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *_: object) -> None:
        self._sock.close()

    def request(self, encoded: bytes, ignore: tuple[int, ...], what: str) -> None:
        """Send one encoded request; PolicyRoutingError unless the kernel acks it (or answers
        with an errno in ``ignore``: already there, already gone)."""
        self._seq += 1
        data = bytearray(encoded)
        _SEQ.pack_into(data, 8, self._seq)
        self._sock.send(data)
        while True:
            reply = self._sock.recv(65536)
            _length, rtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply)
            if rtype == NLMSG_ERROR and seq == self._seq:
                break
        code = -_ERRNO.unpack_from(reply, _NLMSGHDR.size)[0]
        if code and code not in ignore:
            raise PolicyRoutingError(f"policy routing in pod netns: cannot {what}: {os.strerror(code)}")


def policy_routing_present(*, ipv6: bool) -> bool:
    """Whether our fwmark rule and table 100's local route are there, for IPv4 and, with
    ``ipv6``, IPv6, exactly as ``policy_routing`` adds them (call inside the netns): a rule
    moved past ``main``, with another mask or action, or a route on another device does not
    do their work (replies to the inbound relay's connections go astray), and a restart
    that took it for ours kept it; Istio's reconcile adds the rule and replaces the route."""
    lo = socket.if_nametoindex("lo")
    with IPRoute() as ipr:
        for family in _families(ipv6):
            if not any(map(_is_our_rule, ipr.get_rules(family=family))):
                return False
            if not _has_local_route(family):
                continue
            routes = ipr.get_routes(family=family, table=defaults.INPOD_ROUTE_TABLE)
            if not any(_is_our_route(route, lo) for route in routes):
                return False
    return True


#: fib_rule_hdr's flag that inverts a rule's selector.
FIB_RULE_INVERT = 0x2
#: The attributes our rule has (anything else, a selector pyroute2 may not even know, makes a
#: rule that does less than ours)...
_RULE_ATTRS = frozenset(
    {"FRA_TABLE", "FRA_PRIORITY", "FRA_FWMARK", "FRA_FWMASK", "FRA_PROTOCOL"}
    | {"FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP"}
)
#: ... of which these two the kernel reports as -1 when unset.
_SUPPRESSORS = ("FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP")


def _is_our_rule(rule: fibmsg) -> bool:
    """``fwmark 0x111/0xfff pref 32764 lookup 100`` and nothing more to it."""
    return (
        rule["action"] == FR_ACT_TO_TBL
        and not rule["flags"] & FIB_RULE_INVERT
        and rule["src_len"] == rule["dst_len"] == rule["tos"] == 0
        and (rule.get_attr("FRA_TABLE") or rule["table"]) == defaults.INPOD_ROUTE_TABLE
        and rule.get_attr("FRA_PRIORITY") == defaults.INPOD_RULE_PRIORITY
        and rule.get_attr("FRA_FWMARK") == defaults.INPOD_TPROXY_MARK
        and rule.get_attr("FRA_FWMASK") == defaults.INPOD_TPROXY_MASK
        and all(name in _RULE_ATTRS for name, *_ in rule["attrs"])
        and all(rule.get_attr(name) in (None, 0xFFFFFFFF) for name in _SUPPRESSORS)
    )


def _is_our_route(route: rtmsg, lo: int) -> bool:
    """``local 0.0.0.0/0 (::/0) dev lo`` in table 100."""
    return bool(
        route["type"] == RTN_LOCAL
        and route["dst_len"] == route["src_len"] == route["tos"] == 0
        and route.get_attr("RTA_OIF") == lo
    )
