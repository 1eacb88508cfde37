"""Enrollment benchmark: how fast `zds server` + `zds ztunnel` enroll and remove pods.

Starts both ends as real processes (sockets in a temp dir, no rules unless --redirect),
creates N named namespaces (not timed), then times, over one gRPC channel:

- add: AddPod round trip (gRPC -> node agent opens the netns -> AddWorkload + fd over the
  ZDS socket -> ztunnel validates the fd [and opens 3+1 listeners inside the pod] -> ack);
- remove: RemovePod round trip (DelWorkload to every ztunnel -> ack [listeners closed]).

Prints one key=value line per mode, like ../shared/bench-limit's zds-limit, so the two
can be compared as a ratio. Run as root:

    .venv/bin/python bench/enroll.py -n 500 -m proto
    .venv/bin/python bench/enroll.py -n 500 -m listen
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc
from zds.netns.fixtures import create_netns, delete_netns


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=200, help="pods (default %(default)s)")
    parser.add_argument("-m", choices=["proto", "listen"], default="proto", help="ztunnel mode")
    parser.add_argument("--redirect", action="store_true", help="also install the in-pod rules")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/enroll.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="zds-bench-")
    zds_sock, ctl = os.path.join(tmp, "zds.sock"), os.path.join(tmp, "ctl.sock")
    names = [f"zdsbench-{os.getpid()}-{i}" for i in range(args.n)]
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    loop_flag = ["--no-uvloop"] if args.no_uvloop else []
    try:
        for name in names:
            create_netns(name)
            made.append(name)
        server_args = ["server", "--zds-socket", zds_sock, "--control-socket", ctl, "--cni-socket", "off"]
        server_args += ["--state-dir", os.path.join(tmp, "state")]
        server_args += ["--http-listen", "off", *([] if args.redirect else ["--no-redirect"]), *loop_flag]
        ztunnel_args = [
            "ztunnel",
            "--zds-socket",
            zds_sock,
            "--admin-listen",
            "off",
            "--readiness-listen",
            "off",
        ]
        ztunnel_args += [
            "--metrics-listen",
            "off",
            *(["--no-listeners"] if args.m == "proto" else []),
            *loop_flag,
        ]
        for cmd in (server_args, ztunnel_args):
            log = open(os.path.join(tmp, f"{cmd[0]}.log"), "wb")  # noqa: SIM115 (closed with the dir)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "zds", "--log-level", "warning", *cmd], stdout=log, stderr=log
                )
            )
            deadline = time.monotonic() + 20
            while not os.path.exists(zds_sock if cmd[0] == "server" else ctl) and time.monotonic() < deadline:
                time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{ctl}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
            # Wait for the ztunnel connection: an add that succeeds.
            deadline = time.monotonic() + 20
            while True:
                try:
                    stub.AddPod(
                        nodeagent_pb2.AddPodRequest(uid="warmup", netns_path=f"/var/run/netns/{names[0]}"),
                        timeout=10,
                    )
                    stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="warmup"), timeout=10)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            results = {}
            for phase in ("add", "remove"):
                lat: list[float] = []
                start = time.perf_counter()
                for i, name in enumerate(names):
                    t0 = time.perf_counter()
                    if phase == "add":
                        stub.AddPod(
                            nodeagent_pb2.AddPodRequest(
                                uid=f"u{i}", name=name, namespace="bench", netns_path=f"/var/run/netns/{name}"
                            ),
                            timeout=30,
                        )
                    else:
                        stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid=f"u{i}"), timeout=30)
                    lat.append((time.perf_counter() - t0) * 1e6)
                wall = time.perf_counter() - start
                results[phase] = (lat, wall)
        for phase, (lat, wall) in results.items():
            print(
                f"zds phase={phase} mode={args.m} redirect={int(args.redirect)} uvloop={int(not args.no_uvloop)} "
                f"n={args.n} rate={args.n / wall:.0f} wall_s={wall:.3f} p50_us={percentile(lat, 50):.0f} "
                f"p99_us={percentile(lat, 99):.0f} max_us={max(lat):.0f} mean_us={statistics.fmean(lat):.0f}"
            )
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for name in made:
            delete_netns(name, missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
