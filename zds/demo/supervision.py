"""The demo's two children (``zds server``, ``zds ztunnel``): started in their own
session, their JSON logs followed, stopped in reverse order, also on error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from zds import runtime
from zds.demo.narration import LogTail, Narrator
from zds.demo.probes import DemoError


class Supervisor:
    """Owns the child processes and their log files (under ``tmp``)."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, LogTail] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        """``zds --log-format json ARGS`` as ``name``, its output in ``tmp/NAME.log``."""
        log_path = os.path.join(self.tmp, f"{name}.log")
        # Started and noted as one step: an interrupt in between left the child running.
        with runtime.interrupts_held(), open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "zds", "--log-format", "json", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops them in order
                env={**os.environ, runtime.PARENT_PID_ENV: str(os.getpid())},  # and its death ends them
            )
            self.procs[name] = proc
        self.logs[name] = LogTail(log_path, name)
        return proc

    def check_alive(self) -> bool:
        """Raise DemoError if a child died; False otherwise (so it can start an ``or`` chain)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.read_log(name)[-2000:]
                raise DemoError(f"{name} exited with code {proc.returncode}:\n{tail}")
        return False

    def read_log(self, name: str) -> str:
        with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
            return f.read()

    def show_logs(self, narrator: Narrator) -> None:
        for tail in self.logs.values():
            tail.show(narrator)

    def stop_all(self) -> None:
        """SIGTERM each child, the last started first; SIGKILL one that does not stop in 10 s."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
