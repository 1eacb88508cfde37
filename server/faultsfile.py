"""Faults files (``zds server --faults FILE``): faults armed at start-up, before any ztunnel
connects. YAML (a list, or ``faults:`` holding one) or JSON lines, one fault per entry:
``{kind, count, delay, uid, after_snapshot, skip_connections}``. A connection fault is
armed for the first connection accepted (or, with ``skip_connections: N``, the N+1th); a
delivery fault for the node agent."""

from __future__ import annotations

import json
from typing import Any

from zds import defaults
from zds.server.faultkinds import Category, FaultError, FaultKind, Refusal
from zds.server.faults import FaultSpec

FIELDS = ("kind", "count", "delay", "uid", "after_snapshot", "skip_connections")


def spec_from_entry(entry: Any, where: str) -> FaultSpec:
    if not isinstance(entry, dict):
        raise FaultError(Refusal.INVALID, f"{where}: expected an object with {', '.join(FIELDS)}")
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        raise FaultError(
            Refusal.INVALID, f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}"
        )
    if not entry.get("kind"):
        raise FaultError(Refusal.INVALID, f"{where}: missing kind")
    try:
        kind = FaultKind.named(str(entry["kind"]))
    except FaultError as exc:
        raise FaultError(Refusal.INVALID, f"{where}: {exc}") from None
    # As written, or refused: "false" was true, 1.7 was 1, 1e400 a traceback.
    count, skips = entry.get("count", 1), entry.get("skip_connections", 0)
    delay, after = entry.get("delay", 0.0), entry.get("after_snapshot", False)
    for name, value in (("count", count), ("skip_connections", skips)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= defaults.INT32_MAX:
            raise FaultError(
                Refusal.INVALID, f"{where}: {name} must be a whole number from 0 to {defaults.INT32_MAX}"
            )
    if not isinstance(delay, int | float) or isinstance(delay, bool):
        raise FaultError(Refusal.INVALID, f"{where}: delay must be a number of seconds")
    if not isinstance(after, bool):
        raise FaultError(Refusal.INVALID, f"{where}: after_snapshot must be true or false")
    return FaultSpec(
        kind=kind,
        count=count,
        delay=float(delay),
        uid=str(entry.get("uid") or ""),
        after_snapshot=after,
        next_connection=kind.category is not Category.DELIVERY,
        skip_connections=skips,
    )


def load_faults_file(path: str) -> list[FaultSpec]:
    """Read a faults file; FaultError names the file (and line or entry) of the first problem."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise FaultError(Refusal.INVALID, f"cannot read faults file {path}: {exc.strerror}") from exc
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if lines and all(line.startswith("{") for _, line in lines):
        entries = []
        for n, line in lines:
            try:
                entries.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                raise FaultError(Refusal.INVALID, f"{path}:{n}: not valid JSON: {exc.msg}") from exc
            except (ValueError, RecursionError) as exc:  # too deep, an integer too long to convert
                raise FaultError(Refusal.INVALID, f"{path}:{n}: JSON that cannot be read: {exc}") from exc
    else:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise FaultError(Refusal.INVALID, f"{path}: neither JSON lines nor valid YAML: {exc}") from exc
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # as in pods files
            raise FaultError(Refusal.INVALID, f"{path}: YAML that cannot be read: {exc}") from exc
        if isinstance(doc, dict) and "faults" in doc:
            doc = doc["faults"]
        if not isinstance(doc, list):
            raise FaultError(Refusal.INVALID, f"{path}: expected a list of faults")
        entries = [(e, f"{path}: entry {i}") for i, e in enumerate(doc, 1)]
    return [spec_from_entry(e, where) for e, where in entries]
