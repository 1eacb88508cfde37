"""Hello: ``zds ztunnel`` from exec to its hello, against a bare ZDS socket, one checkout or
several interleaved (an A/B of a start-up change, on the same machine in the same minutes).

A SOCK_SEQPACKET socket in the bench process, bound anew for each run, stands in for the
node agent: it accepts, reads the hello (it must be ztunnel's, ``0801``) and notes the time;
then the ztunnel side is stopped (SIGTERM, by its pid) and the next one started. Nothing of a node agent's is in the
timing (``sidebyside.py`` times the hello to the node agent's log line instead). Each
checkout runs with its own ``zds`` first on the path (``PYTHONPATH``, as ``python -m zds``
from it does) and its bytecode compiled first (a pip install does that). Not a timed test.
Run as root or not:

    .venv/bin/python bench/hello.py --runs 30                      # this checkout
    .venv/bin/python bench/hello.py --runs 30 . ../zds-before      # A/B, interleaved
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

from procs import BenchError, compile_bytecode, measuring_env, run_main, stop_process

from zds.cliflags import positive_int
from zds.protocol.messages import encode_hello

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Seconds a run waits for the connection, and then for the hello.
HELLO_TIMEOUT = 30.0


def checkout(path: str) -> str:
    """``path`` as a zds checkout's absolute path (refused when it holds no zds)."""
    root = os.path.abspath(path)
    if not os.path.isfile(os.path.join(root, "zds", "__main__.py")):
        raise argparse.ArgumentTypeError(f"{path}: not a zds checkout (no zds/__main__.py)")
    return root


def one_run(root: str, path: str) -> float:
    """Seconds from starting ``root``'s ``zds ztunnel`` to its hello on a socket bound at
    ``path`` for this run alone (a reconnect of the one before cannot be taken for it)."""
    argv = [sys.executable, "-m", "zds", "--log-level", "warning", "ztunnel", "--zds-socket", path]
    for flag in ("--admin-listen", "--readiness-listen", "--metrics-listen"):
        argv += [flag, "127.0.0.1:0"]
    env = measuring_env(PYTHONPATH=root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as listener:
        listener.bind(path)
        try:
            listener.listen(1)
            listener.settimeout(0.1)
            start = time.perf_counter()
            proc = subprocess.Popen(
                argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            try:
                with _accepted(listener, proc, root) as conn:
                    conn.settimeout(HELLO_TIMEOUT)
                    hello = conn.recv(64)
                    elapsed = time.perf_counter() - start
            except OSError as exc:
                raise BenchError(f"{root}: no hello: {exc}") from None
            finally:
                stop_process(proc)
                if proc.stderr:
                    proc.stderr.close()
        finally:
            os.unlink(path)
    if hello != encode_hello():
        raise BenchError(
            f"{root}: expected ztunnel's hello ({encode_hello().hex()}), got {hello.hex() or 'EOF'}"
        )
    return elapsed


def _accepted(listener: socket.socket, proc: subprocess.Popen[bytes], root: str) -> socket.socket:
    """The connection of ``proc`` (BenchError if it exits first or has not come in time)."""
    deadline = time.monotonic() + HELLO_TIMEOUT
    while True:
        try:
            return listener.accept()[0]
        except TimeoutError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                last = err.splitlines()[-1] if err else "nothing said"
                raise BenchError(
                    f"{root}: zds ztunnel exited {proc.returncode} before its hello: {last}"
                ) from None
            if time.monotonic() > deadline:
                raise BenchError(f"{root}: zds ztunnel did not connect within {HELLO_TIMEOUT:g} s") from None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkouts", nargs="*", type=checkout, default=[HERE], help="zds checkouts (default: this one)"
    )
    parser.add_argument("--runs", type=positive_int, default=20, help="runs of each (default %(default)s)")
    args = parser.parse_args()
    if len(set(args.checkouts)) < len(args.checkouts):
        parser.error("a checkout is named twice")
    roots = args.checkouts
    for root in roots:
        compile_bytecode(root, measuring_env())
    times: dict[str, list[float]] = {root: [] for root in roots}
    tmp = tempfile.mkdtemp(prefix="zds-hello-")
    try:
        for run in range(args.runs):
            for root in roots:  # interleaved: a slower minute weighs on each alike
                times[root].append(one_run(root, os.path.join(tmp, f"zds-{run}.sock")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for root, took in times.items():
        ms = sorted(t * 1e3 for t in took)
        print(
            f"{root}: exec to hello, median {statistics.median(ms):.1f} ms "
            f"(quartiles {ms[len(ms) // 4]:.1f}-{ms[(3 * len(ms)) // 4]:.1f}, min {ms[0]:.1f}; {len(ms)} runs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_main("bench/hello.py", main))
