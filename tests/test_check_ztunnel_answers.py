"""``zds check ztunnel`` judges the answer to every request it sends, within ``--timeout``
(Istio's node agent waits 5 s): a missing or late answer is a finding of the check that sent
the request, and the connection is used no more — else the late answer is read as the next
request's, and the answer to that one as a record nobody asked for."""

from __future__ import annotations

import pathlib

import pytest

from tests.harness import FAST_CHECK as FAST
from tests.harness import ZTUNNEL_CMD as ZTUNNEL
from tests.harness import faults_file, zds_check

pytestmark = pytest.mark.root


def test_a_request_never_answered_fails_the_check_that_sent_it(tmp_path: pathlib.Path) -> None:
    """The DelWorkload that ends add-acked was left unanswered (the SnapshotSent and the Add
    pass first): add-acked passed, its last answer never looked at."""
    faults = faults_file(tmp_path / "f.jsonl", {"kind": "never-ack", "count": 1, "after": 2})
    run = zds_check(
        "ztunnel", "--cmd", f"{ZTUNNEL} --faults {faults}", "--only", "add-acked", *FAST, tmp=tmp_path
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.status("add-acked") == "fail", run.stdout
    assert "DelWorkload uid=" in run.findings("add-acked")
    assert "was answered with nothing within 3s" in run.findings("add-acked")
    [finding] = run.check("add-acked")["findings"]
    assert finding["sent_hex"].startswith("12"), finding  # the DelWorkload's own bytes


def test_a_late_answer_fails_the_request_it_answers_and_is_not_taken_for_the_next(
    tmp_path: pathlib.Path,
) -> None:
    """The Add's ack came 4 s late (--timeout 3): listeners-in-pod passed "after the ack", the
    late ack was taken as the Del's, and the Del's own ack failed speaks-only-when-asked as "a
    record nobody asked for"."""
    faults = faults_file(tmp_path / "f.jsonl", {"kind": "delay-acks", "count": 1, "after": 2, "delay": 4})
    run = zds_check(
        "ztunnel",
        "--cmd",
        f"{ZTUNNEL} --faults {faults}",
        "--only",
        "speaks-only-when-asked,listeners-in-pod,listeners-closed-on-del",
        *FAST,
        tmp=tmp_path,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.statuses() == {
        "speaks-only-when-asked": "pass",
        "listeners-in-pod": "fail",
        "listeners-closed-on-del": "error",  # never judged: its connection was done
    }, run.stdout
    assert "AddWorkload uid=" in run.findings("listeners-in-pod")
    assert "was answered with nothing within 3s" in run.findings("listeners-in-pod")
    assert "was answered with nothing" in run.check("listeners-closed-on-del")["notes"][0]
