"""Fuzz target: any bytes as a client of the control socket's bulk lane sends them (the
opening, then framed ``AddPodsRequest`` messages, or in the JSON form JSON arrays of pods),
read by the node agent's pieces.

The lane's reading (``Opening``, ``Deframer``) may only refuse with ValueError, and reads
the same messages however the bytes are cut into reads (up to a broken frame); a message is an AddPodsRequest or
a DecodeError (in the JSON form one, or a ValueError with a one-line reason: ``json_request``); each pod in it becomes a PodSpec or an INVALID_ARGUMENT with a one-line
reason (``pod_spec``, AddPod's own check too), and a PodSpec passes ``validate`` or is
refused with a one-line PodSpecError. Nothing is opened: a netns path is only read as text.
"""

from __future__ import annotations

import sys

import atheris
import grpc
from google.protobuf.message import DecodeError

from zds.gen import nodeagent_pb2

with atheris.instrument_imports():
    from zds.server.bulklane import json_request
    from zds.server.bulkwire import MAGIC, MAGIC_JSON, Deframer, Opening
    from zds.server.controlwire import pod_spec
    from zds.server.pods import PodSpec, PodSpecError


def read(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bool]:
    """The messages in ``stream`` read in pieces ending at ``cuts``, and whether it was refused."""
    opening, deframer = Opening(MAGIC, MAGIC_JSON), Deframer()
    messages: list[bytes] = []
    start = 0
    for end in [*sorted(cuts), len(stream)]:
        piece, start = stream[start:end], max(start, end)
        try:
            messages += deframer.feed(opening.feed(piece))
        except ValueError as exc:
            one_line(str(exc))
            return messages, True
    return messages, False


def one_line(reason: str) -> None:
    if not reason or "\n" in reason:
        raise AssertionError(f"not a one-line reason: {reason!r}")


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    opened = fdp.ConsumeIntInRange(0, 2)
    cuts = fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 64)
    stream = (b"", MAGIC, MAGIC_JSON)[opened] + fdp.ConsumeBytes(fdp.remaining_bytes())
    # Read a byte at a time, every whole message before a broken frame comes out; in larger
    # reads, those in the read that breaks are not taken (as a gRPC stream's messages after
    # the last one its handler read): the same messages, or fewer of them, in the same order.
    messages, refused = read(stream, list(range(len(stream))))
    for some in (read(stream, []), read(stream, cuts)):
        if some[1] != refused or (
            some[0] != messages if not refused else messages[: len(some[0])] != some[0]
        ):
            raise AssertionError(f"the lane reads {stream.hex()} otherwise when cut at {cuts}: {some}")
    for message in messages:
        try:
            if opened == 2:
                request = json_request(message)
            else:
                request = nodeagent_pb2.AddPodsRequest.FromString(message)
        except DecodeError:
            continue
        except ValueError as exc:  # (the JSON form's: one line)
            one_line(str(exc))
            continue
        for pod in request.pods:
            spec = pod_spec(pod)
            if not isinstance(spec, PodSpec):
                code, reason = spec
                if code is not grpc.StatusCode.INVALID_ARGUMENT:
                    raise AssertionError(f"pod_spec answered {code} for {pod!r}")
                one_line(reason)
                continue
            try:
                spec.validate()
            except PodSpecError as exc:
                one_line(str(exc))


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
