"""A node agent that loses nothing: real processes killed and restarted, real namespaces,
real rules, real traffic. The pod store, recovery, one instance per socket, liveness."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import (
    ZDS,
    Namespaces,
    NodeAgentProc,
    ZtunnelProc,
    failing_ip6tables_save,
    fd_count,
    iptables_save,
    pod_network,
    run_all,
    wait_until,
)
from tests.standins import AckingPeer, RawPeer, request_of
from zds import defaults
from zds.netns import NetnsIdentity, in_netns, netns_identity, open_netns
from zds.netns.apps import EchoServer
from zds.netns.apps import exchange as exchange_from
from zds.protocol.messages import AddWorkload, KeepWorkload
from zds.server.store import PROBE_EVERY

pytestmark = pytest.mark.root

APP_PORT = 8080


class Agents:
    """``zds server`` processes sharing ``tmp`` (sockets, state): a second one is a restart."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = str(tmp)
        self.started: list[NodeAgentProc] = []

    def start(
        self, *extra: str, redirect: bool = False, ready: bool = True, env_path: str | None = None
    ) -> NodeAgentProc:
        name = f"server-{len(self.started)}"
        proc = NodeAgentProc(self.tmp, *extra, name=name, redirect=redirect, env_path=env_path)
        self.started.append(proc)
        return proc.wait_ready() if ready else proc

    def close(self) -> None:
        run_all([proc.stop for proc in self.started], "node agents")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Agents]:
    made = Agents(tmp_path)
    try:
        yield made
    finally:
        made.close()


def pods_file(path: Path, pods: dict[str, str]) -> str:
    path.write_text("".join(json.dumps({"uid": uid, "netns": netns}) + "\n" for uid, netns in pods.items()))
    return str(path)


def listed(server: NodeAgentProc) -> dict[str, object]:
    return {p.uid: p for p in server.list_pods()}


def istio_rules(path: str) -> list[str]:
    with open_netns(path) as ns, in_netns(ns):
        return [line for line in iptables_save().splitlines() if "ISTIO" in line]


# -- the store across a SIGKILL ---------------------------------------------------------


def test_a_pod_add_that_returned_survives_a_sigkill_right_after(
    agents: Agents, namespaces: Namespaces
) -> None:
    netns = namespaces.make("a")
    server = agents.start()
    done = server.cli("pod", "add", "--uid", "u1", "--name", "web", "--namespace", "shop", "--netns", netns)
    assert done.returncode == 1 and "no ztunnel connection" in done.stderr  # cached all the same
    server.stop(signal.SIGKILL)
    restarted = agents.start()
    [pod] = restarted.list_pods()
    assert (pod.uid, pod.name, pod.namespace, pod.netns_path, pod.recovery) == (
        "u1",
        "web",
        "shop",
        netns,
        "restored",
    )
    assert NetnsIdentity(pod.netns.dev, pod.netns.ino) == NetnsIdentity(*_stat_identity(netns))
    assert "recovered 1 pod(s)" in restarted.output() and "1 restored" in restarted.output()


def _stat_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_sigkill_with_200_pods_rules_and_live_traffic_drops_nothing(agents: Agents, tmp_path: Path) -> None:
    tag = secrets.token_hex(2)
    net = pod_network(f"zdsr{tag}")
    namespaces = Namespaces()
    app: EchoServer | None = None
    ztunnel: ZtunnelProc | None = None
    traffic: Traffic | None = None
    try:
        a, b = net.add_pod(f"zst-{tag}-a"), net.add_pod(f"zst-{tag}-b")
        app = EchoServer(b.netns_path, APP_PORT)
        pods = {"p-a": a.netns_path, "p-b": b.netns_path}
        pods.update({f"p-{i:03d}": namespaces.make(f"{i:03d}") for i in range(198)})
        server = agents.start(redirect=True)
        ztunnel = ZtunnelProc(server.zds_socket, str(tmp_path / "ztunnel.log"), "--no-dns")
        wait_until(lambda: server.connected_count() == 1, "ztunnel connected")
        added = server.cli("pod", "add", "--from-file", pods_file(tmp_path / "pods.jsonl", pods))
        assert added.returncode == 0, added.stderr
        wait_until(lambda: len(ztunnel.workload_states()) == 200, "200 workloads in ztunnel")
        assert set(ztunnel.workload_states().values()) == {"Up"}

        # A connection relayed through both pods before the restart, kept open across it.
        held = _connect_in(a.netns_path, b.ipv4)
        assert _echo(held, b"before\n") == b"before\n"
        traffic = flow = Traffic(a.netns_path, b.ipv4)
        wait_until(lambda: flow.ok >= 3, "traffic flowing")

        server.stop(signal.SIGKILL)
        wait_until(
            lambda: "node agent closed the connection" in ztunnel.output(), "ztunnel sees the agent gone"
        )
        during = flow.ok
        wait_until(lambda: flow.ok >= during + 3, "traffic while the agent is down")

        restarted = agents.start(redirect=True)
        wait_until(
            lambda: "snapshot reconciled: 200 workload(s) held, 0 dropped" in ztunnel.output(),
            "ztunnel's snapshot from the restarted agent",
        )
        assert set(ztunnel.workload_states().values()) == {"Up"} and len(ztunnel.workload_states()) == 200
        after = flow.ok
        wait_until(lambda: flow.ok >= after + 3, "traffic after the restart")
        assert _echo(held, b"after\n") == b"after\n", "the relayed connection carries data after the restart"
        held.close()
        flow.stop()
        assert flow.failures == [], flow.failures
        assert "dropped" not in "".join(
            line for line in ztunnel.output().splitlines() if "reconciled" in line and "0 dropped" not in line
        )

        recovered = listed(restarted)
        assert len(recovered) == 200
        assert {p.recovery for p in recovered.values()} == {"restored"}  # type: ignore[attr-defined]
        assert all(p.rules_installed for p in recovered.values())  # type: ignore[attr-defined]

        removed = restarted.cli("pod", "remove", "--uid", "p-000")
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: "p-000" not in ztunnel.workload_states(), "p-000 dropped by ztunnel")
        assert istio_rules(pods["p-000"]) == []
    finally:
        if traffic is not None:
            traffic.stop()
        if ztunnel is not None:
            ztunnel.stop()
        agents.close()
        if app is not None:
            app.close()
        namespaces.close()
        net.close()


def _connect_in(netns: str, address: str) -> socket.socket:
    with open_netns(netns) as ns, in_netns(ns):
        sock = socket.create_connection((address, APP_PORT), timeout=10)
    return sock


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


class Traffic:
    """New connections from a pod to another, one after the other, until stopped."""

    def __init__(self, netns: str, address: str) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(netns, address), daemon=True)
        self._thread.start()

    def _run(self, netns: str, address: str) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            payload = f"exchange {n}\n".encode()
            try:
                if exchange_from(netns, address, APP_PORT, payload, timeout=10) == payload:
                    self.ok += 1
                else:
                    self.failures.append(f"exchange {n}: echo differs")
            except OSError as exc:
                self.failures.append(f"exchange {n}: {exc}")
            self._stop.wait(0.05)  # pacing of the load, not synchronisation

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


# -- recovery decides by identity ----------------------------------------------------------


def test_a_named_netns_recreated_under_the_same_name_is_not_taken_for_the_old_pod(
    agents: Agents, namespaces: Namespaces
) -> None:
    old = namespaces.make("a")
    old_identity = _stat_identity(old)
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", old)
    assert istio_rules(old) != []
    server.stop(signal.SIGKILL)
    # Hold the old netns while the name is reused: a namespace's inode number is only
    # unique while it lives (the kernel may give a new one a freed number).
    held = os.open(old, os.O_RDONLY | os.O_CLOEXEC)
    try:
        namespaces.delete("a")
        new = namespaces.make("a")
    finally:
        os.close(held)
    assert new == old and _stat_identity(new) != old_identity

    restarted = agents.start(redirect=True)
    [pod] = restarted.list_pods()
    assert pod.recovery == "netns replaced" and not pod.HasField("netns")
    assert not pod.rules_installed, "its rules went with its netns"
    assert istio_rules(new) == [], "the rules never go into a netns that is not the pod's"
    assert (
        "pod recovered without its netns (netns replaced): sent to ztunnel as KeepWorkload"
        in restarted.output()
    )
    peer = RawPeer(restarted.zds_socket)
    try:
        peer.hello()
        [entry] = peer.take_snapshot()
        assert request_of(entry) == KeepWorkload(uid="u1") and entry.fds == []
    finally:
        peer.close()


def test_a_netns_file_removed_while_its_process_lives_is_found_through_proc(
    agents: Agents, namespaces: Namespaces
) -> None:
    path = namespaces.make("a")
    identity = _stat_identity(path)
    holder = subprocess.Popen(["ip", "netns", "exec", os.path.basename(path), "sleep", "600"])
    try:
        wait_until(lambda: _proc_netns(holder.pid) == identity, "the process inside the netns")
        server = agents.start(redirect=True)
        server.cli("pod", "add", "--uid", "u1", "--netns", path)
        rules = istio_rules(path)
        server.stop(signal.SIGKILL)
        namespaces.delete("a")  # the file goes; the netns lives on in the process
        assert not os.path.exists(path)

        restarted = agents.start(redirect=True)
        [pod] = restarted.list_pods()
        assert pod.recovery == "netns found elsewhere" and pod.rules_installed
        assert (pod.netns.dev, pod.netns.ino) == identity
        assert istio_rules(f"/proc/{holder.pid}/ns/net") == rules
        peer = RawPeer(restarted.zds_socket)
        try:
            peer.hello()
            [entry] = peer.take_snapshot()
            assert isinstance(request_of(entry), AddWorkload)
            assert len(entry.fds) == 1 and netns_identity(entry.fds[0]) == NetnsIdentity(*identity)
            entry.close_fds()
        finally:
            peer.close()
    finally:
        holder.kill()
        holder.wait()


def _proc_netns(pid: int) -> tuple[int, int] | None:
    try:
        return _stat_identity(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def test_a_removal_a_crash_interrupted_is_finished_on_the_next_start(
    agents: Agents, namespaces: Namespaces
) -> None:
    path = namespaces.make("a")
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    assert istio_rules(path) != []
    server.stop(signal.SIGKILL)
    # What the store holds when a removal began (rules not yet out) and the agent died.
    from zds.server.store import PodStore

    store = PodStore.open(server.state_dir, used_before=True)
    store.mark_removing("u1")
    store.close()

    restarted = agents.start(redirect=True)
    assert restarted.list_pods() == []
    assert istio_rules(path) == []
    assert "finished the removal the last run began" in restarted.output()


def test_a_removal_the_store_cannot_record_removes_nothing_and_says_so(
    agents: Agents, namespaces: Namespaces
) -> None:
    """Removed without its row marked, the pod would come back at the next start, its rules
    installed again: when the store cannot be written (here made immutable; a full disk is
    the same), RemovePod fails in one line and the pod, its rules and its row stay."""
    path = namespaces.make("a")
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    files = [os.path.join(server.state_dir, f) for f in ("pods.db", "pods.db-wal")]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        done = server.cli("pod", "remove", "--uid", "u1")
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("zds pod remove: INTERNAL: cannot record the removal of pod u1 in the pod store")
    assert line.endswith("nothing was removed (the pod stays enrolled)")
    assert "u1" in listed(server) and istio_rules(path) != []
    server.stop()
    restarted = agents.start(redirect=True)
    assert "u1" in listed(restarted)
    assert restarted.cli("pod", "remove", "--uid", "u1").returncode == 0  # writable again: it goes
    assert istio_rules(path) == []


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """The state directory on a filesystem of its own (ext4 in a file, remounted read-only on
    an error, as a root filesystem usually is); calling what it yields makes it fail."""
    image, state = tmp_path / "disk.img", tmp_path / "state"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    state.mkdir()
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(state)], check=True)
    device = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(state)], capture_output=True, text=True, check=True
    ).stdout.strip()

    def fail() -> None:
        Path(f"/sys/fs/ext4/{os.path.basename(device)}/trigger_fs_error").write_text("zds test\n")

    try:
        yield fail
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)  # (its loop device goes with it)


def test_a_store_whose_disk_failed_is_said_so_at_stop_and_the_exit_status_is_1(
    failing_disk: Callable[[], None], agents: Agents, namespaces: Namespaces
) -> None:
    """Commits are on disk once checkpointed (synchronous=NORMAL), the last time as the node
    agent stops: a disk that failed since cannot take it, and that is said, not hidden; a
    write that fails makes the node agent not ready (it said ready while no pod could go in)."""
    server = agents.start("--http-listen", "127.0.0.1:0")
    server.cli("pod", "add", "--uid", "u1", "--netns", namespaces.make("a"))  # (no ztunnel: cached)
    assert "u1" in listed(server)
    failing_disk()
    refused = server.cli("pod", "add", "--uid", "u2", "--netns", namespaces.make("b"))
    assert refused.returncode == 1 and "INTERNAL" in refused.stderr, refused.stderr
    status, detail = server.http_get("/readyz")
    assert status == 503
    assert detail.startswith(f"the pod store's last write failed: pod store {server.state_dir}/pods.db: ")
    assert server.stop() == 1
    [line] = [line for line in server.output().splitlines() if "cannot write the pod store" in line]
    assert line.endswith(
        f"cannot write the pod store out as it closes: pod store {server.state_dir}/pods.db: disk I/O "
        "error; its disk or filesystem failed (see the kernel's log, dmesg); what was committed since "
        "its last checkpoint is in its -wal only: keep that file beside it"
    ), line


def test_a_node_agent_stopped_while_another_process_reads_its_store_loses_nothing_and_exits_0(
    agents: Agents, namespaces: Namespaces
) -> None:
    """Reading the store while the node agent runs is allowed (a sqlite3 shell, a backup), but
    a reader's transaction held the stop's last checkpoint back, and that was said as a store
    lost (an error line, exit 1) while its -wal kept every pod: now a warning, exit 0."""
    server = agents.start()
    for i in range(3):
        server.cli("pod", "add", "--uid", f"u{i}", "--netns", namespaces.make(f"a{i}"))
    reader = sqlite3.connect(f"file:{server.state_dir}/pods.db?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM pods").fetchone()[0] == 3
        assert server.stop() == 0
    finally:
        reader.close()
    out = server.output()
    assert "cannot write the pod store" not in out, out
    [line] = [line for line in out.splitlines() if "not written out" in line]
    assert " warning " in line and line.endswith(
        "another process reads it (a sqlite3 shell, a backup); nothing is lost, its -wal keeps the "
        "rest (synced) for the next start"
    ), line
    assert sorted(listed(agents.start())) == ["u0", "u1", "u2"]


def test_a_node_agent_whose_store_filled_up_is_not_ready_until_it_can_write_again(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """Not ready while its last write failed; once the disk has room again, ready again at
    the next /readyz (it tries a write that changes nothing, at most once a second: it stayed
    503 until a pod went in, and a pod source that waits for ready sends none)."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state)], check=True)
    try:
        server = agents.start("--http-listen", "127.0.0.1:0")
        server.cli("pod", "add", "--uid", "u1", "--netns", namespaces.make("a"))  # (no ztunnel: cached)
        assert server.http_get("/readyz")[0] == 200
        with contextlib.suppress(OSError), open(state / "filler", "wb") as filler:
            filler.write(b"\0" * (2 << 20))  # (ENOSPC: as full as it gets)
        full = server.cli("pod", "add", "--uid", "u2", "--netns", namespaces.make("b"))
        assert full.returncode == 1 and "database or disk is full" in full.stderr, full.stderr
        status, detail = server.http_get("/readyz")
        assert status == 503 and detail.startswith("the pod store's last write failed: pod store "), detail
        time.sleep(PROBE_EVERY)  # (a write is tried at most once a second: this one fails)
        status, detail = server.http_get("/readyz")
        assert status == 503 and "database or disk is full" in detail, detail
        os.unlink(state / "filler")
        time.sleep(PROBE_EVERY)
        assert server.http_get("/readyz")[0] == 200
        server.cli("pod", "add", "--uid", "u3", "--netns", namespaces.make("c"))
        assert server.http_get("/readyz")[0] == 200 and set(listed(server)) == {"u1", "u3"}
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def test_a_state_directory_on_a_full_filesystem_is_refused_at_start_saying_what_to_do(
    agents: Agents, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(state)], check=True)
    with contextlib.suppress(OSError), open(state / "filler", "wb") as filler:
        filler.write(b"\0" * (32 << 10))  # (ENOSPC: as full as it gets)
    try:
        refused = agents.start(ready=False)
        assert refused.wait_exit() == 1
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)
    [line] = [line for line in refused.output().splitlines() if "pod store" in line]
    assert line.endswith("free space on its filesystem (or use another --state-dir)"), line
    assert "Traceback" not in refused.output()


def stopped_while_stored(
    agents: Agents, pods: str, stored: int, timeout: float
) -> tuple[subprocess.Popen[str], str, str]:
    """``zds pod add --from-file pods`` against a node agent whose ztunnel never acks, stopped
    (SIGTERM) once ``stored`` pods are stored and wait for their acks: the client, its output."""
    server = agents.start("--ack-timeout", "60")
    slow = AckingPeer(server.zds_socket, delay=60)  # (its snapshot's ack too: nothing is acked)
    client = subprocess.Popen(
        [*ZDS, "pod", "add", "--from-file", pods, "--control-socket", server.control_socket],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(server.list_pods()) == stored, f"{stored} pods stored, waiting for acks")
        server.stop()
        out, err = client.communicate(timeout=timeout)
    finally:
        client.kill()
        client.wait()
        slow.close()
    return client, out, err


def test_pods_a_stop_cut_short_are_told_they_were_stored_and_come_back(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """A SIGTERM while a bulk enrollment waits for ztunnel's acks: each pod is answered, and
    the answer says it stays (the lane was closed first: "closed the connection without
    answering", as if nothing had been enrolled)."""
    pods = pods_file(tmp_path / "pods.jsonl", {f"u{i}": namespaces.make(f"p{i}") for i in range(3)})
    client, out, err = stopped_while_stored(agents, pods, 3, timeout=30)
    assert client.returncode == 1 and out == "" and len(err.splitlines()) == 3
    stays = (  # lost with the connection (sent, unanswered), or cut short (stored, not yet sent)
        r"ztunnel connection \w+ closed: node agent shutting down \(the pod is stored: it comes back when "
        r"the node agent starts again\)|node agent shutting down; the pod is stored: it comes back when the "
        r"node agent starts again"
    )
    for i, line in enumerate(sorted(err.splitlines())):
        assert re.fullmatch(rf"zds pod add: u{i}: UNAVAILABLE: ({stays})", line), line
    assert sorted(listed(agents.start())) == ["u0", "u1", "u2"]


def test_pods_a_bulk_enrollment_sends_once_the_stop_began_are_not_enrolled(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """The stop cancels the enrollments under way, each giving its place in the bulk window
    back: the lane took the next pod and enrolled it, and so on to the end of the file (1,000
    pods: a 20 s stop, every pod enrolled after the signal). Once the stop began, a pod the
    lane reads is answered "not enrolled" and nothing of it is stored."""
    paths = [namespaces.make(f"p{i}") for i in range(4)]
    count = defaults.BULK_WINDOW * 3
    pods = pods_file(tmp_path / "pods.jsonl", {f"u{i}": paths[i % 4] for i in range(count)})
    # Stopped once the window's pods are stored and wait for their acks; the rest wait for a place.
    client, out, err = stopped_while_stored(agents, pods, defaults.BULK_WINDOW, timeout=60)
    lines = err.splitlines()
    assert client.returncode == 1 and out == "" and len(lines) == count, err[-2000:]
    # Stored: the window's pods only, those the stop found under way (their answers say so;
    # each of the others, when the lane's answers reach the client, says "not enrolled").
    window = {f"u{i}" for i in range(defaults.BULK_WINDOW)}
    assert set(listed(agents.start())) == window
    for line in lines:
        uid = line.split(":")[1].strip()
        assert uid in window or "the pod is stored" not in line, line


def test_a_stop_signal_during_the_recovery_cuts_it_short_and_the_next_start_finishes_it(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """The stop waited for the whole start: every stored pod's rules reinstalled (~70 a second
    with iptables: 2,000 pods outlast kubelet's 30 s grace), "node agent ready", then the
    stop. A stop signal now cuts the recovery short: the pods under way finish, the rest stay
    stored as they were, and the next start recovers them all."""
    count = 200  # (~3 s of recovery here: the signal comes within its first pods)
    paths, restarted = recovering(agents, namespaces, tmp_path, "r", count)
    restarted.proc.send_signal(signal.SIGTERM)
    assert restarted.wait_exit(60) == 0, restarted.output()
    out = restarted.output()
    assert "stop requested during start-up: cutting it short" in out
    assert "node agent ready" not in out and not re.search(r"recovered \d+ pod", out), out
    final = agents.start("--redirect-backend", "iptables", redirect=True)
    assert sorted(listed(final)) == sorted(f"u{i}" for i in range(count))
    assert all(istio_rules(path) for path in paths)
    assert not any("istio-ambient" in nft_ruleset(path) for path in paths)


def recovering(
    agents: Agents, namespaces: Namespaces, tmp_path: Path, prefix: str, count: int
) -> tuple[list[str], NodeAgentProc]:
    """``count`` pods enrolled with the nftables backend, then a start with iptables' under way:
    each pod's nftables rules out, iptables' in, so the recovery takes a while. The pods' netns
    paths and the node agent in its recovery."""
    paths = [namespaces.make(f"{prefix}{i}") for i in range(count)]
    server = agents.start("--redirect-backend", "nftables", redirect=True)
    peer = AckingPeer(server.zds_socket)
    pods = pods_file(tmp_path / "pods.jsonl", {f"u{i}": path for i, path in enumerate(paths)})
    try:
        added = server.cli("pod", "add", "--from-file", pods)
    finally:
        peer.close()
    assert added.returncode == 0, added.stderr
    server.stop()
    restarted = agents.start("--redirect-backend", "iptables", redirect=True, ready=False)
    wait_until(lambda: "rules removed" in restarted.output(), "the recovery under way")
    return paths, restarted


def test_an_iptables_restore_under_way_does_not_outlive_a_sigkilled_node_agent(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """An ``iptables-restore`` the node agent forked kept running after a SIGKILL, and
    committed after the next start had recovered: rules no pod store row records (here: the
    install's), or taken out of a pod enrolled again meanwhile. It now dies with its parent."""
    path = namespaces.make("slow")
    fake = tmp_path / "bin"
    fake.mkdir()
    pid_file, go = tmp_path / "restore.pid", tmp_path / "go"
    (fake / "iptables-restore").write_text(
        f"#!/bin/sh\necho $$ > {pid_file}\n"
        f"while [ ! -e {go} ]; do sleep 0.05; done\n"  # (until the test lets it go)
        'exec /usr/sbin/iptables-restore "$@"\n'
    )
    (fake / "iptables-restore").chmod(0o755)
    server = agents.start(redirect=True, env_path=f"{fake}:{os.environ['PATH']}")
    peer = AckingPeer(server.zds_socket)
    adding = subprocess.Popen(
        [*ZDS, "pod", "add", "--uid", "u1", "--netns", path, "--control-socket", server.control_socket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    restore = 0
    try:
        wait_until(
            lambda: pid_file.exists() and pid_file.read_text().strip(), "the install's iptables-restore"
        )
        restore = int(pid_file.read_text())
        server.stop(signal.SIGKILL)
        wait_until(
            lambda: not os.path.exists(f"/proc/{restore}"), "the iptables-restore killed with its parent", 10
        )
    finally:
        go.touch()  # (a restore that outlived it goes on, and ends)
        peer.close()
        adding.wait(30)
    assert not istio_rules(path)
    restarted = agents.start(redirect=True)
    assert listed(restarted) == {} and not istio_rules(path)


def test_a_ztunnel_that_connects_during_the_recovery_waits_and_gets_its_snapshot_once_served(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """As Istio's agent (its ZDS listener is made before its snapshot), the ZDS socket is
    bound before the recovery: a ztunnel that connects meanwhile is not refused (it would back
    off, up to 15 s) but waits in the backlog, and gets the recovered pods once served."""
    count = 50
    _, restarted = recovering(agents, namespaces, tmp_path, "w", count)
    waiting = AckingPeer(restarted.zds_socket)
    try:
        assert "node agent ready" not in restarted.output(), "connected only after the recovery"
        restarted.wait_ready()
        waiting.wait_snapshot()
        assert waiting.kinds == ["add"] * count + ["snapshot_sent"]
        assert sorted(r.uid for r in waiting.received[:-1]) == sorted(f"u{i}" for i in range(count))  # type: ignore[union-attr]
    finally:
        waiting.close()


def test_a_store_that_cannot_be_written_is_refused_at_start_not_at_the_first_pod(
    agents: Agents, namespaces: Namespaces
) -> None:
    """SQLite opens a store it cannot write (here immutable; a read-only mount is the same)
    for reading without a word: the node agent was ready, then refused every pod it was
    given. It now refuses to start, in one line naming the file, and the store is unchanged."""
    path = namespaces.make("a")
    server = agents.start()
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    server.stop()
    db = os.path.join(server.state_dir, "pods.db")
    before = Path(db).read_bytes()
    subprocess.run(["chattr", "+i", db], check=True)
    try:
        refused = agents.start(ready=False)
        assert refused.wait_exit() == 1
    finally:
        subprocess.run(["chattr", "-i", db], check=True)
    [line] = refused.output().splitlines()  # that line alone (no "node agent stopped" after it)
    assert line.endswith(
        f"pod store {db} cannot be written (the file is not writable); make the file, "
        "its -wal and its directory writable (permissions, chattr -i, a read-only mount)"
    ), line
    assert "Traceback" not in refused.output()
    assert not os.path.exists(refused.zds_socket)
    assert Path(db).read_bytes() == before
    # (nothing of its own either: SQLite, opening it read-only, made a -wal and -shm beside it)
    assert not os.path.exists(db + "-wal") and not os.path.exists(db + "-shm")
    restarted = agents.start()  # writable again: the pod is there
    assert list(listed(restarted)) == ["u1"]


def _stopped_mid_bulk_enrollment(
    agents: Agents, namespaces: Namespaces, tmp_path: Path, sig: int
) -> tuple[NodeAgentProc, dict[str, str]]:
    """A node agent with rules, stopped by ``sig`` once a bulk enrollment of 40 pods has
    installed its first rules; it, and uid -> netns path of the 40."""
    paths = {f"u{i}": namespaces.make(f"m{i}") for i in range(40)}
    server = agents.start(redirect=True)
    peer = AckingPeer(server.zds_socket)
    adding: subprocess.Popen[str] | None = None
    try:
        peer.wait_snapshot()
        pods = pods_file(tmp_path / "pods.jsonl", paths)
        adding = subprocess.Popen(
            [*ZDS, "pod", "add", "--from-file", pods, "--control-socket", server.control_socket],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        server.wait_for_output("in-pod redirection rules installed")
        server.stop(sig)
    finally:
        peer.close()
        if adding is not None:
            adding.wait(60)
    return server, paths


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_node_agent_stopped_mid_enrollment_leaves_no_rules_its_store_does_not_record(
    agents: Agents, namespaces: Namespaces, tmp_path: Path, sig: int
) -> None:
    """Stopped while a bulk enrollment installs rules: an install under way finished in its
    thread after the enrollment was cancelled, and its rules stayed in a namespace no row
    records (the next start knew nothing of them; ztunnel never heard of the pod). Now what
    went in comes out, as after a failed install: every netns with rules has its pod's row."""
    server, paths = _stopped_mid_bulk_enrollment(agents, namespaces, tmp_path, sig)
    import sqlite3

    with sqlite3.connect(os.path.join(server.state_dir, "pods.db")) as raw:
        recorded = {uid for (uid,) in raw.execute("SELECT uid FROM pods")}
    with_rules = {uid for uid, path in paths.items() if istio_rules(path)}
    assert with_rules <= recorded, f"rules without a row: {sorted(with_rules - recorded)}"
    # Deliveries queued on the closing connection end with it, not with a traceback.
    assert "Traceback" not in server.output() and "ztunnel connection failed" not in server.output()
    restarted = agents.start(redirect=True)
    assert set(listed(restarted)) == recorded


@pytest.mark.parametrize(("column", "value"), [("namespace", "Shop"), ("name", "web\n")])
def test_a_stored_pod_whose_names_are_refused_now_is_removed_with_its_rules_and_a_leftover_of_it_too(
    agents: Agents, namespaces: Namespaces, column: str, value: str
) -> None:
    """A row whose names this version refuses (an earlier one took a name ending in a
    newline; or the row was edited) was dropped alone: its rules stayed in the pod's netns,
    recorded nowhere. Now it is removed as a removal is, rules and all; and a leftover row of
    that name has its rules taken out too (it was dropped the same way)."""
    pod, leftover = namespaces.make("a"), namespaces.make("b")
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", pod)
    server.cli("pod", "add", "--uid", "u2", "--netns", leftover)
    server.stop(signal.SIGKILL)
    from zds.server.store import PodStore

    store = PodStore.open(server.state_dir, used_before=True)
    try:  # u2 as a removal whose rules would not come out leaves the store
        row = next(row for row in store.load() if row.spec.uid == "u2")
        store.mark_removing("u2")
        store.keep_leftover(dataclasses.replace(row, removing=True))
        store.delete("u2")
    finally:
        store.close()
    with sqlite3.connect(os.path.join(server.state_dir, "pods.db")) as db:
        db.execute(f"UPDATE pods SET {column} = ?", (value,))
        db.execute(f"UPDATE leftovers SET {column} = ?", (value,))
    db.close()
    again = agents.start(redirect=True)
    assert again.list_pods() == []
    assert "pod refused on reload, removed" in again.output()
    assert not redirected(pod) and not redirected(leftover), again.output()


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_restart_with_no_redirect_takes_out_the_rules_an_earlier_run_installed(
    agents: Agents, namespaces: Namespaces, backend: str
) -> None:
    """Rules an earlier run installed, restarted with --no-redirect: they come out at recovery,
    while the row says which backend made them (a removal by this node agent, which installs
    none, would leave them for good); the pod stays, without rules."""
    path = namespaces.make("a")
    server = agents.start("--redirect-backend", backend, redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    assert redirected(path)
    server.stop()
    plain = agents.start()  # --no-redirect
    [pod] = plain.list_pods()
    assert pod.uid == "u1" and not pod.rules_installed
    assert not redirected(path)
    assert f"{backend} rules removed: this node agent installs none (--no-redirect)" in plain.output()


def test_a_no_redirect_start_told_no_ipv6_takes_earlier_rules_out_without_a_working_ip6tables(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """As an iptables node agent told --no-ipv6 needs no working ip6tables (the IPv6 side at
    best), neither does a --no-redirect one told so, taking out what an earlier run installed:
    its removal asked ip6tables-save as if IPv6 were on, failed, and left the pod recorded
    with rules (tried again for ever) though its IPv4 rules were out."""
    path = namespaces.make("a")
    server = agents.start("--no-ipv6", redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    assert redirected(path)
    server.stop()
    plain = agents.start("--no-ipv6", env_path=failing_ip6tables_save(tmp_path))  # --no-redirect
    [pod] = plain.list_pods()
    assert pod.uid == "u1" and not pod.rules_installed
    assert not redirected(path)
    assert "iptables rules removed: this node agent installs none (--no-redirect)" in plain.output()
    assert "cannot remove" not in plain.output()


@pytest.mark.parametrize(
    ("backend", "restarted_with"),
    [("nftables", ("--redirect-backend", "iptables")), ("iptables", ())],
    ids=["nftables-then-iptables", "iptables-then-no-redirect"],
)
def test_rules_an_earlier_run_could_not_take_out_come_out_at_the_next_start_whichever_backend(
    agents: Agents, namespaces: Namespaces, backend: str, restarted_with: tuple[str, ...]
) -> None:
    """A removal whose rules stayed in left them recorded in ``leftovers``, with the rule set
    that made them: the next start takes them out with that one, though it runs the other
    backend or none (the retry and recovery used this run's backend only)."""
    import sqlite3

    from zds.server.store import PodStore

    path = namespaces.make("a")
    server = agents.start("--redirect-backend", backend, redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    server.stop(signal.SIGKILL)
    store = PodStore.open(server.state_dir, used_before=True)
    try:  # as a removal whose rules would not come out leaves the store
        [row] = store.load()
        store.mark_removing("u1")
        store.keep_leftover(dataclasses.replace(row, removing=True))
    finally:
        store.close()
    assert redirected(path)
    restarted = agents.start(*restarted_with, redirect=bool(restarted_with))
    assert listed(restarted) == {}
    assert not redirected(path), "rules the store recorded stayed in the pod's netns"
    out = restarted.output()
    assert "rules a failed removal left before this start: what went in is taken out" in out
    assert f"{backend} rules removed" in out
    restarted.stop()
    with sqlite3.connect(os.path.join(server.state_dir, "pods.db")) as raw:
        assert raw.execute("SELECT uid FROM leftovers").fetchall() == []


def nft_ruleset(path: str) -> str:
    with open_netns(path) as ns, in_netns(ns):
        return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


def redirected(path: str) -> bool:
    """Istio's in-pod rules of either backend are in the netns at ``path``."""
    return "istio" in nft_ruleset(path) or istio_rules(path) != []


def _crashed_mid_install(state_dir: str, moved: str, written: list[tuple[str, str]]) -> None:
    """Make the pod store a node agent killed mid-enrollment leaves: ``moved``'s row in the
    installs table only (its rules went in, its row was never committed), and install rows
    for (uid, netns path) of ``written`` as if their rules were going in."""
    import asyncio
    import dataclasses

    from zds.netns import NetnsRef
    from zds.server.store import PodStore

    store = PodStore.open(state_dir, used_before=True)
    try:
        [row] = [r for r in store.load() if r.spec.uid == moved]
        store.delete(moved)
        rows = [row] + [
            dataclasses.replace(
                row,
                spec=row.spec._replace(uid=uid, netns=NetnsRef.of_path(path)),
                identity=NetnsIdentity(*_stat_identity(path)),
                cookie=None,
            )
            for uid, path in written
        ]

        async def intend() -> None:
            await asyncio.gather(*(store.intend_soon(r) for r in rows))

        asyncio.run(intend())
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_rules_of_an_enrollment_a_crash_interrupted_come_out_on_the_next_start(
    agents: Agents, namespaces: Namespaces, backend: str
) -> None:
    """Killed after a pod's rules went in and before its row was committed, the node agent
    knew nothing of them at its next start: the pod's traffic stayed redirected to listeners
    no ztunnel opens, for good. Its install row (committed before the rules) says where they
    are: they come out, unless a recovered pod lives in that netns; the rows go."""
    a, b, c = namespaces.make("a"), namespaces.make("b"), namespaces.make("c")
    server = agents.start("--redirect-backend", backend, redirect=True)
    for uid, path in (("u1", a), ("u2", b)):
        assert server.cli("pod", "add", "--uid", uid, "--netns", path).returncode in (0, 1)
    assert redirected(a) and redirected(b)
    server.stop(signal.SIGKILL)
    # u1's rules are in a, and only an install row says so; u3 was going into b, where u2
    # lives; u4 into c, gone since.
    _crashed_mid_install(server.state_dir, "u1", [("u3", b), ("u4", c)])
    namespaces.delete("c")

    restarted = agents.start("--redirect-backend", backend, redirect=True)
    assert list(listed(restarted)) == ["u2"]
    assert not redirected(a), "rules no pod row records stayed in the pod's netns"
    assert redirected(b)
    out = restarted.output()
    said = "an enrollment a stop or crash interrupted while its rules went in: "
    assert f"{said}what went in is taken out" in out and "uid=u1" in out
    assert f"{said}its rules kept: a recovered pod lives in its netns" in out
    assert f"{said}its netns is gone" in out
    restarted.stop()
    import sqlite3

    with sqlite3.connect(os.path.join(server.state_dir, "pods.db")) as raw:
        assert raw.execute("SELECT uid FROM installs").fetchall() == []


def test_a_node_agent_killed_mid_enrollment_leaves_no_rules_the_next_start_does_not_know(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    """SIGKILL while a bulk enrollment installs rules (no clean-up runs): after the restart,
    every netns with rules in it has its pod."""
    _, paths = _stopped_mid_bulk_enrollment(agents, namespaces, tmp_path, signal.SIGKILL)
    restarted = agents.start(redirect=True)
    known = set(listed(restarted))
    with_rules = {uid for uid, path in paths.items() if istio_rules(path)}
    assert with_rules <= known, f"rules no pod of the restarted node agent has: {sorted(with_rules - known)}"


# -- ztunnel killed mid-snapshot -------------------------------------------------------------

KILLED_MID_SNAPSHOT = textwrap.dedent(
    """
    import os, signal, socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(sys.argv[1])
    sock.send(bytes.fromhex("0801"))
    for _ in range(int(sys.argv[2])):
        data, fds, _, _ = socket.recv_fds(sock, 1024, 4)
        sock.send(bytes.fromhex("0a00"))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_ztunnel_killed_in_the_middle_of_a_1000_pod_snapshot_is_followed_by_one_that_gets_all(
    agents: Agents, namespaces: Namespaces, tmp_path: Path
) -> None:
    netns = namespaces.make("shared")
    pods = {f"p-{i:04d}": netns for i in range(1000)}
    server = agents.start("--pods", pods_file(tmp_path / "pods.jsonl", pods))
    assert len(server.list_pods()) == 1000
    before = fd_count(server.pid)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SNAPSHOT, server.zds_socket, "400"], timeout=60, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    wait_until(lambda: server.connected_count() == 0, "the killed ztunnel's connection gone")
    peer = RawPeer(server.zds_socket)
    try:
        peer.hello()
        entries = peer.take_snapshot()
        uids = [request_of(e).uid for e in entries]  # type: ignore[union-attr]
        assert sorted(uids) == sorted(pods) and len(set(uids)) == 1000
        assert all(len(e.fds) == 1 for e in entries)
        for entry in entries:
            entry.close_fds()
    finally:
        peer.close()
    wait_until(lambda: fd_count(server.pid) <= before, "the agent's fds back to where they were")


# -- a refused start leaves what it found ----------------------------------------------------


def test_a_start_refused_for_a_missing_store_leaves_its_wal_which_may_hold_every_pod(agents: Agents) -> None:
    """pods.db moved away (a backup tool) after a kill -9: its -wal holds every pod. The start
    refused ("restore the file") and deleted the -wal and -shm with it, as if it had made them."""
    agents.start().stop(signal.SIGKILL)
    db = os.path.join(agents.started[0].state_dir, "pods.db")
    os.rename(db, db + ".aside")
    for suffix, content in (("-wal", b"the pages of every pod"), ("-shm", b"its index")):
        with open(db + suffix, "wb") as f:
            f.write(content)
    refused = agents.start(ready=False)
    assert refused.wait_exit() == 1
    assert f"pod store {db} is missing, but" in refused.output()
    with open(db + "-wal", "rb") as f:
        assert f.read() == b"the pages of every pod"
    assert os.path.exists(db + "-shm")


def test_a_first_start_refuses_a_wal_without_its_store_and_leaves_it(agents: Agents, tmp_path: Path) -> None:
    """A -wal with no pods.db in a state directory no node agent used (its lock file gone too):
    a store made beside it would take its pages."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "pods.db-wal").write_bytes(b"the pages of every pod")
    refused = agents.start(ready=False)
    assert refused.wait_exit() == 1
    assert f"pod store {state / 'pods.db'} is missing, but its -wal is there" in refused.output()
    assert sorted(os.listdir(state)) == ["pods.db-wal"]


def test_a_start_refused_for_a_store_that_is_a_dangling_symlink_leaves_the_symlink(
    agents: Agents, tmp_path: Path
) -> None:
    """pods.db a symlink to a volume not mounted yet: the start made nothing there, and
    removed the symlink as a store it had made."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.symlink(tmp_path / "volume" / "pods.db", state / "pods.db")
    refused = agents.start(ready=False)
    assert refused.wait_exit() == 1
    assert f"cannot open pod store {state / 'pods.db'}" in refused.output()
    assert os.readlink(state / "pods.db") == str(tmp_path / "volume" / "pods.db")


@pytest.fixture
def full_state_dir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/state on a small tmpfs; unmounted at the end."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "--lazy", str(state)], check=True)


def test_a_reset_whose_new_store_cannot_be_made_puts_the_old_one_back(
    agents: Agents, full_state_dir: Path
) -> None:
    """--reset-state on a full disk moved the store aside, failed to make the new one, and the
    next start without the flag said the store was missing (its .bak unnamed)."""
    agents.start().stop()
    before = sorted(os.listdir(full_state_dir))
    with open(full_state_dir / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:  # (until the disk is full)
            filler.write(b"x" * 4096)
    refused = agents.start("--reset-state", ready=False)
    assert refused.wait_exit() == 1
    assert "(--reset-state undone: the old pod store is back)" in refused.output()
    os.unlink(full_state_dir / "filler")
    assert sorted(os.listdir(full_state_dir)) == before
    agents.start().stop()  # (the old store, as it was)


# -- one instance per socket, and its socket files ------------------------------------------


@pytest.mark.parametrize("flag", ["--http-listen", "--grpc-listen"])
@pytest.mark.parametrize(("host", "named"), [("127.0.0.1", ""), ("localhost", " (127.0.0.1)")])
def test_a_tcp_address_something_holds_is_refused_before_the_store_or_any_socket(
    agents: Agents, tmp_path: Path, flag: str, host: str, named: str
) -> None:
    """Found when it was bound: after the pods were recovered (their rules in) and the ZDS
    socket served (a ztunnel waiting there took a snapshot from an agent that then exited),
    the gRPC one as gRPC core's own line before zds's, which named no errno. A host name was
    left to its server so, and gRPC served on the name's other addresses: each of its
    addresses is tried, the refusal names the one taken."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"{host}:{holder.getsockname()[1]}"
        extra = ("--grpc-insecure",) if flag == "--grpc-listen" else ()
        refused = agents.start(flag, address, *extra, ready=False)
        assert refused.wait_exit() == 1
    [line] = refused.output().splitlines()
    assert line.endswith(f"{flag} {address}{named}: Address already in use"), line
    assert not (tmp_path / "state").exists() and not os.path.exists(refused.zds_socket)


def test_a_reset_start_refused_later_puts_the_old_store_back(agents: Agents) -> None:
    """--reset-state, then a refusal after the new store was made (a file where the control
    socket's private directory goes): the old store stayed aside as a .bak, and the next
    start said the store was missing."""
    first = agents.start()
    state = first.state_dir
    first.stop()
    before = sorted(os.listdir(state))
    Path(first.control_socket + ".private").touch()
    refused = agents.start("--reset-state", ready=False)
    assert refused.wait_exit() == 1
    assert "--reset-state undone: the old pod store is back" in refused.output()
    assert sorted(os.listdir(state)) == before
    os.unlink(first.control_socket + ".private")
    agents.start().stop()


def test_a_second_server_with_the_same_flags_is_named_before_its_ports(agents: Agents) -> None:
    """The HTTP port the first one holds was refused first: "Address already in use",
    not which node agent holds it."""
    first = agents.start("--http-listen", "127.0.0.1:0")
    address = first.http_address()
    second = agents.start("--http-listen", address, ready=False)
    assert second.wait_exit() == 1
    assert f"another zds server (pid {first.pid}) is serving" in second.output()


def test_stop_signals_that_keep_coming_during_the_stop_do_not_cut_it_short(agents: Agents) -> None:
    """A second SIGTERM (an impatient operator, a supervisor) came once the stop had begun:
    its default action ended the process half-way (exit 143; socket and lock files left)."""
    server = agents.start()
    while server.proc.poll() is None:  # (polled: the pid stays ours until it is reaped)
        server.proc.send_signal(random.choice([signal.SIGTERM, signal.SIGINT]))
        time.sleep(0.001)  # pacing: signals one after another, not synchronisation
    assert server.proc.returncode == 0, server.output()
    assert "Traceback" not in server.output()
    assert "node agent stopped" in server.output()
    assert server.output().count("while stopping: ignored") <= 1
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert not os.path.exists(path) and not os.path.exists(path + ".lock")


def test_a_second_server_on_the_same_sockets_refuses_and_the_first_keeps_serving(agents: Agents) -> None:
    first = agents.start()
    second = agents.start(ready=False)
    assert second.wait_exit() == 1
    assert f"another zds server (pid {first.pid}) is serving {first.zds_socket}" in second.output()
    assert "Traceback" not in second.output()
    peer = RawPeer(first.zds_socket)
    try:
        peer.hello()
        assert peer.take_snapshot() == []
    finally:
        peer.close()
    assert first.list_pods() == []
    assert first.stop() == 0
    for path in (first.zds_socket, first.control_socket, first.cni_socket):
        assert not os.path.exists(path)


def test_a_second_server_refused_for_a_socket_leaves_no_state_dir_of_its_own(
    agents: Agents, tmp_path: Path
) -> None:
    first = agents.start()
    state = tmp_path / "second-state"
    (tmp_path / "second").mkdir()
    second = NodeAgentProc(
        str(tmp_path / "second"), "--zds-socket", first.zds_socket, "--state-dir", str(state), name="second"
    )
    try:
        assert second.wait_exit() == 1
        assert f"another zds server (pid {first.pid}) is serving {first.zds_socket}" in second.output()
        assert not state.exists(), "the refused start made a state directory and left it"
    finally:
        second.stop()


def test_a_second_server_on_the_same_state_dir_refuses(agents: Agents, tmp_path: Path) -> None:
    first = agents.start()
    other = tmp_path / "other"
    other.mkdir()
    second = NodeAgentProc(str(other), "--state-dir", first.state_dir, name="other")
    try:
        assert second.wait_exit() == 1
        assert f"another zds server (pid {first.pid}) is serving {first.state_dir}" in second.output()
        assert not os.path.exists(second.zds_socket)
        for path in (second.zds_socket, second.control_socket, second.cni_socket):
            assert not os.path.exists(path + ".lock"), "the refused start left its lock files"
    finally:
        second.stop()


def test_a_second_server_on_a_state_dir_whose_lock_file_was_deleted_still_refuses(
    agents: Agents, tmp_path: Path
) -> None:
    first = agents.start()
    os.unlink(os.path.join(first.state_dir, "zds.lock"))  # (somebody tidying up)
    other = tmp_path / "other"
    other.mkdir()
    second = NodeAgentProc(str(other), "--state-dir", first.state_dir, name="other")
    try:
        assert second.wait_exit() == 1
        lines = [line for line in second.output().splitlines() if first.state_dir in line]
        assert len(lines) == 1 and f"another zds server is serving {first.state_dir}" in lines[0]
        assert "Traceback" not in second.output()
        assert not os.path.exists(second.zds_socket)
        assert not os.path.exists(os.path.join(first.state_dir, "zds.lock")), (
            "the refused start left a lock file naming it, dead, as the state directory's holder"
        )
    finally:
        second.stop()
    assert first.list_pods() == []  # the first one serves on, its store its own
    assert first.stop() == 0


def test_on_exit_a_server_removes_only_the_socket_it_made(agents: Agents) -> None:
    server = agents.start()
    os.unlink(server.zds_socket)  # somebody replaced it meanwhile
    replacement = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        replacement.bind(server.zds_socket)
        assert server.stop() == 0
        assert os.path.exists(server.zds_socket), "a socket this server did not make stays"
        assert not os.path.exists(server.control_socket)
    finally:
        replacement.close()
        os.unlink(server.zds_socket)


@pytest.mark.parametrize(("content", "owner"), [(b"precious data\n", 0), (b"1234\n", 65534)])
def test_a_file_at_a_sockets_lock_path_that_is_no_zds_lock_is_refused_and_left_as_it_was(
    agents: Agents, content: bytes, owner: int
) -> None:
    """Any regular file at ``SOCKET.lock`` was taken: written over with the pid, then
    removed at the stop. A lock file a killed zds left (its pid in it) is still taken."""
    first = agents.start()
    first.stop(signal.SIGKILL)
    lock = first.control_socket + ".lock"
    assert os.path.exists(lock)  # (a killed one leaves its own: taken, below)
    killed = agents.start()
    killed.stop()
    with open(lock, "wb") as f:
        f.write(content)
    os.chown(lock, owner, -1)
    refused = agents.start(ready=False)
    assert refused.proc.wait(15) == 1
    refused.wait_for_output(f"{lock} is there and is not a zds lock file (")
    with open(lock, "rb") as f:
        assert f.read() == content
    assert os.stat(lock).st_uid == owner
    os.unlink(lock)


def test_a_clean_stop_leaves_only_the_state_directory_and_the_socket_directories(agents: Agents) -> None:
    """Each stop left a lock file beside every socket (a default start left
    /run/istio-cni/pluginevent.sock.lock behind for good). The directories made for the
    sockets stay, empty (a ztunnel container may have bind-mounted one)."""
    server = agents.start()
    assert server.stop() == 0
    for path in (server.zds_socket, server.control_socket, server.cni_socket):
        assert os.listdir(os.path.dirname(path)) == [], path
    # zds.lock stays: it says the state directory held a node agent (a pods.db gone is an error then).
    assert sorted(os.listdir(server.state_dir)) == ["pods.db", "zds.lock"]


def _private_dir(server: NodeAgentProc) -> str:
    """Where the node agent keeps its gRPC socket, behind the control socket's gate."""
    return server.control_socket + ".private"


def test_what_a_killed_server_left_beside_its_control_socket_is_cleared_by_the_next_one(
    agents: Agents,
) -> None:
    first = agents.start()
    private = _private_dir(first)
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert stat.S_ISSOCK(os.lstat(os.path.join(private, "grpc.sock")).st_mode)
    first.stop(signal.SIGKILL)
    assert os.listdir(private) == ["grpc.sock"], "a killed agent cannot clean up"

    second = agents.start()
    assert second.list_pods() == []  # through the gate, to the new gRPC socket
    assert second.stop() == 0
    assert not os.path.exists(private)
    assert not os.path.exists(second.control_socket)


@pytest.mark.parametrize("found", ["a file zds did not put there", "open to others", "a symlink", "a file"])
def test_a_private_control_dir_that_is_not_what_zds_leaves_is_refused_and_left_alone(
    agents: Agents, tmp_path: Path, found: str
) -> None:
    private = os.path.join(str(tmp_path), "zds", "control.sock.private")
    os.makedirs(os.path.dirname(private))
    if found == "a symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        os.symlink(tmp_path / "elsewhere", private)
        expected = f"{private} is a symlink"
    elif found == "a file":
        Path(private).write_text("mine\n")
        expected = f"{private} is not a directory"
    else:
        os.mkdir(private, 0o700)
        if found == "open to others":
            os.chmod(private, 0o755)
            expected = f"{private} is not a 0700 directory of this user"
        else:
            Path(private, "notes").write_text("mine\n")
            expected = f"{private} holds 'notes', which zds did not put there"

    def found_there() -> list[str] | str:
        return sorted(os.listdir(private)) if os.path.isdir(private) else Path(private).read_text()

    before = found_there()
    server = agents.start(ready=False)
    assert server.wait_exit() == 1
    lines = [line for line in server.output().splitlines() if "cannot serve the control API" in line]
    assert len(lines) == 1 and expected in lines[0], server.output()
    assert "Traceback" not in server.output()
    assert found_there() == before
    assert not os.path.exists(server.control_socket)


def test_a_control_socket_path_too_long_for_the_private_socket_beside_it_still_serves(tmp_path: Path) -> None:
    """A unix socket path has at most 107 bytes: with the control socket's at 100, the gRPC
    socket's (``….private/grpc.sock``) would not fit, and is bound through the directory's fd."""
    base = str(tmp_path)
    base += "/" + "d" * (100 - len(base) - len("/zds/control.sock") - 1)
    os.mkdir(base)
    server = NodeAgentProc(base)
    try:
        assert len(server.control_socket) == 100
        server.wait_ready()
        assert server.list_pods() == []
        assert server.stop() == 0
        assert not os.path.exists(_private_dir(server))
    finally:
        server.stop()


def test_a_corrupt_store_stops_the_server_in_one_line_and_stays_untouched(agents: Agents) -> None:
    first = agents.start()
    first.stop()
    db = Path(first.state_dir) / "pods.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    second = agents.start(ready=False)
    assert second.wait_exit() == 1
    assert f"pod store {db} is not a readable zds pod store" in second.output()
    assert "Traceback" not in second.output()
    assert db.read_bytes() == garbage


def test_reset_state_starts_empty_and_keeps_the_old_store(agents: Agents, namespaces: Namespaces) -> None:
    netns = namespaces.make("a")
    first = agents.start()
    first.cli("pod", "add", "--uid", "u1", "--netns", netns)
    first.stop()
    second = agents.start("--reset-state")
    assert second.list_pods() == []
    kept = [
        name for name in os.listdir(second.state_dir) if name.startswith("pods.db.") and name.endswith(".bak")
    ]
    assert len(kept) == 1
    assert "the old pod store was moved to" in second.output()


# -- liveness -------------------------------------------------------------------------------


def test_a_ztunnel_that_died_is_seen_gone_at_once_not_at_the_next_keepalive(agents: Agents) -> None:
    server = agents.start("--keepalive-interval", "600")
    peer = RawPeer(server.zds_socket)
    peer.hello()
    assert peer.take_snapshot() == []
    wait_until(lambda: server.connected_count() == 1, "the connection listed")
    peer.close()  # as a ztunnel that died: the kernel closes its end
    # With a 600 s keepalive only the socket's EOF can tell, and it must.
    wait_until(lambda: server.connected_count() == 0, "the connection gone", timeout=5)
    assert "ztunnel closed the connection" in server.output()


def test_a_netns_with_the_old_inode_but_another_cookie_is_not_taken_for_the_pod(
    agents: Agents, namespaces: Namespaces
) -> None:
    """An inode number can be reused by a netns made after the pod's was destroyed; the netns
    cookie (SO_NETNS_COOKIE) never is, so recovery checks it too."""
    import sqlite3

    path = namespaces.make("a")
    server = agents.start()
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    server.stop(signal.SIGKILL)
    db = os.path.join(server.state_dir, "pods.db")
    with sqlite3.connect(db) as raw:
        [(cookie,)] = raw.execute("SELECT netns_cookie FROM pods WHERE uid = 'u1'").fetchall()
        assert isinstance(cookie, int) and cookie > 0, "the cookie is recorded at enrollment"
        raw.execute("UPDATE pods SET netns_cookie = ? WHERE uid = 'u1'", (cookie + 1_000_000,))
    restarted = agents.start()
    [pod] = restarted.list_pods()
    assert pod.recovery == "netns replaced" and not pod.HasField("netns")


def _strip_cookie(server: NodeAgentProc) -> None:
    """Make the pods' rows as a store from before schema version 3 left them: no netns cookie."""
    with sqlite3.connect(os.path.join(server.state_dir, "pods.db")) as raw:
        raw.execute("UPDATE pods SET netns_cookie = NULL")


def test_a_netns_with_a_cookieless_rows_inode_but_none_of_its_rules_is_not_taken_for_the_pod(
    agents: Agents, namespaces: Namespaces
) -> None:
    """A row without a cookie (a store from before schema 3: upgraded, it keeps none) names its
    netns by inode number alone, which the kernel gives again to a netns made after the pod's
    was destroyed (at once: ``ip netns del a; ip netns add b`` gives b a's number). Such a netns
    has none of the rules the row records: it is not the pod's, never touched nor served."""
    path = namespaces.make("a")
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    server.stop(signal.SIGKILL)
    _strip_cookie(server)
    # What a netns made since with the same inode number looks like: none of our rules (taken
    # out by hand here, so that the number is the row's for sure).
    name = os.path.basename(path)
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "mangle", "raw"):
            for flag in ("-F", "-X"):
                subprocess.run(["ip", "netns", "exec", name, tool, "-t", table, flag], check=True)
    for family in ("-4", "-6"):
        subprocess.run(["ip", "-n", name, family, "rule", "del", "pref", "32764"], check=True)
        subprocess.run(["ip", "-n", name, family, "route", "flush", "table", "100"], check=True)
    assert istio_rules(path) == []

    restarted = agents.start(redirect=True)
    [pod] = restarted.list_pods()
    assert pod.recovery == "netns replaced" and not pod.HasField("netns")
    assert istio_rules(path) == [], "no rules go into a netns that may be another pod's"
    assert "has none of the rules the row records: not taken for the pod's" in restarted.output()


def test_a_cookieless_rows_netns_with_its_rules_is_restored(agents: Agents, namespaces: Namespaces) -> None:
    """A store from before schema 3, upgraded: its pods come back where their rules are."""
    path = namespaces.make("a")
    server = agents.start(redirect=True)
    server.cli("pod", "add", "--uid", "u1", "--netns", path)
    rules = istio_rules(path)
    server.stop(signal.SIGKILL)
    _strip_cookie(server)
    restarted = agents.start(redirect=True)
    [pod] = restarted.list_pods()
    assert pod.recovery == "restored" and pod.HasField("netns")
    assert istio_rules(path) == rules
