"""Istio's native nftables backend (``--redirect-backend nftables``): the transaction is
Istio's golden text, what the kernel holds afterwards is what Istio's golden gives (IPv4
and IPv6, with and without DNS capture), re-applying is idempotent, removal deletes the
three tables and the policy routing, and a node agent restarted with the other backend
takes the old backend's rules out before it puts its own in."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DATA, NodeAgentProc, iptables_save, pod_network, run_all, wait_until
from zds.netns import in_netns, open_netns
from zds.netns.fixtures import create_netns, delete_netns
from zds.netns.podnet import PodNetwork
from zds.server import nftables
from zds.server.inpodrules import RedirectConfig
from zds.server.nftables import NftablesRedirector, nft_rules, removal
from zds.server.redirect import RedirectError

#: The IPv6 probe SNAT address Istio's golden test data was generated with.
GOLDEN_PROBE6 = "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"
#: (golden file, the configuration Istio generated it with, IPv6 (its EnableIPv6; the pod has
#: an IPv6 address then too))
CASES = {
    "default": (RedirectConfig(ipv6=False), False),
    "default_ipv6": (RedirectConfig(probe_snat_ipv6=GOLDEN_PROBE6), True),
    "dns_pod_disabled_and_on_globally": (RedirectConfig(dns_capture=False, ipv6=False), False),
    "dns_pod_disabled_and_on_globally_ipv6": (
        RedirectConfig(dns_capture=False, probe_snat_ipv6=GOLDEN_PROBE6),
        True,
    ),
}
#: What zds adds to Istio's text without DNS capture: an earlier raw table goes too.
RAW_GONE = ["add table inet istio-ambient-raw", "delete table inet istio-ambient-raw"]


def golden(case: str) -> str:
    return (DATA / f"istio-inpod-nftables-{case}.golden").read_text()


def lines(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", line.strip()) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("case", CASES)
def test_the_transaction_is_istios_golden_text(case: str) -> None:
    config, ipv6 = CASES[case]
    ours = lines(nft_rules(config, ipv6=ipv6))
    extra = [] if config.dns_capture else RAW_GONE
    assert ours == lines(golden(case)) + extra


def test_removal_deletes_the_three_tables_and_a_missing_one_is_no_error() -> None:
    assert lines(removal()) == [
        f"{verb} table inet istio-ambient-{t}" for t in ("nat", "mangle", "raw") for verb in ("add", "delete")
    ]


def test_without_libnftables_the_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "LIBRARY", "libnftables-that-is-not-there.so.9")
    nftables.libnftables.cache_clear()
    try:
        with pytest.raises(
            RedirectError, match=r"install Debian's libnftables1 .* --redirect-backend iptables"
        ):
            NftablesRedirector()
    finally:
        nftables.libnftables.cache_clear()


# -- in real namespaces -------------------------------------------------------------------


def nft(path: str, *args: str, stdin: str | None = None) -> str:
    with open_netns(path) as ns, in_netns(ns):
        return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, check=True).stdout


def ruleset(path: str) -> str:
    return nft(path, "-s", "list", "ruleset")  # stateless: no counters


def ip(path: str, *args: str) -> str:
    with open_netns(path) as ns, in_netns(ns):
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def install(path: str, config: RedirectConfig) -> list[int]:
    async def go() -> list[int]:
        with open_netns(path) as ns:
            return (await NftablesRedirector(config).install(ns)).families

    return asyncio.run(go())


def remove(path: str) -> None:
    async def go() -> None:
        with open_netns(path) as ns:
            await NftablesRedirector().remove(ns)

    asyncio.run(go())


def digest(path: str) -> str:
    async def go() -> str:
        with open_netns(path) as ns:
            return await NftablesRedirector().digest(ns)

    return asyncio.run(go())


@pytest.fixture
def pods() -> Iterator[PodNetwork]:
    """Pods with IPv4 and IPv6 addresses on a bridge."""
    net = pod_network(f"zdsn{secrets.token_hex(2)}")
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def scratch() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    run_all([functools.partial(delete_netns, name, missing_ok=True) for name in made], "scratch")


def scratch_netns(made: list[str]) -> str:
    name = f"zdsn-{secrets.token_hex(3)}"
    made.append(name)
    return create_netns(name)


@pytest.mark.root
@pytest.mark.parametrize("case", CASES)
def test_the_installed_ruleset_is_what_istios_golden_gives(
    case: str, pods: PodNetwork, scratch: list[str]
) -> None:
    config, ipv6 = CASES[case]
    pod = pods.add_pod(f"zdsn-{secrets.token_hex(3)}").netns_path if ipv6 else scratch_netns(scratch)
    reference = scratch_netns(scratch)
    nft(reference, "-f", "-", stdin=golden(case))
    assert install(pod, config) == ([4, 6] if ipv6 else [4])
    assert ruleset(pod) == ruleset(reference)
    assert ("ip6 daddr" in ruleset(pod)) == ipv6
    assert ("istio-ambient-raw" in ruleset(pod)) == config.dns_capture
    assert "fwmark 0x111/0xfff lookup 100" in ip(pod, "rule")
    assert "local default dev lo" in ip(pod, "route", "show", "table", "100")
    if ipv6:
        assert "fwmark 0x111/0xfff lookup 100" in ip(pod, "-6", "rule")


@pytest.mark.root
def test_reinstalling_is_idempotent_and_the_digest_sees_a_change(scratch: list[str]) -> None:
    pod = scratch_netns(scratch)
    install(pod, RedirectConfig())
    once, stamp = ruleset(pod), digest(pod)
    install(pod, RedirectConfig())
    install(pod, RedirectConfig())
    assert ruleset(pod) == once and digest(pod) == stamp != ""
    nft(pod, "flush", "chain", "inet", "istio-ambient-nat", "istio-output")  # someone tampers
    assert digest(pod) != stamp
    install(pod, RedirectConfig())
    assert digest(pod) == stamp
    ip(pod, "route", "flush", "table", "100")  # the policy routing's route gone: not in place
    assert digest(pod) != stamp
    install(pod, RedirectConfig())
    assert digest(pod) == stamp
    install(pod, RedirectConfig(dns_capture=False))  # a change of configuration replaces it all
    assert "istio-ambient-raw" not in ruleset(pod) and "dport 53" not in ruleset(pod)


@pytest.mark.root
def test_the_digest_sees_the_ipv6_policy_routing_go(pods: PodNetwork) -> None:
    """A pod with IPv6 has the fwmark rule and table 100's route for it too: either gone, the
    rules are not in place (a restart reinstalls them)."""
    pod = pods.add_pod(f"zdsn-{secrets.token_hex(3)}").netns_path
    assert install(pod, RedirectConfig()) == [4, 6]
    stamp = digest(pod)
    ip(pod, "-6", "route", "flush", "table", "100")
    assert digest(pod) != stamp
    install(pod, RedirectConfig())
    assert "local default dev lo" in ip(pod, "-6", "route", "show", "table", "100")
    assert digest(pod) == stamp
    ip(pod, "-6", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")
    assert digest(pod) != stamp
    install(pod, RedirectConfig())
    assert digest(pod) == stamp


@pytest.mark.root
def test_the_digest_recorded_at_install_is_what_the_kernel_lists_in_every_pod(
    pods: PodNetwork, scratch: list[str]
) -> None:
    """One redirector lists the ruleset only for the first pod without our tables with a rule
    text; every pod's recorded digest must still be what a later check of that pod computes
    from the kernel, also where an old table of ours had a chain Istio's flush leaves."""
    plain, again = scratch_netns(scratch), scratch_netns(scratch)
    # an old istio-ambient-nat with a chain of its own: Istio's "flush table" keeps the chain
    nft(again, "add", "table", "inet", "istio-ambient-nat")
    nft(again, "add", "chain", "inet", "istio-ambient-nat", "leftover")
    dual = pods.add_pod(f"zdsn-{secrets.token_hex(3)}").netns_path
    redirector = NftablesRedirector(RedirectConfig())

    async def install_all() -> list[tuple[list[int], str]]:
        done = []
        for path in (plain, again, dual):
            with open_netns(path) as ns:
                installed = await redirector.install(ns)
                done.append((installed.families, installed.digest))
        return done

    recorded = asyncio.run(install_all())
    assert [families for families, _ in recorded] == [[4, 6], [4, 6], [4, 6]]  # (every pod: as Istio)
    assert "chain leftover" in ruleset(again)
    for path, (_, stamp) in zip((plain, again, dual), recorded, strict=True):
        assert stamp != "" and digest(path) == stamp, path
    # (the same rules in the plain and the dual-stack pod, IPv6 in both; the leftover chain differs)
    assert recorded[0][1] == recorded[2][1] != recorded[1][1]


@pytest.mark.root
def test_removal_deletes_the_tables_and_the_policy_routing(scratch: list[str]) -> None:
    pod = scratch_netns(scratch)
    nft(pod, "add", "table", "inet", "theirs")  # not ours: it stays
    install(pod, RedirectConfig())
    remove(pod)
    assert "istio" not in ruleset(pod) and "table inet theirs" in ruleset(pod)
    assert "lookup 100" not in ip(pod, "rule") and ip(pod, "route", "show", "table", "100").strip() == ""
    assert digest(pod) == ""
    remove(pod)  # removing twice is harmless


# -- the backend through the node agent, and across restarts ---------------------------------


def istio_iptables(path: str) -> list[str]:
    with open_netns(path) as ns, in_netns(ns):
        return [line for line in iptables_save().splitlines() if "ISTIO" in line]


def istio_tables(path: str) -> list[str]:
    return [line for line in ruleset(path).splitlines() if line.startswith("table inet istio-ambient")]


@pytest.mark.root
@pytest.mark.parametrize(("first", "then"), [("iptables", "nftables"), ("nftables", "iptables")])
def test_a_restart_with_the_other_backend_swaps_the_rules(
    first: str, then: str, tmp_path: Path, scratch: list[str]
) -> None:
    pod = scratch_netns(scratch)
    server = NodeAgentProc(str(tmp_path), "--redirect-backend", first, redirect=True).wait_ready()
    try:
        done = server.cli("pod", "add", "--uid", "u1", "--netns", pod)
        assert "no ztunnel connection" in done.stderr  # enrolled with its rules all the same
        assert bool(istio_iptables(pod)) == (first == "iptables")
        assert bool(istio_tables(pod)) == (first == "nftables")
    finally:
        server.stop(signal.SIGKILL)
    restarted = NodeAgentProc(str(tmp_path), "--redirect-backend", then, redirect=True, name="again")
    try:
        restarted.wait_ready()
        [listed] = restarted.list_pods()
        assert (listed.uid, listed.recovery, listed.rules_installed) == ("u1", "rules reinstalled", True)
        assert bool(istio_iptables(pod)) == (then == "iptables"), "exactly one backend's rules are left"
        assert bool(istio_tables(pod)) == (then == "nftables")
        assert f"{first} rules removed: this node agent uses {then}" in restarted.output()
        restarted.remove_pod("u1")
        assert not istio_iptables(pod) and not istio_tables(pod)
    finally:
        restarted.stop()


@pytest.mark.root
def test_a_failed_transaction_is_said_in_one_line(scratch: list[str]) -> None:
    """libnftables' own text quotes each command it blames and underlines it with carets, one
    error after the other: the node agent's refusal (INTERNAL, a log line) had all of it. Each
    command is named as the one that failed (for a buffer, libnftables 1.0.6 named the first
    command for every error the kernel gave: the dry run from a file names the right ones)."""
    path = scratch_netns(scratch)
    with open_netns(path) as ns, in_netns(ns), pytest.raises(RedirectError) as failed:
        nftables.libnftables().run("add table inet mine\nadd rule inet nosuch c2 counter\n")
    assert str(failed.value) == (
        "nftables transaction failed: Could not process rule: No such file or directory "
        "(at: add rule inet nosuch c2 counter)"
    )
    assert "table inet mine" not in ruleset(path)  # (one transaction, and the dry run applied nothing)


@pytest.mark.root
def test_a_failed_transaction_leaves_tables_someone_else_made_as_they_were(
    tmp_path: Path, scratch: list[str]
) -> None:
    """A table with our name whose ``prerouting`` chain is someone else's plain chain: the
    transaction fails (our base chain of that name cannot go in), and since the kernel took
    none of it, nothing is cleaned up either (the clean-up deleted all three tables, theirs
    with them). Istio takes nothing out after a failed install either (net_linux.go)."""
    pod = scratch_netns(scratch)
    nft(pod, "add", "table", "inet", "istio-ambient-nat")
    nft(pod, "add", "chain", "inet", "istio-ambient-nat", "prerouting")
    nft(pod, "add", "rule", "inet", "istio-ambient-nat", "prerouting", "counter", "comment", '"owner"')
    nft(pod, "add", "chain", "inet", "istio-ambient-nat", "mine")
    before = ruleset(pod)
    server = NodeAgentProc(str(tmp_path), "--redirect-backend", "nftables", redirect=True).wait_ready()
    try:
        done = server.cli("pod", "add", "--uid", "u1", "--netns", pod)
        assert done.returncode != 0
        [line] = done.stderr.strip().splitlines()
        assert "nftables transaction failed: Could not process rule: File exists" in line
        assert "(at: add chain inet istio-ambient-nat prerouting {" in line and "nothing was changed" in line
        assert ruleset(pod) == before
        assert "lookup 100" not in ip(pod, "rule")
        assert server.list_pods() == []
        wait_until(lambda: "nothing was changed" in server.output(), what="the refusal in the log")
    finally:
        server.stop()
    assert ruleset(pod) == before


@pytest.mark.root
def test_a_restart_whose_reinstall_fails_takes_out_the_rules_the_store_recorded(
    tmp_path: Path, scratch: list[str]
) -> None:
    """The other half: where the pod store records this rule set in the netns, the tables are
    ours, and a reinstall that fails (someone made our base chain a plain one while the node
    agent was down) takes them out rather than leave a rule set nothing records."""
    pod = scratch_netns(scratch)
    server = NodeAgentProc(str(tmp_path), "--redirect-backend", "nftables", redirect=True).wait_ready()
    try:
        server.cli("pod", "add", "--uid", "u1", "--netns", pod)
        assert istio_tables(pod)
    finally:
        server.stop(signal.SIGKILL)
    nft(pod, "delete", "chain", "inet", "istio-ambient-nat", "prerouting")
    nft(pod, "add", "chain", "inet", "istio-ambient-nat", "prerouting")
    restarted = NodeAgentProc(str(tmp_path), "--redirect-backend", "nftables", redirect=True, name="again")
    try:
        restarted.wait_ready()
        [listed] = restarted.list_pods()
        assert (listed.uid, listed.recovery, listed.rules_installed) == ("u1", "rules failed", False)
        assert not istio_tables(pod) and "lookup 100" not in ip(pod, "rule")
    finally:
        restarted.stop()


def dns_captured(path: str, backend: str) -> bool:
    if backend == "iptables":
        return any("15053" in line for line in istio_iptables(path))
    return "dport 53" in ruleset(path)


@pytest.mark.root
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_a_restart_with_another_rule_configuration_reinstalls_the_rules(
    backend: str, tmp_path: Path, scratch: list[str]
) -> None:
    """Rules an earlier configuration installed are not in place: a node agent restarted with
    --no-dns-capture left every enrolled pod's DNS going to a 15053 nobody listens on (Istio's
    reconcile at start-up, on by default, replaces them). The same configuration again: kept."""
    pod = scratch_netns(scratch)
    flags = ("--redirect-backend", backend)
    server = NodeAgentProc(str(tmp_path), *flags, redirect=True).wait_ready()
    try:
        server.cli("pod", "add", "--uid", "u1", "--netns", pod)
        assert dns_captured(pod, backend)
    finally:
        server.stop(signal.SIGKILL)
    for run, (extra, recovery) in enumerate(
        [(("--no-dns-capture",), "rules reinstalled"), (("--no-dns-capture",), "restored")]
    ):
        again = NodeAgentProc(str(tmp_path), *flags, *extra, redirect=True, name=f"again{run}")
        try:
            again.wait_ready()
            [listed] = again.list_pods()
            assert (listed.recovery, listed.rules_installed) == (recovery, True)
            assert not dns_captured(pod, backend)
        finally:
            again.stop(signal.SIGKILL)


#: A process that makes the redirector a node agent serves pods with, then has threads malloc
#: at once, and says how many malloc arenas glibc made (its ``malloc_stats`` lists each).
_ARENAS_SCRIPT = """
import ctypes, sys, threading
from zds.server.inpodrules import RedirectConfig
from zds.server.redirect import serving_redirector
serving_redirector(sys.argv[1], RedirectConfig())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
held, ready = [], threading.Barrier(6)
def allocate():
    ready.wait()
    held.append(libc.malloc(200))
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_nftables_backend_keeps_malloc_to_two_arenas(backend: str) -> None:
    """libnftables runs on the rule threads, each of which glibc gives a malloc arena of its
    own (up to 8 a CPU), what is freed there staying resident: a node agent with this backend
    that enrolled and removed pods without end held ~95-155 MB, with two arenas ~86-97."""
    env = {
        key: value for key, value in os.environ.items() if key not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, "-c", _ARENAS_SCRIPT, backend], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    arenas = len(re.findall(r"^Arena \d+:$", out.stderr, re.MULTILINE))
    assert arenas == 2 if backend == "nftables" else arenas > 2, out.stderr  # (iptables: as glibc has it)
