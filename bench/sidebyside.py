"""Side by side: zds against Istio's own ZDS code, on the same pods, in one run.

For each pod count N the bench makes N network namespaces once (not timed) and then, run
after run, times every pair on them (see ``pairs.py`` for what is timed):

    snapshot  N pods preloaded; from starting the ztunnel side to its acked SnapshotSent
    live      from handing the node agent N enrollments through its bulk path (zds: one
              ``zds pod add --from-file``, start-up included) to the N-th acked enrollment

with listeners on and off, plus the C floor of ../shared/bench-limit (``zds-limit``: one
ZDS exchange per pod, nothing else). Each result is the median of the runs; the ratio is
to Istio's pair (Istio's node agent + Istio's fake ztunnel) in the same run. Results go to
``OUT/NAME.json`` and ``OUT/NAME.md`` (with the machine, the load and the exact command),
plots to ``OUT/NAME-*.png``; OUT is /tmp/zds-sidebyside unless ``--out`` says otherwise
(``bench/results``: the recorded ones). The upstream peers are used when they are built (``--peers``,
default ``../peers`` beside the repository, as ../shared/peers/README.md builds them);
without them their pairs are skipped, and the results say so. Run as root:

    flock /tmp/zds-suite.lock .venv/bin/python bench/sidebyside.py --out bench/results   # everything, recorded
    .venv/bin/python bench/sidebyside.py --smoke --out /tmp/smoke             # N=20, zds only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import firstrequest
import podns
import report
from pairs import PAIRS, Measurement, Pair, Pods, Tools, scratch
from procs import (
    BenchError,
    BusyBeside,
    compile_bytecode,
    loadavg,
    measuring_env,
    peers_dir,
    run_main,
    stop_process,
    wait_idle,
)

from zds.cliflags import positive_int

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PEERS = peers_dir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="pod counts (default: 200,1000,2500; --smoke: 20)")
    p.add_argument("--runs", type=positive_int, help="runs of each configuration (default: 5; --smoke: 1)")
    p.add_argument("--modes", default="snapshot,live", help="(default: %(default)s)")
    p.add_argument("--listeners", default="on,off", help="listeners on, off or both (default: %(default)s)")
    p.add_argument("--pairs", help=f"(default: {','.join(PAIRS)}; --smoke: zds,zds-asyncio,zds-dns)")
    p.add_argument("--no-floor", action="store_true", help="do not run the C floor (zds-limit)")
    p.add_argument("--peers", default=DEFAULT_PEERS, help="where the peers are built (default: %(default)s)")
    p.add_argument(
        "--out",
        default=os.path.join(tempfile.gettempdir(), "zds-sidebyside"),
        help="where the results go (default: %(default)s; the recorded ones: --out bench/results)",
    )
    p.add_argument(
        "--name", default="sidebyside", help="file name stem of the results (default: %(default)s)"
    )
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (no matplotlib needed)")
    p.add_argument("--smoke", action="store_true", help="N=20, one run, zds pairs only, no floor (CI)")
    p.add_argument(
        "--busy-beside",
        type=percent,
        default=0,
        metavar="PERCENT",
        help="other work beside the bench: a process keeping one CPU busy PERCENT%% of the time "
        "throughout (default: 0, none; every run still waits for the rest of the machine to be idle)",
    )
    args = p.parse_args(argv)
    smoke = {"sizes": "20", "runs": 1, "pairs": "zds,zds-asyncio,zds-dns"}
    full = {"sizes": "200,1000,2500", "runs": 5, "pairs": ",".join(PAIRS)}
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.no_floor = True
    unknown = [name for name in args.pairs.split(",") if name not in PAIRS]
    if unknown:
        p.error(f"unknown pair(s) {', '.join(unknown)}; expected some of {', '.join(PAIRS)}")
    for flag, given, allowed in (
        ("--modes", args.modes, ("snapshot", "live")),
        ("--listeners", args.listeners, ("on", "off")),
    ):
        if not set(given.split(",")) <= set(allowed):  # ("bogus" was timed as live, a typo as off)
            p.error(f"{flag} {given}: expected some of {','.join(allowed)}")
    sizes = args.sizes.split(",")
    if not all(size.isascii() and size.isdigit() and int(size) > 0 for size in sizes):
        p.error(f"--sizes {args.sizes}: expected pod counts from 1, comma-separated")
    return args


def percent(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0 to 100")
    return int(text)


def find_tools(peers: str) -> tuple[Tools, str | None]:
    """The programs (a peer that is not built: None) and the C floor (or None)."""
    env = measuring_env()
    found = {
        "istio_server": os.path.join(peers, "istio-go", "bin", "istio-zds-server"),
        "istio_client": os.path.join(peers, "istio-go", "bin", "istio-zds-client"),
        "ztunnel_peer": os.path.join(peers, "ztunnel-rs", "target", "release", "ztunnel-zds-peer"),
        "zds_limit": os.path.join(peers, "zds-limit"),
    }
    have = {key: path if _exe(path) else None for key, path in found.items()}
    tools = Tools(
        python=sys.executable,
        env=env,
        istio_server=have["istio_server"],
        istio_client=have["istio_client"],
        ztunnel_peer=have["ztunnel_peer"],
    )
    return tools, have["zds_limit"]


def _exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def machine(peers: str) -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in read("/proc/cpuinfo").splitlines()
            if "model name" in line
        ),
        "",
    )
    mem = next(
        (line.split()[1] for line in read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), "0"
    )
    os_name = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in read("/etc/os-release").splitlines()
            if line.startswith("PRETTY_NAME")
        ),
        "",
    )
    rev = subprocess.run(
        ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout
    dirty = subprocess.run(
        ["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True
    ).stdout
    import uvloop

    return {
        "os": os_name,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": int(mem) // 1024,
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "zds_commit": rev.strip() + ("+dirty" if dirty.strip() else ""),
        "istio_commit": read(os.path.join(peers, "istio-go", "ISTIO_COMMIT")).strip() or None,
        "ztunnel_commit": read(os.path.join(peers, "ztunnel-rs", "upstream", "ZTUNNEL_COMMIT")).strip()
        or None,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def floor(zds_limit: str, n: int, runs: int, mode: str, env: dict[str, str]) -> list[float]:
    """Wall times (ms) of ``runs`` runs of the C floor: n adds over n netns. Stopped (an
    interrupt), it is asked with SIGTERM, which it takes to remove its namespaces (a SIGKILL
    left them); what it left anyway is removed here."""
    prefix = f"zlim{os.getpid()}-"
    argv = [zds_limit, "-m", mode, "-n", str(n), "-N", str(n), "-r", str(runs), "-p", prefix]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=600)
    except BaseException:
        stop_process(proc, 30)
        raise
    finally:
        left = [name for name in os.listdir(podns.NETNS_DIR) if name.startswith(prefix)]
        podns.remove([os.path.join(podns.NETNS_DIR, name) for name in left])
    if proc.returncode != 0:
        raise BenchError(f"zds-limit failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    walls = []
    for line in out.decode(errors="replace").splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if line.startswith("mode=") and "wall_s" in fields:
            walls.append(float(fields["wall_s"]) * 1e3)
    return walls


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/sidebyside.py: run as root (it makes network namespaces)", file=sys.stderr)
        return 1
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the same limit for every process
    sizes = [int(x) for x in args.sizes.split(",")]
    modes = args.modes.split(",")
    listener_modes = [x == "on" for x in args.listeners.split(",")]
    tools, zds_limit = find_tools(args.peers)
    skipped: list[str] = []
    pairs: list[Pair] = []
    for name in args.pairs.split(","):
        pair = PAIRS[name]
        needs = pair.needs(tools)
        if needs:
            skipped.append(f"{pair.label}: skipped, {', '.join(needs)} not built under {args.peers}")
        else:
            pairs.append(pair)
    if not args.no_floor and zds_limit is None:
        skipped.append(f"C floor: skipped, zds-limit not built under {args.peers}")
    for line in skipped:
        print(f"bench: {line}", file=sys.stderr)
    compile_bytecode(REPO, tools.env)
    doc: dict[str, Any] = {
        "command": shlex.join(
            [os.path.relpath(sys.executable, REPO), "bench/sidebyside.py", *(argv or sys.argv[1:])]
        ),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(args.peers),
        "load_start": loadavg(),
        "config": {
            "sizes": sizes,
            "runs": args.runs,
            "modes": modes,
            "listeners": args.listeners.split(","),
            "busy_beside_pct": args.busy_beside,
        },
        "pairs": {pair.name: pair.label for pair in pairs},
        "skipped": skipped,
        "results": [],
        "first_request": [],
    }
    #: zds pod add's own start-up, against a stand-in control server (firstrequest.py).
    time_first_request = "live" in modes and any(pair.server.name == "zds" for pair in pairs)
    #: Other work beside the bench (--busy-beside); each run waits for the rest to be idle.
    beside = BusyBeside(args.busy_beside)
    idle = beside.idle()
    with beside:
        for n in sizes:
            names = [f"zb{os.getpid()}-{i}" for i in range(n)]
            pods = Pods(podns.create(names))
            try:
                if n == sizes[0]:
                    for pair in pairs:  # untimed: every program's files in the page cache first
                        for mode in modes:
                            measure(pair, mode, tools, pods, listener_modes[0], run=0, idle=idle)
                for run in range(1, args.runs + 1):
                    for mode in modes:
                        for listeners in listener_modes:
                            for pair in pairs:
                                doc["results"].append(measure(pair, mode, tools, pods, listeners, run, idle))
                    if time_first_request:
                        doc["first_request"].append(measure_first_request(tools, pods, run))
            finally:
                podns.remove(pods.paths)
            if not args.no_floor and zds_limit is not None:
                for mode in ("proto", "listen"):
                    load = loadavg()[0]
                    for run, wall in enumerate(floor(zds_limit, n, args.runs, mode, tools.env), start=1):
                        doc["results"].append(
                            {
                                "pair": f"floor-{mode}",
                                "mode": "floor",
                                "n": n,
                                "listeners": mode == "listen",
                                "run": run,
                                "wall_ms": round(wall, 2),
                                "load": load,
                            }
                        )
    doc["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    doc["load_end"] = loadavg()
    doc["summary"] = report.summarize(doc["results"])
    doc["targets"] = report.targets(doc["summary"], doc["results"], doc["first_request"])
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        f.write(report.to_json(doc))
    plots: list[str] = []
    if not args.no_plots:
        try:
            plots = report.plots(doc, stem)
        except ImportError as exc:
            print(
                f"bench: no plots ({exc}); pip install -e '.[bench]' --config-settings editable_mode=compat for matplotlib",
                file=sys.stderr,
            )
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(doc, [os.path.basename(p) for p in plots]))
    print(f"bench: results in {stem}.json and {stem}.md", file=sys.stderr)
    return 0


def measure_first_request(tools: Tools, pods: Pods, run: int) -> dict[str, Any]:
    """``zds pod add --from-file`` of ``pods``: exec to its first request at a stand-in."""
    with scratch() as tmp:
        pods_file = pods.zds_file(tmp)
        if run == 1:  # untimed: the stand-in's and the client's files in the page cache first
            firstrequest.measure(_pod_add(tools, pods_file), pods_file, len(pods), tmp, tools.env)
        load = loadavg()[0]
        m = firstrequest.measure(_pod_add(tools, pods_file), pods_file, len(pods), tmp, tools.env)
    print(
        f"bench: first request n={len(pods):5} zds pod add run {run}: {m.first_request_ms:8.1f} ms "
        f"(exits at {m.exit_ms:.1f} ms, load {load:.2f})",
        file=sys.stderr,
        flush=True,
    )
    return {
        "n": len(pods),
        "run": run,
        "first_request_ms": round(m.first_request_ms, 2),
        "exit_ms": round(m.exit_ms, 2),
        "load": load,
    }


def _pod_add(tools: Tools, pods_file: str) -> Callable[[str], list[str]]:
    return lambda sock: tools.zds("pod", "add", "--from-file", pods_file, "--control-socket", sock)


def measure(
    pair: Pair, mode: str, tools: Tools, pods: Pods, listeners: bool, run: int, idle: float
) -> dict[str, Any]:
    waited = wait_idle(idle=idle)  # every run starts on an idle machine (but for --busy-beside)
    load = loadavg()[0]
    m: Measurement = (
        pair.snapshot(tools, pods, listeners) if mode == "snapshot" else pair.live(tools, pods, listeners)
    )
    row: dict[str, Any] = {
        "pair": pair.name,
        "mode": mode,
        "n": len(pods),
        "listeners": listeners,
        "run": run,
        "wall_ms": round(m.wall_ms, 2),
        "load": load,
        "idle_wait_s": round(waited, 2),
        "rss_kb": m.rss_kb,
        "fds": m.fds,
        "cpu_ms": m.cpu_ms,
        "steal_pct": m.steal_pct,
        "acked_ms": report.percentiles(m.acked_ms),
    }
    if m.hello_ms is not None:
        row["hello_ms"] = round(m.hello_ms, 2)
    if m.first_enrolled_ms is not None:
        row["first_enrolled_ms"] = round(m.first_enrolled_ms, 2)
    if run == 1 and len(pods) == 1000:
        row["acked_all_ms"] = m.acked_ms  # for the per-pod distribution plot
    print(
        f"bench: {mode:8} n={len(pods):5} listeners={'on ' if listeners else 'off'} {pair.name:18} run {run}: "
        f"{m.wall_ms:8.1f} ms (load {load:.2f}, {waited:.1f} s to idle; CPU "
        + ", ".join(f"{role} {ms:.0f}" for role, ms in m.cpu_ms.items())
        + f" ms; steal {'-' if m.steal_pct is None else m.steal_pct}%)",
        file=sys.stderr,
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(run_main("bench/sidebyside.py", main))
