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
out then. Rules that could not be taken out (a failed install's undo failed too, a removal's
stayed) move to a third table, ``leftovers``, one row per uid, netns and rule set, until they
are out or their netns is gone (``Leftovers``; a start takes them out too).
``synchronous=NORMAL``: a commit survives the process being
killed (it is in the WAL); only a power cut may lose the last ones, and a power
cut takes the pods' namespaces with it.

Opening the file, its versioned schema (``PRAGMA user_version``, migrated forward on
open) and what is wrong with one: ``storefile``; a row (``StoredPod``) and its checks:
``storerows``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Self

from zds.netns import NetnsIdentity
from zds.server.pods import PodSpec
from zds.server.storefile import (
    COLUMNS,
    MARKS,
    WAL_SIZE_LIMIT,
    StoreError,
    StoreFile,
    explain,
    has_room,
    open_db,
    sync_wal,
)
from zds.server.storerows import PROBE_ROW, StoredPod, parse_row, values

log = logging.getLogger("zds.server.store")
#: A row recorded in ``leftovers`` (its key: uid, netns, rule set; a later one of that key replaces it).
_INTO_LEFTOVERS = f"INSERT OR REPLACE INTO leftovers ({COLUMNS}) VALUES ({MARKS})"

#: How often (seconds) ``/readyz`` may try a write while the pod store's last one failed.
PROBE_EVERY = 1.0
#: Free space (bytes) on the store's filesystem a probe asks for before it tries a write.
PROBE_ROOM = 256 * 1024
#: The -wal file past this (bytes) has outgrown its checkpoints: a reader holds them back.
WAL_WARN_SIZE = 4 * WAL_SIZE_LIMIT
#: Its size is looked at once every this many writes, and said at most this often (seconds).
WAL_LOOK_WRITES = 256
WAL_WARN_EVERY = 600.0


def _not_written_out(why: str) -> StoreError:
    """The store's last checkpoint, as it closes, failed for ``why``."""
    return StoreError(
        f"cannot write the pod store out as it closes: {why}; what was committed since its last "
        "checkpoint is in its -wal only: keep that file beside it"
    )


class PodStore:
    """The open store; every write commits before it returns."""

    def __init__(self, path: str, db: sqlite3.Connection) -> None:
        self.path = path
        self._db = db
        self._file = StoreFile(path)
        self._closed = False
        #: Why the last write failed ('' once one succeeds): the node agent is not ready.
        self.failing = ""
        #: When ``probe`` last tried a write (``time.monotonic``).
        self._probed = 0.0
        #: Writes committed, and when the -wal's size was last said (``_look_at_wal``).
        self._writes = 0
        self._wal_said: float | None = None
        #: The -wal's size at the last look (said only while it grows: a reader gone since
        #: leaves it at that size until a write restarts it).
        self._wal_seen = 0
        #: ``put_soon``'s and ``intend_soon``'s rows waiting for the next turn of the loop, with
        #: their waiters (True: an install's row).
        self._soon: list[tuple[StoredPod, bool, asyncio.Future[None]]] = []
        #: ``put_soon``'s ``left`` rows, committed with them.
        self._soon_left: list[StoredPod] = []
        #: ``installs`` may hold rows (it had some at open, or this store wrote one since): a pod's
        #: row takes its install row out only then (with --no-redirect it never has one).
        self._installs_used = True
        with contextlib.suppress(sqlite3.Error):  # (if it cannot tell: as if it had)
            self._installs_used = bool(db.execute("SELECT EXISTS (SELECT 1 FROM installs)").fetchone()[0])

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, state_dir: str, *, used_before: bool) -> Self:
        """Open (or, on a first start, create) ``STATE_DIR/pods.db``.

        ``used_before``: the state directory held a node agent before (its lock file was
        there): then a missing database is an error, not a first start, because starting
        empty would make ztunnel drop every pod.
        """
        return cls(*open_db(state_dir, used_before=used_before))

    def close(self) -> None:
        """Write what was committed into the database file and close it. A commit is on disk
        once checkpointed (``synchronous=NORMAL``): StoreError if this last checkpoint failed
        (a disk that fails, a filesystem remounted read-only); the store is closed anyway.
        Closed already: nothing."""
        if self._closed:
            return
        self._closed = True
        # (deleted or replaced: kept aside, and checkpointed all the same: a -wal left full at
        # its path was the replacing file's at the next open, and broke it)
        kept = self._file.keep_aside(self._db, what) if (what := self._file.gone()) else None
        wal = self._file.wal_gone() if kept is None else ""
        try:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy and wal:
                # (a reader kept the checkpoint from finishing, and SQLite's -wal is no longer at
                # its path: what it holds is in a file no start reads, gone once closed)
                kept = self._file.keep_aside(self._db, f"left without its -wal ({wal})")
        except sqlite3.Error as exc:
            # (LOCKED is this connection's own statement still open: a bug, not a reader)
            if kept is None and getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise _not_written_out(explain(self.path, exc)) from exc
            busy = True
        finally:
            self._db.close()
        if kept is not None:
            raise kept
        if busy:
            self._keep_in_wal()

    def _keep_in_wal(self) -> None:
        """The last checkpoint could not finish: another process reads the store (a ``sqlite3``
        shell, a backup), which is allowed. Nothing is lost, the -wal holds what it did not
        write out (synced here: a commit is on disk once checkpointed) and the next start
        reads it; only a -wal that cannot be synced is an error (StoreError)."""
        try:
            sync_wal(self.path)
        except OSError as exc:
            raise _not_written_out(
                f"pod store {self.path}: its -wal cannot be synced ({exc.strerror})"
            ) from exc
        log.warning(
            "pod store %s not written out into the file as it closes: another process reads it (a "
            "sqlite3 shell, a backup); nothing is lost, its -wal keeps the rest (synced) for the next start",
            self.path,
        )

    def checkpoint(self) -> None:
        """Write what the -wal holds into the database file and empty the -wal (a start's,
        once recovered: the file then holds the pods, not only its -wal). A failure is only
        logged: the -wal keeps it all, and SQLite checkpoints again as it grows."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("pod store not checkpointed: %s", explain(self.path, exc))

    # -- reading ------------------------------------------------------------------------
    def row(self, uid: str) -> StoredPod | None:
        """The committed pod row of ``uid`` (what comes back at the next start), if any."""
        try:
            found = self._db.execute(f"SELECT {COLUMNS} FROM pods WHERE uid = ?", (uid,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(explain(self.path, exc)) from exc
        return None if found is None else parse_row(self.path, "pods", found)

    def load(self) -> list[StoredPod]:
        """Every stored pod, oldest enrollment first."""
        return self._load("pods")

    def load_installs(self) -> list[StoredPod]:
        """The pods whose rules were going in when the last run ended (their enrollment
        never finished: no pod row records those rules), oldest first."""
        return self._load("installs")

    def installs_to_leftovers(self) -> list[StoredPod]:
        """At a start, before anything else is written: the install rows (enrollments the last
        run's end interrupted while their rules went in) move to ``leftovers``, in one
        transaction, where no write of their uid's rows takes them out (in ``installs``, one row
        a uid, a restored pod's row rewritten in its own netns took out the row of the netns a
        re-add was installing in, those rules recorded nowhere from then on); the rows moved."""
        rows = self.load_installs()
        if rows:
            with self._write():
                self._db.executemany(_INTO_LEFTOVERS, map(values, rows))
                self._db.execute("DELETE FROM installs")
        return rows

    def load_leftovers(self) -> list[StoredPod]:
        """Rules pods left in their netns that the last run could not take out (``removing``: a
        removal's; ``rules``: the rule set), oldest first."""
        return self._load("leftovers")

    def _load(self, table: str) -> list[StoredPod]:
        try:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM {table} ORDER BY enrolled_at, uid").fetchall()
        except sqlite3.Error as exc:
            raise StoreError(explain(self.path, exc)) from exc
        return [parse_row(self.path, table, row) for row in rows]

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

    def _write_rows(
        self, pods: list[StoredPod], installs: list[StoredPod], left: list[StoredPod] | None = None
    ) -> None:
        if left:
            self._db.executemany(_INTO_LEFTOVERS, map(values, left))
        if installs:
            self._installs_used = True
            self._db.executemany(
                f"INSERT OR REPLACE INTO installs ({COLUMNS}) VALUES ({MARKS})", map(values, installs)
            )
        if pods:
            self._db.executemany(
                f"INSERT OR REPLACE INTO pods ({COLUMNS}) VALUES ({MARKS})", map(values, pods)
            )
            if self._installs_used:
                self._db.executemany("DELETE FROM installs WHERE uid = ?", [(pod.spec.uid,) for pod in pods])

    async def put_soon(self, pod: StoredPod, *, left: StoredPod | None = None) -> None:
        """``put_many`` of every pod asked for in the same turn of the event loop: committed
        together when the loop next turns, each caller woken once its pod is committed (or
        with the StoreError). The bulk path enrolls up to BULK_WINDOW pods at once: one
        transaction for them instead of one each (~30 us a pod, most of it the commit).
        ``left``: the rules the pod this one replaces leaves, recorded in ``leftovers`` in
        the same transaction."""
        if left is not None:
            assert left.identity is not None
            self._soon_left.append(left)
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
        left, self._soon_left = self._soon_left, []
        try:
            with self._write():
                self._write_rows(
                    [pod for pod, install, _ in batch if not install],
                    [pod for pod, install, _ in batch if install],
                    left,
                )
        except Exception as exc:  # a StoreError, each waiter its own; anything else (a bug) as it is
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(StoreError(str(exc)) if isinstance(exc, StoreError) else exc)
            return
        for _, _, done in batch:
            if not done.done():
                done.set_result(None)

    def forget_install(self, uid: str) -> None:
        """The pod's rules are not going in (its install failed and what went in came out,
        or it was taken out at a start): its install row goes."""
        with self._write():
            self._db.execute("DELETE FROM installs WHERE uid = ?", (uid,))

    def keep_leftover(self, row: StoredPod) -> None:
        """The rules ``row``'s pod installed (``row.rules``) could not be taken out of its netns:
        record them in ``leftovers`` (one row per uid, netns and rule set) and, in the same
        transaction, take out the row that recorded them until now (``row.removing``: the pod
        row its removal marked; else its install row), both only for that netns."""
        assert row.identity is not None
        with self._write():
            self._db.execute(_INTO_LEFTOVERS, values(row))
            self._forget_rows(row.spec.uid, row.identity, row.rules, "pods" if row.removing else "installs")

    def forget_leftovers(
        self,
        identity: NetnsIdentity | None,
        keys: Iterable[tuple[str, str]],
        *,
        rows_of: Iterable[tuple[str, str]] = (),
    ) -> None:
        """The rules the pods left in the netns ``identity`` are out (or went with it, or are
        another pod's now): the ``leftovers`` rows of ``keys`` (uid, rule set) go, and for the
        keys ``rows_of`` the rows that recorded them where moving them there failed (the
        removal's pod row, the install row; the other uids' rows there are a later
        enrollment's)."""
        with self._write():
            for uid, rules in keys:
                self._forget_rows(uid, identity, rules, "leftovers")
            for uid, rules in rows_of:
                self._forget_rows(uid, identity, rules, "pods")
                self._forget_rows(uid, identity, rules, "installs")

    def _forget_rows(self, uid: str, identity: NetnsIdentity | None, rules: str, table: str) -> None:
        """Delete ``uid``'s row of the rule set ``rules`` in ``table`` for the netns
        ``identity`` (None: a row without one, written behind zds's back; in ``pods`` only one
        marked removing: the uid may have been enrolled again there meanwhile)."""
        removing = " AND removing = 1" if table == "pods" else ""
        dev, ino = (identity.dev, identity.ino) if identity is not None else (None, None)
        self._db.execute(
            f"DELETE FROM {table} WHERE uid = ? AND netns_dev IS ? AND netns_ino IS ? AND rules = ?{removing}",
            (uid, dev, ino, rules),
        )

    def mark_removing(self, uid: str) -> None:
        """A removal begins: if it does not finish, the next start finishes it."""
        with self._write():
            self._db.execute("UPDATE pods SET removing = 1 WHERE uid = ?", (uid,))

    def delete(self, uid: str) -> None:
        """Delete the pod's row."""
        with self._write():
            self._db.execute("DELETE FROM pods WHERE uid = ?", (uid,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM pods").fetchone()[0])

    def probe(self, every: float = PROBE_EVERY) -> str:
        """While the last write failed: try what a pod's write does, at most once every
        ``every`` seconds, so that a store whose disk has room again is said to be writable
        without waiting for a pod to go in; ``failing`` then ('' once the write went through).

        The write is a row of the largest size a pod's can have, put into ``pods`` and
        ``installs`` and deleted again in one transaction (nothing changes; their pages are
        written and committed: a page written elsewhere proved nothing of theirs); it is tried
        only with ``PROBE_ROOM`` free on the store's filesystem (room for one pod's rows is not
        room for the next pod's: ready, then not, at every pod) and without waiting for a lock
        another process holds (``/readyz`` answers on the event loop)."""
        if not self.failing or self._closed or time.monotonic() - self._probed < every:
            return self.failing
        self._probed = time.monotonic()
        if not has_room(os.path.dirname(self.path), PROBE_ROOM):
            return self.failing
        busy = int(self._db.execute("PRAGMA busy_timeout").fetchone()[0])
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            with contextlib.suppress(StoreError), self._write():
                for table in ("pods", "installs"):
                    self._db.execute(f"INSERT INTO {table} ({COLUMNS}) VALUES ({MARKS})", values(PROBE_ROW))
                    self._db.execute(f"DELETE FROM {table} WHERE uid = ?", (PROBE_ROW.spec.uid,))
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {busy}")
        return self.failing

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        if what := self._file.gone():
            self.failing = self._file.moved(what)
            raise StoreError(self.failing)
        if what := self._file.wal_gone():
            try:
                self._file.make_wal_again(self._db, what)
            except StoreError as exc:
                self.failing = str(exc)
                raise
        try:
            changes = self._db.total_changes
            with self._db:  # one transaction, committed on exit
                self._db.execute("BEGIN IMMEDIATE")
                yield
        except sqlite3.Error as exc:
            self.failing = explain(self.path, exc)
            raise StoreError(self.failing) from exc
        if self._db.total_changes != changes:  # (one that wrote nothing proves nothing)
            self.failing = ""
        self._writes += 1
        if self._writes % WAL_LOOK_WRITES == 0:
            self._look_at_wal()

    def _look_at_wal(self) -> None:
        """Say so when the -wal file has outgrown its checkpoints (at most every
        WAL_WARN_EVERY seconds): a reader holding a snapshot keeps them from finishing, and
        the file grows with every write until that reader ends (then it is cut back)."""
        try:
            size = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        now, grew = time.monotonic(), size > self._wal_seen
        self._wal_seen = size
        if (
            size > WAL_WARN_SIZE
            and grew
            and (self._wal_said is None or now - self._wal_said >= WAL_WARN_EVERY)
        ):
            self._wal_said = now
            log.warning(
                "the pod store's write-ahead log %s-wal is %d MB and growing: a reader holds its "
                "checkpoints back (a sqlite3 shell left in a transaction, a backup); it is cut back "
                "to %d MB once that reader ends",
                self.path,
                size >> 20,
                WAL_SIZE_LIMIT >> 20,
            )
