"""Enrollment benchmark: how fast `zds server` + `zds ztunnel` enroll and remove pods,
with the in-pod rules (either backend) or without.

Starts both ends as real processes (sockets in a temp dir), creates N named namespaces
(not timed), then times, over one gRPC channel:

- add: every pod through the bulk path (one AddPods stream, as ``zds pod add
  --from-file``): node agent opens the netns -> installs the rules -> stores the pod ->
  AddWorkload + fd over the ZDS socket -> ztunnel validates the fd [and opens its
  listeners inside the pod] -> ack;
- remove: RemovePod for every pod, up to ``--window`` calls at a time, as a node's pods
  are deleted (rules out, DelWorkload to every ztunnel, ack).

Prints one key=value line per phase, like ../shared/bench-limit's zds-limit. Run as root:

    .venv/bin/python bench/enroll.py -n 1000 -m listen --rules nftables
    .venv/bin/python bench/enroll.py -n 300 -m listen --rules iptables
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import podns
from procs import measuring_env, run_main, stop_process

from zds.cliflags import positive_int
from zds.gen import nodeagent_pb2, nodeagent_pb2_grpc


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=positive_int, default=300, help="pods (default %(default)s)")
    parser.add_argument(
        "-m", choices=["proto", "listen"], default="listen", help="ztunnel mode (default %(default)s)"
    )
    parser.add_argument(
        "--rules", choices=["off", "iptables", "nftables"], default="nftables", help="(default %(default)s)"
    )
    parser.add_argument(
        "--window", type=positive_int, default=64, help="removals at a time (default %(default)s)"
    )
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--no-ipv6",
        action="store_true",
        help="IPv4 rules only (zds server --no-ipv6; default: both, as Istio)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/enroll.py: run as root (it creates network namespaces)", file=sys.stderr)
        return 1

    env = measuring_env()
    tmp = tempfile.mkdtemp(prefix="zds-bench-")
    zds_sock, ctl = os.path.join(tmp, "zds.sock"), os.path.join(tmp, "ctl.sock")
    procs: list[subprocess.Popen[bytes]] = []
    paths: list[str] = []
    loop_flag = ["--no-uvloop"] if args.no_uvloop else []
    rules = ["--no-redirect"] if args.rules == "off" else ["--redirect-backend", args.rules]
    rules += ["--no-ipv6"] if args.no_ipv6 else []
    try:
        paths = podns.create([f"zdsbench-{os.getpid()}-{i}" for i in range(args.n)])
        server_args = ["server", "--zds-socket", zds_sock, "--control-socket", ctl, "--cni-socket", "off"]
        server_args += ["--state-dir", os.path.join(tmp, "state"), "--http-listen", "off", *rules, *loop_flag]
        ztunnel_args = ["ztunnel", "--zds-socket", zds_sock]
        for flag in ("--admin-listen", "--readiness-listen", "--metrics-listen"):
            ztunnel_args += [flag, "off"]
        ztunnel_args += [*(["--no-listeners"] if args.m == "proto" else []), *loop_flag]
        for cmd in (server_args, ztunnel_args):
            log = open(os.path.join(tmp, f"{cmd[0]}.log"), "wb")  # noqa: SIM115 (closed with the dir)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "zds", "--log-level", "warning", *cmd],
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            )
            deadline = time.monotonic() + 20
            while not os.path.exists(zds_sock if cmd[0] == "server" else ctl) and time.monotonic() < deadline:
                time.sleep(0.05)
        with grpc.insecure_channel(f"unix:{ctl}") as channel:
            stub = nodeagent_pb2_grpc.NodeAgentStub(channel)  # type: ignore[no-untyped-call]
            warm_up(stub, paths[0])
            requests = [
                nodeagent_pb2.AddPodRequest(uid=f"u{i}", name=f"pod-{i}", namespace="bench", netns_path=path)
                for i, path in enumerate(paths)
            ]
            start = time.perf_counter()
            batches = (
                nodeagent_pb2.AddPodsRequest(pods=requests[i : i + 64]) for i in range(0, len(requests), 64)
            )
            results = [r for reply in stub.AddPods(batches, timeout=600) for r in reply.results]
            add_wall = time.perf_counter() - start
            failed = [r.message for r in results if r.code != 0]
            if failed or len(results) != args.n:
                raise SystemExit(f"bench/enroll.py: {len(failed)} enrollments failed, e.g. {failed[:1]}")
            lat, remove_wall = remove_all(stub, args.n, args.window)
        print(
            f"zds phase=add mode={args.m} rules={args.rules} uvloop={int(not args.no_uvloop)} n={args.n} "
            f"rate={args.n / add_wall:.0f} wall_s={add_wall:.3f} (bulk path: one AddPods stream)"
        )
        print(
            f"zds phase=remove mode={args.m} rules={args.rules} uvloop={int(not args.no_uvloop)} n={args.n} "
            f"window={args.window} rate={args.n / remove_wall:.0f} wall_s={remove_wall:.3f} "
            f"p50_us={percentile(lat, 50):.0f} p99_us={percentile(lat, 99):.0f} max_us={max(lat):.0f}"
        )
        return 0
    finally:
        for proc in reversed(procs):
            stop_process(proc, 30)
        podns.remove(paths)
        if not os.environ.get("ZDS_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench/enroll.py: kept {tmp}", file=sys.stderr)


def warm_up(stub: nodeagent_pb2_grpc.NodeAgentStub, path: str) -> None:
    """Until ztunnel is connected: an add that succeeds (then removed again)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            stub.AddPod(nodeagent_pb2.AddPodRequest(uid="warmup", netns_path=path), timeout=10)
            stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="warmup"), timeout=10)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def remove_all(stub: nodeagent_pb2_grpc.NodeAgentStub, n: int, window: int) -> tuple[list[float], float]:
    """RemovePod for u0..u(n-1), ``window`` calls in flight; (latencies in us, wall time)."""
    lat: list[float] = []
    errors: list[BaseException] = []
    slots = threading.Semaphore(window)

    def finished(future: grpc.Future, t0: float) -> None:
        lat.append((time.perf_counter() - t0) * 1e6)
        if future.exception() is not None:
            errors.append(future.exception())
        slots.release()

    start = time.perf_counter()
    for i in range(n):
        slots.acquire()
        t0 = time.perf_counter()
        future = stub.RemovePod.future(nodeagent_pb2.RemovePodRequest(uid=f"u{i}"), timeout=60)
        future.add_done_callback(lambda f, t0=t0: finished(f, t0))
    for _ in range(window):
        slots.acquire()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"bench/enroll.py: {len(errors)} removals failed, e.g. {errors[0]}")
    return lat, wall


if __name__ == "__main__":
    sys.exit(run_main("bench/enroll.py", main))
