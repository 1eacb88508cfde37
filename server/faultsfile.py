"""Faults files (``zds server --faults FILE``): faults armed at start-up, before any ztunnel
connects. YAML (a list, or ``faults:`` holding one) or JSON lines, one fault per entry:
``{kind, count, delay, uid, after_snapshot, skip_connections}``. A connection fault is
armed for the first connection accepted (or, with ``skip_connections: N``, the N+1th); a
delivery fault for the node agent."""

from __future__ import annotations

from typing import Any

from zds import defaults
from zds.entryfile import EntryFileError, read_entries, real_number, whole_number
from zds.server.faultkinds import Category, FaultError, FaultKind, Refusal
from zds.server.faults import FaultSpec, spec_problem

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
        if not whole_number(value):
            raise FaultError(
                Refusal.INVALID, f"{where}: {name} must be a whole number from 0 to {defaults.INT32_MAX}"
            )
    if not real_number(delay):
        raise FaultError(Refusal.INVALID, f"{where}: delay must be a number of seconds")
    if not isinstance(after, bool):
        raise FaultError(Refusal.INVALID, f"{where}: after_snapshot must be true or false")
    uid = entry.get("uid", "")
    if not isinstance(uid, str):
        raise FaultError(Refusal.INVALID, f"{where}: uid must be a string")
    spec = FaultSpec(
        kind=kind,
        count=count,
        delay=float(delay),
        uid=uid,
        after_snapshot=after,
        next_connection=kind.category is not Category.DELIVERY,
        skip_connections=skips,
    )
    if (problem := spec_problem(spec, str)) is not None:  # (before anything starts: the same checks)
        raise FaultError(Refusal.INVALID, f"{where}: {problem}")
    return spec


def load_faults_file(path: str) -> list[FaultSpec]:
    """Read a faults file; FaultError names the file (and line or entry) of the first problem."""
    try:
        entries = read_entries(path, key="faults", what="fault", max_entries=defaults.FAULTS_ARMED_MAX)
    except EntryFileError as exc:
        raise FaultError(Refusal.INVALID, str(exc)) from exc
    return [spec_from_entry(entry, where) for entry, where in entries]
