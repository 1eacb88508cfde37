"""Pods files (``zds server --pods``, ``zds pod add --from-file``): JSON lines, a JSON
array, or YAML (a list, or ``pods:`` holding one), one pod per entry:
``{uid, name, namespace, service_account, netns, ips}`` with ``netns`` a path or ``pid:N``
and ``ips`` an optional list of addresses."""

from __future__ import annotations

import json
from typing import Any

from zds.netns import NetnsRef, NetnsRefError
from zds.server.pods import PodSource, PodSpec, PodSpecError

FIELDS = ("uid", "name", "namespace", "service_account", "netns", "ips")
#: The fields that are plain strings.
TEXT_FIELDS = FIELDS[:5]
_KNOWN = frozenset(FIELDS)


def spec_from_mapping(entry: Any, where: str) -> PodSpec:
    """A PodSpec from one pods-file entry (``serviceAccount`` is accepted for ``service_account``)."""
    if not isinstance(entry, dict):
        raise PodSpecError(
            f"{where}: expected an object with {', '.join(FIELDS)}, got {type(entry).__name__}"
        )
    if "serviceAccount" in entry and "service_account" not in entry:
        entry = dict(entry)
        entry["service_account"] = entry.pop("serviceAccount")
    if not entry.keys() <= _KNOWN:  # (a file of thousands of pods is read before any is sent)
        unknown = sorted(str(key) for key in entry.keys() - _KNOWN)
        raise PodSpecError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
    missing = [f for f in ("uid", "netns") if not entry.get(f)]
    if missing:
        raise PodSpecError(f"{where}: missing {', '.join(missing)}")
    values = {f: "" if (value := entry.get(f)) is None else str(value) for f in TEXT_FIELDS}
    try:
        netns = NetnsRef.parse(values["netns"])
    except NetnsRefError as exc:
        raise PodSpecError(f"{where}: {exc}") from exc
    ips = entry.get("ips") or []
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise PodSpecError(f"{where}: ips must be a list of addresses")
    return PodSpec.create(
        values["uid"],
        netns,
        name=values["name"],
        namespace=values["namespace"],
        service_account=values["service_account"],
        ips=tuple(ips),
        source=PodSource.PODS_FILE,
    )


def load_pods_file(path: str) -> list[PodSpec]:
    """Read a pods file; PodSpecError names the file (and line or entry) of the first problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PodSpecError(f"cannot read pods file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise PodSpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return parse_pods(text, path)


def parse_pods(text: str, path: str) -> list[PodSpec]:
    """The pods in a pods file's ``text`` (``path`` names it in messages)."""
    entries: list[tuple[Any, str]] = []
    stripped = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    json_lines = [(n, line) for n, line in stripped if line and not line.startswith("#")]
    if json_lines and all(line.startswith("{") for _, line in json_lines):
        for n, line in json_lines:
            try:
                entries.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise PodSpecError(f"{path}:{n}: not valid JSON: {exc.msg}") from exc
            except RecursionError as exc:
                raise PodSpecError(f"{path}:{n}: JSON nested too deep") from exc
    else:
        import yaml  # only YAML files need it (~10 ms of imports)

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PodSpecError(f"{path}: neither JSON lines nor valid YAML: {exc}") from exc
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # PyYAML's resolvers raise these on some scalars ("_0b_": int("", 2)); found by fuzzing.
            raise PodSpecError(f"{path}: YAML that cannot be read: {type(exc).__name__}: {exc}") from exc
        if isinstance(doc, dict) and "pods" in doc:
            doc = doc["pods"]
        if doc is None:
            doc = []
        if not isinstance(doc, list):
            raise PodSpecError(f"{path}: expected a list of pods")
        entries = [(e, f"{path}: entry {i}") for i, e in enumerate(doc, 1)]
    specs = [spec_from_mapping(e, where) for e, where in entries]
    seen: set[str] = set()
    for spec in specs:
        if spec.uid in seen:
            raise PodSpecError(f"{path}: uid {spec.uid} appears twice")
        seen.add(spec.uid)
    return specs
