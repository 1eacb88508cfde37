"""Pods files (``zds server --pods``, ``zds pod add --from-file``): what is read, and the one
line that names the first problem (file, line or entry, field). Nothing here needs root."""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys

import pytest

from zds.netns import NetnsRef
from zds.server.pods import PodSource, PodSpecError
from zds.server.podsfile import load_pods_file, parse_pods


def lines(*entries: object) -> str:
    return "".join(json.dumps(e) + "\n" for e in entries)


def test_json_lines_are_read_with_the_defaults_filled_in_and_service_account_spelled_either_way() -> None:
    text = "# pods\n" + lines(
        {"uid": "u1", "name": "web", "namespace": "shop", "serviceAccount": "web-sa", "netns": "zdsp-1"},
        {"uid": "u2", "netns": "pid:42", "ips": ["10.0.0.2"], "name": None},
    )
    first, second = parse_pods(text, "pods.jsonl")
    assert (first.uid, first.name, first.namespace, first.service_account) == ("u1", "web", "shop", "web-sa")
    assert first.netns == NetnsRef(path="/var/run/netns/zdsp-1") and first.source is PodSource.PODS_FILE
    # A null or missing name is the uid, as Kubernetes' defaults for the rest.
    assert (second.uid, second.name, second.namespace, second.service_account) == (
        "u2",
        "u2",
        "default",
        "default",
    )
    assert second.netns == NetnsRef(pid=42) and second.ips == ("10.0.0.2",)


def test_an_entry_spelling_the_service_account_both_ways_keeps_service_account_and_names_the_other() -> None:
    text = lines({"uid": "u1", "netns": "/run/netns/a", "service_account": "sa", "serviceAccount": "other"})
    with pytest.raises(
        PodSpecError, match=r"^pods.jsonl:1: unknown field\(s\) serviceAccount; expected uid, "
    ):
        parse_pods(text, "pods.jsonl")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"uid": "u1", "netns": "/run/netns/a", "labels": {}, "image": "x"},
            "unknown field(s) image, labels",
        ),
        ({"netns": "/run/netns/a"}, "missing uid"),
        ({"uid": "", "netns": ""}, "missing uid, netns"),
        ({"uid": "u1", "netns": "pid:0"}, 'bad netns reference "pid:0"'),
        ({"uid": "u1", "netns": "pid:\u00b2"}, 'bad netns reference "pid:\u00b2"'),
        ({"uid": "u1", "netns": "/run/netns/a", "ips": "10.0.0.1"}, "ips must be a list of addresses"),
        (
            {"uid": "u1", "netns": "/run/netns/a", "ips": ["fd00::1", "web"]},
            "ips[1] 'web' is not an IP address",
        ),
        ({"uid": "u1", "netns": "/run/netns/a", "ips": [5]}, "ips[0] must be an address string, not int"),
        # a traceback from the control API's int32 field (zds pod add), a 5,000-digit int() before
        ({"uid": "u1", "netns": "pid:2147483648"}, "with N a process id (at most 2147483647)"),
        ({"uid": "u1", "netns": "pid:" + "9" * 5000}, 'bad netns reference "pid:999'),
        # a list was taken as the path "['a']"; true as the name "True"
        ({"uid": "u1", "netns": ["a"]}, "netns must be text, not a list"),
        (
            {"uid": "u1", "netns": "/run/netns/a", "name": True},
            "name must be text, not true (quote it in YAML)",
        ),
        ({"uid": "u1", "netns": "/run/netns/a", "namespace": 1.5}, "namespace must be text, not 1.5"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_file_its_line_and_what_is_wrong(
    entry: object, message: str
) -> None:
    text = lines({"uid": "ok", "netns": "/run/netns/ok"}, entry)
    with pytest.raises(PodSpecError) as refused:
        parse_pods(text, "pods.jsonl")
    assert str(refused.value).startswith("pods.jsonl:2: ") and message in str(refused.value)


def test_a_line_that_is_not_json_and_a_uid_given_twice_are_refused() -> None:
    with pytest.raises(PodSpecError, match=r"^pods.jsonl:2: not valid JSON: Extra data$"):
        parse_pods('{"uid": "a", "netns": "x"}\n{"uid": "b", "netns": "y"} {}\n', "pods.jsonl")
    with pytest.raises(PodSpecError, match=r"^pods.jsonl:2: uid 'a' appears twice \(first at line 1\)$"):
        parse_pods(lines({"uid": "a", "netns": "x"}, {"uid": "a", "netns": "y"}), "pods.jsonl")


def test_a_line_with_an_integer_too_long_to_convert_is_refused_in_one_line() -> None:
    with pytest.raises(PodSpecError, match=r"^pods.jsonl:1: JSON that cannot be read: Exceeds the limit"):
        parse_pods('{"uid": ' + "1" * 5000 + ', "netns": "x"}\n', "pods.jsonl")


def test_yaml_entries_are_named_by_their_position() -> None:
    specs = parse_pods("pods:\n  - {uid: u1, netns: pid:7}\n  - {uid: 12345, netns: b}\n", "pods.yaml")
    assert [(s.uid, s.netns) for s in specs] == [("u1", NetnsRef(pid=7)), ("12345", NetnsRef.of_path("b"))]
    with pytest.raises(PodSpecError, match=r"^pods.yaml: entry 2: expected an object with uid, "):
        parse_pods("- {uid: u1, netns: pid:7}\n- just a string\n", "pods.yaml")


@pytest.mark.parametrize("written", ["0123", "1_000", "0x1f", "1:30", "+12", "0b101", "-0"])
def test_an_unquoted_yaml_integer_is_the_text_it_was_written_as(written: str) -> None:
    """YAML 1.1 reads these as 83, 1000, 31, 90, ...: the pod was enrolled under a uid, name
    or namespace that was never written. JSON's integers are written only one way."""
    [spec] = parse_pods(
        f"- {{uid: {written}, name: {written}, namespace: {written}, netns: b}}\n", "pods.yaml"
    )
    assert (spec.uid, spec.name, spec.namespace) == (written, written, written)
    [spec] = parse_pods('{"uid": 83, "netns": "b"}\n', "pods.jsonl")
    assert spec.uid == "83"


def test_zero_is_a_uid_in_json_lines_as_in_yaml() -> None:
    """It was "missing uid" in JSON lines (0 is falsy) and the uid "0" in YAML."""
    for text, path in (('{"uid": 0, "netns": 0}\n', "pods.jsonl"), ("- {uid: 0, netns: 0}\n", "pods.yaml")):
        [spec] = parse_pods(text, path)
        assert (spec.uid, spec.netns) == ("0", NetnsRef.of_path("/var/run/netns/0")), path
    with pytest.raises(PodSpecError, match=r"^pods.jsonl:1: missing uid$"):
        parse_pods('{"uid": "", "netns": "b"}\n', "pods.jsonl")


def test_yaml_that_does_not_parse_is_said_in_one_line_with_where() -> None:
    """PyYAML's own text is four or five lines (the line quoted, a caret under it)."""
    with pytest.raises(PodSpecError) as refused:
        parse_pods("pods:\n  - {uid: a\n", "pods.yaml")
    assert str(refused.value) == (
        "pods.yaml: neither JSON lines nor valid YAML: while parsing a flow mapping: "
        "expected ',' or '}', but got '<stream end>' (line 3, column 1)"
    )


def test_a_pods_file_is_read_up_to_16_mib_and_a_fifo_nobody_writes_to_is_refused_at_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/zero was read until memory ran out (a MemoryError traceback under a ulimit), and a
    FIFO without a writer held the command for good, --timeout or not (now refused at once;
    one read as empty would have started a node agent with no pods, silently)."""
    with pytest.raises(PodSpecError) as refused:
        load_pods_file("/dev/zero")
    assert str(refused.value) == "/dev/zero: over 16 MiB; not a pods file"
    fifo = tmp_path / "pods.fifo"
    os.mkfifo(fifo)
    with pytest.raises(PodSpecError) as refused:  # nobody writes to it: at once, said
        load_pods_file(str(fifo))
    assert (
        str(refused.value)
        == f"cannot read pods file {fifo}: a FIFO that gave nothing (is its writer started?)"
    )
    monkeypatch.setattr(
        sys, "stdin", io.TextIOWrapper(io.BytesIO(lines({"uid": "u1", "netns": "pid:7"}).encode()))
    )
    assert [s.uid for s in load_pods_file("-")] == ["u1"]  # "-" is stdin
    with pytest.raises(PodSpecError, match=r"^cannot read pods file .*: Is a directory$"):
        load_pods_file(str(tmp_path))
