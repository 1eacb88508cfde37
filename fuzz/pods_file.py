"""Fuzz target: any text as a pods file; only PodSpecError may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from zds.server.pods import PodSpecError
    from zds.server.podsfile import parse_pods


def one_input(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        specs = parse_pods(text, "fuzz")
    except PodSpecError:
        return
    uids = [spec.uid for spec in specs]
    if len(set(uids)) != len(uids):
        raise AssertionError("a pods file with a uid twice was accepted")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
