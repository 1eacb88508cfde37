"""Fuzz target: any bytes as Istio's CNI plugin event body; only BadEvent may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from zds.server.cni import BadEvent, parse_add_event


def one_input(data: bytes) -> None:
    try:
        spec = parse_add_event(data)
    except BadEvent:
        return
    if not spec.uid or not spec.name or not spec.namespace:
        raise AssertionError(f"an accepted event without identity: {data!r}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
