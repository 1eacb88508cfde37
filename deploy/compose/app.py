"""The applications of the compose scenario: a TCP echo server and clients.

Standard library only, and no privilege: the ``reviews`` and ``productpage``
containers run them as user ``nobody`` with every capability dropped, the way a
pod's application runs. Neither knows about ztunnel: the redirection is transparent.

    python3 app.py serve --port 9080 [--stop-on-eof]
    python3 app.py send --host 10.177.0.3 --port 9080 --size 65536
    python3 app.py call --host 10.178.0.10 --port 9080     # once a second, for ever
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import sys
import time


def capabilities() -> str:
    """This process's effective capabilities (hex), to show the app has none."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return line.split()[1]
    return "?"


async def serve(port: int, stop_on_eof: bool) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        total = 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                total += len(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError as exc:
            print(f"app: connection from {peer[0]} failed: {exc}", flush=True)
        finally:
            writer.close()
        print(f"app: echoed {total} bytes to {peer[0]} port {peer[1]}", flush=True)

    # One dual-stack socket: IPv4 peers arrive as ::ffff:a.b.c.d.
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    server = await asyncio.start_server(echo, sock=sock)
    print(
        f"app: echo server on port {port}, uid {os.getuid()}, gid {os.getgid()}, "
        f"effective capabilities {capabilities()}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if stop_on_eof:
        # Whoever started us holds our stdin: its closing (or its death) stops us. That
        # needs no privilege, where signalling a process of another user needs CAP_KILL.
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        eof = loop.create_task(reader.read())
        eof.add_done_callback(lambda _: stop.set())
    async with server:
        await stop.wait()
    print("app: stopped", flush=True)


def send(host: str, port: int, size: int, timeout: float) -> int:
    """Connect, send ``size`` random bytes, half-close, read the echo; print a JSON result."""
    payload = os.urandom(size)
    started = time.monotonic()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    received = bytearray()
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        local = sock.getsockname()[0]
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while data := sock.recv(65536):
            received += data
    result = {
        "host": host,
        "port": port,
        "from": local,
        "sent": len(payload),
        "received": len(received),
        "identical": hashlib.sha256(received).digest() == hashlib.sha256(payload).digest(),
        "seconds": round(time.monotonic() - started, 3),
        "uid": os.getuid(),
        "capabilities": capabilities(),
    }
    print(json.dumps(result), flush=True)
    return 0 if result["identical"] else 1


def call(host: str, port: int, size: int, timeout: float, interval: float) -> int:
    """``send`` for ever, one call every ``interval`` seconds (the first one at once)."""
    while True:
        try:
            send(host, port, size, timeout)
        except OSError as exc:
            print(json.dumps({"host": host, "port": port, "error": str(exc)}), flush=True)
        time.sleep(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description="the compose pods' applications (no privilege)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="TCP echo server (dual stack)")
    serve_cmd.add_argument("--port", type=int, required=True)
    serve_cmd.add_argument("--stop-on-eof", action="store_true", help="stop when stdin reaches EOF")
    send_cmd = sub.add_parser("send", help="send random bytes, expect them echoed back")
    send_cmd.add_argument("--host", required=True)
    send_cmd.add_argument("--port", type=int, required=True)
    send_cmd.add_argument("--size", type=int, default=65536)
    send_cmd.add_argument("--timeout", type=float, default=10.0)
    call_cmd = sub.add_parser("call", help="send once a second, for ever")
    call_cmd.add_argument("--host", required=True)
    call_cmd.add_argument("--port", type=int, required=True)
    call_cmd.add_argument("--size", type=int, default=4096)
    call_cmd.add_argument("--timeout", type=float, default=10.0)
    call_cmd.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    if args.command == "call":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        return call(args.host, args.port, args.size, args.timeout, args.interval)
    if args.command == "serve":
        asyncio.run(serve(args.port, args.stop_on_eof))
        return 0
    try:
        return send(args.host, args.port, args.size, args.timeout)
    except OSError as exc:
        print(json.dumps({"host": args.host, "port": args.port, "error": str(exc)}), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
