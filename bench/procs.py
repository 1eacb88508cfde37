"""Processes the side-by-side bench starts, and when things happen in their output.

Every stream a bench process writes is read by a thread of its own as it comes (so no
process ever blocks on a full pipe), and each line is timestamped (``time.perf_counter``)
when it is read: that is how the driver learns that a ztunnel side acked ``SnapshotSent``
or that an enrollment was acked, at the moment it was said, without polling.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: How long any one milestone may take before the run is abandoned (a hung run, not a timing).
DEADLINE = 120.0
#: Environment variables of the caller's session that would change what is measured
#: (no bytecode cache: every import compiled again; unbuffered output; import profiling).
UNSET = ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PYTHONPROFILEIMPORTTIME", "PYTHONDEVMODE")
#: A checkout's packages (zds's subpackages are links to the top-level ones).
PACKAGES = ("zds", "server", "client", "netns")
#: The kernel's clock ticks a second (/proc/PID/stat counts CPU time in them).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def measuring_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``UNSET``, with ``extra``: what measured processes get."""
    return {**{k: v for k, v in os.environ.items() if k not in UNSET}, **extra}


def compile_bytecode(root: str, env: dict[str, str]) -> None:
    """Compile the checkout at ``root`` beforehand, as a pip install does: no run pays for it
    (the packages it has: an older or a made-up checkout may lack some)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(p for p in PACKAGES if os.path.isdir(os.path.join(root, p))),
        ],
        cwd=root,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def peers_dir() -> str:
    """Where the upstream reference peers are built: ``$ZDS_PEERS`` (or ``$ZDS_PEERS_DIR``),
    else ``../peers`` beside the repository, else /work/peers; ``../peers`` when neither is
    there (the bench then skips their pairs; the tests, ``harness.peers_dir``, their checks)."""
    given = os.environ.get("ZDS_PEERS") or os.environ.get("ZDS_PEERS_DIR")
    if given:
        return given
    beside = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "peers"
    )
    return next((path for path in (beside, "/work/peers") if os.path.isdir(path)), beside)


class BenchError(Exception):
    """A bench step failed; the message says what and where its output is."""


def run_main(name: str, main: Callable[[], int]) -> int:
    """A bench script's ``main``: SIGTERM and SIGHUP stop it as Ctrl-C does, so its clean-up
    runs (processes, namespaces, the temp dir: a SIGTERM left them all); an interrupt, or a
    BenchError, is one line and an exit code (128 + the signal; 1), not a traceback."""
    from zds import runtime

    try:
        with runtime.Interrupts():
            return main()
    except KeyboardInterrupt as exc:
        print(f"{name}: {runtime.how_stopped(exc)}; cleaned up", file=sys.stderr)
        return runtime.interrupt_exit_code(exc)
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1


@dataclass
class Stream:
    """One output stream of a process, read line by line on a thread."""

    name: str
    #: (time read, line) of every line, in order.
    lines: list[tuple[float, str]] = field(default_factory=list)
    closed: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    #: What a waiter waits for: the reader counts such lines and wakes it only once there are
    #: enough (not for every line: the driver must not compete with what it measures).
    _wanted: str | None = None
    _after: float = 0.0
    _matches: int = 0
    _target: int = 0

    def follow(self, pipe: object) -> None:
        def run() -> None:
            assert hasattr(pipe, "readline")
            for raw in iter(pipe.readline, b""):
                now = time.perf_counter()
                line = raw.decode(errors="replace").rstrip("\n")
                with self._cond:
                    self.lines.append((now, line))
                    if self._wanted is not None and now >= self._after and self._wanted in line:
                        self._matches += 1
                        if self._matches >= self._target:
                            self._cond.notify_all()
            with self._cond:
                self.closed = True
                self._cond.notify_all()

        threading.Thread(target=run, name=f"read {self.name}", daemon=True).start()

    def wait_for(
        self, marker: str, *, count: int = 1, after: float = 0.0, timeout: float = DEADLINE
    ) -> float:
        """The read time of the ``count``-th line read after ``after`` that contains ``marker``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._wanted, self._after, self._target = marker, after, count
            self._matches = sum(1 for t, line in self.lines if t >= after and marker in line)
            try:
                while self._matches < count:
                    if self.closed:
                        raise BenchError(f"{self.name} ended before {count}x {marker!r}: {self.tail()}")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BenchError(
                            f"{self.name}: no {count}x {marker!r} within {timeout:.0f}s: {self.tail()}"
                        )
                    self._cond.wait(min(left, 1.0))
            finally:
                self._wanted = None
            return [t for t, line in self.lines if t >= after and marker in line][count - 1]

    def times(self, marker: str, *, after: float = 0.0) -> list[float]:
        with self._cond:
            return [t for t, line in self.lines if t >= after and marker in line]

    def tail(self, n: int = 5) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines[-n:]]


class Proc:
    """A bench process: its stdout and stderr followed, stopped by its PID at the end."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        stdin: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.started = time.perf_counter()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.out = Stream(f"{name} stdout")
        self.err = Stream(f"{name} stderr")
        self.out.follow(self.popen.stdout)
        self.err.follow(self.popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def write(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def rss_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the process now, in KiB."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
        return found

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_ms(self) -> float | None:
        """CPU time the process used so far, user and system, every thread's (also those that
        ended), in ms (to the kernel's clock tick, 10 ms here); None once it is gone. Not its
        children's (the bench runs zds with --no-redirect: no iptables-restore to count)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            return None
        return (int(fields[11]) + int(fields[12])) * 1e3 / CLOCK_TICKS

    def stop(self, *, quit_line: str | None = None, timeout: float = 20.0) -> None:
        """Ask it to stop (a stdin command, else SIGTERM); SIGKILL by PID if it does not."""
        if self.popen.poll() is None:
            try:
                if quit_line is not None and self.popen.stdin is not None:
                    self.write(quit_line)
                else:
                    self.popen.send_signal(signal.SIGTERM)
            except (BrokenPipeError, ProcessLookupError):
                pass
            stop_process(self.popen, timeout, signal_first=False)
        if self.popen.stdin is not None:
            self.popen.stdin.close()


def stop_process(popen: subprocess.Popen[bytes], timeout: float = 15.0, *, signal_first: bool = True) -> None:
    """SIGTERM (unless already asked), wait ``timeout`` seconds, then SIGKILL, by its PID."""
    if popen.poll() is not None:
        return
    if signal_first:
        popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


def _cpu_fields() -> list[int]:
    """The jiffies of all CPUs so far (/proc/stat's ``cpu`` line: user, nice, system, idle,
    iowait, irq, softirq, steal, ...)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs so far."""
    fields = _cpu_fields()
    return fields[3] + fields[4], sum(fields)  # idle + iowait


class Steal:
    """The share of the machine's CPU time its hypervisor gave to others (steal) from when
    this is made to ``percent()``: a run on a virtual machine whose host is busy is slower
    for that alone, and by more for whichever pair needs more CPU."""

    def __init__(self) -> None:
        self._start = _cpu_fields()

    def percent(self) -> float | None:
        now = _cpu_fields()
        # (user to steal: guest and guest_nice, after them, are counted in user and nice too)
        total = sum(now[:8]) - sum(self._start[:8])
        if total <= 0 or len(now) < 8:
            return None
        return round(100 * (now[7] - self._start[7]) / total, 1)


#: What another program keeping a CPU busy runs: busy ``share`` of every ``period`` seconds.
#: It ends by itself once the bench is gone (killed with no clean-up: it would spin forever),
#: and leaves Ctrl-C to the bench.
_BUSY = """import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
share, period, bench = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
while os.getppid() == bench:
    until = time.perf_counter() + share * period
    while time.perf_counter() < until:
        pass
    if share < 1.0:
        time.sleep((1.0 - share) * period)
"""


class BusyBeside:
    """Other work on the machine while the bench runs (``--busy-beside``): a process keeping
    one CPU busy ``percent`` of the time, in slices of ``period`` seconds, from ``__enter__``
    to ``__exit__`` (stopped by its PID): what the measured processes meet on a machine that
    is not theirs alone. 0: none."""

    def __init__(self, percent: int, period: float = 0.01) -> None:
        self.share = percent / 100
        self.period = period
        self._proc: subprocess.Popen[bytes] | None = None

    def idle(self, idle: float = 0.9) -> float:
        """What ``wait_idle`` waits for with this beside it: ``idle`` less the CPU it keeps busy."""
        return idle - self.share / (os.cpu_count() or 1)

    def __enter__(self) -> BusyBeside:
        if self.share > 0:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BUSY, str(self.share), str(self.period), str(os.getpid())]
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def wait_idle(*, idle: float = 0.9, window: float = 0.1, limit: float = 5.0) -> float:
    """Until the machine was ``idle`` (share of all CPUs) over a ``window`` of seconds, or
    ``limit`` seconds passed; returns the seconds waited. What a run's processes leave to the
    kernel (the sockets and namespaces of thousands of pods freed by workers) runs on after
    them, and would otherwise be paid by whichever pair comes next."""
    started = time.monotonic()
    while True:
        idle0, total0 = _cpu_times()
        time.sleep(window)
        idle1, total1 = _cpu_times()
        waited = time.monotonic() - started
        if (total1 > total0 and (idle1 - idle0) / (total1 - total0) >= idle) or waited >= limit:
            return waited


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]
