"""The CNI specification, as far as ``zds-cni`` speaks it (spec 1.0.0, with 0.3.x/0.4.0
and 1.1.0 network configs): versions, error codes, the command's environment, the
network configuration, and the result a chained plugin prints.

Socket-free and side-effect-free; ``plugin.py`` does the I/O.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from zds.errors import ZdsError

#: Config versions zds-cni accepts (the spec's own list from 0.3.0 on). 0.1.0/0.2.0 results
#: have another shape (ip4/ip6) that zds-cni does not convert.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
#: The version VERSION answers with (the newest it speaks).
CURRENT_VERSION = SUPPORTED_VERSIONS[-1]
#: Commands, and the environment variables each one requires (spec: "Parameters").
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}
#: Commands a config older than their spec version may not ask for (libcni's skel refuses
#: them the same way: code 1, "config version does not allow CHECK").
SINCE: dict[str, str] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}
#: libcni's rule, matched whole (``fullmatch``: Python's ``$`` also matches before a last newline).
_CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")


def is_container_id(value: str) -> bool:
    """Whether ``value`` is a container id as libcni takes one (the node agent's CNI
    endpoint checks the plugin's ``ContainerID`` so too)."""
    return _CONTAINER_ID.fullmatch(value) is not None


class Code(enum.IntEnum):
    """The spec's well-known error codes; 100 and up are zds-cni's own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    #: The node agent refused or failed the pod's enrollment (its words are in msg).
    ENROLLMENT_FAILED = 100
    #: The node agent could not tell whether the container belongs in the mesh.
    SELECTION_FAILED = 101
    #: An unexpected failure inside the plugin (libcni's ErrInternal, as Istio's plugin uses it).
    INTERNAL = 999


class CniError(ZdsError):
    """A failure the plugin reports as the spec's error object."""

    def __init__(self, code: Code, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def document(self, cni_version: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            doc["details"] = self.details
        return doc


@dataclass(frozen=True)
class Invocation:
    """One run of the plugin: the command and its CNI_* environment."""

    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    path: str

    @classmethod
    def from_environment(cls, env: dict[str, str]) -> Invocation:
        command = env.get("CNI_COMMAND", "")
        if command not in REQUIRED_ENV:
            raise CniError(
                Code.INVALID_ENVIRONMENT,
                f"unknown CNI_COMMAND {command!r}",
                f"expected one of {', '.join(REQUIRED_ENV)}",
            )
        missing = [name for name in REQUIRED_ENV[command] if not env.get(name)]
        if missing:
            raise CniError(Code.INVALID_ENVIRONMENT, f"{command}: {', '.join(missing)} not set")
        container_id = env.get("CNI_CONTAINERID", "")
        if container_id and not is_container_id(container_id):
            raise CniError(
                Code.INVALID_ENVIRONMENT, f"CNI_CONTAINERID {container_id!r} is not a container id"
            )
        ifname = env.get("CNI_IFNAME", "")
        if ifname and (len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname)):
            raise CniError(Code.INVALID_ENVIRONMENT, f"CNI_IFNAME {ifname!r} is not an interface name")
        try:
            args = parse_args(env.get("CNI_ARGS", ""))
        except CniError:
            if command != "DEL":
                raise
            args = {}  # (libcni's skel reads no CNI_ARGS, and Istio's DEL nothing: a DEL must not fail)
        return cls(
            command=command,
            container_id=container_id,
            netns=env.get("CNI_NETNS", ""),
            ifname=ifname,
            args=args,
            path=env.get("CNI_PATH", ""),
        )


def parse_args(text: str) -> dict[str, str]:
    """CNI_ARGS: ``K=V;K=V`` (``IgnoreUnknown=1;K8S_POD_NAME=web``)."""
    args: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(Code.INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def parse_config(data: bytes, command: str) -> dict[str, Any]:
    """The network configuration from stdin, checked as the spec requires of every plugin."""
    try:
        doc = _loads(data) if data.strip() else {}
    except (ValueError, RecursionError) as exc:  # also too deep, or an integer too long to convert
        raise CniError(Code.DECODING_FAILURE, f"network configuration is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CniError(Code.DECODING_FAILURE, "network configuration must be a JSON object")
    if command == "VERSION":
        return doc
    version = doc.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(Code.INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"zds-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    since = SINCE.get(command)
    if since is not None and _version(version) < _version(since):
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"{command} needs cniVersion {since} or later; the config is {version}",
        )
    for key in ("name", "type"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise CniError(Code.INVALID_CONFIG, f"network configuration has no {key}")
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(Code.DECODING_FAILURE, "prevResult must be a JSON object")
    return doc


def _loads(data: bytes) -> Any:
    """JSON as the spec means it (RFC 8259, what Go's runtimes read): Python's ``NaN``,
    ``Infinity`` and numbers beyond a double (``1e999``) are refused (ValueError): taken, they
    came out in the result as ``Infinity``, which no runtime can read."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def json_object(data: bytes) -> dict[str, Any] | None:
    """``data`` as a JSON object (what libcni's skel reads a config's version from); None if
    it is not one. Never raises."""
    try:
        doc = _loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def config_version(data: bytes) -> str:
    """The cniVersion of the configuration on stdin, if it has one zds-cni speaks (an error
    carries it: the spec); else the newest. Reads what it can, never raises."""
    version = (json_object(data) or {}).get("cniVersion")
    return version if version in SUPPORTED_VERSIONS else CURRENT_VERSION


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def version_info() -> dict[str, Any]:
    """What VERSION prints."""
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def add_result(config: dict[str, Any]) -> dict[str, Any]:
    """What ADD prints: ``prevResult`` passed through unchanged (its ``cniVersion`` is the
    config's, as the runtime converted it), or, with none, an empty result of the config's version."""
    prev = config.get("prevResult")
    if prev is None:
        return {"cniVersion": config["cniVersion"], "dns": {}}
    result = dict(prev)
    result.setdefault("cniVersion", config["cniVersion"])
    return result


def plugin_event_ips(prev: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The pod's addresses from ``prevResult.ips``, in the shape Istio's plugin sends them
    (Go's ``IPConfig``: ``Interface`` *int, ``Address`` net.IPNet ``{IP, Mask}`` with the mask
    in base64, ``Gateway`` net.IP); None without a prevResult (Istio sends ``null``)."""
    if prev is None:
        return None
    ips = prev.get("ips") or []
    if not isinstance(ips, list):
        raise CniError(Code.DECODING_FAILURE, "prevResult.ips must be a list")
    converted = []
    for entry in ips:
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), str):
            raise CniError(Code.DECODING_FAILURE, f"prevResult.ips entry {entry!r} has no address")
        try:
            interface = ipaddress.ip_interface(entry["address"])
        except ValueError as exc:
            raise CniError(Code.DECODING_FAILURE, f"prevResult.ips: {exc}") from exc
        index = entry.get("interface")
        converted.append(
            {
                "Interface": index if isinstance(index, int) and not isinstance(index, bool) else None,
                "Address": {
                    "IP": str(interface.ip),
                    "Mask": base64.b64encode(interface.network.netmask.packed).decode(),
                },
                "Gateway": str(entry.get("gateway") or ""),
            }
        )
    return converted
