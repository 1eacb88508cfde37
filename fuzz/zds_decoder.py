"""Fuzz target: any bytes as a ZDS record, to the codec and to both protocol roles.

The codec may only raise CodecError; the ztunnel role answers every record (a nack is an
answer) and the node-agent role closes on what it cannot read: neither may raise.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from zds.errors import CodecError
    from zds.protocol.messages import SnapshotSent, decode_ack, decode_hello, decode_request
    from zds.protocol.nodeagent import NodeAgentProtocol
    from zds.protocol.reading import PROCESS_FAILURE, READ_FAILURE, START_FAILURE
    from zds.protocol.records import Record
    from zds.protocol.workloads import SendReply, StartProxy
    from zds.protocol.ztunnel import ZtunnelProtocol

FLAGS = (0, socket.MSG_TRUNC, socket.MSG_CTRUNC)


def identify(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    flags = FLAGS[fdp.ConsumeIntInRange(0, len(FLAGS) - 1)]
    with_fd = fdp.ConsumeBool()
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    for decode in (decode_request, decode_ack, decode_hello):
        with contextlib.suppress(CodecError):
            decode(payload)
    # ztunnel's side: one reply for anything but EOF; every fd closed or kept.
    ztunnel = ZtunnelProtocol(identify=identify)
    ztunnel.connection_made()
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)] if with_fd else []
    events = ztunnel.receive(Record(payload, fds, flags))
    for event in list(events):
        if isinstance(event, StartProxy):  # the caller's turn: report the start (here: failed)
            events += ztunnel.proxy_failed(event.workload.uid, "fuzz")
    replies = [e for e in events if isinstance(e, SendReply)]
    if payload and len(replies) != 1:
        raise AssertionError(f"{len(replies)} replies to {payload.hex()}")
    for reply in replies:
        if reply.ack.error and not reply.ack.error.startswith((READ_FAILURE, PROCESS_FAILURE, START_FAILURE)):
            raise AssertionError(f"a nack ztunnel never sends: {reply.ack.error!r}")
    ztunnel.drain()
    # The node agent's side: a hello, then the same bytes as an ack.
    agent = NodeAgentProtocol(now=0.0)
    agent.receive(Record(payload, [], flags), 0.0)
    agent2 = NodeAgentProtocol(now=0.0)
    agent2.receive(Record(bytes.fromhex("0801")), 0.0)
    agent2.send(SnapshotSent(), 0.0)
    agent2.receive(Record(payload, [], flags), 0.0)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
