"""``frozen``: an immutable record as a NamedTuple that behaves as a frozen dataclass would.

``zds ztunnel``'s modules made 26 dataclasses before its hello: a frozen ``@dataclass`` costs
~0.4 ms a class at import here (it compiles six methods, one ``exec`` each), a NamedTuple
~0.06 ms; with ``dataclasses`` itself that was 11-13 ms of its start
(bench/results/hello.md). A bare tuple differs from a dataclass where it matters, so ``frozen``
takes that back: a record equals only a record of its own type (``KeepWorkload("u")`` is not
``DelWorkload("u")``, ``Ack("")`` is not ``KeepWorkload("")``), and it is always true (a
record with no field, ``SnapshotSent()``, as well). Its hash is its fields' (as a frozen
dataclass's), and records are not ordered. A plain NamedTuple (not ``frozen``) still
compares as a tuple: ``P(1, 2) == NetnsIdentity(1, 2)`` where ``P`` is one (this way round
only). Mutable state is a plain class with ``__slots__``, not a record.
"""

from __future__ import annotations

from typing import Any, TypeVar

_T = TypeVar("_T", bound=type)


def _eq(self: tuple[Any, ...], other: object) -> Any:
    if not isinstance(other, tuple):
        return NotImplemented  # (the other operand may know: mock.ANY, as with a dataclass)
    return type(other) is type(self) and tuple.__eq__(self, other)


def _ne(self: tuple[Any, ...], other: object) -> Any:
    equal = _eq(self, other)
    return equal if equal is NotImplemented else not equal


def _unordered(self: tuple[Any, ...], other: object) -> Any:
    return NotImplemented  # (no order, as a dataclass's: sorting records is a TypeError)


def _true(self: object) -> bool:
    return True


def frozen(cls: _T) -> _T:
    """Decorate a NamedTuple class: equal only to its own type, unordered, always true, hashed
    by its fields."""
    methods: dict[str, object] = {"__eq__": _eq, "__ne__": _ne, "__hash__": tuple.__hash__}
    methods.update(dict.fromkeys(("__lt__", "__le__", "__gt__", "__ge__"), _unordered))
    if not getattr(cls, "_fields", ()):  # (a tuple with fields is true already, without a call)
        methods["__bool__"] = _true
    for name, method in methods.items():
        setattr(cls, name, method)
    return cls
