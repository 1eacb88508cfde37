"""``zds.values.frozen``: records as NamedTuples that compare and test as frozen dataclasses."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from zds.client.inpod import ListenerSpec
from zds.protocol.messages import Ack, AddWorkload, DelWorkload, Hello, KeepWorkload, SnapshotSent
from zds.protocol.workloads import StopProxy
from zds.server.faultkinds import MadeUpAdd


def same(a: Any, b: Any) -> bool:
    return bool(a == b)


def differ(a: Any, b: Any) -> bool:
    return bool(a != b)


def test_a_record_equals_only_a_record_of_its_own_type() -> None:
    assert same(KeepWorkload("u"), KeepWorkload("u")) and not differ(KeepWorkload("u"), KeepWorkload("u"))
    assert not same(KeepWorkload("u"), DelWorkload("u")) and differ(KeepWorkload("u"), DelWorkload("u"))
    assert not same(Ack(""), KeepWorkload("")) and not same(Hello(1), (1,))
    assert not same(SnapshotSent(), ()) and SnapshotSent() == SnapshotSent()
    assert not same(MadeUpAdd("u", None), AddWorkload("u", None))
    assert not same(StopProxy("u", "gone"), ("u", "gone"))


def test_a_record_is_always_true_and_hashed_by_its_fields() -> None:
    assert bool(SnapshotSent()) and bool(Ack())
    assert hash(ListenerSpec("hbone", 15008)) == hash(ListenerSpec("hbone", 15008))
    assert {KeepWorkload("u"): 1}[KeepWorkload("u")] == 1
    assert len({KeepWorkload("u"), DelWorkload("u")}) == 2
    assert repr(DelWorkload("u")) == "DelWorkload(uid='u')"


def test_a_record_has_no_order_and_lets_the_other_operand_compare() -> None:
    with pytest.raises(TypeError):
        sorted([KeepWorkload("b"), KeepWorkload("a")])
    assert same(Ack("x"), mock.ANY) and not differ(Ack("x"), mock.ANY)
