"""The pod store on its own: a real SQLite file in a temporary directory, no root needed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import sqlite3
import subprocess
import sys
import threading

import pytest

from zds.netns import NetnsIdentity, NetnsRef
from zds.server import storefile
from zds.server.pods import PodSource, PodSpec
from zds.server.store import PROBE_EVERY, WAL_LOOK_WRITES, WAL_WARN_EVERY, WAL_WARN_SIZE, PodStore
from zds.server.storefile import MIGRATIONS, SCHEMA_VERSION, StoreError
from zds.server.storerows import StoredPod


def spec(uid: str, netns: str = "/var/run/netns/pod-a", ips: tuple[str, ...] = ()) -> PodSpec:
    return PodSpec.create(uid, NetnsRef.parse(netns), name=f"n-{uid}", namespace="shop", ips=ips)


@pytest.fixture
def state(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "state"


def open_store(state: pathlib.Path, used_before: bool = False) -> PodStore:
    state.mkdir(exist_ok=True)
    return PodStore.open(str(state), used_before=used_before)


def test_a_first_start_creates_a_versioned_store_only_the_owner_can_read(state: pathlib.Path) -> None:
    store = open_store(state)
    try:
        assert len(store) == 0 and store.load() == []
        # Open, it has its -wal and -shm files: made by SQLite with the database's mode.
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in state.glob("pods.db*")}
        assert modes == {"pods.db": "0o600", "pods.db-wal": "0o600", "pods.db-shm": "0o600"}, modes
    finally:
        store.close()
    db = state / "pods.db"
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_empty_file_in_a_new_state_directory_becomes_a_store_only_the_owner_can_read(
    state: pathlib.Path,
) -> None:
    # (a file made ahead, with the usual umask's 0644: the pods' names went into it as they were)
    state.mkdir()
    db = state / "pods.db"
    db.touch(0o644)
    db.chmod(0o644)
    store = open_store(state)
    try:
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in state.glob("pods.db*")}
        assert modes == {"pods.db": "0o600", "pods.db-wal": "0o600", "pods.db-shm": "0o600"}, modes
    finally:
        store.close()


def test_an_existing_store_keeps_the_mode_it_was_given(state: pathlib.Path) -> None:
    open_store(state).close()
    db = state / "pods.db"
    db.chmod(0o640)  # the operator's choice (a group that reads it): not zds's to undo
    open_store(state, used_before=True).close()
    assert oct(db.stat().st_mode & 0o777) == "0o640"


def test_what_is_put_comes_back_as_it_was_written(state: pathlib.Path) -> None:
    store = open_store(state)
    try:
        store.put(
            spec("u1", ips=("10.0.0.5", "fd00::5")),
            NetnsIdentity(4, 4026532290),
            rules="iptables",
            rules_digest="abc",
            enrolled_at=10.0,
        )
        store.put(spec("u2", "pid:4242"), None, enrolled_at=5.0)
    finally:
        store.close()
    store = open_store(state, used_before=True)  # a restart reads what the last run committed
    try:
        u2, u1 = store.load()  # oldest enrollment first
    finally:
        store.close()
    assert u1.spec == spec("u1", ips=("10.0.0.5", "fd00::5"))
    assert (u1.identity, u1.rules, u1.rules_digest, u1.removing, u1.enrolled_at) == (
        NetnsIdentity(4, 4026532290),
        "iptables",
        "abc",
        False,
        10.0,
    )
    assert u2.spec.netns == NetnsRef.of_pid(4242) and u2.identity is None and u2.rules == ""


def test_a_put_overwrites_and_a_removal_is_marked_then_deleted(state: pathlib.Path) -> None:
    store = open_store(state)
    try:
        store.put(spec("u1"), NetnsIdentity(4, 1))
        store.put(spec("u1", "/var/run/netns/pod-b"), NetnsIdentity(4, 2))
        [row] = store.load()
        assert row.identity == NetnsIdentity(4, 2) and str(row.spec.netns) == "/var/run/netns/pod-b"
        store.mark_removing("u1")
        [row] = store.load()
        assert row.removing
        store.delete("u1")
        assert store.load() == []
    finally:
        store.close()


def test_a_file_that_is_not_a_database_is_refused_in_one_line_and_left_untouched(state: pathlib.Path) -> None:
    state.mkdir()
    db = state / "pods.db"
    garbage = b"this is not an SQLite database\n" * 200
    db.write_bytes(garbage)
    with pytest.raises(StoreError) as caught:
        PodStore.open(str(state), used_before=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"pod store {db} is not a readable zds pod store")
    assert "--reset-state" in message
    assert db.read_bytes() == garbage
    assert not (state / "pods.db-wal").exists()


def test_another_programs_database_is_refused(state: pathlib.Path) -> None:
    state.mkdir()
    db = state / "pods.db"
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE accounts (id INTEGER)")
    before = db.read_bytes()
    with pytest.raises(StoreError, match="is an SQLite database but not a zds pod store"):
        PodStore.open(str(state), used_before=True)
    assert db.read_bytes() == before


@pytest.mark.parametrize(
    "statements",
    [
        ["CREATE TABLE pods (x)", "PRAGMA user_version = 2"],  # migrated to 3, then "no such column: uid"
        ["CREATE TABLE pods (uid TEXT PRIMARY KEY)", "PRAGMA user_version = 1"],
        [*MIGRATIONS[1], "PRAGMA user_version = 3"],  # no source, no netns_cookie
        [*MIGRATIONS[1], *MIGRATIONS[2], *MIGRATIONS[3], "PRAGMA user_version = 4"],  # no installs
        [
            *MIGRATIONS[1],
            *MIGRATIONS[2],
            *MIGRATIONS[3],
            *MIGRATIONS[4],
            "PRAGMA user_version = 5",
        ],  # no leftovers
    ],
)
def test_a_database_with_a_pods_table_that_is_not_zds_is_refused_untouched(
    state: pathlib.Path, statements: list[str]
) -> None:
    state.mkdir()
    db = state / "pods.db"
    with sqlite3.connect(db) as raw:
        for statement in statements:
            raw.execute(statement)
    before = db.read_bytes()
    with pytest.raises(StoreError, match="is an SQLite database but not a zds pod store"):
        PodStore.open(str(state), used_before=True)
    assert db.read_bytes() == before


def test_a_store_from_a_newer_zds_is_refused(state: pathlib.Path) -> None:
    open_store(state).close()
    with sqlite3.connect(state / "pods.db") as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this zds knows"):
        PodStore.open(str(state), used_before=True)


def test_a_missing_store_in_a_used_state_directory_is_an_error_not_an_empty_start(
    state: pathlib.Path,
) -> None:
    state.mkdir()
    with pytest.raises(StoreError) as caught:
        PodStore.open(str(state), used_before=True)
    assert str(caught.value) == (
        f"pod store {state / 'pods.db'} is missing, but {state} was used by a node agent before; "
        "restore the file, or start empty with --reset-state (ztunnel then drops the pods it holds)"
    )
    assert not (state / "pods.db").exists()


@pytest.mark.parametrize("wal_lost", [False, True], ids=["truncated", "wal-lost"])
def test_an_empty_store_in_a_used_state_directory_is_an_error_not_an_empty_start(
    state: pathlib.Path, tmp_path: pathlib.Path, wal_lost: bool
) -> None:
    """Truncated, or its -wal (holding every row) lost: no tables. In a state directory a node
    agent used, that is refused, and the file left as it was."""
    state.mkdir()
    db = state / "pods.db"
    if wal_lost:  # the database as a kill -9 leaves it, without its -wal: its first page only
        source = tmp_path / "source.db"
        raw = sqlite3.connect(source)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA wal_autocheckpoint=0")
        raw.execute("CREATE TABLE pods (uid TEXT PRIMARY KEY)")
        raw.execute("PRAGMA user_version = 3")
        db.write_bytes(source.read_bytes())
        raw.close()
    else:
        db.write_bytes(b"")
    before = db.read_bytes()
    with pytest.raises(StoreError, match=r"is empty \(no tables\), but its state directory was used"):
        PodStore.open(str(state), used_before=True)
    assert db.read_bytes() == before


def test_a_locked_store_is_named_as_locked(state: pathlib.Path) -> None:
    open_store(state).close()
    holder = sqlite3.connect(state / "pods.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreError, match="is locked by another process"):
            store = PodStore.open(str(state), used_before=True)
            store.put(spec("u1"), None)
    finally:
        holder.close()


def stored(uid: str) -> StoredPod:
    return StoredPod(spec(uid), NetnsIdentity(4, 100), "", "", removing=False, enrolled_at=1.0, cookie=7)


async def test_pods_put_in_one_turn_of_the_loop_are_committed_together_each_before_its_caller_returns(
    state: pathlib.Path,
) -> None:
    store = open_store(state)
    transactions: list[str] = []
    store._db.set_trace_callback(lambda sql: transactions.append(sql) if sql.startswith("BEGIN") else None)
    reader = sqlite3.connect(state / "pods.db")

    async def put_then_read(uid: str) -> list[str]:
        await store.put_soon(stored(uid))
        return [row[0] for row in reader.execute("SELECT uid FROM pods WHERE uid = ?", (uid,))]

    try:
        seen = await asyncio.gather(*(put_then_read(f"u{i}") for i in range(5)))
        assert seen == [[f"u{i}"] for i in range(5)]  # committed (another connection sees it) on return
        assert len(transactions) == 1
        await store.put_soon(stored("u9"))  # a later turn: a transaction of its own
        assert len(transactions) == 2 and len(store) == 6
    finally:
        reader.close()
        store.close()


async def test_an_install_row_is_committed_on_its_own_and_goes_with_the_pods_own_row(
    state: pathlib.Path,
) -> None:
    """Written before a pod's rules go in (committed: another connection sees it), the pod's
    own row takes it out in the same transaction; ``forget_install`` after a failed install."""
    store = open_store(state)
    reader = sqlite3.connect(state / "pods.db")

    def committed() -> tuple[list[str], list[str]]:
        installs, pods = (
            [uid for (uid,) in reader.execute(f"SELECT uid FROM {table} ORDER BY uid")]
            for table in ("installs", "pods")
        )
        return installs, pods

    try:
        await asyncio.gather(store.intend_soon(stored("u1")), store.intend_soon(stored("u2")))
        assert committed() == (["u1", "u2"], [])
        assert [p.spec.uid for p in store.load_installs()] == ["u1", "u2"] and store.load() == []
        assert store.load_installs()[0] == stored("u1")
        await store.put_soon(stored("u1"))
        assert committed() == (["u2"], ["u1"])
        store.forget_install("u2")
        assert committed() == ([], ["u1"]) and store.load_installs() == []
    finally:
        reader.close()
        store.close()


def test_rules_left_in_a_netns_are_recorded_per_uid_netns_and_rule_set_apart_from_the_uids_later_rows(
    state: pathlib.Path,
) -> None:
    """Recorded in ``pods`` (marked removing) or ``installs``, keyed by uid alone, rules a
    failed removal or install left in netns A were overwritten by the uid's next row, for
    another netns: nothing recorded them any more."""
    store = open_store(state)
    a, b = NetnsIdentity(4, 100), NetnsIdentity(4, 200)
    in_a = dataclasses.replace(stored("u1"), rules="iptables")
    try:
        store.put_many([in_a])
        store.mark_removing("u1")
        store.keep_leftover(dataclasses.replace(in_a, removing=True))  # its removal's rules stayed
        assert store.load() == []  # the removal's row moved, in one transaction
        store.put_many([dataclasses.replace(in_a, identity=b)])  # u1 again, in B
        assert [(r.spec.uid, r.identity, r.removing) for r in store.load_leftovers()] == [("u1", a, True)]
        # A failed install's in A, under the other rule set: its install row moves.
        install = dataclasses.replace(stored("u2"), rules="nftables")
        store._write_rows([], [install])
        store.keep_leftover(install)
        other = dataclasses.replace(in_a, rules="nftables")
        store.keep_leftover(other)  # u1's under the other rule set, in A too: a row of its own
        assert store.load_installs() == []
        assert sorted((r.spec.uid, r.rules) for r in store.load_leftovers()) == [
            ("u1", "iptables"),
            ("u1", "nftables"),
            ("u2", "nftables"),
        ]
        store.forget_leftovers(a, [("u1", "nftables")])
        assert sorted((r.spec.uid, r.rules) for r in store.load_leftovers()) == [
            ("u1", "iptables"),
            ("u2", "nftables"),
        ]
        store.keep_leftover(other)
        store.mark_removing("u1")  # u1's removal in B has begun: its row is not A's
        store.forget_leftovers(a, [("u1", "iptables"), ("u2", "nftables")], rows_of=[("u1", "iptables")])
        assert [(r.spec.uid, r.rules) for r in store.load_leftovers()] == [("u1", "nftables")]  # (not done)
        store.forget_leftovers(a, [("u1", "nftables")])
        assert store.load_leftovers() == []
        assert [(r.spec.uid, r.identity, r.removing) for r in store.load()] == [("u1", b, True)]
    finally:
        store.close()


def test_rows_that_moving_to_leftovers_left_behind_go_with_them_for_that_netns_only(
    state: pathlib.Path,
) -> None:
    store = open_store(state)
    a, b = NetnsIdentity(4, 100), NetnsIdentity(4, 200)
    try:
        store.put_many([stored("u1"), dataclasses.replace(stored("u3"), identity=b), stored("u4")])
        store.mark_removing("u1")
        store.mark_removing("u3")  # (in B)
        store._write_rows([], [stored("u2"), dataclasses.replace(stored("u5"), rules="nftables")])
        keys = [(uid, "") for uid in ("u1", "u2", "u3", "u4", "u5")]
        store.forget_leftovers(a, [], rows_of=keys)
        # u4 enrolled again in A (not removing), u5's install row of another rule set: theirs
        assert [r.spec.uid for r in store.load()] == ["u3", "u4"]
        assert [r.spec.uid for r in store.load_installs()] == ["u5"]
    finally:
        store.close()


@pytest.mark.parametrize("table", ["pods", "installs", "leftovers", None])
def test_a_refused_first_start_removes_the_store_it_made_only_if_nothing_went_in(
    state: pathlib.Path, table: str | None
) -> None:
    """A store holding only rules left in a netns (an install of a --pods entry whose undo
    failed, then a start refused later) was removed with them: the rules recorded nowhere."""
    store = open_store(state)
    try:
        if table == "pods":
            store.put_many([stored("u1")])
        elif table == "installs":
            store._write_rows([], [stored("u1")])
        elif table == "leftovers":
            store.keep_leftover(stored("u1"))
    finally:
        store.close()
    assert storefile.remove_if_unused(str(state)) is (table is None)
    assert (state / "pods.db").exists() is (table is not None)
    assert not (state / "pods.db-wal").exists() and not (state / "pods.db-shm").exists()  # (kept or not)


async def test_a_failed_group_commit_fails_every_pod_in_it_and_the_next_turn_starts_afresh(
    state: pathlib.Path,
) -> None:
    store = open_store(state)
    holder = sqlite3.connect(state / "pods.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        outcomes = await asyncio.gather(
            *(store.put_soon(stored(f"u{i}")) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(o, StoreError) and "is locked by another process" in str(o) for o in outcomes)
        assert len({id(o) for o in outcomes}) == 3  # each caller its own error
        holder.execute("ROLLBACK")
        await store.put_soon(stored("u1"))
        assert [p.spec.uid for p in store.load()] == ["u1"]
    finally:
        holder.close()
        store.close()


async def test_a_group_commit_that_fails_unexpectedly_leaves_no_caller_waiting(state: pathlib.Path) -> None:
    store = open_store(state)
    unwritable = dataclasses.replace(stored("u2"), spec=spec("u2")._replace(ips=(object(),)))  # type: ignore[arg-type]
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(store.put_soon(stored("u1")), store.put_soon(unwritable), return_exceptions=True),
            5,
        )
        assert all(isinstance(o, TypeError) for o in outcomes), outcomes  # the whole transaction failed
        assert len(store) == 0
    finally:
        store.close()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("netns = 'pid:x'", "the row of pod 'u1' is damaged (bad netns reference"),
        ("uid = NULL", "the row of pod None is damaged (its uid is not a non-empty text)"),
        ("name = x'00ff'", "the row of pod 'u1' is damaged (name is bytes, not text)"),
        ("enrolled_at = 'x'", "the row of pod 'u1' is damaged (enrolled_at is str, not a number)"),
        # (the first two broke every ListPods and Watch later: a Timestamp cannot hold them;
        # before 1970 is no time zds writes)
        ("enrolled_at = 1e12", "the row of pod 'u1' is damaged (enrolled_at is 1000000000000.0, not a time"),
        ("enrolled_at = 9e999", "the row of pod 'u1' is damaged (enrolled_at is inf, not a time from 1970"),
        (
            "enrolled_at = -1",
            "the row of pod 'u1' is damaged (enrolled_at is -1.0, not a time from 1970 to 9999)",
        ),
        ("removing = 'no'", "the row of pod 'u1' is damaged (removing is 'no', not 0 or 1)"),
        ("ips = '\"ab\"'", "the row of pod 'u1' is damaged (ips is not a list of addresses)"),
        ("netns_ino = -1", "the row of pod 'u1' is damaged (netns_ino is -1, not a number)"),
    ],
)
def test_a_damaged_row_is_named_with_its_uid(state: pathlib.Path, change: str, says: str) -> None:
    """Written behind zds's back: refused when read, in one line saying what to do (it was a
    traceback at start, or a pod silently removed, or every later ListPods failing)."""
    store = open_store(state)
    store.put(spec("u1"), NetnsIdentity(4, 4026531840))
    store.close()
    with sqlite3.connect(state / "pods.db") as raw:
        raw.execute(f"UPDATE pods SET {change} WHERE uid = 'u1'")
    store = open_store(state, used_before=True)
    try:
        with pytest.raises(StoreError) as refused:
            store.load()
        assert says in str(refused.value) and "restore the file from a backup" in str(refused.value)
    finally:
        store.close()


def test_reset_moves_the_store_aside_and_never_deletes_it(state: pathlib.Path) -> None:
    store = open_store(state)
    store.put(spec("u1"), None)
    store.close()
    aside = storefile.reset(str(state))
    assert aside is not None and aside.startswith(str(state / "pods.db.")) and aside.endswith(".bak")
    assert not (state / "pods.db").exists()
    with sqlite3.connect(aside) as raw:
        assert raw.execute("SELECT uid FROM pods").fetchall() == [("u1",)]
    assert storefile.reset(str(state)) is None  # nothing there to move
    fresh = open_store(state)
    try:
        assert fresh.load() == []
    finally:
        fresh.close()
    assert sorted(os.listdir(state))[0] == "pods.db"


def test_resets_within_one_second_each_keep_their_own_backup(state: pathlib.Path) -> None:
    """The second one's rename replaced the first backup (its name has a second's resolution)."""
    asides = []
    for uid in ("u1", "u2"):
        store = open_store(state)
        store.put(spec(uid), None)
        store.close()
        asides.append(storefile.reset(str(state)))
    first, second = asides
    assert first is not None and second is not None and first != second
    for aside, uid in ((first, "u1"), (second, "u2")):
        with contextlib.closing(sqlite3.connect(aside)) as raw:
            assert raw.execute("SELECT uid FROM pods").fetchall() == [(uid,)]


def test_a_schema_1_store_is_migrated_and_its_pods_came_from_the_api(state: pathlib.Path) -> None:
    state.mkdir(exist_ok=True)
    with sqlite3.connect(state / "pods.db") as raw:
        for statement in MIGRATIONS[1]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        raw.execute(
            "INSERT INTO pods (uid, name, namespace, service_account, netns, enrolled_at) "
            "VALUES ('u1', 'web', 'shop', 'default', '/run/netns/a', 1.0)"
        )
    store = open_store(state, used_before=True)
    try:
        [row] = store.load()
        assert row.spec.source is PodSource.API
        assert store.load_installs() == [] == store.load_leftovers()  # their tables are there (schemas 4, 5)
        store.put(spec("u2", "/run/netns/b")._replace(source=PodSource.CNI), None)
        assert {r.spec.uid: r.spec.source for r in store.load()} == {"u1": PodSource.API, "u2": PodSource.CNI}
    finally:
        store.close()


def test_the_wal_grown_behind_a_long_reader_is_cut_back_once_it_is_gone(state: pathlib.Path) -> None:
    """A reader holding its snapshot over many writes (a ``sqlite3`` shell left in a
    transaction) keeps the -wal file growing; it stayed at its largest until the node agent
    stopped."""
    store = open_store(state)
    wal = state / "pods.db-wal"
    try:
        reader = sqlite3.connect(f"file:{state / 'pods.db'}?mode=ro", uri=True, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM pods").fetchone()
            for i in range(1500):
                store.put(spec(f"u{i % 50}", ips=(f"10.0.{i % 200}.1",)), NetnsIdentity(4, i))
            grown = wal.stat().st_size
            assert grown > 2 * storefile.WAL_SIZE_LIMIT
        finally:
            reader.close()
        for i in range(1100):  # (past SQLite's checkpoint at 1,000 pages: the log starts over)
            store.put(spec(f"u{i % 50}"), NetnsIdentity(4, i))
        assert wal.stat().st_size <= storefile.WAL_SIZE_LIMIT, f"{grown} -> {wal.stat().st_size}"
    finally:
        store.close()


def test_a_wal_a_reader_keeps_from_its_checkpoints_is_said_once(
    state: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held back by a reader, the -wal grew to 92 MB in a soak with nothing said: now a warning
    names the file, its size and why, once (not at every look past the size: again only
    WAL_WARN_EVERY later, and only while it grows); none while checkpoints work."""
    store = open_store(state)
    caplog.set_level(logging.WARNING, logger="zds.server.store")
    looks_past = 0
    look = store._look_at_wal

    def counted() -> None:
        nonlocal looks_past
        looks_past += (state / "pods.db-wal").stat().st_size > WAL_WARN_SIZE
        look()

    monkeypatch.setattr(store, "_look_at_wal", counted)
    wal = state / "pods.db-wal"
    try:
        for i in range(3 * WAL_LOOK_WRITES):  # (no reader: the checkpoints keep it small)
            store.put(spec(f"u{i % 50}"), NetnsIdentity(4, i))
        assert not caplog.records
        reader = sqlite3.connect(f"file:{state / 'pods.db'}?mode=ro", uri=True, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM pods").fetchone()
            i = 0
            while looks_past < 3:
                store.put(spec(f"u{i % 50}", ips=("10.0.0.1",)), NetnsIdentity(4, i))
                i += 1
            [said] = [r.getMessage() for r in caplog.records]
            assert re.fullmatch(
                rf"the pod store's write-ahead log {state}/pods.db-wal is \d+ MB and growing: a reader holds its "
                r"checkpoints back \(a sqlite3 shell left in a transaction, a backup\); it is cut back to 4 MB "
                r"once that reader ends",
                said,
            ), said
            assert store._wal_said is not None
            store._wal_said -= WAL_WARN_EVERY  # (said that long ago)
            store._wal_seen = wal.stat().st_size  # (a look at a -wal that did not grow since)
            look()
            assert len(caplog.records) == 1
            for _ in range(WAL_LOOK_WRITES):
                store.put(spec(f"u{i % 50}", ips=("10.0.0.1",)), NetnsIdentity(4, i))
                i += 1
            assert len(caplog.records) == 2, "not said again once WAL_WARN_EVERY went by"
        finally:
            reader.close()
    finally:
        store.close()


def test_a_probe_waits_for_no_lock_another_holds_and_tries_at_most_once_every_so_often(
    state: pathlib.Path,
) -> None:
    """``/readyz``'s probe answers on the event loop: with another process holding the write
    lock it fails at once (it waited out the busy timeout, 0.5 s, once a second for as long as
    anyone asked), keeps the connection's busy timeout as it was, and tries again only
    PROBE_EVERY later."""
    store = open_store(state)
    other = sqlite3.connect(state / "pods.db", isolation_level=None)
    try:
        store.put(spec("u1"), NetnsIdentity(4, 1))
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            store.put(spec("u2"), NetnsIdentity(4, 2))
        store._db.execute("PRAGMA busy_timeout = 600000")  # (a probe that waits: ten minutes)
        answered: list[str] = []
        probing = threading.Thread(target=lambda: answered.append(store.probe()), daemon=True)
        probing.start()
        probing.join(60)
        assert answered and "locked" in answered[0], "the probe waited for the lock"
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 600000
        other.rollback()
        writes = store._writes
        assert "locked" in store.probe() and store._writes == writes  # (tried less than PROBE_EVERY ago)
        store._probed -= PROBE_EVERY
        assert store.probe() == "" and store._writes == writes + 1
        assert [pod.spec.uid for pod in store.load()] == ["u1"]  # (the probe's row is not left)
    finally:
        other.close()
        store.close()


@pytest.mark.root
def test_a_probe_says_writable_only_with_room_for_pods_not_for_a_page(state: pathlib.Path) -> None:
    """A disk with a few pages free took a probe that wrote one page (ready), then refused the
    next pod (not ready), again and again: a probe writes what a pod's write does and asks
    for PROBE_ROOM free."""
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(state)], check=True)
    try:
        store = open_store(state)
        try:
            store.put(spec("u1"), NetnsIdentity(4, 1))
            with contextlib.suppress(OSError), open(state / "filler", "wb") as filler:
                filler.write(b"\0" * (2 << 20))  # (ENOSPC: as full as it gets)
            big = spec("u2" + "x" * 250, netns="/var/run/netns/" + "p" * 200, ips=("10.0.0.1",) * 16)
            with pytest.raises(StoreError, match="full"):
                store.put(big, NetnsIdentity(4, 2))
            os.truncate(state / "filler", os.stat(state / "filler").st_size - 6 * 4096)  # (6 pages)
            for _ in range(3):
                store._probed -= PROBE_EVERY
                assert "full" in store.probe()
            os.unlink(state / "filler")
            store._probed -= PROBE_EVERY
            assert store.probe() == ""
            store.put(big, NetnsIdentity(4, 2))
            assert {pod.spec.uid for pod in store.load()} == {"u1", big.uid}
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=True)


def test_a_close_its_own_open_statement_keeps_from_writing_out_is_an_error_not_a_reader(
    state: pathlib.Path,
) -> None:
    """Another process reading the store keeps the last checkpoint from finishing, which is
    allowed (a warning); a statement of the store's own left open does too (SQLITE_LOCKED):
    a bug of ours, said as the store not written out, not as someone else reading it."""
    store = open_store(state)
    store.put(spec("u1"), NetnsIdentity(4, 1))
    store.put(spec("u2"), NetnsIdentity(4, 2))
    cursor = store._db.execute("SELECT uid FROM pods")
    assert cursor.fetchone() is not None  # (one row read, one to come: the statement stays open)
    with pytest.raises(StoreError, match=r"cannot write the pod store out as it closes: .*locked"):
        store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced by another file"])
def test_a_store_file_deleted_or_replaced_under_it_stores_nothing_more_and_is_kept_aside(
    state: pathlib.Path, how: str
) -> None:
    """Its writes went on into the file SQLite held open, which no start reads: pods acked
    since were lost, and (deleted) every pod before them, or (replaced) a start recovered the
    other file's shorter list without a word. Now no write goes in (the enrollment fails, the
    node agent is not ready), and the close writes what the store holds beside the file."""
    store = open_store(state)
    path = state / "pods.db"
    store.put(spec("u1"), None, enrolled_at=1.0)
    if how == "deleted":
        for name in ("pods.db", "pods.db-wal", "pods.db-shm"):
            (state / name).unlink(missing_ok=True)
    else:
        other = state / "other.db"
        with contextlib.closing(sqlite3.connect(other)) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE theirs (x)")
            db.executemany("INSERT INTO theirs VALUES (?)", [(b"x" * 200,)] * 300)
            db.commit()
        os.replace(other, path)
    with pytest.raises(StoreError, match=f"was {how} while the node agent ran: nothing more is stored"):
        store.put(spec("u2"), None, enrolled_at=2.0)
    assert store.failing.startswith(f"pod store {path} was {how}")
    with pytest.raises(StoreError, match="what it held is written out as") as info:
        store.close()
    found = re.search(r"written out as (\S+):", str(info.value))
    assert found is not None
    kept = found.group(1)
    assert os.stat(kept).st_mode & 0o777 == 0o600
    with contextlib.closing(sqlite3.connect(kept)) as db:
        assert db.execute("SELECT uid FROM pods").fetchall() == [("u1",)]
    assert path.exists() == (how != "deleted")
    if path.exists():  # (the file put in its place is not touched: its -wal at the path was ours, left full)
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert db.execute("SELECT count(*) FROM theirs").fetchone() == (300,)


_CRASH_AFTER = """
import os, sys
from zds.netns import NetnsRef
from zds.server.pods import PodSpec
from zds.server.store import PodStore
state, how = sys.argv[1], sys.argv[2]
def spec(uid):
    return PodSpec.create(uid, NetnsRef.parse("/var/run/netns/pod-a"), name="n-" + uid, namespace="shop")
store = PodStore.open(state, used_before=False)
store.put(spec("u1"), None, enrolled_at=1.0)
wal = os.path.join(state, "pods.db-wal")
os.unlink(wal)
if how == "replaced by another file":
    with open(wal, "wb") as f:
        f.write(b"not a wal")
store.put(spec("u2"), None, enrolled_at=2.0)
print(store.failing or "stored")
sys.stdout.flush()
os._exit(0)  # (as a SIGKILL: no checkpoint, no close)
"""


@pytest.mark.parametrize("how", ["deleted", "replaced by another file"])
def test_a_wal_deleted_or_replaced_under_it_is_written_into_the_store_and_made_again(
    state: pathlib.Path, how: str
) -> None:
    """SQLite went on writing into the -wal it held open: a crash then lost every pod committed
    since the last checkpoint (the first start after it found none, not even the store's
    tables). Now the next write puts what that -wal held into the store and starts a new one."""
    state.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _CRASH_AFTER, str(state), how], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stored"
    assert re.search(
        rf"pod store \S+'s -wal was {how} while the node agent ran .*a new -wal made", done.stderr
    )
    store = open_store(state, used_before=True)
    try:
        assert sorted(pod.spec.uid for pod in store.load()) == ["u1", "u2"]
    finally:
        store.close()


def test_a_wal_that_cannot_be_made_again_refuses_writes_until_it_can(state: pathlib.Path) -> None:
    """Another connection open on the store keeps the journal mode from changing: the write is
    refused (the node agent not ready) and the next one, once it closed, goes through."""
    store = open_store(state)
    try:
        store.put(spec("u1"), None, enrolled_at=1.0)
        other = sqlite3.connect(state / "pods.db", isolation_level=None)
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM pods").fetchall()  # (a reader's snapshot, held)
        (state / "pods.db-wal").unlink()
        with pytest.raises(
            StoreError, match="-wal was deleted while the node agent ran, and what it holds cannot"
        ):
            store.put(spec("u2"), None, enrolled_at=2.0)
        assert "-wal was deleted" in store.failing
        other.rollback()
        other.close()
        store.put(spec("u2"), None, enrolled_at=2.0)
        assert store.failing == ""
        assert (state / "pods.db-wal").exists()
        with contextlib.closing(sqlite3.connect(f"file:{state / 'pods.db'}?mode=ro", uri=True)) as db:
            assert sorted(db.execute("SELECT uid FROM pods").fetchall()) == [("u1",), ("u2",)]
    finally:
        store.close()


def test_a_wal_deleted_while_a_reader_keeps_the_last_checkpoint_from_finishing_is_kept_aside_at_the_stop(
    state: pathlib.Path,
) -> None:
    """The stop's checkpoint, kept from finishing by a reader, left what it could not write
    out in SQLite's -wal, no longer at its path: gone once closed, and the stop said "nothing
    is lost". Now what the store holds is written out beside it, and the stop says so."""
    store = open_store(state)
    store.put(spec("u1"), None, enrolled_at=1.0)
    store.checkpoint()
    reader = sqlite3.connect(f"file:{state / 'pods.db'}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM pods").fetchall()  # (its snapshot: u1 only)
        store.put(spec("u2"), None, enrolled_at=2.0)
        (state / "pods.db-wal").unlink()
        with pytest.raises(
            StoreError, match=r"was left without its -wal \(deleted\) .* written out as"
        ) as info:
            store.close()
    finally:
        reader.close()
    found = re.search(r"written out as (\S+):", str(info.value))
    assert found is not None
    with contextlib.closing(sqlite3.connect(found.group(1))) as db:
        assert sorted(db.execute("SELECT uid FROM pods").fetchall()) == [("u1",), ("u2",)]
