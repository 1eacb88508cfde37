"""What a pod's uid, name, namespace and service account may be: Kubernetes' rules.

- uid: not blank, printable, at most 128 bytes (Kubernetes' uids are UUIDs; zds accepts
  any printable text so scripts can use readable ones);
- namespace: a DNS-1123 label (``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63 characters);
- name and service account: DNS-1123 subdomains (labels joined by dots, at most 253).

Checked once, the same way, whatever the pod came from (CLI, gRPC, CNI event, pods
file, the pod store).
"""

from __future__ import annotations

import re

UID_MAX_BYTES = 128
LABEL_MAX = 63
SUBDOMAIN_MAX = 253

_LABEL_RE = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
#: Matched whole (``fullmatch``: ``$`` also matches before a last newline, and Go's, which
#: Kubernetes checks with, does not).
_LABEL = re.compile(_LABEL_RE)
_SUBDOMAIN = re.compile(rf"{_LABEL_RE}(?:\.{_LABEL_RE})*")
_NOT_DNS = re.compile(r"[^a-z0-9.-]+")


def cut(value: str) -> str:
    """``value`` cut when long (a message stays one short line)."""
    return value if len(value) <= 40 else value[:40] + "..."


def shown(value: str) -> str:
    """A value as a message shows it: quoted, and cut when long."""
    return repr(cut(value))


def uid_problem(uid: str) -> str | None:
    if not uid.strip():
        return "pod uid is empty" if not uid else f"pod uid {shown(uid)} is blank"
    if not uid.isprintable():
        return f"pod uid {shown(uid)} has characters that are not printable"
    if len(uid.encode()) > UID_MAX_BYTES:
        return f"pod uid {shown(uid)} is {len(uid.encode())} bytes, over {UID_MAX_BYTES}"
    return None


def label_problem(value: str, what: str) -> str | None:
    """``value`` as a DNS-1123 label (a Kubernetes namespace)."""
    if len(value) > LABEL_MAX or not _LABEL.fullmatch(value):
        return (
            f"{what} {shown(value)} is not a DNS-1123 label (lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {LABEL_MAX} characters)"
        )
    return None


def subdomain_problem(value: str, what: str) -> str | None:
    """``value`` as a DNS-1123 subdomain (a Kubernetes pod or service-account name)."""
    if len(value) > SUBDOMAIN_MAX or not _SUBDOMAIN.fullmatch(value):
        return (
            f"{what} {shown(value)} is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', "
            f"each part starting and ending with a letter or digit, at most {SUBDOMAIN_MAX} characters)"
        )
    return None


def pod_problem(uid: str, name: str, namespace: str, service_account: str) -> str | None:
    """The first thing wrong with a pod's identity, or None."""
    return (
        uid_problem(uid)
        or subdomain_problem(
            name, f"pod {uid}: name" + (" (the uid, the name when none is given)" if name == uid else "")
        )
        or label_problem(namespace, f"pod {uid}: namespace")
        or subdomain_problem(service_account, f"pod {uid}: service account")
    )


def dns_name(text: str, limit: int) -> str:
    """A container's name (or compose project) as Kubernetes would have it: a DNS-1123
    name, lower-cased, every other character ('_' from podman-compose) a '-'."""
    name = _NOT_DNS.sub("-", text.lower())[:limit]
    name = ".".join(part.strip("-") for part in name.split(".") if part.strip("-"))
    return name or "container"
