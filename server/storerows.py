"""A row of the pod store (``zds.server.store``): ``StoredPod``, the columns it is written as,
the checks of a row read back (one written behind zds's back is refused, not met later
as a traceback), and the largest row a pod can have (what ``/readyz``'s probe writes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Self

from zds.defaults import MAX_NETNS_PATH, MAX_POD_IPS
from zds.netns import NetnsIdentity, NetnsRef, NetnsRefError, netns_cookie
from zds.server.names import UID_MAX_BYTES
from zds.server.podcache import Pod
from zds.server.pods import PodSource, PodSpec
from zds.server.storefile import StoreError


@dataclass(frozen=True)
class StoredPod:
    """One row: a pod as it was when last written."""

    spec: PodSpec
    #: The netns the pod was enrolled with; None: it was known without one.
    identity: NetnsIdentity | None
    #: The rule set installed ('' for none): the redirect backend's name.
    rules: str
    #: What the installed rules looked like (the backend's digest), to tell them apart from others.
    rules_digest: str
    #: A removal began and did not finish.
    removing: bool
    enrolled_at: float
    #: The netns's cookie when it was enrolled (None: unknown, e.g. an older kernel).
    cookie: int | None = None

    @classmethod
    def of(cls, pod: Pod, *, rules: str, removing: bool = False) -> Self:
        """The row of a pod as it is now, with the rule set ``rules`` (a pod recovered without
        opening its netns: the netns it was stored with), marked ``removing`` or not."""
        identity: NetnsIdentity | None = None
        cookie: int | None = None
        if pod.netns is not None:
            identity, cookie = pod.netns.identity, netns_cookie(pod.netns)
        elif pod.unopened is not None:
            identity, cookie = pod.unopened.identity, pod.unopened.cookie
        return cls(
            pod.spec,
            identity,
            rules=rules,
            rules_digest=pod.rules_digest,
            removing=removing,
            enrolled_at=pod.enrolled_at,
            cookie=cookie,
        )


def parse_row(path: str, table: str, row: Any) -> StoredPod:
    """The ``StoredPod`` of a row read back from ``table``; StoreError (naming ``path``, the
    row's uid and the fix) if it does not hold what zds writes there."""
    uid, name, namespace, sa, ips, netns, dev, ino, rules, digest, removing, enrolled_at, src, cookie = row
    try:
        _check_row(uid, name, namespace, sa, ips, dev, ino, rules, digest, removing, enrolled_at, cookie)
        ref = NetnsRef.parse(netns)
        listed = json.loads(ips)
        if not isinstance(listed, list) or not all(isinstance(ip, str) for ip in listed):
            raise ValueError("ips is not a list of addresses")
        addresses = tuple(listed)
        source = PodSource(src)
    except (NetnsRefError, ValueError, TypeError, RecursionError) as exc:
        shown = repr(uid) if not isinstance(uid, str) or len(uid) <= 128 else repr(uid[:128] + "...")
        raise StoreError(
            f"pod store {path}: the {'' if table == 'pods' else table + ' '}row of pod {shown} is "
            f'damaged ({exc}); restore the file from a backup, or delete that row (sqlite3 PATH "DELETE '
            f'FROM {table} WHERE uid = ...") while no node agent runs'
        ) from exc
    spec = PodSpec(uid, name, namespace, sa, ref, ips=addresses, source=source)
    identity = NetnsIdentity(dev, ino) if dev is not None and ino is not None else None
    return StoredPod(spec, identity, rules, digest, bool(removing), enrolled_at, cookie)


def values(pod: StoredPod) -> tuple[object, ...]:
    """A row's columns, in ``COLUMNS``' order."""
    return (
        pod.spec.uid,
        pod.spec.name,
        pod.spec.namespace,
        pod.spec.service_account,
        json.dumps(list(pod.spec.ips)),
        str(pod.spec.netns),
        pod.identity.dev if pod.identity else None,
        pod.identity.ino if pod.identity else None,
        pod.rules,
        pod.rules_digest,
        int(pod.removing),
        pod.enrolled_at,
        pod.spec.source.value,
        pod.cookie,
    )


#: The last second a ``google.protobuf.Timestamp`` holds (9999-12-31T23:59:59Z).
LATEST_TIME = 253_402_300_799


def _check_row(uid: object, *values: object) -> None:
    """TypeError/ValueError unless a row's columns hold what zds writes there (the text columns
    text, the numbers numbers, removing 0 or 1): a row written behind zds's back is refused
    when read, not met later as a traceback."""
    name, namespace, sa, ips, dev, ino, rules, digest, removing, enrolled_at, cookie = values
    if not isinstance(uid, str) or not uid:
        raise TypeError("its uid is not a non-empty text")
    for column, value in (("name", name), ("namespace", namespace), ("service_account", sa),
                          ("ips", ips), ("rules", rules), ("rules_digest", digest)):  # fmt: skip
        if not isinstance(value, str):
            raise TypeError(f"{column} is {type(value).__name__}, not text")
    for column, value in (("netns_dev", dev), ("netns_ino", ino), ("netns_cookie", cookie)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{column} is {value!r}, not a number")
    if removing not in (0, 1):
        raise ValueError(f"removing is {removing!r}, not 0 or 1")
    if not isinstance(enrolled_at, int | float):
        raise TypeError(f"enrolled_at is {type(enrolled_at).__name__}, not a number")
    if not 0 <= enrolled_at <= LATEST_TIME:  # (NaN too; protobuf's Timestamp ends with 9999)
        raise ValueError(f"enrolled_at is {enrolled_at!r}, not a time from 1970 to 9999")


#: What ``PodStore.probe`` writes: a row of the largest size a pod's can have (each name at Kubernetes'
#: longest, the most addresses, the longest netns path), of a uid no pod has (no NUL in one).
PROBE_ROW = StoredPod(
    PodSpec(
        "\0" + "p" * (UID_MAX_BYTES - 1),
        "n" * 253,
        "s" * 63,
        "a" * 253,
        NetnsRef.of_path("/" + "p" * (MAX_NETNS_PATH - 1)),
        ips=("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",) * MAX_POD_IPS,
        source=PodSource.CONTAINER_ENGINE,
    ),
    NetnsIdentity(2**63 - 1, 2**63 - 1),
    rules="r" * 16,
    rules_digest="d" * 64,
    removing=False,
    enrolled_at=0.0,
    cookie=2**63 - 1,
)
