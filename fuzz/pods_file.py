"""Fuzz target: any bytes as a pods file (decoded as the node agent decodes one: the input's
bytes are the file's, so seeds are plain pods files); only PodSpecError may come out."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from zds.server.pods import PodSpecError
    from zds.server.podsfile import parse_pods_bytes


def one_input(data: bytes) -> None:
    try:
        specs = parse_pods_bytes(data, "fuzz")
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
