"""Running the iptables tools inside a pod's netns (from its worker thread): their errors,
a save read safely, and the removal of our jumps and chains (redirect.py's iptables backend,
and every removal of its rules)."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Collection

from zds import runtime
from zds.errors import ZdsError, printable
from zds.server.iptablesave import (
    OUTPUT,
    PRERT,
    RULE_TABLES,
    cleanup_rules,
    is_incompatible,
    our_chains,
    unreadable_line,
)

log = logging.getLogger("zds.server.redirect")


class RulesNotOurs(ZdsError):
    """The netns holds rules not ours that our install would break; nothing was touched."""


class RedirectError(ZdsError):
    """Installing or removing the rules failed; the message has iptables' own words."""


class UnreadableSave(RedirectError):
    """``iptables-save`` printed a rule whose string holds a newline: its lines cannot be told apart."""


class NothingChanged(RedirectError):
    """An install failed in one atomic transaction (nftables): nothing of it went in, and
    what the namespace held before is as it was (tables with our names that someone else
    made, say: a clean-up would delete them)."""


def run_tool(argv: list[str], stdin: str = "") -> str:
    """What ``argv`` printed, its bytes as they are (surrogateescape: ``iptables-save`` lists
    every rule of the pod's netns, whose comments a pod with NET_ADMIN writes in any bytes; read
    as UTF-8 text one such made every install, removal and restart of the node agent fail)."""
    missing = f"{argv[0]} not found; install Debian's iptables package"  # (setpriv's 127, or none)
    try:
        done = subprocess.run(
            [*runtime.killed_with_parent(), *argv],
            input=stdin,
            capture_output=True,
            encoding="utf-8",
            errors="surrogateescape",
            timeout=30,
            check=False,
        )
    except FileNotFoundError as exc:
        raise RedirectError(missing) from exc
    except subprocess.TimeoutExpired as exc:  # (a hung iptables: a failure like any other)
        raise RedirectError(f"{' '.join(argv)} did not end within {exc.timeout:g} s") from exc
    if done.returncode == 127 and done.stderr.startswith(f"setpriv: failed to execute {argv[0]}: No such"):
        raise RedirectError(missing)
    if done.returncode != 0:
        detail = ""
        for line in filter(None, map(str.strip, (done.stderr or done.stdout).splitlines())):
            detail += (" " if detail.endswith(":") else "; " if detail else "") + printable(line)
        raise RedirectError(f"{' '.join(argv)} failed (exit {done.returncode}): {detail}")
    return done.stdout


def save(tool: str) -> str:
    """``TOOL-save``'s output; UnreadableSave where a rule's string runs past its line (what
    follows it there is the pod's, and read as iptables-save's it misled a removal)."""
    saved = run_tool([f"{tool}-save"])
    if line := unreadable_line(saved):
        if is_incompatible(line):
            raise UnreadableSave(
                f"{tool}-save cannot print a table of the pod's, which holds a rule made with nft that "
                f"iptables cannot read ({printable(line)}); `nft list ruleset` in the pod's netns shows it"
            )
        raise UnreadableSave(
            f"{tool}-save's output cannot be read safely: a string in a rule of the pod's (a comment, a "
            f"label) holding a newline?: {printable(line)}"
        )
    return saved


def remove_family(tool: str, saved: str) -> list[str]:
    """Take our jumps, rules and chains found in ``saved`` (``tool``'s save) out: in one
    restore; if that fails, the jumps out and the chains flushed, then each chain deleted
    on its own. What could not be done, said (RedirectError if a step failed outright)."""
    cleanup = cleanup_rules(saved)
    if not cleanup:
        return []
    try:
        run_tool([f"{tool}-restore", "--noflush"], cleanup)
    except RedirectError:
        saved = save(tool)  # (tables before the failed one went already)
        run_tool([f"{tool}-restore", "--noflush"], cleanup_rules(saved, delete_chains=False))
        return delete_chains(tool, our_chains(saved))
    return []


#: How many copies of one jump of ours a removal that cannot read the save takes out at most.
JUMP_COPIES = 8
#: What iptables says of a rule or chain that is not there (nft; legacy).
NOT_THERE = (
    "does not exist",
    "No chain/target/match by that name",
    "does a matching rule exist",
    "Couldn't load target",
)
#: iptables-nft's word when looking for a rule to delete it met one it cannot read (made with
#: nft): no copy of ours is found past it (one there keeps our emptied chain from going).
UNREADABLE_RULE = "Parsing nftables rule failed"


def remove_family_unread(tool: str) -> list[str]:
    """Take our jumps and chains out of a netns whose ``tool``-save cannot be read, as Istio
    removes them (``executeDeleteCommands``: fixed commands, none of which needs the save):
    each jump of ours deleted (every copy, up to ``JUMP_COPIES``), each chain of ours flushed,
    then deleted (``delete_chains``). A command that finds nothing there is no failure; what
    else failed, said."""
    errors: list[str] = []
    unreadable: list[str] = []  # (chains a search for our jumps could not look past a rule in)

    def done(argv: list[str]) -> bool:
        try:
            run_tool(argv)
        except RedirectError as exc:
            if UNREADABLE_RULE in str(exc):
                unreadable.append(argv[-1])
            elif not any(words in str(exc) for words in NOT_THERE):
                errors.append(str(exc))
            return False
        return True

    for table in RULE_TABLES:
        for builtin, chain in (("PREROUTING", PRERT), ("OUTPUT", OUTPUT)):
            for _ in range(JUMP_COPIES):
                if not done([tool, "-t", table, "-D", builtin, "-j", chain]):
                    break
    flushed = [
        (table, chain)
        for table in RULE_TABLES
        for chain in (PRERT, OUTPUT)
        if done([tool, "-t", table, "-F", chain])
    ]
    return errors + delete_chains(tool, flushed, behind_unreadable=set(unreadable))


def delete_chains(
    tool: str, chains: list[tuple[str, str]], *, behind_unreadable: Collection[str] = ()
) -> list[str]:
    """Delete our emptied ``chains``, each on its own; what could not go, said. One a rule of
    the pod's own still jumps to (EBUSY) stays, empty, as in Istio: a warning, not a failure
    (the redirection is out; retrying would fail until that rule goes, for as long as the pod)."""
    errors = []
    for table, chain in chains:
        try:
            run_tool([tool, "-t", table, "-X", chain])
        except RedirectError as exc:
            if "resource busy" in str(exc) or "Too many links" in str(exc):  # (nft; legacy)
                log.warning(
                    "%s %s chain %s stays, empty: %s jumps to it",
                    tool,
                    table,
                    chain,
                    "a jump of ours behind a rule iptables cannot read (made with nft), or a rule of the pod's own,"
                    if chain in behind_unreadable
                    else "a rule of the pod's own",
                )
            else:
                errors.append(str(exc))
    return errors
