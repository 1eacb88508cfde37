"""Parsing Istio's CNI plugin add event the way Go's encoding/json unmarshals it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zds.server.cni import BadEvent, derived_uid, parse_add_event, parse_del_event, parse_event

#: What Istio's plugin sends: IPConfig{Interface *int; Address net.IPNet; Gateway net.IP},
#: net.IPNet marshalling IP as text and Mask as base64.
GO_BODY = {
    "Netns": "/var/run/netns/cni-1234",
    "PodName": "reviews-v1-abc",
    "PodNamespace": "bookinfo",
    "IPs": [
        {"Interface": 0, "Address": {"IP": "10.244.1.7", "Mask": "////AA=="}, "Gateway": "10.244.1.1"},
        {
            "Interface": None,
            "Address": {"IP": "fd00::7", "Mask": "/////////////////////w=="},
            "Gateway": None,
        },
    ],
}


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_istios_body_parses_with_a_derived_uid_and_default_service_account() -> None:
    spec = parse_add_event(body(GO_BODY))
    assert (spec.name, spec.namespace, str(spec.netns)) == (
        "reviews-v1-abc",
        "bookinfo",
        "/var/run/netns/cni-1234",
    )
    assert spec.uid == derived_uid("bookinfo", "reviews-v1-abc") and spec.service_account == "default"
    assert derived_uid("bookinfo", "reviews-v1-abc") != derived_uid("bookinfo", "reviews-v1-abd")


def test_keys_match_case_insensitively_as_in_go() -> None:
    spec = parse_add_event(
        body({"netns": "/x", "podName": "a", "PODNAMESPACE": "b", "podUid": "u", "serviceaccount": "s"})
    )
    assert (str(spec.netns), spec.name, spec.namespace, spec.uid, spec.service_account) == (
        "/x",
        "a",
        "b",
        "u",
        "s",
    )


@pytest.mark.parametrize(
    ("ip_config", "text"),
    [
        ({"Address": "10.0.0.5/24"}, "Address must be an object"),
        ({"Address": {"IP": "notanip"}}, "not an IP address"),
        ({"Address": {"IP": "fe80::1%eth0\nFAKE"}}, "not an IP address"),  # (a zone: net.ParseIP takes none)
        ({"Address": {"IP": "10.0.0.5", "Mask": "%%%"}}, "not base64"),
        ({"Interface": "eth0"}, "Interface must be an integer"),
        ({"Gateway": "gw"}, "Gateway 'gw' is not an IP address"),
        ("10.0.0.5", "must be an object"),
    ],
)
def test_ip_configs_go_would_reject_are_refused(ip_config: Any, text: str) -> None:
    with pytest.raises(BadEvent, match=text):
        parse_add_event(body({**GO_BODY, "IPs": [ip_config]}))


def test_more_addresses_than_a_pod_has_are_refused() -> None:
    config = {"Address": {"IP": "10.0.0.5", "Mask": "////AA=="}}
    assert parse_add_event(body({**GO_BODY, "IPs": [config] * 16})).ips == ("10.0.0.5",) * 16
    with pytest.raises(BadEvent, match=r"^IPs: 17 entries, over 16"):
        parse_add_event(body({**GO_BODY, "IPs": [config] * 17}))


def test_empty_and_null_ip_fields_are_fine() -> None:
    for ips in ([None, {}, {"Address": {"IP": "", "Mask": None}, "Gateway": ""}], None):
        spec = parse_add_event(body({**GO_BODY, "IPs": ips}))
        assert spec.ips == ()  # no address, and nothing refused
        assert (spec.name, spec.namespace, str(spec.netns)) == (
            "reviews-v1-abc",
            "bookinfo",
            "/var/run/netns/cni-1234",
        )


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b'{"IPs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deep"),
        (b'{"PodUID": ' + b"1" * 5000 + b"}", "body is not JSON: Exceeds the limit"),
        (b"\xff{}", "body is not JSON"),
    ],
)
def test_a_body_json_cannot_read_is_a_bad_event_not_a_crash(raw: bytes, text: str) -> None:
    """A body under the size limit that is too deep for the decoder or holds an integer of
    more digits than Python converts is refused in one line (a 400), as any other bad body."""
    for parse in (parse_add_event, parse_del_event):
        with pytest.raises(BadEvent, match=text) as refused:
            parse(raw)
        assert "\n" not in str(refused.value)


def test_a_netns_path_with_a_newline_or_an_escape_is_a_bad_event() -> None:
    """It went into the log line and the answer as it was: a forged log line, a cleared terminal."""
    for netns in (
        "/var/run/netns/x\n2026-12-02T00:00:00.000Z info  zds.server: pod enrolled",
        "/run/netns/\x1b[2J",
    ):
        with pytest.raises(BadEvent, match=r"^Netns: netns path .* has a character that is not printable$"):
            parse_add_event(body({**GO_BODY, "Netns": netns}))


@pytest.mark.parametrize("key", ["PodName", "PodNamespace"])
def test_a_name_that_is_no_text_is_a_bad_event_when_the_uid_comes_from_it(key: str) -> None:
    """Without PodUID or ContainerID the uid is derived from the namespace and name: a lone
    surrogate there (JSON's "\\ud800") raised out of the handler (a traceback and a 500)."""
    raw = body({**GO_BODY, key: "\ud800"})
    with pytest.raises(BadEvent, match=r"is not valid text$") as refused:
        parse_add_event(raw)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("container_id", ["a\nb", "abc\n", "-abc", "a/b", "a b", "\x1b[2J"])
def test_a_container_id_libcni_would_refuse_is_a_bad_event(container_id: str) -> None:
    """The same rule as zds-cni's (libcni's): the id went raw into messages and log lines."""
    with pytest.raises(BadEvent, match=r"^ContainerID .* is not a container id$") as refused:
        parse_event(body({**GO_BODY, "PodUID": "u1", "ContainerID": container_id}))
    assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)
    spec, container = parse_event(body({**GO_BODY, "PodUID": "u1", "ContainerID": "0123abc_x.y-z"}))
    assert container == "0123abc_x.y-z" and spec.uid == "u1"


def test_a_field_given_twice_in_any_case_is_the_last_as_go_reads_it() -> None:
    """Go's encoding/json sets a field from every key that is its name in any case, in order:
    the last wins (zds took the exact-case one, whichever came)."""
    doc = {k: v for k, v in GO_BODY.items() if k != "Netns"}
    text = json.dumps(doc)[:-1] + ', "Netns": "/var/run/netns/a", "netns": "/var/run/netns/b"}'
    assert str(parse_add_event(text.encode()).netns) == "/var/run/netns/b"
    text = json.dumps(doc)[:-1] + ', "netns": "/var/run/netns/b", "NETNS": "/var/run/netns/c"}'
    assert str(parse_add_event(text.encode()).netns) == "/var/run/netns/c"


def test_a_null_given_after_a_field_leaves_it_as_go_does() -> None:
    text = json.dumps(GO_BODY)[:-1] + ', "podname": null}'
    assert parse_add_event(text.encode()).name == GO_BODY["PodName"]


@pytest.mark.parametrize(
    "doc",
    [{"PodName": 5}, {"IPs": "x"}, {"Netns": "", "PodUID": 3}, {"IPs": [{"Address": {"IP": "notanip"}}]}],
)
def test_a_field_go_cannot_decode_is_a_400_even_with_the_pod_named_by_nothing(doc: dict[str, Any]) -> None:
    """Istio's decode refuses the whole body first (400); only a body that decoded fails at its
    pod lookup (500): a missing Netns had been said first, a 500, for a body Go refuses."""
    from zds.server.cni import UnusableEvent

    with pytest.raises(BadEvent) as refused:
        parse_event(body(doc))
    assert not isinstance(refused.value, UnusableEvent), refused.value
    with pytest.raises(UnusableEvent, match=r"^Netns is missing or empty$"):
        parse_event(body({}))
