"""`zds netns create --bridge`: pods that outlive the command and reach each other."""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.harness import ZDS, catches, free_subnets, run_all, wait_until
from zds.netns.apps import EchoServer, exchange
from zds.netns.fixtures import delete_netns, list_netns

pytestmark = pytest.mark.root


def zds(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZDS, "netns", *args], capture_output=True, text=True, timeout=60)


def remove_all(pods: Sequence[str], bridge: str) -> None:
    """Delete the pods' namespaces and the bridge, every one whichever fails."""
    steps: list[Callable[[], object]] = [
        functools.partial(delete_netns, name, missing_ok=True) for name in pods
    ]
    steps.append(lambda: subprocess.run(["ip", "link", "del", bridge], capture_output=True))
    run_all(steps, "pods and bridge")


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def names() -> Iterator[tuple[str, str, str]]:
    tag = secrets.token_hex(2)
    made = (f"zdst-{tag}-a", f"zdst-{tag}-b", f"zdsb{tag}")
    yield made
    remove_all(made[:2], made[2])


def test_pods_made_by_separate_commands_share_the_bridge_and_talk(names: tuple[str, str, str]) -> None:
    a, b, bridge = names
    subnets = free_subnets()
    subnet = ["--subnet4", subnets.v4, "--subnet6", subnets.v6]
    first = zds("create", a, "--bridge", bridge, *subnet)
    second = zds("create", b, "--bridge", bridge, *subnet)  # another process: the bridge is reused
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split()[1:3] == [subnets.ip4(2), subnets.ip6(2)]
    assert second.stdout.split()[1:3] == [subnets.ip4(3), subnets.ip6(3)]  # the next free address
    listed = {e["name"]: e for e in json.loads(zds("list", "--json").stdout)}
    assert listed[b]["addresses"] == [subnets.ip4(3), subnets.ip6(3)]
    app = EchoServer(f"/var/run/netns/{b}", 7000)
    try:
        assert exchange(f"/var/run/netns/{a}", subnets.ip4(3), 7000, b"ping") == b"ping"
        assert exchange(f"/var/run/netns/{a}", subnets.ip6(3), 7000, b"ping6") == b"ping6"
    finally:
        app.close()
    deleted = zds("delete", a, b, "--bridge", bridge)
    assert deleted.returncode == 0, deleted.stderr
    assert a not in list_netns() and b not in list_netns()
    left = links()
    assert bridge not in left
    assert f"zv-{a}" not in left and f"zv-{b}" not in left, "the pods' veths are gone"


def test_a_bridge_with_other_addresses_is_refused(names: tuple[str, str, str]) -> None:
    a, _, bridge = names
    mine, other = free_subnets(), free_subnets()
    assert zds("create", a, "--bridge", bridge, "--subnet4", mine.v4, "--subnet6", mine.v6).returncode == 0
    refused = zds("create", "zdst-never", "--bridge", bridge, "--subnet4", other.v4, "--subnet6", other.v6)
    assert refused.returncode == 1
    assert f"bridge {bridge} exists but does not have {other.ip4(1)}" in refused.stderr
    assert "zdst-never" not in list_netns()
    zds("delete", a, "--bridge", bridge)


def test_delete_takes_only_links_zds_netns_made(names: tuple[str, str, str]) -> None:
    """A bridge, or any link, named as --bridge says but made by someone else (docker0 on a
    real node) stays, said in one line; so does a host link named like a pod's veth."""
    a, _, bridge = names
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    veth = f"zv-{a}"
    subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"zp{bridge[4:]}"], check=True)
    try:
        done = zds("delete", a, "--missing-ok", "--bridge", bridge)
        assert done.returncode == 0  # (a note: it said so as an error)
        assert done.stderr.startswith(f"zds netns delete: note: bridge {bridge} kept")
        assert "zds netns did not make it" in done.stderr
        left = links()
        assert bridge in left and veth in left
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)


@pytest.mark.parametrize("after", [0.0, 0.3])
def test_sigterm_while_pods_are_made_on_a_bridge_leaves_all_of_them_or_none(after: float) -> None:
    """SIGTERM killed it where it stood: the bridge with its addresses and 31 of 60 pods were
    left, none printed ("what this call made is undone" held for Ctrl-C only). SIGTERM is now
    taken as Ctrl-C: whenever it comes once zds netns took it over (before that, as any
    program's start-up, the default kills it: nothing is made yet), the pods are all there
    (and printed) or none is."""
    import signal
    import time

    tag = secrets.token_hex(2)
    pods, bridge = [f"zdst-{tag}-{i}" for i in range(40)], f"zdsb{tag}"
    subnets = free_subnets()
    proc = subprocess.Popen(
        [
            *ZDS,
            "netns",
            "create",
            "--bridge",
            bridge,
            "--subnet4",
            subnets.v4,
            "--subnet6",
            subnets.v6,
            *pods,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # (a fresh clone compiles every module at its first start: the handler comes late)
        wait_until(lambda: proc.poll() is not None or catches(proc.pid, signal.SIGTERM), "SIGTERM taken over")
        time.sleep(after)  # when the signal lands is the point (either outcome is checked)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        made = [name for name in pods if name in list_netns()]
        assert proc.returncode in (0, 143), (proc.returncode, out)  # (143 = 128 + SIGTERM: it took effect)
        assert err == ""  # (pyroute2's "Exception ignored ... Event loop is closed" came out)
        if made:  # it was done before the signal took effect (then 0, or 143 once all were told)
            assert made == pods and len(out.splitlines()) == len(pods)
        else:
            assert proc.returncode == 143 and out == ""
            assert bridge not in links() and f"zv-{pods[0]}" not in links()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_all(pods, bridge)


def test_a_link_that_is_not_a_bridge_is_refused_in_one_line_and_kept() -> None:
    """It failed with a bare "(95, 'Operation not supported')"."""
    tag = secrets.token_hex(2)
    link, pod = f"zdsv{tag}", f"zdst-{tag}-x"
    subnets = free_subnets()
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"zdsw{tag}"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{subnets.ip4(1)}/24", "dev", link], check=True)
        done = zds("create", "--bridge", link, "--subnet4", subnets.v4, "--subnet6", subnets.v6, pod)
        assert done.returncode == 1
        assert done.stderr.splitlines() == [
            f"zds netns create: {link} exists and is not a bridge (a veth); pick another --bridge"
        ]
        assert pod not in list_netns() and link in links()
    finally:
        delete_netns(pod, missing_ok=True)
        subprocess.run(["ip", "link", "del", link], capture_output=True)


@pytest.mark.parametrize("after", ["create_netns", "_wire_pod"])
def test_an_interrupt_right_after_a_pod_part_is_made_leaves_nothing(
    after: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CI run of a fresh clone left one netns of 40 after SIGTERM (exit 130): a signal
    landing between a netns being made and its undo being noted left it for good. Here the
    interrupt comes exactly there: SIGTERM to this process as the part returns."""
    import os
    import signal

    from zds import runtime
    from zds.netns import podnet

    real = getattr(podnet, after) if after == "create_netns" else getattr(podnet.PodNetwork, after)

    def then_interrupted(*args: object, **kwargs: object) -> object:
        done = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return done

    if after == "create_netns":
        monkeypatch.setattr(podnet, "create_netns", then_interrupted)
    else:
        monkeypatch.setattr(podnet.PodNetwork, "_wire_pod", then_interrupted)
    tag = secrets.token_hex(2)
    pods, bridge = [f"zdst-{tag}-{i}" for i in range(2)], f"zdsb{tag}"
    subnets = free_subnets()
    told: list[object] = []
    try:
        with pytest.raises(KeyboardInterrupt), runtime.Interrupts():
            podnet.create_pods_on_bridge(pods, bridge, subnets.v4, subnets.v6, told.extend)
        assert [name for name in pods if name in list_netns()] == [] and told == []
        assert bridge not in links() and f"zv-{pods[0]}" not in links()
    finally:
        remove_all(pods, bridge)


def test_a_bridge_someone_else_made_is_not_used_and_a_subnet_in_use_not_taken_again(
    names: tuple[str, str, str],
) -> None:
    """A bridge of someone else's with the gateway address was taken as a pod bridge (the pod
    on a bridge that was down, with no IPv6 gateway); a new bridge on a subnet another bridge
    has got the same gateway address and handed out addresses already in use."""
    a, b, bridge = names
    subnets = free_subnets()
    subnet = ["--subnet4", subnets.v4, "--subnet6", subnets.v6]
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", f"{subnets.ip4(1)}/24", "dev", bridge], check=True)
    foreign = zds("create", a, "--bridge", bridge, *subnet)
    assert foreign.returncode == 1
    assert foreign.stderr == (
        f"zds netns create: bridge {bridge} exists and zds netns did not make it; pick another --bridge\n"
    )
    other = f"zdsc{secrets.token_hex(2)}"
    try:
        taken = zds("create", b, "--bridge", other, *subnet)  # a new bridge, on that bridge's subnet
        assert taken.returncode == 1
        assert (  # (only the IPv4 one: it said both)
            f"the pod subnet {subnets.v4} is in use on this host ({subnets.ip4(1)} on {bridge});"
            " pick another (--subnet4)"
        ) in taken.stderr
        assert a not in list_netns() and b not in list_netns() and other not in links()
    finally:
        subprocess.run(["ip", "link", "del", other], capture_output=True)


def test_delete_without_bridge_takes_the_pods_veth_also_while_the_netns_lives_on(
    names: tuple[str, str, str],
) -> None:
    """A netns something holds (the node agent, here this test) outlives its name, and its
    veth pair with it: `delete --force` without --bridge left the veth on the bridge and its
    address was handed out again."""
    a, b, bridge = names
    subnets = free_subnets()
    subnet = ["--subnet4", subnets.v4, "--subnet6", subnets.v6]
    assert zds("create", a, "--bridge", bridge, *subnet).returncode == 0
    held = os.open(f"/var/run/netns/{a}", os.O_RDONLY)
    try:
        deleted = zds("delete", a, "--force")
        assert deleted.returncode == 0, deleted.stderr
        assert f"zv-{a}" not in links()
        again = zds("create", b, "--bridge", bridge, *subnet)
        assert again.returncode == 0, again.stderr
        assert again.stdout.split()[1] == subnets.ip4(2)  # free again
    finally:
        os.close(held)
        zds("delete", b, "--bridge", bridge)


def test_netns_names_with_a_newline_and_stale_directories() -> None:
    """A name ending in a newline was made (the regex's $ matched before it) and broke the
    table; a directory where a netns belongs was said to go with zds netns delete (which cannot)."""
    refused = zds("create", "zdst-nl\n")
    assert refused.returncode == 1 and "zdst-nl\n" not in list_netns(), refused.stderr
    stale = f"/var/run/netns/zdst-dir-{secrets.token_hex(2)}"
    os.mkdir(stale)
    try:
        [entry] = [e for e in json.loads(zds("list", "--json").stdout) if e["path"] == stale]
        assert entry["error"] == f"a directory, not a namespace; remove it with rmdir {stale}"
    finally:
        os.rmdir(stale)


def test_delete_says_when_the_node_agent_does_not_answer(names: tuple[str, str, str], tmp_path: Path) -> None:
    a, _, _ = names
    assert zds("create", a).returncode == 0
    dead = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(dead)  # bound, never listened on
        deleted = zds("delete", a, "--control-socket", dead)
    assert deleted.returncode == 0 and a not in list_netns()
    assert deleted.stderr.startswith(f"zds netns delete: warning: cannot reach the node agent at {dead}: ")
    assert deleted.stderr.endswith("; deleting without knowing whether a pod lives there\n"), deleted.stderr
    assert len(deleted.stderr.splitlines()) == 1


def test_delete_names_no_timeout_flag_when_the_node_agent_is_silent(
    names: tuple[str, str, str], tmp_path: Path
) -> None:
    """The warning said "(--timeout)", a flag zds netns delete does not have."""
    a, _, _ = names
    assert zds("create", a).returncode == 0
    silent = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(silent)
        sock.listen(8)  # connections wait in the backlog: never accepted, never answered
        deleted = zds("delete", a, "--control-socket", silent)
    assert deleted.returncode == 0 and a not in list_netns()
    assert deleted.stderr == (
        f"zds netns delete: warning: no answer from the node agent at {silent} within 5 s: busy, or not "
        "a node agent; what was asked may still be done there; deleting without knowing whether a pod "
        "lives there\n"
    )
