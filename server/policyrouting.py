"""Istio's in-pod policy routing, the same for both rule backends (``iptables_linux.go``'s
``AddInpodMarkIPRule`` and ``AddLoopbackRoutes``), through netlink (pyroute2), called from a
worker thread inside the pod's netns:

    ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ip route replace local 0.0.0.0/0 dev lo table 100      (and ::/0 unless --no-ipv6)

Replies to connections the inbound relay made with the client's source address
(IP_TRANSPARENT) are delivered locally through table 100.

Where the pod has routing of its own in the way, Istio's netlink calls act on it as on ours;
zds does what Istio does and says so, except that its removal never deletes a rule or route
of the pod's: the kernel deletes the first rule at our pref that matches what the request
names, and a rule of the pod's with a selector more (``iif``, ``proto``) matches; IPv6 deletes
the first default route in table 100 on ``lo`` whatever its type, unless the metric is named.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg,
)
from pyroute2.netlink.rtnl import (
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from zds import defaults
from zds.errors import ZdsError

log = logging.getLogger("zds.server.redirect")

NETLINK_ROUTE = 0
#: What Istio's routes carry (netlink's default; `ip route` leaves it out): a removal's
#: request names none, so it matches a route whoever made it, as ``ip route del`` does.
RTPROT_BOOT = 3
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
#: The metric an IPv6 route added without one gets (ours, as Istio's).
IP6_RT_PRIO_USER = 1024
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


def policy_routing(add: bool, *, ipv6: bool) -> bool:
    """Add (or remove) the rule and the local route, for IPv4 and, with ``ipv6``, IPv6 (no
    IPv6 route where the pod's ``lo`` has IPv6 off, as Istio); removal ignores what is
    already gone. Whether the rule is ours now in every family (added: a rule of the pod's
    own at our pref that the kernel takes for ours, ``from`` or ``tos`` besides, keeps ours
    out; said).

    pyroute2's message classes over one plain netlink socket made here (so in the pod's
    netns): its ``IPRoute`` runs an event loop of its own per instance, ~0.8 ms a pod,
    which with thousands of pods was most of what installing the rules cost."""
    lo = socket.if_nametoindex("lo")  # in this thread's netns (a netlink dump costs 30x as much)
    ours = True
    with _Rtnl() as rtnl:
        for family in _families(ipv6):
            if add:
                if _has_local_route(family):
                    _add_local_route(rtnl, family, lo)
                ours = _add_rule(rtnl, family) and ours
            else:
                gone = (errno.ENOENT, errno.ESRCH, errno.EAFNOSUPPORT)  # (no IPv6 in this kernel)
                if _ours_to_delete(rtnl, family, gone):
                    rtnl.request(_encoded(RTM_DELRULE, family, lo), gone, "delete the fwmark rule")
                rtnl.request(_encoded(RTM_DELROUTE, family, lo), gone, "delete the local route")
    return ours


def _add_local_route(rtnl: _Rtnl, family: int, lo: int) -> None:
    """Table 100's local route; a default route of the pod's own there is replaced, as Istio's
    ``RouteReplace`` does (said: the removal takes ours out, and the pod's stays gone)."""
    if not rtnl.request(_encoded(RTM_NEWROUTE, family, lo), (errno.EEXIST,), "add the local route"):
        return
    theirs = [route for route in _table_routes(rtnl, family) if route["dst_len"] == 0 and route["tos"] == 0]
    if any(_is_our_route(route, lo) for route in theirs):
        return
    log.warning(
        "the pod's own default route in table %d (%s) is replaced by ours, as Istio's node agent "
        "replaces it; the removal does not put it back",
        defaults.INPOD_ROUTE_TABLE,
        "; ".join(map(_route_text, theirs)) or "?",
    )
    rtnl.request(_encoded(RTM_NEWROUTE, family, lo, replace=True), (), "replace the local route")


def _add_rule(rtnl: _Rtnl, family: int) -> bool:
    """The fwmark rule; whether it is ours now (already there: looked at)."""
    if not rtnl.request(_encoded(RTM_NEWRULE, family, 0), (errno.EEXIST,), "add the fwmark rule"):
        return True
    rules = rtnl.dump(RTM_GETRULE, family, ())
    if any(map(_is_our_rule, rules)):
        return True
    log.warning(
        "the policy routing in the pod's netns is not ours as added: the kernel takes a rule of the "
        "pod's own at pref %d for ours (%s)",
        defaults.INPOD_RULE_PRIORITY,
        "; ".join(_rule_text(rule) for rule in rules if _taken_for_ours(rule) and not _is_our_rule(rule))
        or "?",
    )
    return False


def _ours_to_delete(rtnl: _Rtnl, family: int, gone: tuple[int, ...]) -> bool:
    """Whether the kernel's delete of our rule would take ours: False if none is there, or if
    a rule of the pod's own comes first that the delete matches as well (ours stays: said)."""
    rules = rtnl.dump(RTM_GETRULE, family, gone)
    first = next((rule for rule in rules if _taken_for_ours(rule)), None)
    if first is None or _is_our_rule(first):
        return first is not None
    if any(map(_is_our_rule, rules)):
        log.warning(
            "the fwmark rule is left in the pod's netns: a rule of the pod's own at pref %d (%s) comes "
            "first, and deleting ours would delete it",
            defaults.INPOD_RULE_PRIORITY,
            _rule_text(first),
        )
    return False


@functools.cache
def _encoded(kind: int, family: int, lo: int, *, replace: bool = False) -> bytes:
    """One request, encoded once (by pyroute2) for every pod: they only differ in the
    sequence number, which ``_Rtnl.request`` sets. (A route is added, not replaced, first:
    one of the pod's own in its place is said before it goes.)"""
    flags = (
        NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        if kind in (RTM_NEWROUTE, RTM_NEWRULE)
        else 0
    )
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
    if family == socket.AF_INET6 and not add:
        # (IPv6's delete takes the first route matching what it names, whatever its type: a
        # route of the pod's own at a lower metric went in ours' place; ours has the default)
        msg["attrs"].append(("RTA_PRIORITY", IP6_RT_PRIO_USER))
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

    def request(self, encoded: bytes, ignore: tuple[int, ...], what: str) -> int:
        """Send one encoded request; PolicyRoutingError unless the kernel acks it (0) or answers
        with an errno in ``ignore`` (already there, already gone: that errno)."""
        self._seq += 1
        data = bytearray(encoded)
        _SEQ.pack_into(data, 8, self._seq)
        self._sock.send(data)
        while True:
            reply = self._sock.recv(65536)
            _length, rtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply)
            if rtype == NLMSG_ERROR and seq == self._seq:
                break
        code: int = -_ERRNO.unpack_from(reply, _NLMSGHDR.size)[0]
        if code and code not in ignore:
            raise PolicyRoutingError(f"policy routing in pod netns: cannot {what}: {os.strerror(code)}")
        return code

    def dump(self, kind: int, family: int, ignore: tuple[int, ...]) -> list[nlmsg]:
        """Every rule (``RTM_GETRULE``) or route (``RTM_GETROUTE``) of ``family``, in the
        kernel's order (none if it answers with an errno in ``ignore``)."""
        self._seq += 1
        msg: nlmsg = fibmsg() if kind == RTM_GETRULE else rtmsg()
        msg["family"] = family
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        found: list[nlmsg] = []
        marshal = MarshalRtnl()
        while True:
            for reply in marshal.parse(self._sock.recv(1 << 16), seq=self._seq):
                rtype = reply["header"]["type"]
                if rtype == NLMSG_DONE:
                    return found
                if rtype == NLMSG_ERROR:
                    code = getattr(reply["header"]["error"], "code", errno.EIO)  # (pyroute2's NetlinkError)
                    if code in ignore:
                        return []
                    raise PolicyRoutingError(
                        f"policy routing in pod netns: cannot list it: {os.strerror(code)}"
                    )
                found.append(reply)


def policy_routing_present(*, ipv6: bool) -> bool:
    """Whether our fwmark rule and table 100's local route are there, for IPv4 and, with
    ``ipv6``, IPv6, exactly as ``policy_routing`` adds them (call inside the netns): a rule
    moved past ``main``, with another mask or action, or a route on another device does not
    do their work (replies to the inbound relay's connections go astray), and a restart
    that took it for ours kept it; Istio's reconcile adds the rule and replaces the route."""
    lo = socket.if_nametoindex("lo")
    with _Rtnl() as rtnl:
        for family in _families(ipv6):
            if not any(map(_is_our_rule, rtnl.dump(RTM_GETRULE, family, ()))):
                return False
            if _has_local_route(family) and not any(
                _is_our_route(r, lo) for r in _table_routes(rtnl, family)
            ):
                return False
    return True


def fwmark_rule_there() -> bool:
    """Whether a rule like our fwmark rule (our pref, table, fwmark and mask, whatever else it
    selects on) is in this netns, IPv4's or IPv6's (call inside the netns): what every zds
    that installed in-pod rules, with either backend, added with them."""
    with _Rtnl() as rtnl:
        for family in (socket.AF_INET, socket.AF_INET6):
            if any(map(_taken_for_ours, rtnl.dump(RTM_GETRULE, family, (errno.EAFNOSUPPORT,)))):
                return True
    return False


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
        and not rule.get_attr("FRA_PROTOCOL")  # (a pod's ``proto static`` one is not ours)
    )


def _taken_for_ours(rule: fibmsg) -> bool:
    """Whether the kernel's lookup of a rule like ours (to add or delete it) may take ``rule``:
    our pref, table, action, fwmark and mask, whatever else it selects on."""
    return bool(
        rule["action"] == FR_ACT_TO_TBL
        and (rule.get_attr("FRA_TABLE") or rule["table"]) == defaults.INPOD_ROUTE_TABLE
        and rule.get_attr("FRA_PRIORITY") == defaults.INPOD_RULE_PRIORITY
        and rule.get_attr("FRA_FWMARK") == defaults.INPOD_TPROXY_MARK
        and rule.get_attr("FRA_FWMASK") == defaults.INPOD_TPROXY_MASK
    )


def _rule_text(rule: fibmsg) -> str:
    """A rule's selectors beyond ours, as netlink names them (what an ``ip rule`` line shows)."""
    more = ["not"] if rule["flags"] & FIB_RULE_INVERT else []
    more += [f"{name}={value}" for name, value in rule["attrs"] if name not in _RULE_ATTRS]
    more += [
        f"{name}={rule.get_attr(name)}"
        for name in _SUPPRESSORS
        if rule.get_attr(name) not in (None, 0xFFFFFFFF)
    ]
    more += [f"FRA_PROTOCOL={proto}" for proto in [rule.get_attr("FRA_PROTOCOL")] if proto]
    more += [f"{field}={rule[field]}" for field in ("src_len", "dst_len", "tos") if rule[field]]
    return ", ".join(more) or "nothing more than ours"


def _table_routes(rtnl: _Rtnl, family: int) -> list[rtmsg]:
    """The routes of ``family`` in table 100."""
    return [
        route
        for route in rtnl.dump(RTM_GETROUTE, family, ())
        if (route.get_attr("RTA_TABLE") or route["table"]) == defaults.INPOD_ROUTE_TABLE
    ]


def _route_text(route: rtmsg) -> str:
    """A route as netlink gives it, in short: type, gateway, device index."""
    parts = [f"type {route['type']}"]
    if (gateway := route.get_attr("RTA_GATEWAY")) is not None:
        parts.append(f"via {gateway}")
    if (oif := route.get_attr("RTA_OIF")) is not None:
        parts.append(f"dev #{oif}")
    return " ".join(parts)


def _is_our_route(route: rtmsg, lo: int) -> bool:
    """``local 0.0.0.0/0 (::/0) dev lo`` in table 100."""
    return bool(
        route["type"] == RTN_LOCAL
        and route["dst_len"] == route["src_len"] == route["tos"] == 0
        and route.get_attr("RTA_OIF") == lo
    )
