"""A stored row's netns found again at a start (``recovery``): reopened at its path if that is
still the same netns (its identity and cookie), else looked for by identity in
``/proc/*/ns/net`` and the named namespaces (``--netns-root`` directories too). What could not be looked for (no fd to spare)
is told from what is gone: only the latter lets a row go."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from zds import defaults
from zds.netns import (
    NetnsError,
    NetnsHandle,
    OutOfFds,
    netns_cookie,
    open_netns,
    open_netns_ref,
    run_in_netns,
)
from zds.netns.search import find_by_identity
from zds.server.netnspolicy import NetnsPolicy, NetnsRefused, named_dirs
from zds.server.pods import PodSpecError
from zds.server.storerows import StoredPod

log = logging.getLogger("zds.server.recovery")


@dataclass
class Found:
    """A stored row and what was found of its netns."""

    row: StoredPod
    netns: NetnsHandle | None = None
    #: The path opened to a different netns.
    replaced: bool = False
    #: The path is at a place this run does not allow: not opened.
    place_refused: bool = False
    #: Why its netns could not be looked for now (no fd to spare): '' if it could.
    unreachable: str = ""
    elsewhere: bool = False


def why_refused(row: StoredPod, policy: NetnsPolicy | None, *, names: bool = True) -> str:
    """Why a stored pod may not be reloaded ('' if it may): names zds refuses (unless not
    ``names``), or the node's netns. (A path at a place not allowed now is not opened,
    ``reopen``; the row is kept.)"""
    try:
        if names:
            row.spec.validate()
        if policy is not None and row.identity is not None:
            policy.check_identity(row.identity, str(row.spec.netns))
    except (PodSpecError, NetnsRefused) as exc:
        return str(exc)
    return ""


def reopen(row: StoredPod, policy: NetnsPolicy | None) -> Found:
    """Open the pod's netns reference and keep it only if it is the same netns."""
    item = Found(row)
    if row.identity is None:
        return item
    try:
        candidate = policy.open(row.spec.netns) if policy is not None else open_netns_ref(row.spec.netns)
    except NetnsRefused as exc:
        # --netns-root changed since it was enrolled: not opened there, looked for by identity.
        log.warning("pod's stored netns path not opened: %s", exc, extra=row.spec.log_extra)
        item.place_refused = True
        return item
    except OutOfFds as exc:  # (not a sign the netns is gone)
        item.unreachable = str(exc)
        return item
    except NetnsError:
        return item
    if same(row, candidate):
        candidate.move_above(defaults.NETNS_FD_FLOOR)  # as enrollment does
        item.netns = candidate
    else:
        candidate.close()
        item.replaced = True
    return item


def same(row: StoredPod, candidate: NetnsHandle) -> bool:
    """Whether ``candidate`` is the netns the pod was enrolled with: the same identity and,
    where both are known, the same cookie (an inode number can be given to a netns made
    after the pod's was destroyed; a cookie never is)."""
    if candidate.identity != row.identity:
        return False
    if row.cookie is None:
        return True
    now = netns_cookie(candidate)
    return now is None or now == row.cookie


def search(missing: list[Found], policy: NetnsPolicy | None) -> None:
    """Look for the netns of each pod whose path failed, by identity, in one pass over the
    named namespaces (the allowed roots) and /proc."""
    wanted = {item.row.identity for item in missing if item.row.identity is not None}
    try:
        paths = find_by_identity(wanted, named_dirs(policy))
    except OutOfFds as exc:
        for item in missing:
            item.unreachable = item.unreachable or str(exc)
        return
    for item in missing:
        path = paths.get(item.row.identity) if item.row.identity is not None else None
        if path is None:
            continue
        try:
            candidate = open_netns(path)
        except OutOfFds as exc:
            item.unreachable = str(exc)
            continue
        except NetnsError:
            continue  # gone between the scan and now
        if same(item.row, candidate):
            candidate.move_above(defaults.NETNS_FD_FLOOR)
            item.netns, item.elsewhere = candidate, True
        else:
            candidate.close()


async def vouch_for_cookieless(found: list[Found]) -> None:
    """A row stored without its netns's cookie (a store from before schema version 3, or a
    kernel without SO_NETNS_COOKIE) names its netns by inode number alone, which the kernel
    gives again to a netns made after the pod's was destroyed: such a netns is taken for the
    pod's only where the rules the row records left their mark (our fwmark rule, which every
    zds added with them, either backend); else it is another's, never touched nor served."""
    for item in found:
        row = item.row
        if item.netns is None or row.cookie is not None or not row.rules or row.removing:
            continue  # (a removal takes out only what is ours: finished wherever it was cut short)
        # (imported once a row needs it: pyroute2's netlink modules are ~8 MB of a node agent's
        # RSS, which one without rules (--no-redirect) never loads otherwise)
        from zds.server.policyrouting import PolicyRoutingError, fwmark_rule_there

        try:
            ours = await run_in_netns(item.netns, fwmark_rule_there)
        except (PolicyRoutingError, NetnsError, OSError):
            ours = False
        if ours:
            continue
        log.warning(
            "the pod's row has no netns cookie and the netns with its inode number (%s) has none of "
            "the rules the row records: not taken for the pod's (the kernel gives a destroyed "
            "netns's number again)",
            item.netns.identity,
            extra=row.spec.log_extra,
        )
        item.netns.close()
        item.netns, item.replaced = None, not item.elsewhere
        item.elsewhere = False
