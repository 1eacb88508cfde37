"""The pairs the side-by-side bench compares: a node agent and a ztunnel side, started as
real processes on the same pods, and how one snapshot or one live bulk enrollment is timed.

- snapshot: N pods preloaded into the node agent; from starting the ztunnel side to the
  moment the ztunnel side says it acked ``SnapshotSent`` (zds: its "snapshot reconciled"
  line, written as it sends that ack; Istio's fake ztunnel and ztunnel's peer: their
  ``snapshot_sent`` line, written after it);
- live: the ztunnel side connected with an empty snapshot; from handing the node agent all
  N enrollments at once through its bulk path (zds: starting one ``zds pod add --from-file``,
  its start-up included; Istio's server: writing N ``add`` lines to its stdin at once) to
  the N-th acked enrollment as its client sees it.

With listeners every ztunnel side opens the same sockets in each pod, ztunnel's three TCP
listeners (15001, 15006, 15008), as Istio's fake ztunnel (``--listen``) and ztunnel's peer
do: zds's with ``--no-dns``. The ``zds-dns`` pair is zds's ztunnel side at its default, its
DNS forwarder too (ztunnel's default: UDP and TCP 15053 on 127.0.0.1 and ::1, four sockets a
pod more than the peers): what the forwarder costs, beside the same work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from procs import BenchError, Proc, Steal, Stream


@dataclass(frozen=True)
class Pods:
    """The bench's pods: their netns paths; uids and names follow from the index."""

    paths: list[str]
    namespace: str = "bench"
    service_account: str = "bench-sa"

    def __len__(self) -> int:
        return len(self.paths)

    def entries(self) -> Iterator[tuple[str, str, str]]:
        for i, path in enumerate(self.paths):
            yield f"uid-{i:05d}", f"pod-{i:05d}", path

    def zds_file(self, directory: str) -> str:
        path = os.path.join(directory, "pods.jsonl")
        with open(path, "w") as f:
            for uid, name, netns in self.entries():
                doc = {"uid": uid, "name": name, "namespace": self.namespace}
                doc.update(service_account=self.service_account, netns=netns)
                f.write(json.dumps(doc) + "\n")
        return path

    def istio_lines(self, prefix: str = "") -> str:
        return "".join(
            f"{prefix}{uid} {name} {self.namespace} {self.service_account} {netns}\n"
            for uid, name, netns in self.entries()
        )

    def istio_file(self, directory: str) -> str:
        path = os.path.join(directory, "snapshot.txt")
        with open(path, "w") as f:
            f.write(self.istio_lines())
        return path


@dataclass(frozen=True)
class Tools:
    """Where the programs are: zds (this checkout's Python) and, when built, the peers."""

    python: str
    env: dict[str, str]
    istio_server: str | None = None
    istio_client: str | None = None
    ztunnel_peer: str | None = None

    def zds(self, *args: str) -> list[str]:
        return [self.python, "-m", "zds", *args]


@dataclass
class Measurement:
    """One timed run of one pair."""

    wall_ms: float
    #: zds ztunnel only: from exec to the node agent receiving its hello.
    hello_ms: float | None = None
    #: zds pod add only: from exec to the node agent's first ``pod enrolled`` line (its first
    #: request exactly, without the node agent's part: ``firstrequest.py``).
    first_enrolled_ms: float | None = None
    #: process -> {"VmRSS": KiB, "VmHWM": KiB} once the run is done.
    rss_kb: dict[str, dict[str, int]] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    #: Per pod, in order: when its ack was reported by the ztunnel side, in ms since the
    #: start (zds's lines come in batches, so to within ~5 ms; the peers print a line each).
    acked_ms: list[float] = field(default_factory=list)
    #: CPU (user + system) each process used in the timed section, ms: "server", "ztunnel"
    #: (snapshot: its whole life to its acked SnapshotSent) and, zds live, "client" (``zds pod add``).
    cpu_ms: dict[str, float] = field(default_factory=dict)
    #: The share of the machine's CPU time its hypervisor gave others meanwhile, %.
    steal_pct: float | None = None


class CpuWatch:
    """The CPU each process uses from when it is added (less ``baseline``: what it had
    used by then) to ``read``, and the machine's steal over the same time."""

    def __init__(self) -> None:
        self._procs: dict[str, tuple[Proc, float]] = {}
        self._steal = Steal()

    def add(self, role: str, proc: Proc, *, whole_life: bool = False) -> None:
        self._procs[role] = (proc, 0.0 if whole_life else (proc.cpu_ms() or 0.0))

    def read(self, m: Measurement) -> None:
        for role, (proc, baseline) in self._procs.items():
            used = proc.cpu_ms()
            if used is not None:
                m.cpu_ms[role] = round(used - baseline, 1)
        m.steal_pct = self._steal.percent()


# -- the two ends ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKind:
    name: str

    def start(self, tools: Tools, tmp: str, pods: Pods | None, uvloop: bool) -> Proc:
        sock = os.path.join(tmp, "zds.sock")
        if self.name == "zds":
            argv = tools.zds(
                "server",
                "--zds-socket",
                sock,
                "--control-socket",
                os.path.join(tmp, "control.sock"),
                "--cni-socket",
                "off",
                "--http-listen",
                "127.0.0.1:0",
                "--state-dir",
                os.path.join(tmp, "state"),
                "--no-redirect",
            )
            if pods is not None:
                argv += ["--pods", pods.zds_file(tmp)]
            if not uvloop:
                argv.append("--no-uvloop")
            proc = Proc("zds server", argv, env=tools.env)
            proc.err.wait_for("node agent ready")
            return proc
        assert tools.istio_server is not None
        argv = [tools.istio_server, "--socket", sock]
        if pods is not None:
            argv += ["--snapshot", pods.istio_file(tmp)]
        proc = Proc("istio-zds-server", argv, env=tools.env, stdin=True)
        proc.err.wait_for("istio-zds-server: serving")
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop(quit_line="quit\n" if self.name == "istio" else None)


@dataclass(frozen=True)
class ZtunnelKind:
    name: str
    #: zds only: its DNS forwarder too (ztunnel's default: UDP and TCP 15053 on 127.0.0.1 and
    #: ::1, 4 sockets a pod more); without it a pod gets the 3 TCP listeners the peers open.
    dns: bool = False

    def start(self, tools: Tools, sock: str, listeners: bool, uvloop: bool) -> Proc:
        if self.name == "zds":
            argv = tools.zds("ztunnel", "--zds-socket", sock)
            for flag in ("--admin-listen", "--readiness-listen", "--metrics-listen"):
                argv += [flag, "127.0.0.1:0"]
            if not listeners:
                argv.append("--no-listeners")
            elif not self.dns:
                argv.append("--no-dns")
            if not uvloop:
                argv.append("--no-uvloop")
            return Proc("zds ztunnel", argv, env=tools.env)
        if self.name == "istio":
            assert tools.istio_client is not None
            argv = [tools.istio_client, "--socket", sock, *(["--listen"] if listeners else [])]
            return Proc("istio-zds-client", argv, env=tools.env)
        assert tools.ztunnel_peer is not None
        argv = [tools.ztunnel_peer, sock, *([] if listeners else ["--no-listen"])]
        return Proc("ztunnel-zds-peer", argv, env={**tools.env, "RUST_LOG": "warn"})

    def stream(self, proc: Proc) -> Stream:
        """Where it reports each ack."""
        return proc.err if self.name == "zds" else proc.out

    @property
    def snapshot_done(self) -> str:
        return "snapshot reconciled" if self.name == "zds" else '"snapshot_sent"'

    @property
    def per_pod(self) -> str:
        return "proxy started" if self.name == "zds" else '"type":"add"'

    def settle(self, proc: Proc, after: float) -> None:
        """Until it is fully up (zds: its HTTP endpoints served, once the snapshot is in)."""
        if self.name == "zds":
            proc.err.wait_for("metrics listening on", after=after)


@dataclass(frozen=True)
class Pair:
    name: str
    label: str
    server: ServerKind
    ztunnel: ZtunnelKind
    uvloop: bool = True

    def needs(self, tools: Tools) -> list[str]:
        """What is missing to run this pair (empty: it can run)."""
        missing = []
        if self.server.name == "istio" and not tools.istio_server:
            missing.append("istio-zds-server")
        if self.ztunnel.name == "istio" and not tools.istio_client:
            missing.append("istio-zds-client")
        if self.ztunnel.name == "rs" and not tools.ztunnel_peer:
            missing.append("ztunnel-zds-peer")
        return missing

    def snapshot(self, tools: Tools, pods: Pods, listeners: bool) -> Measurement:
        with self._running(tools, pods, listeners) as (_, server, ztunnel, t0, cpu):
            stream = self.ztunnel.stream(ztunnel)
            done = stream.wait_for(self.ztunnel.snapshot_done, after=t0)
            m = Measurement(wall_ms=(done - t0) * 1e3)
            cpu.read(m)
            if self.server.name == "zds" and self.ztunnel.name == "zds":
                m.hello_ms = (server.err.wait_for("received hello", after=t0) - t0) * 1e3
            m.acked_ms = self._acked(stream, t0, len(pods))
            self.ztunnel.settle(ztunnel, t0)
            self._footprint(m, server, ztunnel)
            return m

    def live(self, tools: Tools, pods: Pods, listeners: bool) -> Measurement:
        with self._running(tools, None, listeners) as (tmp, server, ztunnel, begun, _):
            self.ztunnel.stream(ztunnel).wait_for(self.ztunnel.snapshot_done, after=begun)
            self.ztunnel.settle(ztunnel, begun)
            cpu = CpuWatch()
            cpu.add("server", server)
            cpu.add("ztunnel", ztunnel)
            if self.server.name == "zds":
                m, t0 = self._live_zds(tools, tmp, pods, server, cpu)
            else:
                m, t0 = self._live_istio(pods, server, cpu)
            m.acked_ms = self._acked(self.ztunnel.stream(ztunnel), t0, len(pods))
            self._footprint(m, server, ztunnel)
            return m

    @contextmanager
    def _running(
        self, tools: Tools, preloaded: Pods | None, listeners: bool
    ) -> Iterator[tuple[str, Proc, Proc, float, CpuWatch]]:
        """Both ends in a scratch directory: the node agent started (with ``preloaded`` pods),
        then the ztunnel side; yields (directory, node agent, ztunnel side, when the ztunnel
        side was started, the CPU both used from then) and stops both, ztunnel side first."""
        with scratch() as tmp:
            server = self.server.start(tools, tmp, preloaded, self.uvloop)
            ztunnel: Proc | None = None
            try:
                cpu = CpuWatch()
                cpu.add("server", server)
                t0 = time.perf_counter()
                ztunnel = self.ztunnel.start(tools, os.path.join(tmp, "zds.sock"), listeners, self.uvloop)
                cpu.add("ztunnel", ztunnel, whole_life=True)
                yield tmp, server, ztunnel, t0, cpu
            finally:
                if ztunnel is not None:
                    ztunnel.stop()
                self.server.stop(server)

    def _acked(self, stream: Stream, t0: float, n: int) -> list[float]:
        """When each of the first ``n`` pods' acks after ``t0`` was reported, ms since ``t0``."""
        stream.wait_for(self.ztunnel.per_pod, count=n, after=t0)
        return [round((t - t0) * 1e3, 3) for t in stream.times(self.ztunnel.per_pod, after=t0)[:n]]

    def _live_zds(
        self, tools: Tools, tmp: str, pods: Pods, server: Proc, cpu: CpuWatch
    ) -> tuple[Measurement, float]:
        pods_file = pods.zds_file(tmp)
        argv = tools.zds(
            "pod", "add", "--from-file", pods_file, "--control-socket", os.path.join(tmp, "control.sock")
        )
        t0 = time.perf_counter()
        cli = Proc("zds pod add", argv, env=tools.env)
        try:
            last = cli.out.wait_for(" enrolled", count=len(pods), after=t0)
            m = Measurement(wall_ms=(last - t0) * 1e3)
            cpu.read(m)  # (at the timed section's end, as Istio's: not after the client's exit)
            used = cli.cpu_ms()  # (before it exits: it has nothing left to do but that)
            m.first_enrolled_ms = (server.err.wait_for("pod enrolled", after=t0) - t0) * 1e3
            code = cli.popen.wait(60)
        finally:
            cli.stop()
        if code != 0:
            raise BenchError(f"zds pod add --from-file exited {code}: {cli.err.tail()}")
        if used is not None:
            m.cpu_ms["client"] = round(used, 1)
        return m, t0

    def _live_istio(self, pods: Pods, server: Proc, cpu: CpuWatch) -> tuple[Measurement, float]:
        lines = pods.istio_lines(prefix="add ")
        t0 = time.perf_counter()
        server.write(lines)
        last = server.out.wait_for("", count=len(pods), after=t0)
        m = Measurement(wall_ms=(last - t0) * 1e3)
        cpu.read(m)
        replies = [line for t, line in server.out.lines if t >= t0]
        failed = [r for r in replies[: len(pods)] if r != "ok"]
        if failed:
            raise BenchError(f"istio-zds-server refused {len(failed)} adds, e.g. {failed[0]}")
        return m, t0

    @staticmethod
    def _footprint(m: Measurement, server: Proc, ztunnel: Proc) -> None:
        for role, proc in (("server", server), ("ztunnel", ztunnel)):
            m.rss_kb[role] = proc.rss_kb()
            m.fds[role] = proc.fd_count()


@contextmanager
def scratch() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="zds-bench-")
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ZDS, ISTIO, RS = ServerKind("zds"), ServerKind("istio"), ZtunnelKind("rs")

PAIRS = {
    pair.name: pair
    for pair in (
        Pair("istio", "Istio server + Istio fake ztunnel", ISTIO, ZtunnelKind("istio")),
        Pair("zds", "zds server + zds ztunnel (uvloop)", ZDS, ZtunnelKind("zds")),
        Pair("zds-asyncio", "zds server + zds ztunnel (asyncio loop)", ZDS, ZtunnelKind("zds"), uvloop=False),
        Pair(
            "zds-dns",
            "zds server + zds ztunnel (uvloop, DNS forwarder on)",
            ZDS,
            ZtunnelKind("zds", dns=True),
        ),
        Pair("istio+zds", "Istio server + zds ztunnel", ISTIO, ZtunnelKind("zds")),
        Pair("zds+istio", "zds server + Istio fake ztunnel", ZDS, ZtunnelKind("istio")),
        Pair("istio+ztunnel-rs", "Istio server + ztunnel's in-pod code", ISTIO, RS),
    )
}
