"""The container-engine source against a stand-in engine: a unix-socket HTTP server that
answers what Podman's Docker-compatible API answers (``/version``, ``/containers/json``,
``/events``, ``/containers/{id or name}/json``, a container looked up by its id *or its
name*, as Podman and Docker do), with real namespaces and a real process in each. What a
real engine cannot be made to do on cue (a container named like another's id; its event
stream cut) is what these tests are about; tests/test_runtime_podman.py runs Podman itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.harness import NodeAgentProc, Pod, post_unix, wait_until
from tests.standins import AckingPeer
from zds import defaults
from zds.server import engine as engine_module

pytestmark = pytest.mark.root

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class StandInEngine:
    """Containers by id (their inspections), served over ``path`` from a thread of its own."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.containers: dict[str, dict[str, Any]] = {}
        #: Containers whose inspection fails with this status.
        self.failing: dict[str, int] = {}
        #: As Podman with events_logger = "none": each event stream ends at once (and a
        #: listing takes a moment).
        self.no_events = False
        self._loop = asyncio.new_event_loop()
        #: One per open event stream: set, the stream ends.
        self._cuts: list[asyncio.Event] = []
        self._streams: list[web.StreamResponse] = []
        self._runner: web.AppRunner | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        assert started.wait(10), "the stand-in engine did not start"

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/version", self._version)
        app.router.add_get("/v1.41/containers/json", self._list)
        app.router.add_get("/v1.41/containers/{ref}/json", self._inspect)
        app.router.add_get("/v1.41/events", self._events)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.UnixSite(self._runner, self.path).start())
        started.set()
        self._loop.run_forever()

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"ApiVersion": "1.41"})

    async def _list(self, request: web.Request) -> web.Response:
        if self.no_events:
            await asyncio.sleep(0.5)
        return web.json_response(
            [
                {"Id": cid, "Names": [info["Name"]], "Labels": info["Config"]["Labels"], "HostConfig": {}}
                for cid, info in self.containers.items()
            ]
        )

    async def _inspect(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if ref in self.failing:
            return web.json_response({"message": f"cannot inspect {ref}"}, status=self.failing[ref])
        info = self.containers.get(ref) or next(
            (i for i in self.containers.values() if i["Name"].lstrip("/") == ref), None
        )
        if info is None:
            return web.json_response({"message": f"no such container: {ref}"}, status=404)
        return web.json_response(info)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        stream = web.StreamResponse()
        await stream.prepare(request)
        if self.no_events:
            return stream
        cut = asyncio.Event()
        self._cuts.append(cut)
        self._streams.append(stream)
        try:
            await cut.wait()
        finally:
            self._streams.remove(stream)
        return stream

    def emit(self, cid: str, action: str) -> None:
        """A container event on every open event stream, as Podman writes it."""
        info = self.containers[cid]
        event = {
            "Type": "container",
            "Action": action,
            "Actor": {
                "ID": cid,
                "Attributes": {"name": info["Name"].lstrip("/"), **info["Config"]["Labels"]},
            },
        }

        async def write() -> None:
            for stream in self._streams:
                await stream.write(json.dumps(event).encode() + b"\n")

        asyncio.run_coroutine_threadsafe(write(), self._loop).result(10)

    def _cut(self) -> None:
        for cut in self._cuts:
            cut.set()
        self._cuts.clear()

    def cut_events(self) -> None:
        """End every event stream: the node agent reconnects, lists and reconciles again."""
        self._loop.call_soon_threadsafe(self._cut)

    def reconcile_again(self, server: NodeAgentProc) -> None:
        """``cut_events``, then wait until ``server`` has listed and reconciled again."""
        reconciled = server.output().count("listed and reconciled")
        self.cut_events()
        wait_until(lambda: server.output().count("listed and reconciled") > reconciled, "another reconcile")

    def close(self) -> None:
        async def stop() -> None:
            self._cut()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[StandInEngine]:
    """A stand-in engine on ``tmp_path/engine.sock``, closed at the end (also on failure)."""
    made = StandInEngine(str(tmp_path / "engine.sock"))
    try:
        yield made
    finally:
        made.close()


def inspection(cid: str, name: str, pod: Pod, pid: int) -> dict[str, Any]:
    return {
        "Id": cid,
        "Name": f"/{name}",
        "Config": {"Labels": AMBIENT},
        "HostConfig": {"NetworkMode": "bridge"},
        "State": {"Running": True, "Pid": pid},
        "NetworkSettings": {"SandboxKey": pod.path, "Networks": {}},
    }


@pytest.fixture
def in_netns() -> Iterator[Callable[[Pod], int]]:
    """Start a process in a pod's netns (its "container"); the pid. All stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(pod: Pod) -> int:
        proc = subprocess.Popen(["ip", "netns", "exec", pod.name, "sleep", "600"])
        started.append(proc)
        netns = os.stat(pod.path).st_ino
        wait_until(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == netns, "the process in its netns")
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_container_named_like_a_gone_containers_id_is_not_taken_for_it(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """Container c0ffee's pod is enrolled; then c0ffee is gone and another container is
    *named* c0ffee. Looking c0ffee up answers with the other one: that is not c0ffee (it is
    gone: its pod goes), the other is enrolled under its own id, and the source keeps
    working (a KeyError there had ended it for good, silently)."""
    a, b = make_pod(), make_pod()
    old, new = "c0ffee" + "0" * 58, "beef" + "0" * 60
    engine.containers[old] = inspection(old, "app", a, in_netns(a))
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        wait_until(lambda: [p.uid for p in server.list_pods()] == [old], "the container's pod")
        del engine.containers[old]
        engine.containers[new] = inspection(new, old, b, in_netns(b))  # named like the old one's id
        engine.cut_events()
        wait_until(lambda: [p.uid for p in server.list_pods()] == [new], "the old pod gone, the new enrolled")
        [pod] = server.list_pods()
        assert pod.netns.ino == os.stat(b.path).st_ino
        # The source still works: cut again, it reconnects and reconciles again.
        engine.reconcile_again(server)
        assert "Traceback" not in server.output() and "unexpected" not in server.output()
    finally:
        server.stop()


def test_a_container_the_engine_describes_wrongly_is_skipped_in_one_line_and_the_others_go_on(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """A container whose inspection zds cannot read (a pid that is no number; a state that is
    text): in a reconcile it failed the whole reconcile, every time, and the source stayed
    down for good; after an event its sync ended without a word. Now that container is
    skipped in one warning line and every other container's pod is made as the engine says."""
    a, b, c = make_pod(), make_pod(), make_pod()
    good, bad, odd, late = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    engine.containers[good] = inspection(good, "good", a, in_netns(a))
    engine.containers[bad] = {
        **inspection(bad, "bad", b, in_netns(b)),
        "State": {"Running": True, "Pid": "abc"},
    }
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        server.wait_for_output("listed and reconciled")
        wait_until(lambda: [p.uid for p in server.list_pods()] == [good], "the good container's pod")
        server.wait_for_output(
            f"container {bad[:12]}: the engine's answer is not understood (ValueError: invalid literal"
        )
        engine.containers[odd] = {**inspection(odd, "odd", c, in_netns(c)), "State": "running"}
        engine.emit(odd, "start")
        server.wait_for_output(f"container {odd[:12]}: the engine's answer is not understood (AttributeError")
        del engine.containers[bad]
        engine.containers[late] = inspection(late, "late", b, in_netns(b))
        engine.emit(late, "start")  # the source goes on following events
        wait_until(lambda: {p.uid for p in server.list_pods()} == {good, late}, "the late container's pod")
        assert "is down" not in server.output() and "Traceback" not in server.output()
    finally:
        server.stop()


def test_a_container_whose_inspection_fails_is_skipped_and_looked_at_again(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """One container's inspection answered 500 in a reconcile: the whole source went down,
    tried again every 30 s, and no other container was followed. Now the others go on, and
    that one is looked at again (with backoff) until the engine answers."""
    a, b = make_pod(), make_pod()
    good, bad = "a" * 64, "b" * 64
    engine.containers[good] = inspection(good, "good", a, in_netns(a))
    engine.containers[bad] = inspection(bad, "bad", b, in_netns(b))
    engine.failing[bad] = 500
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        server.wait_for_output("listed and reconciled")
        line = f"cannot look at container {bad[:12]}: engine answered 500: "
        server.wait_for_output(line)
        assert "looked at again later" in next(x for x in server.output().splitlines() if line in x)
        wait_until(lambda: [p.uid for p in server.list_pods()] == [good], "the good container's pod")
        wait_until(lambda: server.output().count(line) >= 2, "a second look at it (again in 0.5s)")
        del engine.failing[bad]  # (no event: the retry finds it)
        wait_until(lambda: {p.uid for p in server.list_pods()} == {good, bad}, "the other pod")
        assert "is down" not in server.output()
    finally:
        server.stop()


def test_a_container_looked_at_again_is_looked_at_through_the_next_session(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """A sync waiting to try again kept the session it began in: once that ended (a
    reconnect), its next try met a closed session ("unexpected RuntimeError") and ended, and
    the new session's reconcile only asked it for one more: the container stayed unenrolled."""
    a = make_pod()
    bad = "b" * 64
    engine.containers[bad] = inspection(bad, "bad", a, in_netns(a))
    engine.failing[bad] = 500
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        server.wait_for_output(f"cannot look at container {bad[:12]}: engine answered 500: ")
        server.wait_for_output("(again in 0.5s")
        time.sleep(2.5)  # (its tries 0.5, 1 and 2 s apart: it waits 2 s now, across the reconnect)
        engine.reconcile_again(server)
        del engine.failing[bad]  # (no event: the next try finds it)
        wait_until(lambda: [p.uid for p in server.list_pods()] == [bad], "the pod, through the new session")
        assert "unexpected" not in server.output()
    finally:
        server.stop()


def test_an_event_stream_that_ends_after_a_while_is_followed_again_at_once_and_the_engine_stays_up(
    tmp_path: Path, engine: StandInEngine
) -> None:
    """Podman's file event logger ends the stream at each rotation of its log: the source was
    said down (a warning, ``/readyz`` 503, Watch's ``pod source down``) until the reconnect
    0.5 s later, and the compose file's HEALTHCHECK caught the node agent unhealthy then. It
    reconnects at once, still up; down only when that reconnect fails."""
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        server.wait_for_output("listed and reconciled; watching events")
        time.sleep(defaults.ENGINE_RECONNECT_AT_ONCE)
        engine.reconcile_again(server)
        assert (
            f"container engine {engine_module.engine_url(engine.path)}: its event stream ended; reconnecting"
            in (server.output())
        )
        assert "is down" not in server.output()
        time.sleep(defaults.ENGINE_RECONNECT_AT_ONCE)
        engine.no_events = True  # (the reconnect's stream ends before its listing: it failed)
        engine.cut_events()
        server.wait_for_output("is down: its event stream ended before its containers were listed")
    finally:
        server.stop()


def test_an_engine_without_events_is_down_and_says_why(tmp_path: Path, engine: StandInEngine) -> None:
    """Podman with events_logger = "none" ends the stream at once, before each listing is
    reconciled: nothing was ever enrolled, and the line said only that the stream ended."""
    engine.no_events = True
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    try:
        server.wait_for_output(
            "its event stream ended before its containers were listed (an engine without events? "
            'Podman\'s events_logger = "none" has none: zds needs "file" or "journald")'
        )
    finally:
        server.stop()


async def test_an_engine_answer_not_given_in_time_is_a_timeout_that_says_what(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Engine calls had no timeout: an engine that never answered its ping or a listing held
    the source at "not connected yet" for good, without a line."""
    monkeypatch.setattr(defaults, "ENGINE_ANSWER_TIMEOUT", 0.05)
    with pytest.raises(TimeoutError, match=r"^no answer to a listing within 0.05s$"):
        async with engine_module._answer_within("a listing"):
            await asyncio.sleep(10)


def test_a_cni_del_for_a_container_that_still_runs_selected_leaves_it_enrolled(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """A labelled container's pod, enrolled again by zds-cni's ADD (a zds-cni network
    connected to it): the DEL when that network is disconnected is not the container gone.
    The pod had gone, and stayed away (no container event follows) until the next reconcile;
    the DEL's pod is now looked at again through the engine and enrolled again."""
    a = make_pod()
    cid = "e" * 64
    engine.containers[cid] = inspection(cid, "web", a, in_netns(a))
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    peer = AckingPeer(server.zds_socket)  # a ztunnel: a CNI ADD is answered once it acked
    try:
        peer.wait_snapshot()
        wait_until(
            lambda: [(p.uid, p.source) for p in server.list_pods()] == [(cid, "container-engine")], "pod"
        )
        add = {"Netns": a.path, "PodName": "web", "PodNamespace": "default", "ContainerID": cid}
        assert post_unix(server.cni_socket, "/cmdadd", json.dumps(add).encode())[0] == 200
        assert [(p.uid, p.source) for p in server.list_pods()] == [(cid, "cni")]
        deleted = {"PodUID": cid, "Netns": a.path}
        assert post_unix(server.cni_socket, "/cmddel", json.dumps(deleted).encode()) == (200, "removed\n")
        wait_until(
            lambda: [(p.uid, p.source) for p in server.list_pods()] == [(cid, "container-engine")],
            "the container's pod enrolled again",
        )
        [pod] = server.list_pods()
        assert pod.netns.ino == os.stat(a.path).st_ino
        # The DEL of a container that is gone: its pod goes, and stays away.
        assert post_unix(server.cni_socket, "/cmdadd", json.dumps(add).encode())[0] == 200
        del engine.containers[cid]
        assert post_unix(server.cni_socket, "/cmddel", json.dumps(deleted).encode()) == (200, "removed\n")
        engine.reconcile_again(server)  # after the DEL's look: nothing to enroll either
        assert server.list_pods() == []
        assert "Traceback" not in server.output()
        assert peer.kinds.count("del") == 2  # one for each DEL
    finally:
        peer.close()
        server.stop()


def test_a_containers_cni_add_naming_the_node_is_500_with_one_warning_line(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """A refused enrollment on the ContainerID path is answered as an Istio-style event's:
    500 with the reason (Istio's agent: any failure once the body parsed), said in one
    warning line (it was an ERROR line there once the answer was 500)."""
    a = make_pod()
    cid = "f" * 64
    engine.containers[cid] = inspection(cid, "web", a, in_netns(a))
    server = NodeAgentProc(str(tmp_path), "--container-engine", engine.path).wait_ready()
    peer = AckingPeer(server.zds_socket)
    try:
        peer.wait_snapshot()
        add = {"Netns": "/proc/self/ns/net", "PodName": "web", "PodNamespace": "default", "ContainerID": cid}
        status, text = post_unix(server.cni_socket, "/cmdadd", json.dumps(add).encode())
        assert status == 500 and "the node is never enrolled as a pod" in text, text
        server.wait_for_output("refused CNI add event")
        [line] = [line for line in server.output().splitlines() if "the node is never enrolled" in line]
        assert " warning zds.server.cni: refused CNI add event: " in line, line
        assert "Traceback" not in server.output()
    finally:
        peer.close()
        server.stop()


def test_a_container_without_the_container_label_is_another_node_agents(
    tmp_path: Path, engine: StandInEngine, make_pod: Callable[[], Pod], in_netns: Callable[[Pod], int]
) -> None:
    """With --container-label, zds-cni's ADD for an ambient container without that label
    waited 10 s for facts the engine's label filter kept away, then blamed the engine; it is
    now answered at once: not this node agent's. And a pod of a container that is no longer
    its own (restarted with another --container-label) goes at the reconcile (it stayed,
    followed by nobody)."""
    a, b = make_pod(), make_pod()
    ours, other = "a" * 64, "b" * 64
    engine.containers[ours] = inspection(ours, "ours", a, in_netns(a))
    engine.containers[ours]["Config"]["Labels"] = {**AMBIENT, "zds-test": "1"}
    engine.containers[other] = inspection(other, "other", b, in_netns(b))
    first = NodeAgentProc(
        str(tmp_path), "--container-engine", engine.path, "--container-label", "zds-test=1", name="first"
    ).wait_ready()
    try:
        wait_until(lambda: [p.uid for p in first.list_pods()] == [ours], "only the labelled container's pod")
        add = {"Netns": b.path, "PodName": "other", "PodNamespace": "default", "ContainerID": other}
        status, text = post_unix(first.cni_socket, "/cmdadd", json.dumps(add).encode())
        assert (status, text) == (
            200,
            "not selected: container other is without the label(s) zds-test=1 (--container-label)\n",
        )
        assert [p.uid for p in first.list_pods()] == [ours]
    finally:
        first.stop()
    second = NodeAgentProc(
        str(tmp_path), "--container-engine", engine.path, "--container-label", "zds-test=2", name="second"
    ).wait_ready()
    try:
        wait_until(lambda: second.list_pods() == [], "the pod of a container no longer its own removed")
    finally:
        second.stop()


def test_an_engine_that_does_not_answer_costs_no_session_per_try(tmp_path: Path) -> None:
    """An engine socket nobody listens on: each try's HTTP session was left open when the
    first request failed (asyncio said ``Unclosed client session`` for each at the stop, and
    they piled up while the engine stayed away). Each is closed with its try now."""
    path = str(tmp_path / "engine.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # a socket file nobody listens on: each connect is refused
    server = NodeAgentProc(str(tmp_path), "--container-engine", path).wait_ready()
    try:
        wait_until(lambda: server.output().count("next try in") >= 3, "three failed tries", timeout=20)
    finally:
        server.stop()
    assert "Connection refused" in server.output(), server.output()
    assert "Unclosed" not in server.output(), server.output()
