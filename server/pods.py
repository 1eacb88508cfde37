"""What the node agent knows about pods: specs (from the API, a pods file or
the CNI plugin), the cache entry with its open netns fd, and pods files."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from zds import defaults
from zds.netns import NetnsHandle
from zds.protocol.messages import AddWorkload, WorkloadInfo, encode_request


class PodState(enum.Enum):
    PENDING = "pending"  # cached, not (yet) acked by a ztunnel
    ACKED = "acked"  # the last AddWorkload was acked cleanly
    FAILED = "failed"  # the last AddWorkload was nacked (see last_error)


class PodSpecError(ValueError):
    """A pod description that cannot be enrolled (empty uid, too large, bad entry)."""


@dataclass(frozen=True)
class PodSpec:
    """A pod to enroll: who it is and where its netns is (a path or ``pid:N``)."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: str

    @property
    def info(self) -> WorkloadInfo:
        return WorkloadInfo(name=self.name, namespace=self.namespace, service_account=self.service_account)

    def validate(self) -> None:
        """Refuse what ztunnel would refuse: an empty uid, or an AddWorkload over its 1024-byte buffer."""
        if not self.uid:
            raise PodSpecError("pod uid is empty")
        if not self.netns:
            raise PodSpecError(f"pod {self.uid}: no netns given (a path or pid:N)")
        size = len(encode_request(AddWorkload(uid=self.uid, info=self.info)))
        if size > defaults.MAX_MESSAGE_SIZE:
            # Istio's agent sends it anyway and ztunnel rejects it as truncated; refuse it here instead.
            raise PodSpecError(
                f"pod {self.uid}: its AddWorkload would be {size} bytes, over ztunnel's "
                f"{defaults.MAX_MESSAGE_SIZE}-byte receive buffer; shorten its uid, name, namespace "
                "or service account"
            )


@dataclass
class Pod:
    """A cache entry: the spec, the open netns (None when it could not be opened) and delivery state."""

    spec: PodSpec
    netns: NetnsHandle | None
    state: PodState = PodState.PENDING
    last_error: str = ""
    enrolled_at: float = field(default_factory=time.time)
    rules_installed: bool = False

    @property
    def uid(self) -> str:
        return self.spec.uid

    def close(self) -> None:
        """Close the netns fd now (not whenever a garbage collector gets to it)."""
        if self.netns is not None:
            self.netns.close()


_FIELDS = ("uid", "name", "namespace", "service_account", "netns")


def spec_from_mapping(entry: Any, where: str) -> PodSpec:
    """A PodSpec from one pods-file entry (``serviceAccount`` is accepted for ``service_account``)."""
    if not isinstance(entry, dict):
        raise PodSpecError(
            f"{where}: expected an object with {', '.join(_FIELDS)}, got {type(entry).__name__}"
        )
    entry = dict(entry)
    if "serviceAccount" in entry and "service_account" not in entry:
        entry["service_account"] = entry.pop("serviceAccount")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise PodSpecError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(_FIELDS)}")
    missing = [f for f in ("uid", "netns") if not entry.get(f)]
    if missing:
        raise PodSpecError(f"{where}: missing {', '.join(missing)}")
    values = {f: str(entry.get(f, "") if entry.get(f) is not None else "") for f in _FIELDS}
    if not values["service_account"]:
        values["service_account"] = "default"
    return PodSpec(**values)


def load_pods_file(path: str) -> list[PodSpec]:
    """Read a pods file: JSON lines, a JSON array, or YAML (a list, or ``pods:`` holding one)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise PodSpecError(f"cannot read pods file {path}: {exc.strerror}") from exc
    entries: list[tuple[Any, str]] = []
    stripped = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    json_lines = [(n, line) for n, line in stripped if line and not line.startswith("#")]
    if json_lines and all(line.startswith("{") for _, line in json_lines):
        for n, line in json_lines:
            try:
                entries.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise PodSpecError(f"{path}:{n}: not valid JSON: {exc.msg}") from exc
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PodSpecError(f"{path}: neither JSON lines nor valid YAML: {exc}") from exc
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
