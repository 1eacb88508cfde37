"""The pods of CNI events whose netns is gone are removed (``--netns-sweep``): Istio's plugin
sends no event when a pod goes, and zds-cni's DEL is lost while the node agent is down; the
pod stayed enrolled, its netns kept alive by the node agent's fd and ztunnel's sockets. A
removal takes a pod out of the mesh: never one whose netns something still holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Namespaces, NodeAgentProc, post_unix, wait_until
from tests.standins import AckingPeer
from zds.netns import NetnsIdentity
from zds.protocol.messages import DelWorkload
from zds.server import netnssweep

pytestmark = pytest.mark.root

#: The capabilities the compose file gives the node agent: no CAP_SYS_PTRACE.
COMPOSE_CAPS = ("setpriv", "--bounding-set=-all,+sys_admin,+net_admin", "--inh-caps=-all")


def cni_add(server: NodeAgentProc, netns: str, name: str) -> None:
    """Istio's plugin's event: no container named, no DEL ever."""
    body = json.dumps({"Netns": netns, "PodName": name, "PodNamespace": "shop", "IPs": []}).encode()
    status, answer = post_unix(server.cni_socket, "/cmdadd", body)
    assert status == 200, answer


def listed(server: NodeAgentProc) -> set[str]:
    return {pod.name for pod in server.list_pods()}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test leaves inside a netns; killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def in_netns(pid: int, netns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
    except OSError:
        return False


def live_in(netns: str, processes: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["ip", "netns", "exec", os.path.basename(netns), "sleep", "infinity"])
    processes.append(proc)
    wait_until(
        lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(netns).st_ino, "a process in the netns"
    )
    return proc


def test_a_cni_pod_whose_netns_nothing_holds_is_removed_and_no_other(
    tmp_path: Path, namespaces: Namespaces, processes: list[subprocess.Popen[bytes]]
) -> None:
    server = NodeAgentProc(str(tmp_path), "--netns-sweep", "0.2").wait_ready()
    peer = AckingPeer(server.zds_socket)
    hold = tmp_path / "hold"
    hold.touch()
    mounted = False
    try:
        peer.wait_snapshot()
        gone, lived_in, mount, by_hand, stays = (
            namespaces.make(label) for label in ("gone", "lived", "mount", "hand", "stays")
        )
        for path, name in ((gone, "gone"), (lived_in, "lived-in"), (mount, "mounted"), (stays, "stays")):
            cni_add(server, path, name)
        server.add_pod("by-hand", by_hand, name="by-hand")
        # Held without its name: by a process in it, by a bind mount elsewhere.
        inside = live_in(lived_in, processes)
        subprocess.run(["mount", "--bind", mount, str(hold)], check=True)
        mounted = True
        gone_uid = {pod.name: pod.uid for pod in server.list_pods()}["gone"]
        for label in ("gone", "lived", "mount", "hand"):
            namespaces.delete(label)
        wait_until(lambda: "gone" not in listed(server), "the pod whose netns is gone removed")
        # (a removed pod leaves the list before its DelWorkload is sent: its rules go first)
        wait_until(lambda: "del" in peer.kinds, "the DelWorkload of the pod whose netns is gone")
        server.wait_for_output("its netns is gone")
        dels = [r for r in peer.received if isinstance(r, DelWorkload)]
        assert [d.uid for d in dels] == [gone_uid], peer.kinds  # (its own: ztunnel lets the netns go)
        assert listed(server) == {"lived-in", "mounted", "stays", "by-hand"}
        inside.kill()
        inside.wait()
        wait_until(lambda: "lived-in" not in listed(server), "the pod whose last process ended removed")
        subprocess.run(["umount", str(hold)], check=True)
        mounted = False
        wait_until(lambda: "mounted" not in listed(server), "the pod whose last mount went removed")
        # Not CNI's: the control API's pods go by hand, whatever became of their netns.
        assert listed(server) == {"stays", "by-hand"}
    finally:
        if mounted:
            subprocess.run(["umount", str(hold)], check=False)
        peer.close()
        server.stop()


def test_a_netns_bind_mounted_at_a_path_that_is_not_utf8_is_found(
    tmp_path: Path, namespaces: Namespaces
) -> None:
    """A mount point is any bytes: /proc/self/mountinfo read as text was a UnicodeDecodeError
    in every sweep while one that is not UTF-8 was mounted anywhere on the node."""
    for name in (b"\xff", b"a\rb", b"a\x1cb\x1d"):  # (str.splitlines split a line at the last two)
        netns = namespaces.make(f"odd{len(name)}")
        odd = os.fsencode(tmp_path) + b"/" + name
        with open(odd, "w"):
            pass
        subprocess.run(["mount", "--bind", netns, odd], check=True)
        namespaces.delete(f"odd{len(name)}")  # (bind-mounted at the odd path alone now)
        try:
            st = os.stat(odd)
            assert NetnsIdentity(st.st_dev, st.st_ino) in netnssweep._bind_mounted(), name
        finally:
            subprocess.run(["umount", odd], check=True)


def test_a_process_a_security_module_hides_makes_the_sweep_blind(monkeypatch: pytest.MonkeyPatch) -> None:
    """A denied look at a process's netns was taken for the process gone: the only holder of
    a pod's netns could be passed over and the pod removed. Pid 1's denial (the node's init,
    on some VMs) is not counted, as before. (No security module denies one on cue here: the
    denial is made up at the stat.)"""
    real_stat = os.stat

    def denied(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(path, str) and path.startswith(f"/proc/{hidden}/task/") and path.endswith("/ns/net"):
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied)  # (the module's os is this one)
    hidden = "1"
    assert netnssweep._threads_in("1") == set()
    hidden = str(os.getpid())
    with pytest.raises(netnssweep.Blind, match=f"the netns of process {hidden} cannot be seen"):
        netnssweep._threads_in(hidden)
    # A thread denied once, as the kernel denies one reaped meanwhile, then seen: counted.
    denials = [1]

    def denied_once(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(path, str) and path.endswith("/ns/net") and denials:
            denials.pop()
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", denied_once)
    st = real_stat(f"/proc/{hidden}/ns/net")
    assert NetnsIdentity(st.st_dev, st.st_ino) in netnssweep._threads_in(hidden)


def test_a_node_agent_that_cannot_see_every_process_removes_nothing_and_says_why(
    tmp_path: Path, namespaces: Namespaces, processes: list[subprocess.Popen[bytes]]
) -> None:
    # Without CAP_SYS_PTRACE (the compose file's capabilities) another process's netns cannot
    # be read: its pod was taken for gone and removed while the process lived in its netns.
    server = NodeAgentProc(str(tmp_path), "--netns-sweep", "0.2", wrapper=COMPOSE_CAPS).wait_ready()
    peer = AckingPeer(server.zds_socket)
    try:
        peer.wait_snapshot()
        path = namespaces.make("blind")
        cni_add(server, path, "lived-in")
        live_in(path, processes)
        namespaces.delete("blind")
        server.wait_for_output("netns sweep: without CAP_SYS_PTRACE the node agent cannot see")
        server.wait_for_output("no pod is removed while that lasts")
        assert listed(server) == {"lived-in"}
        assert not [r for r in peer.received if isinstance(r, DelWorkload)]
    finally:
        peer.close()
        server.stop()


def test_a_netns_held_by_processes_that_fork_and_exit_is_not_taken_for_gone(
    tmp_path: Path, namespaces: Namespaces, processes: list[subprocess.Popen[bytes]]
) -> None:
    # Each one forks and exits: /proc was listed once, the child came after the listing and
    # its parent was gone at its turn, so no process was found in the netns (299 looks of 300).
    server = NodeAgentProc(str(tmp_path), "--netns-sweep", "0.2").wait_ready()
    peer = AckingPeer(server.zds_socket)
    hop = "import os, time\ntime.sleep(1)\nend = time.time() + 4\nwhile time.time() < end:\n    if os.fork():\n        os._exit(0)\n"
    try:
        peer.wait_snapshot()
        path = namespaces.make("hop")
        cni_add(server, path, "hopping")
        first = subprocess.Popen(["ip", "netns", "exec", os.path.basename(path), sys.executable, "-c", hop])
        processes.append(first)
        wait_until(lambda: in_netns(first.pid, path), "the first of the chain in the netns")  # (it waits 1 s)
        namespaces.delete("hop")
        time.sleep(3)  # (15 looks: each sees the chain, or is given up)
        assert listed(server) == {"hopping"}, server.output()[-2000:]
        # The chain ends after 4 s: nothing holds the netns then.
        wait_until(lambda: not listed(server), "the pod removed once the chain ended")
    finally:
        peer.close()
        server.stop()
