"""What an ``iptables-save`` says about the in-pod rules: our chains and the jumps to them,
someone else's rules that jump into them, and the ``iptables-restore`` input that takes ours
out (redirect.py applies it; Istio's own cleanup deletes the same jumps and chains)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from zds import defaults

PRERT = defaults.CHAIN_PREROUTING
OUTPUT = defaults.CHAIN_OUTPUT

_CHAIN_RE = re.compile(r"^:(\S+) ")
_JUMP_RE = re.compile(r"^-A (PREROUTING|OUTPUT) -j (ISTIO_PRERT|ISTIO_OUTPUT)$")


#: The tables the in-pod rules are in (Istio's): a chain of a pod's own named like ours in
#: another table (filter) is not ours, and is left alone.
RULE_TABLES = ("mangle", "nat", "raw")


def cleanup_rules(saved: str, *, delete_chains: bool = True) -> str:
    """``iptables-restore --noflush`` input that removes our jumps and chains found in
    ``saved`` (in RULE_TABLES only); without ``delete_chains``, only the jumps and the rules in
    the chains (``our_chains`` names them, to delete once emptied)."""
    out: list[str] = []
    for table, jumps, ours in _ours_by_table(saved):
        out.append(f"*{table}")
        out += [f"-D {builtin} -j {chain}" for builtin, chain in jumps]
        out += [f"-F {c}" for c in ours]
        if delete_chains:
            out += [f"-X {c}" for c in ours]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


#: A rule that jumps (or goes) into one of our chains.
_INTO_OURS_RE = re.compile(rf"^-A (\S+) .*-[jg] ({PRERT}|{OUTPUT})(?:\s|$)")


def foreign_jumps(saved: str) -> list[str]:
    """``table: rule`` of each rule in ``saved`` (RULE_TABLES) that jumps into a chain named as
    ours and is not one of our jumps: an Istio sidecar's istio-init puts ``-A OUTPUT -p tcp -j
    ISTIO_OUTPUT`` in nat. Our install takes those chains out first, which would break them."""
    return [
        f"{table}: {line}"
        for table, line in _table_lines(saved)
        if _INTO_OURS_RE.match(line) and not _JUMP_RE.match(line)
    ]


def our_chains(saved: str) -> list[tuple[str, str]]:
    """(table, chain) of each of our chains found in ``saved`` (in RULE_TABLES)."""
    return [(table, chain) for table, _, ours in _ours_by_table(saved) for chain in ours]


def _ours_by_table(saved: str) -> list[tuple[str, list[tuple[str, str]], list[str]]]:
    """(table, our jumps as (built-in chain, our chain), our chains) for each of RULE_TABLES
    in ``saved`` that holds any of them."""
    found: list[tuple[str, list[tuple[str, str]], list[str]]] = []
    table = ""
    jumps: list[tuple[str, str]] = []
    ours: list[str] = []
    for line in saved.split("\n"):
        line = line.strip()
        if line.startswith("*"):
            table, jumps, ours = line[1:].strip(), [], []
        elif table not in RULE_TABLES:
            continue
        elif (m := _CHAIN_RE.match(line)) and m.group(1) in (PRERT, OUTPUT):
            ours.append(m.group(1))
        elif m := _JUMP_RE.match(line):
            jumps.append((m.group(1), m.group(2)))
        elif line == "COMMIT" and (jumps or ours):
            found.append((table, jumps, ours))
    return found


_COUNTERS = re.compile(r"\s*\[\d+:\d+\]")


def our_lines(saved: str) -> list[str]:
    """The lines of ``iptables-save`` output that are our rules: our chains, the jumps to them,
    and the rules in them (counters stripped), with the table each is in (RULE_TABLES only)."""
    lines: list[str] = []
    for table, line in _table_lines(saved):
        if (m := _CHAIN_RE.match(line)) and m.group(1) in (PRERT, OUTPUT):
            lines.append(f"*{table} :{m.group(1)}")
        elif line.startswith("-A ") and (f" {PRERT}" in line or f" {OUTPUT}" in line):
            lines.append(f"*{table} {line}")
    return lines


#: The tables iptables-save prints, and the shape of a line in one of them (a comment, a
#: chain, a rule, the commit; empty).
_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
_LINE = re.compile(r"#.*|:\S+ \S+ \[\d+:\d+\]|-A \S+.*|COMMIT|")


def is_incompatible(line: str) -> bool:
    """Whether ``line`` is iptables-nft's in place of a table it cannot print (``# Table `nat'
    is incompatible, use 'nft' tool.``)."""
    return line.startswith("# Table `") and "' is incompatible" in line


def unreadable_line(saved: str) -> str:
    """The first line of ``saved`` that iptables-save cannot have written as it reads ('' if
    none): a string of a rule's holding a newline is written as it is (a comment quoted, by
    ``xtables_save_string``: its ``"`` and ``\\`` escaped; an IDLETIMER label, a RATEEST name
    not even that), and the lines after it are then the pod's words: a forged ``COMMIT`` and
    ``*filter`` moved a sidecar's jump out of nat, past the refusal, and its chain was
    flushed. So: a quoted string that does not end on its line; a line of no shape of its
    own; a table opened inside another, twice, or one iptables has not; a commit of none; a
    rule in a chain its table did not declare. And iptables-nft's word for a table holding a
    rule it cannot print (one made with ``nft``): the table is left out, our rules in it with it
    (a removal that read no nat table left our whole redirection in the pod)."""
    table = ""
    seen: set[str] = set()
    chains: set[str] = set()  # (declared in the table open: a rule is in one of them)
    for line in saved.split("\n"):
        if is_incompatible(line):
            return line
        if line.startswith("*"):
            if table or line[1:] not in _TABLES or line[1:] in seen:
                return line
            table = line[1:]
            seen.add(table)
            chains = set()
        elif line == "COMMIT":
            if not table:
                return line
            table = ""
        elif (
            not _LINE.fullmatch(line)
            or (not table and line and not line.startswith("#"))
            or _open_quote(line)
            or (line.startswith("-A ") and line[3:].split(" ", 1)[0] not in chains)
        ):
            return line
        elif line.startswith(":"):
            chains.add(line[1:].split(" ", 1)[0])
    return ""


def _open_quote(line: str) -> bool:
    """Whether a string ``xtables_save_string`` quoted (opened by `` "``) is still open at the
    line's end (a ``"`` inside a word, an interface's name, opens none)."""
    quoted = escaped = False
    before = " "
    for char in line if '"' in line else "":
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"' and before == " ":
            quoted = True
        before = char
    return quoted


def _table_lines(saved: str) -> Iterator[tuple[str, str]]:
    """(table, line) of each line of ``iptables-save`` output in one of RULE_TABLES, its
    counters stripped. Lines end at a newline only: a rule's comment is any bytes the pod
    wrote, and str.splitlines split one at \\x1c or \\r (a comment that forged ``*filter``
    hid a sidecar's jump into our chains, and kept ours from being taken out)."""
    table = ""
    for raw in saved.split("\n"):
        line = _COUNTERS.sub("", raw.strip())
        if line.startswith("*"):
            table = line[1:]
        elif table in RULE_TABLES:
            yield table, line
