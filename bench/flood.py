"""Flood: how long a real ztunnel waits for its snapshot while hundreds of connections that
never say hello are open on the node agent's ZDS socket (issue 11: within 1 s with 500).

Starts `zds server` as a real process (sockets in a temp dir, rules off, no pods), opens
``--idle`` SOCK_SEQPACKET connections that stay silent, then connects one more that sends
ztunnel's hello (the bytes zds ztunnel and ztunnel send) and times hello -> its first record
(SnapshotSent: there are no pods). Repeats ``--runs`` times, each with a fresh server and a
fresh flood, and prints each run and the median. Not a timed test: tests/test_server.py
checks that the ztunnel is served and the flood bounded, without a clock. Run as root or
not:

    .venv/bin/python bench/flood.py --idle 500 --runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from procs import run_main, stop_process

from zds.cliflags import non_negative_int, positive_int
from zds.protocol.messages import encode_hello


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"zds server did not create {path}")
        time.sleep(0.02)  # waiting for the process to come up


def one_run(idle: int) -> float:
    """Seconds from the real ztunnel's hello to its first record, with ``idle`` silent connections open."""
    tmp = tempfile.mkdtemp(prefix="zds-flood-")
    path = os.path.join(tmp, "zds.sock")
    argv = [
        sys.executable, "-m", "zds", "--log-level", "warning", "server", "--zds-socket", path,
        "--control-socket", os.path.join(tmp, "ctl.sock"), "--cni-socket", "off", "--http-listen", "off",
        "--state-dir", os.path.join(tmp, "state"), "--no-redirect", "--hello-timeout", "60",
    ]  # fmt: skip
    opened: list[socket.socket] = []
    with open(os.path.join(tmp, "server.log"), "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        wait_for_socket(path, proc)
        for _ in range(idle):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            opened.append(sock)
            sock.connect(path)
        real = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        opened.append(real)
        real.connect(path)
        real.settimeout(30)
        start = time.perf_counter()
        real.send(encode_hello())
        record = real.recv(1024)
        elapsed = time.perf_counter() - start
        if record != bytes.fromhex("1a00"):
            raise RuntimeError(f"expected SnapshotSent (1a00), got {record.hex() or 'EOF'}")
        return elapsed
    finally:
        for sock in opened:
            sock.close()
        stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--idle", type=non_negative_int, default=500, help="silent connections (default %(default)s)"
    )
    parser.add_argument("--runs", type=positive_int, default=5, help="runs (default %(default)s)")
    args = parser.parse_args()
    times = []
    for run in range(args.runs):
        elapsed = one_run(args.idle)
        times.append(elapsed)
        print(
            f"run {run + 1}: hello -> snapshot {elapsed * 1e3:.1f} ms with {args.idle} silent connections open"
        )
    print(f"median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main("bench/flood.py", main))
