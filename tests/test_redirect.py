"""In-pod redirection rules: the text equals Istio's golden files, and the rules
installed in a real namespace read back (iptables-save) exactly like the golden
rule set restored into a scratch namespace."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator

import grpc
import pytest

from tests.harness import DATA, NodeAgentProc, failing_ip6tables_save, pod_network, run_all, wait_until
from tests.standins import AckingPeer, RawPeer
from zds import runtime
from zds.gen import nodeagent_pb2
from zds.netns import in_netns, open_netns
from zds.netns.fixtures import create_netns, delete_netns
from zds.server import redirect as redirect_module
from zds.server.inpodrules import RedirectConfig, inpod_rules
from zds.server.iptablesave import cleanup_rules, foreign_jumps, unreadable_line
from zds.server.iptablesrun import run_tool
from zds.server.nftables import NftablesRedirector
from zds.server.redirect import RedirectError, Redirector, RulesNotOurs

GOLDEN4 = (DATA / "istio-inpod-iptables.golden").read_text()
GOLDEN6_FILE = (DATA / "istio-inpod-iptables-ipv6.golden").read_text()
#: The IPv6 probe SNAT address Istio's golden test data was generated with.
GOLDEN_PROBE6 = "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"


def golden_part(text: str, part: int) -> str:
    """Rules of the golden file without its two command-name lines: part 0 = IPv4, 1 = IPv6 (after the 3rd COMMIT)."""
    lines = [line for line in text.splitlines()[2:] if line.strip()]
    commits = [i for i, line in enumerate(lines) if line == "COMMIT"]
    chunk = lines[: commits[2] + 1] if part == 0 else lines[commits[2] + 1 :]
    return "\n".join(chunk) + "\n"


def test_ipv4_rules_are_istios_golden_rules() -> None:
    assert inpod_rules(4) == golden_part(GOLDEN4, 0)


def test_ipv6_rules_are_istios_golden_rules() -> None:
    assert golden_part(GOLDEN6_FILE, 0) == golden_part(GOLDEN4, 0)
    assert inpod_rules(6, RedirectConfig(probe_snat_ipv6=GOLDEN_PROBE6)) == golden_part(GOLDEN6_FILE, 1)


def test_without_dns_capture_no_port_53_rule_and_no_raw_table() -> None:
    rules = inpod_rules(4, RedirectConfig(dns_capture=False))
    assert "15053" not in rules and "* raw" not in rules and "--dport 53" not in rules
    assert "--to-ports 15001" in rules and "--to-ports 15006" in rules
    # Istio's golden for a pod without DNS capture (its IPv4 tables: mangle and nat only).
    golden = (DATA / "istio-inpod-iptables-nodns.golden").read_text()
    assert rules == "\n".join(line for line in golden.splitlines()[2:] if line.strip()) + "\n"


def test_a_tool_not_there_is_said_so_through_setpriv_too() -> None:
    """The tools run under ``setpriv --pdeathsig`` (on this machine): a missing one is
    setpriv's exit 127, said as a missing tool, as without setpriv."""
    assert runtime.killed_with_parent(), "setpriv (util-linux) is on every Debian"
    with pytest.raises(RedirectError) as failed:
        run_tool(["iptables-nowhere-save"])
    assert str(failed.value) == "iptables-nowhere-save not found; install Debian's iptables package"


def test_a_failing_tool_is_said_in_one_line() -> None:
    """ip6tables-restore says which lines failed on lines of their own: the refusal a client
    sees, and the log line, were several lines."""
    with pytest.raises(RedirectError) as failed:
        run_tool(
            [
                "sh",
                "-c",
                "echo 'ip6tables-restore v1.8.9 (nf_tables): ' >&2; echo 'line 2: failed' >&2; echo 'line 4: failed' >&2; exit 1",
            ]
        )
    said = str(failed.value)
    assert "\n" not in said and said.endswith(
        "failed (exit 1): ip6tables-restore v1.8.9 (nf_tables): line 2: failed; line 4: failed"
    )


def test_a_comment_cannot_forge_a_line_of_iptables_save() -> None:
    """A rule's comment is any bytes the pod wrote, and iptables-save prints them as they are:
    read with str.splitlines, one with \\x1c or \\r in it split its line, and a forged
    ``*filter`` hid the sidecar's jump into our chain below it, and our chains from the cleanup."""
    saved = (
        "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
        '-A OUTPUT -m comment --comment "x\x1c*filter\x1cy" -j ACCEPT\n'
        "-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    assert foreign_jumps(saved) == ["nat: -A OUTPUT -p tcp -j ISTIO_OUTPUT"]
    assert cleanup_rules(saved) == "*nat\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"


def test_cleanup_removes_exactly_our_jumps_and_chains() -> None:
    saved = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:OTHER - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A OUTPUT -j OTHER
COMMIT
*filter
:INPUT ACCEPT [0:0]
COMMIT
"""
    assert (
        cleanup_rules(saved) == "*nat\n-D OUTPUT -j ISTIO_OUTPUT\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"
    )
    assert cleanup_rules("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n") == ""


# -- real namespaces -------------------------------------------------------------------


def normalise(saved: str) -> list[str]:
    """iptables-save output without comments and counters, rules sorted within each chain."""
    out: list[str] = []
    rules: dict[str, list[str]] = {}
    for line in saved.splitlines():
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\s*\[\d+:\d+\]$", "", line)
        if line.startswith("-A "):
            rules.setdefault(line.split()[1], []).append(line)
        elif line == "COMMIT":
            for chain in sorted(rules):
                out += sorted(rules[chain])
            rules = {}
            out.append(line)
        else:
            out.append(line)
    return out


def saved_in(netns_path: str, tool: str = "iptables-save") -> str:
    with open_netns(netns_path) as ns, in_netns(ns):
        return subprocess.run([tool], capture_output=True, text=True, check=True).stdout


def restore_in(netns_path: str, rules: str, tool: str = "iptables-restore") -> None:
    with open_netns(netns_path) as ns, in_netns(ns):
        subprocess.run([tool], input=rules, text=True, check=True, capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    run_all([functools.partial(delete_netns, name, missing_ok=True) for name in made], "namespaces")


def scratch(namespaces: list[str]) -> str:
    name = f"zdst-{secrets.token_hex(3)}"
    path = create_netns(name)
    namespaces.append(name)
    return path


def install(path: str, config: RedirectConfig | None = None) -> list[int]:
    async def run() -> list[int]:
        with open_netns(path) as ns:
            return (await Redirector(config or RedirectConfig()).install(ns)).families

    return asyncio.run(run())


def remove(path: str) -> None:
    async def run() -> None:
        with open_netns(path) as ns:
            await Redirector().remove(ns)

    asyncio.run(run())


@pytest.mark.root
def test_installed_rules_read_back_like_the_golden_rule_set(namespaces: list[str]) -> None:
    pod, reference = scratch(namespaces), scratch(namespaces)
    # Without its two command-name lines: iptables-restore 1.8.9 here refuses them ("line 1 failed").
    restore_in(reference, golden_part(GOLDEN4, 0))
    assert install(pod) == [4, 6]  # (IPv6 too, whatever addresses the pod has: as Istio's default)
    assert normalise(saved_in(pod)) == normalise(saved_in(reference))
    assert "ISTIO_OUTPUT" in saved_in(pod)


@pytest.mark.root
def test_a_pod_without_ipv6_addresses_gets_the_ipv6_rules_too_unless_told_not_to(
    namespaces: list[str],
) -> None:
    """Istio installs the IPv6 rules and policy routing in every pod when its AMBIENT_IPV6 is on
    (its default), not by the pod's addresses; ``zds server --no-ipv6`` is that setting off."""
    reference, pod, v4_only = scratch(namespaces), scratch(namespaces), scratch(namespaces)
    restore_in(reference, golden_part(GOLDEN6_FILE, 1), "ip6tables-restore")
    assert install(pod, RedirectConfig(probe_snat_ipv6=GOLDEN_PROBE6)) == [4, 6]
    assert normalise(saved_in(pod, "ip6tables-save")) == normalise(saved_in(reference, "ip6tables-save"))
    assert "fwmark 0x111/0xfff lookup 100" in in_pod(pod, "ip", "-6", "rule")
    assert "local default dev lo" in in_pod(pod, "ip", "-6", "route", "show", "table", "100")
    assert install(v4_only, RedirectConfig(ipv6=False)) == [4]
    assert "ISTIO" not in saved_in(v4_only, "ip6tables-save") and "ISTIO" in saved_in(v4_only)
    assert "lookup 100" not in in_pod(v4_only, "ip", "-6", "rule")
    assert "lookup 100" in in_pod(v4_only, "ip", "-4", "rule")


@pytest.mark.root
def test_reinstalling_is_idempotent(namespaces: list[str]) -> None:
    pod = scratch(namespaces)
    install(pod)
    once = normalise(saved_in(pod))
    install(pod)
    install(pod)
    assert normalise(saved_in(pod)) == once
    assert sum(1 for line in once if line == "-A OUTPUT -j ISTIO_OUTPUT") == 3  # mangle, nat, raw: once each


@pytest.mark.root
def test_removal_leaves_no_istio_chain_and_no_policy_route(namespaces: list[str]) -> None:
    pod = scratch(namespaces)
    install(pod)
    with open_netns(pod) as ns, in_netns(ns):
        rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
    assert "fwmark 0x111/0xfff lookup 100" in rules
    remove(pod)
    assert "ISTIO" not in saved_in(pod)
    with open_netns(pod) as ns, in_netns(ns):
        rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
        table = subprocess.run(["ip", "route", "show", "table", "100"], capture_output=True, text=True).stdout
    assert "lookup 100" not in rules and table.strip() == ""
    remove(pod)  # removing twice is harmless


@pytest.mark.root
def test_a_pod_with_ipv6_gets_the_ipv6_rules_too(namespaces: list[str]) -> None:
    reference = scratch(namespaces)
    v6 = golden_part(GOLDEN6_FILE, 1)
    restore_in(reference, v6, "ip6tables-restore")
    net = pod_network(f"zdsb{secrets.token_hex(2)}")
    try:
        pod = net.add_pod(f"zdst-{secrets.token_hex(3)}")
        assert install(pod.netns_path, RedirectConfig(probe_snat_ipv6=GOLDEN_PROBE6)) == [4, 6]
        assert normalise(saved_in(pod.netns_path, "ip6tables-save")) == normalise(
            saved_in(reference, "ip6tables-save")
        )
    finally:
        net.close()


@pytest.mark.root
def test_ipv6_with_lo_ipv6_disabled_gets_the_rule_but_no_local_route(namespaces: list[str]) -> None:
    """IPv6 off on the pod's lo: the kernel refuses a ::/0 local route there, and the pod was
    refused for it; Istio skips that route (forEachLoopbackRoute), the rule all the same."""
    pod = scratch(namespaces)
    in_pod(pod, "sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1")
    assert install(pod) == [4, 6]

    def ip(*args: str) -> str:
        with open_netns(pod) as ns, in_netns(ns):
            return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    assert "fwmark 0x111/0xfff lookup 100" in ip("-6", "rule")
    assert ip("-6", "route", "show", "table", "100").strip() == ""
    assert "local default dev lo" in ip("route", "show", "table", "100")
    remove(pod)
    assert "lookup 100" not in ip("-6", "rule") + ip("rule")


@pytest.mark.root
def test_the_policy_routing_reads_as_istios_and_goes_whoever_made_it(namespaces: list[str]) -> None:
    """Istio's route is netlink's default protocol (``ip route`` prints no ``proto``); zds
    added its own as ``proto static`` and deleted with that, which left a route Istio's agent
    (or ``ip route add``) had made in place."""
    pod = scratch(namespaces)

    def ip(*args: str) -> str:
        with open_netns(pod) as ns, in_netns(ns):
            return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    install(pod)
    assert ip("route", "show", "table", "100").split() == ["local", "default", "dev", "lo", "scope", "host"]
    remove(pod)
    ip("rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
    ip("route", "add", "local", "default", "dev", "lo", "table", "100")
    remove(pod)
    assert "lookup 100" not in ip("rule") and ip("route", "show", "table", "100").strip() == ""


# -- through the node agent -----------------------------------------------------------------


@pytest.mark.root
def test_enrollment_installs_rules_and_removal_takes_them_out(
    tmp_path: object, namespaces: list[str]
) -> None:
    pod = scratch(namespaces)
    server = NodeAgentProc(str(tmp_path), redirect=True).wait_ready()
    try:
        with pytest.raises(grpc.RpcError) as info:  # no ztunnel: UNAVAILABLE, but enrolled with rules
            server.add_pod("u1", pod)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        [listed] = server.list_pods()
        assert listed.rules_installed
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved_in(pod)
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved_in(pod, "ip6tables-save")  # (no IPv6 address: as Istio)
        server.remove_pod("u1")
        assert "ISTIO" not in saved_in(pod) + saved_in(pod, "ip6tables-save")
    finally:
        server.stop()


@pytest.mark.root
def test_a_node_agent_told_no_ipv6_installs_the_ipv4_rules_only(
    tmp_path: object, namespaces: list[str]
) -> None:
    pod = scratch(namespaces)
    server = NodeAgentProc(str(tmp_path), "--no-ipv6", redirect=True).wait_ready()
    try:
        with pytest.raises(grpc.RpcError):  # (no ztunnel: enrolled with rules all the same)
            server.add_pod("u1", pod)
        assert server.list_pods()[0].rules_installed
        assert "-A OUTPUT -j ISTIO_OUTPUT" in saved_in(pod)
        assert "ISTIO" not in saved_in(pod, "ip6tables-save")
        assert "lookup 100" not in in_pod(pod, "ip", "-6", "rule")
    finally:
        server.stop()


@pytest.mark.root
def test_rules_forked_with_fork_not_vfork_work_and_leave_no_thread_in_the_pods_netns(
    tmp_path: pathlib.Path, namespaces: list[str]
) -> None:
    """CPython falls back to fork() when vfork() fails (and a loaded machine made it fail):
    gRPC's fork handlers then ran in the worker thread inside the pod's netns, started gRPC's
    threads there for good (the netns held after its pod and name were gone) and the forked
    iptables-save died (SIGSEGV, SIGABRT). With gRPC's fork support off, nothing of gRPC runs
    at a fork. Here every fork is a fork (``subprocess._USE_VFORK`` off)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import subprocess\nsubprocess._USE_VFORK = False\n")
    pods = [scratch(namespaces) for _ in range(2)]
    server = NodeAgentProc(str(tmp_path), redirect=True, env={"PYTHONPATH": str(site)}).wait_ready()
    peer = AckingPeer(server.zds_socket)
    try:
        for i, pod in enumerate(pods):
            assert server.add_pod(f"u{i}", pod).pod.rules_installed
        for i in range(len(pods)):
            server.remove_pod(f"u{i}")
        inodes = {os.stat(pod).st_ino for pod in pods}
        threads = {
            t: os.stat(f"/proc/{server.pid}/task/{t}/ns/net").st_ino
            for t in os.listdir(f"/proc/{server.pid}/task")
        }
        assert not [t for t, ino in threads.items() if ino in inodes], "threads left in a pod's netns"
        assert "fork_posix" not in server.output() and " exit -" not in server.output(), server.output()
    finally:
        peer.close()
        server.stop()


@pytest.mark.root
def test_a_rule_failure_fails_enrollment_and_nothing_is_sent(tmp_path: object, namespaces: list[str]) -> None:
    pod = scratch(namespaces)
    # No iptables on the node agent's PATH: installing the rules must fail. (IPv4 rules only:
    # with IPv6 on, a node agent without a working ip6tables does not start at all, below.)
    server = NodeAgentProc(str(tmp_path), "--no-ipv6", redirect=True, env_path="/nonexistent").wait_ready()
    peer = RawPeer(server.zds_socket)
    try:
        peer.hello()
        peer.take_snapshot()
        with pytest.raises(grpc.RpcError) as info:
            server.add_pod("u1", pod)
        assert info.value.code() is grpc.StatusCode.INTERNAL
        assert "cannot install in-pod redirection rules" in (info.value.details() or "")
        assert "iptables-save not found" in (info.value.details() or "")
        assert peer.recv(timeout=0.5) is None
        assert server.list_pods() == []
    finally:
        peer.close()
        server.stop()
    assert os.path.exists(pod)


@pytest.mark.root
def test_a_node_agent_without_a_working_ip6tables_does_not_start_with_ipv6_on(tmp_path: pathlib.Path) -> None:
    server = NodeAgentProc(str(tmp_path), redirect=True, env_path="/nonexistent")
    assert server.proc.wait(timeout=60) == 1
    last = server.output().strip().splitlines()[-1]
    assert last.endswith(
        "ip6tables-save not found; install Debian's iptables package; the pods' IPv6 rules need a "
        "working ip6tables (or give --no-ipv6)"
    ), last


@pytest.mark.root
def test_a_caller_that_gives_up_does_not_leave_rules_and_cache_disagreeing(
    tmp_path: object, namespaces: list[str]
) -> None:
    pod = scratch(namespaces)
    server = NodeAgentProc(str(tmp_path), redirect=True).wait_ready()
    peer = AckingPeer(server.zds_socket, delay=1.0)
    try:
        peer.wait_snapshot()
        with server.control() as stub:
            stub.ListPods(nodeagent_pb2.ListPodsRequest(), timeout=30)  # connected: the 0.3 s are the calls'
            request = nodeagent_pb2.AddPodRequest(uid="u1", name="a", namespace="ns", netns_path=pod)
            with pytest.raises(grpc.RpcError) as info:
                stub.AddPod(request, timeout=0.3)  # gives up while ztunnel is still acking
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # The enrollment went on: cached, acked, and the rules are there.
            wait_until(
                lambda: [p.state for p in server.list_pods()] == [nodeagent_pb2.POD_STATE_ACKED],
                what="the enrollment to complete",
            )
            assert "ISTIO_OUTPUT" in saved_in(pod)
            with pytest.raises(grpc.RpcError) as info:
                stub.RemovePod(nodeagent_pb2.RemovePodRequest(uid="u1"), timeout=0.3)
            assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            # (the pod leaves the cache as its removal begins; DelWorkload goes once its rules are out)
            wait_until(lambda: "del" in peer.kinds, what="the DelWorkload, sent once the rules are out")
            assert server.list_pods() == []
            assert "ISTIO" not in saved_in(pod)
    finally:
        peer.close()
        server.stop()


@pytest.mark.root
def test_remove_and_re_add_at_once_leaves_the_rules_of_the_new_enrollment(
    tmp_path: object, namespaces: list[str]
) -> None:
    pod = scratch(namespaces)
    server = NodeAgentProc(str(tmp_path), redirect=True).wait_ready()
    peer = AckingPeer(server.zds_socket, delay=0.5)
    try:
        peer.wait_snapshot()
        server.add_pod("u2", pod)
        remover = threading.Thread(target=server.remove_pod, args=("u2",))
        remover.start()
        wait_until(lambda: peer.kinds.count("del") == 1, what="the DelWorkload to be in flight")
        server.add_pod("u2", pod)  # re-enrolled while ztunnel is still acking the delete
        remover.join(10)
        [listed] = server.list_pods()
        assert listed.uid == "u2" and listed.rules_installed
        assert "ISTIO_OUTPUT" in saved_in(pod)
    finally:
        peer.close()
        server.stop()


def in_pod(path: str, *argv: str) -> str:
    with open_netns(path) as ns, in_netns(ns):
        return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


@pytest.mark.root
def test_a_chain_of_the_pods_own_named_like_ours_in_another_table_is_left_alone(
    namespaces: list[str],
) -> None:
    """Istio's rules live in mangle, nat and raw: an ISTIO_OUTPUT the pod made in filter (and
    its jump and rule) is its own, through install and removal."""
    pod = scratch(namespaces)
    restore_in(pod, "*filter\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n"
               "-A ISTIO_OUTPUT -p tcp --dport 2222 -j DROP\nCOMMIT\n")  # fmt: skip

    def filter_table() -> list[str]:
        saved = normalise(saved_in(pod))
        start = saved.index("*filter")
        return saved[start : saved.index("COMMIT", start) + 1]

    before = filter_table()
    assert "-A ISTIO_OUTPUT -p tcp -m tcp --dport 2222 -j DROP" in before
    install(pod)
    assert filter_table() == before
    remove(pod)
    assert filter_table() == before
    assert "ISTIO_PRERT" not in saved_in(pod)


#: What an Istio sidecar's istio-init leaves in a pod's nat table (abridged): its own ISTIO_OUTPUT,
#: named as ours, jumped to by a rule that is not ours.
SIDECAR_RULES = (
    "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"
    "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
)


@pytest.mark.root
def test_a_netns_with_a_sidecars_rules_is_refused_and_left_exactly_as_it_was(
    tmp_path: object, namespaces: list[str]
) -> None:
    """The install took every ISTIO_OUTPUT out first: the sidecar's chain was flushed (its
    pod's traffic no longer redirected) and, its jump left pointing at it, the chain could not
    be deleted: the enrollment failed, the rollback failed, and its retry ran for good."""
    pod = scratch(namespaces)
    restore_in(pod, SIDECAR_RULES)
    before = normalise(saved_in(pod))
    with pytest.raises(
        RulesNotOurs, match=r"iptables nat: -A OUTPUT -p tcp -j ISTIO_OUTPUT; an Istio sidecar"
    ):
        install(pod)
    assert normalise(saved_in(pod)) == before
    server = NodeAgentProc(str(tmp_path), redirect=True).wait_ready()
    try:
        with pytest.raises(grpc.RpcError) as info:
            server.add_pod("u1", pod)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(
            "pod u1 not enrolled: the netns holds a rule zds did not make that jumps into its chains"
        )
        assert server.list_pods() == []
        assert normalise(saved_in(pod)) == before
        assert "lookup 100" not in in_pod(pod, "ip", "rule")
    finally:
        server.stop()
    assert "leftovers" not in server.output() and "tried again" not in server.output()


@pytest.mark.root
def test_a_comment_with_a_newline_cannot_forge_iptables_saves_lines(namespaces: list[str]) -> None:
    """iptables-save writes a comment's newline as it is: "x\nCOMMIT\n*filter\ny" made the
    sidecar's jump into ISTIO_OUTPUT after it read as filter's, past the refusal, and the
    install flushed the sidecar's chain. A save whose quoted string runs past its line is
    refused, nothing changed."""
    pod = scratch(namespaces)
    nat = ("iptables", "-t", "nat")
    in_pod(pod, *nat, "-N", "ISTIO_OUTPUT")
    in_pod(pod, *nat, "-A", "ISTIO_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
    forged = "x\nCOMMIT\n*filter\ny"
    in_pod(pod, *nat, "-A", "OUTPUT", "-p", "udp", "-m", "comment", "--comment", forged, "-j", "ACCEPT")
    in_pod(pod, *nat, "-A", "OUTPUT", "-p", "tcp", "-j", "ISTIO_OUTPUT")
    before = normalise(saved_in(pod))
    with pytest.raises(
        RulesNotOurs, match="iptables-save's output cannot be read safely: a string in a rule of the pod's"
    ):
        install(pod)
    assert normalise(saved_in(pod)) == before


@pytest.mark.root
def test_a_removal_takes_our_rules_out_of_a_netns_whose_save_cannot_be_read(
    namespaces: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A rule of the pod's own whose comment holds a newline makes iptables-save unreadable: a
    removal then left every rule of that family in (the policy routing went), and its retry
    failed the same for as long as the pod lived. It takes them out as Istio's does, with
    commands that need no save: the pod's rule stays."""
    pod = scratch(namespaces)
    install(pod)
    comment = ("-m", "comment", "--comment", "x\nCOMMIT\ny")
    in_pod(pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", *comment, "-j", "ACCEPT")
    in_pod(pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT")  # (twice: both go)
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        remove(pod)
    assert "our rules are taken out without it, as Istio's removal does" in caplog.text
    for table in ("mangle", "nat", "raw"):
        assert "ISTIO" not in in_pod(pod, "iptables", "-t", table, "-S")
    assert in_pod(pod, "iptables", "-t", "nat", "-S", "OUTPUT") == (
        '-P OUTPUT ACCEPT\n-A OUTPUT -p udp -m comment --comment "x\nCOMMIT\ny" -j ACCEPT\n'
    )
    assert "ISTIO" not in saved_in(pod, "ip6tables-save") and "lookup 100" not in in_pod(pod, "ip", "rule")


@pytest.mark.root
def test_installing_again_leaves_rules_of_ours_in_place_where_they_are(namespaces: list[str]) -> None:
    """The same uid enrolled again, or another pod of the netns: our rules were replaced, their
    jumps appended behind a rule of the pod's own that had come after them, and traffic they
    had redirected (TCP to 8443 here) went past. As Istio's reconcile, while all of ours are in
    place nothing is replaced; one missing, they go in again."""
    pod = scratch(namespaces)
    redirector = Redirector()

    async def run() -> list[str]:
        with open_netns(pod) as ns:
            return [(await redirector.install(ns)).digest for _ in range(2)]

    first = asyncio.run(run())
    in_pod(pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "8443", "-j", "ACCEPT")
    before = in_pod(pod, "iptables", "-t", "nat", "-S", "OUTPUT")
    assert before.splitlines()[1:] == [
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A OUTPUT -p tcp -m tcp --dport 8443 -j ACCEPT",
    ]
    again = asyncio.run(run())
    assert in_pod(pod, "iptables", "-t", "nat", "-S", "OUTPUT") == before
    assert len(set(first + again)) == 1
    ours = in_pod(pod, "iptables", "-t", "nat", "-S", "ISTIO_OUTPUT")
    in_pod(pod, "iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "1")
    asyncio.run(run())
    assert in_pod(pod, "iptables", "-t", "nat", "-S", "ISTIO_OUTPUT") == ours


@pytest.mark.root
@pytest.mark.parametrize(
    "change",
    [
        ("ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "40000", "lookup", "100"),
        ("ip", "rule", "add", "fwmark", "0x111/0xffffffff", "pref", "32764", "lookup", "100"),
        ("ip", "route", "add", "local", "default", "tos", "0x10", "dev", "lo", "table", "100"),
        ("ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "iif", "lo", "lookup", "100"),
        ("ip", "route", "add", "local", "default", "dev", "zdsd0", "table", "100"),
    ],
)
def test_policy_routing_changed_by_hand_is_not_taken_for_ours(
    namespaces: list[str], change: tuple[str, ...]
) -> None:
    """The restart's check took any fwmark rule in table 100 and any local default route there
    for ours, and kept them: moved past main, another mask or action, a route on another device.
    Such a change makes the digest differ (a restart installs them again); the install adds ours."""
    pod = scratch(namespaces)
    in_pod(pod, "ip", "link", "add", "zdsd0", "type", "veth", "peer", "name", "zdsd1")
    in_pod(pod, "ip", "link", "set", "zdsd0", "up")
    redirector = Redirector()

    async def digest() -> str:
        with open_netns(pod) as ns:
            return await redirector.digest(ns)

    install(pod)
    installed = asyncio.run(digest())
    wrong = "rule" if change[1] == "rule" else "route"
    in_pod(
        pod,
        "ip",
        wrong,
        "del",
        *(
            ("fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
            if wrong == "rule"
            else ("local", "default", "dev", "lo", "table", "100")
        ),
    )
    in_pod(pod, *change)
    assert asyncio.run(digest()) != installed
    install(pod)
    assert asyncio.run(digest()) == installed


def backend_install(path: str, backend: type[Redirector]) -> tuple[str, str]:
    """Install with ``backend``: the digest the install recorded, and the one a restart reads."""

    async def run() -> tuple[str, str]:
        with open_netns(path) as ns:
            installed = await backend().install(ns)
            return installed.digest, await backend().digest(ns)

    return asyncio.run(run())


def backend_remove(path: str, backend: type[Redirector]) -> None:
    async def run() -> None:
        with open_netns(path) as ns:
            await backend().remove(ns)

    asyncio.run(run())


def our_pref(path: str) -> list[str]:
    return [line for line in in_pod(path, "ip", "rule").splitlines() if line.startswith("32764:")]


@pytest.mark.root
@pytest.mark.parametrize("backend", [Redirector, NftablesRedirector], ids=["iptables", "nftables"])
@pytest.mark.parametrize(
    ("theirs", "shown"),
    [("iif lo", "iif lo"), ("from 10.0.0.0/8", "from 10.0.0.0/8"), ("protocol static", "proto static")],
)
def test_a_rule_of_the_pods_own_at_our_pref_is_never_deleted(
    namespaces: list[str],
    backend: type[Redirector],
    theirs: str,
    shown: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The kernel deletes the first rule at pref 32764 matching what the request names (our
    fwmark, mask, table): a rule of the pod's own with a selector more, there before ours, was
    deleted in ours' place, ours left (Istio's removal does the same). Now the pod's stays, and
    ours with it, said. A ``from`` one also keeps ours out at the install (the kernel takes it for
    ours): said by both backends, and the nftables one recorded the routing as ours all the same
    (every restart then found the pod's rules changed and installed them again)."""
    pod = scratch(namespaces)
    in_pod(
        pod, "ip", "rule", "add", "pref", "32764", *theirs.split(), "fwmark", "0x111/0xfff", "lookup", "100"
    )
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        recorded, read = backend_install(pod, backend)
        kept_out = "from" in theirs
        assert ("not ours as added" in caplog.text) == kept_out
        assert recorded == read
        assert len(our_pref(pod)) == (1 if kept_out else 2)
        backend_remove(pod, backend)
    left = our_pref(pod)
    assert shown in left[0] and len(left) == (1 if kept_out else 2)  # (ours behind it: left)
    assert ("deleting ours would delete it" in caplog.text) == (not kept_out)
    assert in_pod(pod, "ip", "route", "show", "table", "100").strip() == ""


@pytest.mark.root
def test_an_ipv6_route_of_the_pods_own_at_a_lower_metric_in_table_100_stays_at_the_removal(
    namespaces: list[str],
) -> None:
    """IPv6's delete takes the first route that matches what it names, whatever its type: the
    pod's own default route in table 100 at a lower metric went in ours' place, ours left
    (Istio's removal names no metric either)."""
    pod = scratch(namespaces)
    in_pod(pod, "ip", "link", "set", "lo", "up")
    in_pod(pod, "ip", "-6", "route", "add", "unreachable", "::/0", "table", "100", "metric", "100")
    backend_install(pod, Redirector)
    assert "local default dev lo" in in_pod(pod, "ip", "-6", "route", "show", "table", "100")
    backend_remove(pod, Redirector)
    assert in_pod(pod, "ip", "-6", "route", "show", "table", "100").split()[:2] == ["unreachable", "default"]
    assert "local" not in in_pod(pod, "ip", "-6", "route", "show", "table", "100")


@pytest.mark.root
@pytest.mark.parametrize("backend", [Redirector, NftablesRedirector], ids=["iptables", "nftables"])
def test_a_default_route_of_the_pods_own_in_table_100_is_replaced_and_said(
    namespaces: list[str], backend: type[Redirector], caplog: pytest.LogCaptureFixture
) -> None:
    """Istio replaces whatever default route table 100 has (``RouteReplace``); so does zds, and it
    said nothing of the pod's route it took out. A route of ours there already is no news."""
    pod = scratch(namespaces)
    in_pod(pod, "ip", "link", "add", "zdsd0", "type", "veth", "peer", "name", "zdsd1")
    in_pod(pod, "ip", "link", "set", "zdsd0", "up")
    in_pod(pod, "ip", "addr", "add", "10.77.0.2/24", "dev", "zdsd0")
    in_pod(pod, "ip", "route", "add", "default", "via", "10.77.0.1", "dev", "zdsd0", "table", "100")
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        backend_install(pod, backend)
        assert "the pod's own default route in table 100 (type 1 via 10.77.0.1" in caplog.text
        assert in_pod(pod, "ip", "route", "show", "table", "100").split() == [
            *("local", "default", "dev", "lo", "scope", "host")
        ]
        caplog.clear()
        backend_install(pod, backend)  # (ours there: nothing to say)
        assert "default route" not in caplog.text
    backend_remove(pod, backend)


#: An iptables-save of a pod's nat table as it may legitimately be: quotes escaped in a comment
#: and a log prefix, a ``"`` inside an interface's name (which opens no string).
SAVED_OK = (
    "# Generated by iptables-save v1.8.9 (nf_tables)\n*nat\n:PREROUTING ACCEPT [0:0]\n"
    ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
    '-A PREROUTING -p udp -m comment --comment "a \\"q\\" b\\\\" -j ACCEPT\n'
    '-A PREROUTING -i we"ird -j ACCEPT\n'
    '-A ISTIO_OUTPUT -j LOG --log-prefix "pre\\"x\\\\ "\nCOMMIT\n# Completed\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n'
)


@pytest.mark.parametrize(
    ("rule", "unreadable"),
    [
        ('-A PREROUTING -i we"ird -j ACCEPT', ""),
        ('-A OUTPUT -p tcp -m comment --comment "x\nCOMMIT\n*filter\ny" -j ISTIO_OUTPUT', '--comment "x'),
        # Strings printed without quotes: an IDLETIMER label, a RATEEST name.
        ("-A POSTROUTING -j IDLETIMER --timeout 10 --label \n*nat\n:ISTIO_OUTPUT - [0:0]", "*nat"),
        ("-A PREROUTING -j RATEEST --rateest-name a\n*x --rateest-interval 1", "*x"),
        ("-A PREROUTING -j RATEEST --rateest-name a\nCOMMIT\n*security\n-A X", "-A X"),
    ],
)
def test_an_iptables_save_a_pods_string_could_have_forged_is_unreadable(rule: str, unreadable: str) -> None:
    assert unreadable_line(SAVED_OK) == ""
    found = unreadable_line(SAVED_OK.replace('-A PREROUTING -i we"ird -j ACCEPT', rule))
    assert (unreadable in found) if unreadable else found == ""


def in_pod_bytes(path: str, *argv: bytes) -> bytes:
    with open_netns(path) as ns, in_netns(ns):
        return subprocess.run(argv, capture_output=True, check=True).stdout


@pytest.mark.root
def test_a_pods_rule_whose_comment_is_not_utf8_is_read_and_left_as_it_is(namespaces: list[str]) -> None:
    """iptables-save lists every rule of the pod's netns, comments written in any bytes by a
    pod with NET_ADMIN: read as UTF-8 text, one such failed every install, removal and
    digest there (a UnicodeDecodeError nothing caught: the node agent's restart too)."""
    pod = scratch(namespaces)
    in_pod_bytes(
        pod, b"iptables", b"-A", b"INPUT", b"-m", b"comment", b"--comment", b"caf\xe9", b"-j", b"ACCEPT"
    )
    before = in_pod_bytes(pod, b"iptables", b"-S", b"INPUT")
    assert install(pod) == [4, 6]

    async def digest() -> str:
        with open_netns(pod) as ns:
            return await Redirector(RedirectConfig()).digest(ns)

    assert asyncio.run(digest())
    remove(pod)
    assert "ISTIO" not in saved_in(pod, "ip6tables-save")
    assert in_pod_bytes(pod, b"iptables", b"-S", b"INPUT") == before
    assert b"ISTIO" not in in_pod_bytes(pod, b"iptables-save")
    # A rule of the pod's own into our chains, its comment a terminal escape and not UTF-8:
    # refused, the rule said escaped (it went into log lines and answers as it was).
    in_pod_bytes(pod, b"iptables", b"-t", b"nat", b"-N", b"ISTIO_OUTPUT")
    comment = b"x\x1b[31m\xe9"
    jump = [b"-p", b"tcp", b"-m", b"comment", b"--comment", comment, b"-j", b"ISTIO_OUTPUT"]
    in_pod_bytes(pod, b"iptables", b"-t", b"nat", b"-A", b"OUTPUT", *jump)
    with pytest.raises(RulesNotOurs) as refused:
        install(pod)
    assert "\x1b" not in str(refused.value) and str(refused.value).isprintable()
    assert "\\x1b[31m\\udce9" in str(refused.value)


@pytest.mark.root
def test_a_removal_takes_the_redirection_out_even_when_a_chain_of_ours_cannot_go(
    namespaces: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The pod made a rule of its own that jumps to our nat chain: the chain cannot be deleted
    (EBUSY), as in Istio, but the jumps and every redirect go, the other family and the policy
    routing too; what stayed is said in a warning, and the removal is done (a failure was
    retried in the background, an error line a minute, for as long as the pod lived)."""
    pod = scratch(namespaces)
    install(pod)
    in_pod(pod, "iptables", "-t", "nat", "-N", "MYOUT")
    in_pod(pod, "iptables", "-t", "nat", "-A", "MYOUT", "-p", "udp", "--dport", "9999", "-j", "ISTIO_OUTPUT")
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        remove(pod)
    assert [r.getMessage() for r in caplog.records] == [
        "iptables nat chain ISTIO_OUTPUT stays, empty: a rule of the pod's own jumps to it"
    ]
    saved = saved_in(pod)
    assert "REDIRECT" not in saved and "-j ISTIO_PRERT" not in saved
    assert [line for line in saved.splitlines() if "ISTIO" in line] == [
        ":ISTIO_OUTPUT - [0:0]",
        "-A MYOUT -p udp -m udp --dport 9999 -j ISTIO_OUTPUT",
    ]
    assert "lookup 100" not in in_pod(pod, "ip", "rule")


@pytest.mark.root
def test_a_no_ipv6_removal_takes_the_ipv6_redirection_out_even_when_a_chain_cannot_go(
    namespaces: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """As above for the IPv6 rules an earlier configuration installed, removed by a node agent
    told --no-ipv6 (best effort there: what stays is said, the removal is done)."""
    pod = scratch(namespaces)
    install(pod)
    in_pod(pod, "ip6tables", "-t", "nat", "-N", "MYOUT")
    in_pod(pod, "ip6tables", "-t", "nat", "-A", "MYOUT", "-p", "udp", "--dport", "9999", "-j", "ISTIO_OUTPUT")

    async def run() -> None:
        with open_netns(pod) as ns:
            await Redirector(RedirectConfig(ipv6=False)).remove(ns)

    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        asyncio.run(run())
    assert [r.getMessage() for r in caplog.records] == [
        "ip6tables nat chain ISTIO_OUTPUT stays, empty: a rule of the pod's own jumps to it"
    ]
    saved = saved_in(pod, "ip6tables-save")
    assert "REDIRECT" not in saved and "-j ISTIO_PRERT" not in saved
    assert [line for line in saved.splitlines() if "ISTIO" in line] == [
        ":ISTIO_OUTPUT - [0:0]",
        "-A MYOUT -p udp -m udp --dport 9999 -j ISTIO_OUTPUT",
    ]
    assert "ISTIO" not in saved_in(pod)
    assert "lookup 100" not in in_pod(pod, "ip", "-6", "rule") + in_pod(pod, "ip", "rule")


@pytest.mark.root
def test_a_node_agent_that_no_longer_installs_ipv6_rules_takes_the_earlier_ones_out(
    namespaces: list[str],
) -> None:
    """Installed for IPv4 and IPv6, then a restart with --no-ipv6: the pod's recorded rules are
    not taken for in place (the configuration differs; a pod of a zds that installed IPv4 only,
    at the first start of one that installs both: its IPv6 rule is missing too), its reinstall
    takes the IPv6 chains out (as Istio's reconcile takes out what it would not install), and a
    removal takes out both families."""
    pod, earlier = scratch(namespaces), scratch(namespaces)
    both, v4_only = Redirector(RedirectConfig()), Redirector(RedirectConfig(ipv6=False))

    async def run() -> None:
        with open_netns(pod) as ns, open_netns(earlier) as old:
            recorded = (await both.install(ns)).digest
            assert "ISTIO" in saved_in(pod, "ip6tables-save")
            assert await v4_only.digest(ns) != recorded  # (the IPv6 chains are not v4_only's)
            assert (await v4_only.install(ns)).families == [4]
            assert "ISTIO" not in saved_in(pod, "ip6tables-save") and "ISTIO" in saved_in(pod)
            recorded = (await v4_only.install(old)).digest
            assert await both.digest(old) != recorded  # (no IPv6 rules: reinstalled at the start)
            await both.remove(old)
            recorded = (await v4_only.install(old)).digest
            await both.install(old)  # (and a crash before its digest was stored)
            assert await v4_only.digest(old) != recorded  # (IPv6 chains there: not in place)
            await v4_only.remove(old)  # (removal: both families, whatever is configured)

    asyncio.run(run())
    assert "ISTIO" not in saved_in(earlier, "ip6tables-save") + saved_in(earlier)
    assert "lookup 100" not in in_pod(earlier, "ip", "-6", "rule") + in_pod(earlier, "ip", "-4", "rule")


def test_an_iptables_run_that_does_not_end_is_a_rule_failure_like_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung iptables ended its run with subprocess' TimeoutExpired, which no caller takes for
    a rule failure: an install or a removal then failed as a bug (a traceback; at a stop during
    the start, the start's end with that error instead of the stop)."""

    def hung(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, 30)

    monkeypatch.setattr(subprocess, "run", hung)
    with pytest.raises(RedirectError, match=r"^iptables-save -t nat did not end within 30 s$"):
        run_tool(["iptables-save", "-t", "nat"])


def test_a_kernel_without_ipv6_gets_ipv4_rules_only_and_it_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ip6tables and IPv6 netlink would fail every pod on a kernel without IPv6 (booted with
    ipv6.disable=1: no /proc/net/if_inet6, not something a test can make here)."""
    monkeypatch.setattr(redirect_module, "kernel_has_ipv6", lambda: False)
    with caplog.at_level(logging.INFO, logger="zds.server.redirect"):
        for backend in ("iptables", "nftables"):
            assert redirect_module.node_config(backend, RedirectConfig()).ipv6 is False
    assert (
        caplog.text.count("this kernel has no IPv6: the in-pod rules and policy routing are IPv4 only") == 2
    )
    monkeypatch.undo()
    assert redirect_module.node_config("iptables", RedirectConfig()).ipv6 is True
    assert redirect_module.node_config("iptables", RedirectConfig(ipv6=False)).ipv6 is False


@pytest.fixture
def broken_ip6tables(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """An ``ip6tables-save`` first on PATH that fails as a legacy one without its table does."""
    monkeypatch.setenv("PATH", failing_ip6tables_save(tmp_path))


@pytest.mark.usefixtures("broken_ip6tables")
def test_ipv6_rules_without_a_working_ip6tables_stop_the_start_in_one_line() -> None:
    """As Istio's agent, which does not start without a working ip6tables while IPv6 is on: a
    pod would otherwise get its IPv4 rules taken out again by the failure of its IPv6 ones."""
    with pytest.raises(RedirectError) as info:
        redirect_module.node_config("iptables", RedirectConfig())
    assert str(info.value) == (
        "ip6tables-save failed (exit 1): ip6tables-save: can't initialize ip6tables table; the pods' "
        "IPv6 rules need a working ip6tables (or give --no-ipv6)"
    )
    assert redirect_module.node_config("iptables", RedirectConfig(ipv6=False)).ipv6 is False
    assert redirect_module.node_config("nftables", RedirectConfig()).ipv6 is True  # (no ip6tables used)


@pytest.mark.root
@pytest.mark.usefixtures("broken_ip6tables")
def test_a_node_agent_told_no_ipv6_needs_no_working_ip6tables(namespaces: list[str]) -> None:
    """What the start's refusal says to give: with --no-ipv6 the IPv6 side is best effort, as
    Istio's agent with IPv6 off (an install, its digest and a removal that asked a broken
    ip6tables-save failed every pod)."""
    pod = scratch(namespaces)
    config = redirect_module.node_config("iptables", RedirectConfig(ipv6=False))
    v4_only = Redirector(config)

    async def run() -> None:
        with open_netns(pod) as ns:
            installed = await v4_only.install(ns)
            assert installed.families == [4]
            assert await v4_only.digest(ns) == installed.digest
            assert "-A OUTPUT -j ISTIO_OUTPUT" in saved_in(pod)
            await v4_only.remove(ns)

    asyncio.run(run())
    assert "ISTIO" not in saved_in(pod)


@pytest.mark.root
def test_a_no_ipv6_install_asks_ip6tables_save_once_unless_ipv6_rules_of_ours_were_there(
    namespaces: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """An IPv4-only install reads ip6tables-save for IPv6 chains of an earlier configuration
    and again for its digest: the second read (a fork and exec, ~2 ms a pod) only when the
    first found some to take out (the digest must see what is there after)."""
    calls = tmp_path / "calls"
    real = shutil.which("ip6tables-save")
    assert real is not None
    counting = tmp_path / "ip6tables-save"
    counting.write_text(f'#!/bin/sh\necho x >> {calls}\nexec {real} "$@"\n')
    counting.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    pod, earlier = scratch(namespaces), scratch(namespaces)
    install(earlier)  # (IPv4 and IPv6)
    v4_only = Redirector(RedirectConfig(ipv6=False))

    async def run(path: str) -> tuple[int, bool]:
        """How often an install read ip6tables-save; whether its digest is what is there."""
        with open_netns(path) as ns:
            calls.write_text("")
            installed = await v4_only.install(ns)
            reads = calls.read_text().count("x")
            return reads, installed.digest == await v4_only.digest(ns)

    assert asyncio.run(run(pod)) == (1, True)
    assert asyncio.run(run(earlier)) == (2, True)  # (before and after taking the IPv6 chains out)
    assert "ISTIO" not in saved_in(earlier, "ip6tables-save") and "ISTIO" in saved_in(earlier)


@pytest.mark.root
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rule_made_with_nft_that_iptables_cannot_print_refuses_the_install_and_not_the_removal(
    namespaces: list[str], caplog: pytest.LogCaptureFixture, when: str
) -> None:
    """iptables-nft prints ``# Table `nat' is incompatible`` in place of a table holding a rule
    it cannot read: read as a comment, the table was empty, and a removal left our whole nat
    redirection in the pod without a word (no retry); an install missed the jumps there. Now
    the install is refused, nothing changed, and a removal takes ours out as Istio's does
    (a jump iptables cannot look past is the end of our copies)."""
    pod = scratch(namespaces)
    native = ("nft", "add", "rule", "ip", "nat", "OUTPUT", "numgen", "inc", "mod", "2", "0", "counter")
    if when == "before":
        in_pod(pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")
        in_pod(pod, *native)
        before = in_pod(pod, "nft", "list", "ruleset")
        with pytest.raises(
            RulesNotOurs,
            match=r"iptables-save cannot print a table of the pod's, which holds a rule made with nft",
        ):
            install(pod)
        assert in_pod(pod, "nft", "list", "ruleset") == before
        return
    install(pod)
    in_pod(pod, *native)
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        remove(pod)
    assert "our rules are taken out without it, as Istio's removal does" in caplog.text
    ruleset = in_pod(pod, "nft", "list", "ruleset")
    assert "ISTIO" not in ruleset and "redirect" not in ruleset, ruleset
    assert "numgen inc mod 2" in ruleset  # (the pod's own rule stays)
    assert "lookup 100" not in in_pod(pod, "ip", "rule")


@pytest.mark.root
def test_a_jump_of_ours_behind_a_rule_made_with_nft_is_said_as_ours_when_its_chain_stays(
    namespaces: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """iptables cannot look past a rule it cannot read for our jump to delete: the jump stays,
    and so does our emptied chain, which the warning blamed on a rule of the pod's own."""
    pod = scratch(namespaces)
    install(pod)
    in_pod(
        pod, "nft", "insert", "rule", "ip", "nat", "PREROUTING", "numgen", "inc", "mod", "2", "0", "counter"
    )
    with caplog.at_level(logging.WARNING, logger="zds.server.redirect"):
        remove(pod)
    assert (
        "iptables nat chain ISTIO_PRERT stays, empty: a jump of ours behind a rule iptables cannot read "
        "(made with nft), or a rule of the pod's own, jumps to it"
    ) in caplog.text
    ruleset = in_pod(pod, "nft", "list", "table", "ip", "nat")
    assert "redirect" not in ruleset, ruleset  # (the redirection is out all the same)


def test_a_removal_without_the_save_says_what_failed_besides_what_was_not_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each failure of its fixed commands was taken for "not there": one that timed out left
    the rules in and the removal said it was done (no retry)."""
    from zds.server import iptablesrun

    def run(argv: list[str], stdin: str = "") -> str:
        if argv[3] == "-D" and argv[2] == "nat":
            raise RedirectError(f"{' '.join(argv)} did not end within 30 s")
        if argv[3] == "-D":
            raise RedirectError("iptables: Bad rule (does a matching rule exist in that chain?).")
        if argv[3] == "-F":
            raise RedirectError("iptables: No chain/target/match by that name.")
        return ""

    monkeypatch.setattr(iptablesrun, "run_tool", run)
    assert iptablesrun.remove_family_unread("iptables") == [
        "iptables -t nat -D PREROUTING -j ISTIO_PRERT did not end within 30 s",
        "iptables -t nat -D OUTPUT -j ISTIO_OUTPUT did not end within 30 s",
    ]
