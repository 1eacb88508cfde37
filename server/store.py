"""The pod store: what the node agent needs to rebuild its pod cache after a restart.

An embedded SQLite database (stdlib ``sqlite3``), ``pods.db`` in the state
directory (``--state-dir``, default ``/var/lib/zds``), in WAL mode. One row per
pod: who it is (uid, name, namespace, service account, IPs), where its netns
is (the reference it was enrolled with) and which netns that was (``st_dev``,
``st_ino``), whether the rules went in and which rule set. A pod is written
(committed) before its caller hears "enrolled"; a removal marks the row first
and deletes it once the rules are out, so a crash in between is finished on
the next start. Before a pod's rules go in, its row is written to a second
table, ``installs`` (committed), and taken out with the pod's own row (or once
a failed install took out what went in): one found there at a start is an
enrollment a crash interrupted, whose rules no pod row records, and they come
out then. ``synchronous=NORMAL``: a commit survives the process being
killed (it is in the WAL); only a power cut may lose the last ones, and a power
cut takes the pods' namespaces with it.

The schema is versioned (``PRAGMA user_version``) and migrated forward on open.
What is wrong with a store is said in one line, naming the file and what to do;
a store that cannot be read is never replaced or truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from zds.errors import ZdsError
from zds.netns import NetnsIdentity, NetnsRef, NetnsRefError
from zds.server.pods import PodSource, PodSpec

log = logging.getLogger("zds.server.store")

DB_NAME = "pods.db"

#: Schema version -> the statements that take a store from the version before to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE pods (
            uid TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            namespace TEXT NOT NULL,
            service_account TEXT NOT NULL,
            ips TEXT NOT NULL DEFAULT '[]',
            netns TEXT NOT NULL,
            netns_dev INTEGER,
            netns_ino INTEGER,
            rules TEXT NOT NULL DEFAULT '',
            rules_digest TEXT NOT NULL DEFAULT '',
            removing INTEGER NOT NULL DEFAULT 0,
            enrolled_at REAL NOT NULL
        )""",
    ),
}
MIGRATIONS[2] = ("ALTER TABLE pods ADD COLUMN source TEXT NOT NULL DEFAULT 'api'",)
#: The netns cookie (SO_NETNS_COOKIE): unlike an inode number, never given to another netns.
MIGRATIONS[3] = ("ALTER TABLE pods ADD COLUMN netns_cookie INTEGER",)
#: Pods whose rules are going in: a row as in ``pods`` (its columns, uid unique), there from
#: before the install until the pod's own row is written (or the failed install's rules are out).
MIGRATIONS[4] = (
    "CREATE TABLE installs AS SELECT * FROM pods WHERE 0",
    "CREATE UNIQUE INDEX installs_uid ON installs (uid)",
)
SCHEMA_VERSION = max(MIGRATIONS)

#: The columns of ``pods`` each schema version brought: a table of that name without them (at a
#: store's version) is another program's.
_POD_COLUMNS: dict[int, tuple[str, ...]] = {
    1: (
        "uid",
        "name",
        "namespace",
        "service_account",
        "ips",
        "netns",
        "netns_dev",
        "netns_ino",
        "rules",
        "rules_digest",
        "removing",
        "enrolled_at",
    ),
    2: ("source",),
    3: ("netns_cookie",),
}

#: The columns of a row, in both tables, in the order ``_values`` and ``_parse`` use.
_COLUMN_NAMES = tuple(column for added in _POD_COLUMNS.values() for column in added)
_COLUMNS = ", ".join(_COLUMN_NAMES)


class StoreError(ZdsError):
    """The pod store cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class StoredPod:
    """One row: a pod as it was when last written."""

    spec: PodSpec
    #: The netns the pod was enrolled with; None: it was known without one.
    identity: NetnsIdentity | None
    #: The rule set installed ('' for none): the redirect backend's name.
    rules: str
    #: What the installed rules looked like (the backend's digest), to tell them apart from others.
    rules_digest: str
    #: A removal began and did not finish.
    removing: bool
    enrolled_at: float
    #: The netns's cookie when it was enrolled (None: unknown, e.g. an older kernel).
    cookie: int | None = None


class PodStore:
    """The open store; every write commits before it returns."""

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        #: ``put_soon``'s and ``intend_soon``'s rows waiting for the next turn of the loop, with
        #: their waiters (True: an install's row).
        self._soon: list[tuple[StoredPod, bool, asyncio.Future[None]]] = []

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str, *, used_before: bool) -> Self:
        """Open (or, on a first start, create) ``STATE_DIR/pods.db``.

        ``used_before``: the state directory held a node agent before (its lock file was
        there): then a missing database is an error, not a first start, because starting
        empty would make ztunnel drop every pod.
        """
        path = os.path.join(state_dir, DB_NAME)
        exists = os.path.exists(path)
        if not exists and used_before:
            raise StoreError(
                f"pod store {path} is missing, but {state_dir} was used by a node agent before; "
                "restore the file, or start empty with --reset-state (ztunnel then drops the pods it holds)"
            )
        try:
            if not exists:
                # Made 0600 before SQLite sees it: its -wal and -shm files take the mode of the
                # database (made by SQLite, then chmod-ed, they were 0644).
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            # mode=rw never creates (or truncates) an existing file it cannot read.
            uri = f"file:{path}?mode={'rw' if exists else 'rwc'}"
            db = sqlite3.connect(uri, uri=True, timeout=0.5, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"cannot open pod store {path}: {exc}; check the file and its directory"
            ) from exc
        try:
            version = _check(db, path, used_before=used_before) if exists else 0
            made = version == 0  # (also an existing empty file: the store is made here)
            if made:
                # Before SQLite makes the -wal and -shm files, which take the database's mode.
                os.chmod(path, 0o600)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _migrate(db, path)
            _check_writable(db)
        except StoreError:
            db.close()
            raise
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(_explain(path, exc)) from exc
        if made:
            log.info("created the pod store %s", path)
        return cls(path, db)

    def close(self) -> None:
        self._db.close()

    # -- reading ------------------------------------------------------------------------
    def load(self) -> list[StoredPod]:
        """Every stored pod, oldest enrollment first."""
        return self._load("pods")

    def load_installs(self) -> list[StoredPod]:
        """The pods whose rules were going in when the last run ended (their enrollment
        never finished: no pod row records those rules), oldest first."""
        return self._load("installs")

    def _load(self, table: str) -> list[StoredPod]:
        try:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM {table} ORDER BY enrolled_at, uid").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(_explain(self.path, exc)) from exc
        return [self._parse(table, row) for row in rows]

    def _parse(self, table: str, row: Any) -> StoredPod:
        uid, name, namespace, sa, ips, netns, dev, ino, rules, digest, removing, enrolled_at, src, cookie = (
            row
        )
        try:
            _check_row(uid, name, namespace, sa, ips, dev, ino, rules, digest, removing, enrolled_at, cookie)
            ref = NetnsRef.parse(netns)
            listed = json.loads(ips)
            if not isinstance(listed, list) or not all(isinstance(ip, str) for ip in listed):
                raise ValueError("ips is not a list of addresses")
            addresses = tuple(listed)
            source = PodSource(src)
        except (NetnsRefError, ValueError, TypeError, RecursionError) as exc:
            shown = repr(uid) if not isinstance(uid, str) or len(uid) <= 128 else repr(uid[:128] + "...")
            raise StoreError(
                f"pod store {self.path}: the {'' if table == 'pods' else table + ' '}row of pod {shown} is "
                f'damaged ({exc}); restore the file from a backup, or delete that row (sqlite3 PATH "DELETE '
                f'FROM {table} WHERE uid = ...") while no node agent runs'
            ) from exc
        spec = PodSpec(uid, name, namespace, sa, ref, ips=addresses, source=source)
        identity = NetnsIdentity(dev, ino) if dev is not None and ino is not None else None
        return StoredPod(spec, identity, rules, digest, bool(removing), enrolled_at, cookie)

    # -- writing ------------------------------------------------------------------------
    def put(
        self,
        spec: PodSpec,
        identity: NetnsIdentity | None,
        *,
        rules: str = "",
        rules_digest: str = "",
        enrolled_at: float | None = None,
        cookie: int | None = None,
    ) -> None:
        """Write (or overwrite) a pod; committed when this returns."""
        self.put_many(
            [
                StoredPod(
                    spec,
                    identity,
                    rules,
                    rules_digest,
                    removing=False,
                    enrolled_at=enrolled_at if enrolled_at is not None else time.time(),
                    cookie=cookie,
                )
            ]
        )

    def put_many(self, pods: list[StoredPod]) -> None:
        """Write (or overwrite) pods, in order, in one transaction (their install rows gone
        with it); committed when this returns."""
        with self._write():
            self._write_rows(pods, [])

    def _write_rows(self, pods: list[StoredPod], installs: list[StoredPod]) -> None:
        marks = ",".join("?" * len(_COLUMN_NAMES))
        if installs:
            self._db.executemany(
                f"INSERT OR REPLACE INTO installs ({_COLUMNS}) VALUES ({marks})", map(_values, installs)
            )
        if pods:
            self._db.executemany(
                f"INSERT OR REPLACE INTO pods ({_COLUMNS}) VALUES ({marks})", map(_values, pods)
            )
            self._db.executemany("DELETE FROM installs WHERE uid = ?", [(pod.spec.uid,) for pod in pods])

    async def put_soon(self, pod: StoredPod) -> None:
        """``put_many`` of every pod asked for in the same turn of the event loop: committed
        together when the loop next turns, each caller woken once its pod is committed (or
        with the StoreError). The bulk path enrolls up to BULK_WINDOW pods at once: one
        transaction for them instead of one each (~30 us a pod, most of it the commit)."""
        await self._soon_committed(pod, install=False)

    async def intend_soon(self, pod: StoredPod) -> None:
        """Write the row of a pod whose rules are about to go in to ``installs``, committed
        with the other writes of this turn of the loop as ``put_soon``'s are. The pod's own
        row takes it out (``put_many``), as does ``forget_install``."""
        await self._soon_committed(pod, install=True)

    async def _soon_committed(self, pod: StoredPod, *, install: bool) -> None:
        loop = asyncio.get_running_loop()
        if not self._soon:
            loop.call_soon(self._commit_soon)
        done = loop.create_future()
        self._soon.append((pod, install, done))
        await done

    def _commit_soon(self) -> None:
        batch, self._soon = self._soon, []
        try:
            with self._write():
                self._write_rows(
                    [pod for pod, install, _ in batch if not install],
                    [pod for pod, install, _ in batch if install],
                )
        except Exception as exc:  # a StoreError, each waiter its own; anything else (a bug) as it is
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(StoreError(str(exc)) if isinstance(exc, StoreError) else exc)
            return
        for _, _, done in batch:
            if not done.done():
                done.set_result(None)

    def forget_install(self, uid: str, identity: NetnsIdentity | None = None) -> None:
        """The pod's rules are not going in (its install failed and what went in came out,
        or it was taken out at a start): its install row goes. With ``identity``, only a row
        for that netns (the uid may have been sent again, for another netns, meanwhile)."""
        with self._write():
            if identity is None:
                self._db.execute("DELETE FROM installs WHERE uid = ?", (uid,))
            else:
                self._db.execute(
                    "DELETE FROM installs WHERE uid = ? AND netns_dev = ? AND netns_ino = ?",
                    (uid, identity.dev, identity.ino),
                )

    def mark_removing(self, uid: str) -> None:
        """A removal begins: if it does not finish, the next start finishes it."""
        with self._write():
            self._db.execute("UPDATE pods SET removing = 1 WHERE uid = ?", (uid,))

    def delete(self, uid: str, identity: NetnsIdentity | None = None) -> None:
        """Delete the pod's row; with ``identity``, only while it is a removal's in that netns
        (the uid may have been enrolled again, in another netns, meanwhile)."""
        with self._write():
            if identity is None:
                self._db.execute("DELETE FROM pods WHERE uid = ?", (uid,))
            else:
                self._db.execute(
                    "DELETE FROM pods WHERE uid = ? AND removing = 1 AND netns_dev = ? AND netns_ino = ?",
                    (uid, identity.dev, identity.ino),
                )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pods").fetchone()[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        try:
            with self._db:  # one transaction, committed on exit
                self._db.execute("BEGIN IMMEDIATE")
                yield
        except sqlite3.Error as exc:
            raise StoreError(_explain(self.path, exc)) from exc


def _values(pod: StoredPod) -> tuple[object, ...]:
    """A row's columns, in ``_COLUMNS``' order."""
    return (
        pod.spec.uid,
        pod.spec.name,
        pod.spec.namespace,
        pod.spec.service_account,
        json.dumps(list(pod.spec.ips)),
        str(pod.spec.netns),
        pod.identity.dev if pod.identity else None,
        pod.identity.ino if pod.identity else None,
        pod.rules,
        pod.rules_digest,
        int(pod.removing),
        pod.enrolled_at,
        pod.spec.source.value,
        pod.cookie,
    )


def _check_row(uid: object, *values: object) -> None:
    """TypeError/ValueError unless a row's columns hold what zds writes there (the text columns
    text, the numbers numbers, removing 0 or 1): a row written behind zds's back is refused
    when read, not met later as a traceback."""
    name, namespace, sa, ips, dev, ino, rules, digest, removing, enrolled_at, cookie = values
    if not isinstance(uid, str) or not uid:
        raise TypeError("its uid is not a non-empty text")
    for column, value in (("name", name), ("namespace", namespace), ("service_account", sa),
                          ("ips", ips), ("rules", rules), ("rules_digest", digest)):  # fmt: skip
        if not isinstance(value, str):
            raise TypeError(f"{column} is {type(value).__name__}, not text")
    for column, value in (("netns_dev", dev), ("netns_ino", ino), ("netns_cookie", cookie)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{column} is {value!r}, not a number")
    if removing not in (0, 1):
        raise ValueError(f"removing is {removing!r}, not 0 or 1")
    if not isinstance(enrolled_at, int | float):
        raise TypeError(f"enrolled_at is {type(enrolled_at).__name__}, not a number")


def _version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _check(db: sqlite3.Connection, path: str, *, used_before: bool) -> int:
    """Refuse a file that is not a zds pod store, is damaged, or is from a newer zds; its
    schema version (0: an empty file, in a state directory no node agent used)."""
    try:
        result = db.execute("PRAGMA quick_check").fetchone()
        version = _version(db)
    except sqlite3.Error as exc:
        raise StoreError(_explain(path, exc)) from exc
    if result is None or result[0] != "ok":
        raise StoreError(
            f"pod store {path} is damaged ({result[0] if result else 'no answer'}); restore it from a "
            "backup, or move it away and start empty with --reset-state"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"pod store {path} has schema version {version}, newer than this zds knows ({SCHEMA_VERSION}); "
            "run the zds that wrote it"
        )
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    columns = {row[1] for row in db.execute("PRAGMA table_info(pods)")}
    needed = {column for since, added in _POD_COLUMNS.items() if since <= version for column in added}
    if (
        (version >= 1 and ("pods" not in tables or not needed <= columns))
        or (version >= 4 and "installs" not in tables)
        or (version == 0 and tables)
    ):
        # (refused before anything is written: a migration had changed another program's file)
        raise StoreError(f"{path} is an SQLite database but not a zds pod store; use another --state-dir")
    if version == 0 and used_before:
        # Empty (truncated, or its -wal lost with every row in it) in a state directory a node
        # agent used: starting empty would make ztunnel drop every pod.
        raise StoreError(
            f"pod store {path} is empty (no tables), but its state directory was used by a node agent "
            "before; restore it (and its -wal) from a backup, or start empty with --reset-state "
            "(ztunnel then drops the pods it holds)"
        )
    return version


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the schema to SCHEMA_VERSION, one migration per transaction."""
    version = _version(db)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        with db:
            db.execute("BEGIN IMMEDIATE")
            for statement in MIGRATIONS[target]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {target}")
        log.info("pod store %s migrated to schema version %d", path, target)


def _check_writable(db: sqlite3.Connection) -> None:
    """Write nothing, but as a write would: SQLite opens a store it cannot write (the file
    immutable, a read-only mount) for reading without a word, and the node agent would
    then be ready and refuse every pod it is given. sqlite3.Error (SQLITE_READONLY) if so."""
    version = _version(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.execute("ROLLBACK")


def _explain(path: str, exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        code &= 0xFF  # the primary result code, without the extended bits
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (
            f"pod store {path} is locked by another process ({exc}); close whatever holds it "
            "(another zds server, an sqlite3 shell) and start again"
        )
    if code == sqlite3.SQLITE_READONLY:
        return (
            f"pod store {path} cannot be written ({exc}); make the file, its -wal and its "
            "directory writable (permissions, chattr -i, a read-only mount)"
        )
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return (
            f"pod store {path} is not a readable zds pod store ({exc}); restore it from a backup, or "
            "move it away and start empty with --reset-state"
        )
    return f"pod store {path}: {exc}"


def reset(state_dir: str) -> str | None:
    """``--reset-state``: move an existing store aside (never delete it); the new name, if any."""
    path = os.path.join(state_dir, DB_NAME)
    if not os.path.exists(path):
        return None
    aside = f"{path}.{time.strftime('%Y%m%dT%H%M%S')}.bak"
    os.rename(path, aside)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(path + suffix, aside + suffix)
    return aside
