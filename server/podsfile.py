"""Pods files (``zds server --pods``, ``zds pod add --from-file``): JSON lines, a JSON
array, or YAML (a list, or ``pods:`` holding one), one pod per entry:
``{uid, name, namespace, service_account, netns, ips}`` with ``netns`` a path or ``pid:N``
and ``ips`` an optional list of addresses."""

from __future__ import annotations

import json
import sys
from typing import Any

from zds.entryfile import EntryFileError, read_bounded, yaml_list
from zds.netns import NetnsRef, NetnsRefError
from zds.server import names
from zds.server.pods import PodSource, PodSpec, PodSpecError, check_ips

FIELDS = ("uid", "name", "namespace", "service_account", "netns", "ips")
_KNOWN = frozenset(FIELDS)


def _spec(entry: Any) -> PodSpec:
    """A PodSpec from one entry (``serviceAccount`` is accepted for ``service_account``); the
    caller puts the place in front of the message. Written for files of thousands of pods (each
    is checked before any is sent): no copy of the entry, one lookup per field."""
    if not isinstance(entry, dict):
        raise PodSpecError(f"expected an object with {', '.join(FIELDS)}, got {type(entry).__name__}")
    if "serviceAccount" in entry and "service_account" not in entry:
        entry = dict(entry)
        entry["service_account"] = entry.pop("serviceAccount")
    if not entry.keys() <= _KNOWN:
        unknown = sorted(str(key) for key in entry.keys() - _KNOWN)
        raise PodSpecError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
    get = entry.get
    # (as text first: 0 is the uid "0" in JSON as in YAML)
    uid, netns_text = _text("uid", get("uid")), _text("netns", get("netns"))
    if not uid or not netns_text:
        missing = [field for field, value in (("uid", uid), ("netns", netns_text)) if not value]
        raise PodSpecError(f"missing {', '.join(missing)}")
    try:
        netns = NetnsRef.parse(netns_text)
    except NetnsRefError as exc:
        raise PodSpecError(str(exc)) from exc
    ips = get("ips") or []
    if not isinstance(ips, list):
        raise PodSpecError("ips must be a list of addresses")
    return PodSpec.create(
        uid,
        netns,
        name=_text("name", get("name")),
        namespace=_text("namespace", get("namespace")),
        service_account=_text("service_account", get("service_account")),
        ips=check_ips(ips),
        source=PodSource.PODS_FILE,
    )


def _text(field: str, value: Any) -> str:
    """A text field's value ('' for null); a number is taken as its digits (JSON's 12345; YAML's
    unquoted integers are read as the text they were written as), anything else refused: a
    list had become the path "['a']"."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if type(value) is int:
        return str(value)
    if isinstance(value, bool | float):  # YAML's yes/no/1.0 unquoted
        raise PodSpecError(f"{field} must be text, not {str(value).lower()} (quote it in YAML)")
    raise PodSpecError(f"{field} must be text, not a {type(value).__name__}")


#: The largest pods file read: a pod is a line of ~200 bytes, so some 80,000 pods (a node's
#: ztunnel runs out of fds near 2,800). ``/dev/zero`` was read until memory ran out.
MAX_BYTES = 16 * 1024 * 1024


def load_pods_file(path: str) -> list[PodSpec]:
    """Read a pods file (``-``: stdin); PodSpecError names the file (and line or entry) of the
    first problem. A FIFO is read from its writer, and refused at once without one."""
    try:
        data = sys.stdin.buffer.read(MAX_BYTES + 1) if path == "-" else read_bounded(path, MAX_BYTES)
    except OSError as exc:
        raise PodSpecError(f"cannot read pods file {path}: {exc.strerror}") from exc
    if len(data) > MAX_BYTES:
        raise PodSpecError(f"{path}: over {MAX_BYTES // 1024 // 1024} MiB; not a pods file")
    return parse_pods_bytes(data, path)


def parse_pods_bytes(data: bytes, path: str) -> list[PodSpec]:
    """The pods in a pods file's bytes (UTF-8), as ``parse_pods``."""
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise PodSpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_pods(text, path)


def parse_pods(text: str, path: str) -> list[PodSpec]:
    """The pods in a pods file's ``text`` (``path`` names it in messages)."""
    #: Each entry with its line (JSON lines) or its number (YAML), and how a message names it.
    entries: list[tuple[Any, int]] = []
    where, unit = f"{path}:{{}}", "line"
    stripped = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    json_lines = [(n, line) for n, line in stripped if line and not line.startswith("#")]
    if json_lines and all(line.startswith("{") for _, line in json_lines):
        decode = json.JSONDecoder().raw_decode  # json.loads less its checks for whitespace (stripped)
        for n, line in json_lines:
            try:
                entry, end = decode(line)
                if end != len(line):
                    raise json.JSONDecodeError("Extra data", line, end)  # as json.loads says it
            except json.JSONDecodeError as exc:
                raise PodSpecError(f"{path}:{n}: not valid JSON: {exc.msg}") from exc
            except ValueError as exc:  # an integer of more digits than Python converts
                raise PodSpecError(f"{path}:{n}: JSON that cannot be read: {exc}") from exc
            except RecursionError as exc:
                raise PodSpecError(f"{path}:{n}: JSON nested too deep") from exc
            entries.append((entry, n))
    else:
        try:
            doc = yaml_list(text, path, key="pods", what="pod", empty_ok=True, ints_as_written=True)
        except EntryFileError as exc:
            raise PodSpecError(str(exc)) from exc
        entries = [(entry, number) for number, entry in enumerate(doc, 1)]
        where, unit = f"{path}: entry {{}}", "entry"
    specs = []
    #: uid -> where it came first
    seen: dict[str, int] = {}
    for entry, number in entries:
        try:
            spec = _spec(entry)
        except PodSpecError as exc:
            raise PodSpecError(f"{where.format(number)}: {exc}") from exc
        if (first := seen.get(spec.uid)) is not None:
            raise PodSpecError(
                f"{where.format(number)}: uid {names.shown(spec.uid)} appears twice (first at {unit} {first})"
            )
        seen[spec.uid] = number
        specs.append(spec)
    return specs
