"""Soak: thousands of enroll/remove cycles through both ends with the redirection rules on,
and what the two processes hold before and after (open fds, RSS).

Starts `zds server` (rules on) and `zds ztunnel` (listeners on) as real processes, makes a
few pod namespaces, then cycles: AddPod (rules in, AddWorkload + fd, listeners opened in the
pod, ack) and RemovePod (rules out, DelWorkload, listeners closed, ack), pod after pod. The
counts are read after a warm-up and at the end, each once both ends are idle; any fd growth
is a leak, RSS growth a question. Not a timed test: tests/test_soak.py runs a short version
in CI and asserts only that no fd is left behind. Run as root:

    .venv/bin/python bench/soak.py --cycles 10000
    .venv/bin/python bench/soak.py --cycles 500 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc
from procs import run_main, stop_process

from zds.cliflags import non_negative_int, positive_int
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns.fixtures import create_netns, delete_netns


def counts(pid: int) -> dict[str, int]:
    """Open fds and resident memory (kB) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_kb": rss}


def settled(pid: int, timeout: float = 30.0) -> dict[str, int]:
    """The counts once they stop moving (connections and listeners closing take a moment)."""
    deadline = time.monotonic() + timeout
    last = counts(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)  # the soak's own pacing: it samples, it does not synchronise
        now = counts(pid)
        if now["fds"] == last["fds"]:
            return now
        last = now
    return last


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cycles", type=positive_int, default=10000, help="enroll/remove cycles (default %(default)s)"
    )
    parser.add_argument(
        "--pods", type=positive_int, default=4, help="pod namespaces cycled through (default %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=20,
        help="cycles before the first count (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/soak.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="zds-soak-")
    names = [f"zdssoak-{os.getpid()}-{i}" for i in range(args.pods)]
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    zds_sock, ctl = os.path.join(tmp, "zds.sock"), os.path.join(tmp, "ctl.sock")
    try:
        for name in names:
            made.append(create_netns(name))
        server = [
            "server", "--zds-socket", zds_sock, "--control-socket", ctl, "--cni-socket", "off",
            "--http-listen", "off", "--state-dir", os.path.join(tmp, "state"),
        ]  # fmt: skip
        ztunnel = ["ztunnel", "--zds-socket", zds_sock, "--admin-listen", "off", "--readiness-listen", "off",
                   "--metrics-listen", "off"]  # fmt: skip
        for argv in (server, ztunnel):
            with open(os.path.join(tmp, f"{argv[0]}.log"), "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "zds", "--log-level", "warning", *argv], stdout=log, stderr=log
                    )
                )
            deadline = time.monotonic() + 30
            while (
                not os.path.exists(ctl if argv[0] == "server" else zds_sock) and time.monotonic() < deadline
            ):
                time.sleep(0.05)  # waiting for the process to come up
        with grpc.insecure_channel(f"unix:{ctl}") as channel:
            stub: Any = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + 30
            while not stub.ListConnections(nodeagent_pb2.ListConnectionsRequest(), timeout=10).connections:
                if time.monotonic() > deadline:
                    raise RuntimeError("zds ztunnel did not connect")
                time.sleep(0.05)

            def cycle(i: int) -> None:
                uid = f"soak-{i}"
                path = made[i % len(made)]
                stub.AddPod(nodeagent_pb2.AddPodRequest(uid=uid, netns_path=path), timeout=30)
                stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=uid), timeout=30)

            for i in range(args.warmup):
                cycle(i)
            before = {"node_agent": settled(procs[0].pid), "ztunnel": settled(procs[1].pid)}
            started = time.monotonic()
            for i in range(args.cycles):
                cycle(args.warmup + i)
                if not args.json and (i + 1) % 1000 == 0:
                    print(f"{i + 1} cycles", file=sys.stderr, flush=True)
            elapsed = time.monotonic() - started
            after = {"node_agent": settled(procs[0].pid), "ztunnel": settled(procs[1].pid)}
        report = {"cycles": args.cycles, "seconds": round(elapsed, 1), "before": before, "after": after}
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{args.cycles} enroll/remove cycles with rules and listeners in {elapsed:.1f}s")
            for side in ("node_agent", "ztunnel"):
                b, a = before[side], after[side]
                print(f"{side:10} fds {b['fds']} -> {a['fds']}   RSS {b['rss_kb']} kB -> {a['rss_kb']} kB")
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        for name in names:
            delete_netns(name, missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main("bench/soak.py", main))
