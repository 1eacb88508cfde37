"""The pod store's file, ``pods.db``: opening it, its schema and migrations, and what is wrong
with one, said in one line naming the file and what to do. A store that cannot be read is
never replaced or truncated."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time

from zds.errors import ZdsError

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
#: Rules a pod left in a netns that could not be taken out at the time (a failed install whose
#: undo failed too, a removal whose rules stayed): a row as in ``pods`` (``removing``: a
#: removal's), one per uid, netns and rule set, there until they are out or the netns is gone.
#: (In ``pods`` or ``installs``, keyed by uid alone, a re-add of the uid elsewhere overwrote it.)
MIGRATIONS[5] = (
    "CREATE TABLE leftovers AS SELECT * FROM pods WHERE 0",
    "CREATE UNIQUE INDEX leftovers_key ON leftovers (uid, netns_dev, netns_ino, rules)",
)
SCHEMA_VERSION = max(MIGRATIONS)
#: The tables whose rows record pods or their rules.
ROW_TABLES = ("pods", "installs", "leftovers")

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

#: The columns of a row, in every table, in the order ``storerows``' ``values`` and ``parse_row`` use.
COLUMN_NAMES = tuple(column for added in _POD_COLUMNS.values() for column in added)
COLUMNS = ", ".join(COLUMN_NAMES)
#: A row's placeholders, one per column (``INSERT ... VALUES ({MARKS})``).
MARKS = ",".join("?" * len(COLUMN_NAMES))


class StoreError(ZdsError):
    """The pod store cannot be used; the message names the file and what to do."""


#: What the -wal file is cut back to once its pages are checkpointed (bytes).
WAL_SIZE_LIMIT = 4 * 1024 * 1024


def open_db(state_dir: str, *, used_before: bool) -> tuple[str, sqlite3.Connection]:
    """Open (or, on a first start, create) ``STATE_DIR/pods.db``, checked and migrated: its
    path and the connection (``PodStore.open``)."""
    path = os.path.join(state_dir, DB_NAME)
    exists = os.path.lexists(path)  # (a dangling symlink is there: refused, never replaced)
    if not exists and used_before:
        raise StoreError(
            f"pod store {path} is missing, but {state_dir} was used by a node agent before; "
            "restore the file, or start empty with --reset-state (ztunnel then drops the pods it holds)"
        )
    if not exists and os.path.lexists(path + "-wal"):
        # (a store made beside it would take its pages for its own; it may hold every pod)
        raise StoreError(
            f"pod store {path} is missing, but its -wal is there (it may hold every pod); restore the "
            "file beside it, or start empty with --reset-state (which moves the -wal aside)"
        )
    if exists and not os.path.islink(path) and os.path.isfile(path) and not os.access(path, os.W_OK):
        # Refused before SQLite sees it: opened read-only (the file immutable), SQLite makes a
        # -wal and -shm beside it and leaves them, and a refused start leaves what it found only.
        raise StoreError(_cannot_write(path, "the file is not writable"))
    made = False
    try:
        if not exists:
            # Made 0600 before SQLite sees it: its -wal and -shm files take the mode of the
            # database (made by SQLite, then chmod-ed, they were 0644).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            made = True
        # mode=rw never creates (or truncates) an existing file it cannot read.
        uri = f"file:{path}?mode={'rw' if exists else 'rwc'}"
        db = sqlite3.connect(uri, uri=True, timeout=0.5, isolation_level=None, check_same_thread=False)
    except (sqlite3.Error, OSError) as exc:
        if made:
            _remove_made(path)
        raise StoreError(f"cannot open pod store {path}: {exc}; check the file and its directory") from exc
    try:
        version = _check(db, path, used_before=used_before) if exists else 0
        made = version == 0  # (also an existing empty file: the store is made here)
        if made:
            # Before SQLite makes the -wal and -shm files, which take the database's mode.
            os.chmod(path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # The -wal file is reused, not shrunk: a reader that held a snapshot over many writes
        # (a ``sqlite3`` shell left in a transaction, a backup) left it at its largest until
        # the node agent stopped (92 MB after 4,500 pod cycles). Cut back once checkpointed.
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        _migrate(db, path)
        _check_writable(db)
    except (StoreError, sqlite3.Error) as exc:
        db.close()
        if not exists:  # (what this start made goes: a refused start leaves what it found only)
            _remove_made(path)
        if isinstance(exc, StoreError):
            raise
        raise StoreError(explain(path, exc)) from exc
    if made:
        log.info("created the pod store %s", path)
    return path, db


def _schema_version(db: sqlite3.Connection) -> int:
    """The file's schema version (``PRAGMA user_version``)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _check(db: sqlite3.Connection, path: str, *, used_before: bool) -> int:
    """Refuse a file that is not a zds pod store, is damaged, or is from a newer zds; its
    schema version (0: an empty file, in a state directory no node agent used)."""
    try:
        result = db.execute("PRAGMA quick_check").fetchone()
        version = _schema_version(db)
    except sqlite3.Error as exc:
        raise StoreError(explain(path, exc)) from exc
    if result is None or result[0] != "ok":
        damage = " ".join(str(result[0]).split()) if result else "no answer"  # (one line: it lists pages)
        raise StoreError(
            f"pod store {path} is damaged ({damage}); restore it from a backup, or move it away and "
            "start empty with --reset-state"
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
        or (version >= 5 and "leftovers" not in tables)
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
    version = _schema_version(db)
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
    version = _schema_version(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.execute("ROLLBACK")


def explain(path: str, exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        code &= 0xFF  # the primary result code, without the extended bits
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return (
            f"pod store {path} is locked by another process ({exc}); close whatever holds it "
            "(another zds server, an sqlite3 shell)"
        )
    if code == sqlite3.SQLITE_READONLY:
        return _cannot_write(path, str(exc))
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return (
            f"pod store {path} is not a readable zds pod store ({exc}); restore it from a backup, or "
            "move it away and start empty with --reset-state"
        )
    if code == sqlite3.SQLITE_FULL:
        return f"pod store {path}: {exc}; free space on its filesystem (or use another --state-dir)"
    if code == sqlite3.SQLITE_IOERR:
        return f"pod store {path}: {exc}; its disk or filesystem failed (see the kernel's log, dmesg)"
    return f"pod store {path}: {exc}"


def _cannot_write(path: str, why: str) -> str:
    return (
        f"pod store {path} cannot be written ({why}); make the file, its -wal and its "
        "directory writable (permissions, chattr -i, a read-only mount)"
    )


#: The store's files: the database, its -wal and its -shm (suffixes to its path).
_FILES = ("", "-wal", "-shm")


def exists(state_dir: str) -> bool:
    """Whether ``STATE_DIR/pods.db`` is there (a symlink to nothing too)."""
    return os.path.lexists(os.path.join(state_dir, DB_NAME))


def _remove_made(path: str) -> None:
    """Remove the store file this start made at ``path``, and the -wal and -shm SQLite made
    beside it (open_db refuses to make one where a -wal is)."""
    for suffix in _FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def remove_if_unused(state_dir: str) -> bool:
    """Remove ``STATE_DIR/pods.db`` (and its -wal, -shm) unless it holds a row (a pod, an
    install, rules left), or cannot be read and is not empty (for a start that made it and
    failed). Whether it is gone."""
    path = os.path.join(state_dir, DB_NAME)
    if not os.path.isfile(path) or os.path.islink(path):
        return False  # (not a store file a start made)
    try:
        # (read-write: a read-only connection, the last to close, leaves a -wal and -shm behind)
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if any(db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in ROW_TABLES if t in tables):
                return False
    except sqlite3.Error:
        with contextlib.suppress(OSError):
            if os.path.getsize(path):
                return False
    _remove_made(path)
    return True


def reset(state_dir: str) -> str | None:
    """``--reset-state``: move an existing store aside (never delete it), with its -wal and
    -shm (also those of a store that is gone: a new one would take their pages); the new
    name, if anything was moved."""
    path = os.path.join(state_dir, DB_NAME)
    there = [suffix for suffix in _FILES if os.path.lexists(path + suffix)]
    if not there:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = f"{path}.{stamp}.bak"
    n = 1
    while any(os.path.lexists(aside + suffix) for suffix in _FILES):
        n += 1  # (a reset within the same second: a rename would replace the earlier backup)
        aside = f"{path}.{stamp}-{n}.bak"
    for suffix in there:
        os.rename(path + suffix, aside + suffix)
    return aside


def put_back(aside: str, state_dir: str) -> bool:
    """Undo ``reset`` (the start it was for refused before it made a store): whether it was."""
    path = os.path.join(state_dir, DB_NAME)
    if any(os.path.lexists(path + suffix) for suffix in _FILES):
        return False
    for suffix in _FILES:
        with contextlib.suppress(FileNotFoundError):
            os.rename(aside + suffix, path + suffix)
    return True


def has_room(directory: str, room: int) -> bool:
    """Whether ``directory``'s filesystem has ``room`` bytes free for whoever is not root
    (what root may use beyond that is not told apart from what it may not: ext4 keeps some
    blocks from root too; a pod's write that goes through says ready meanwhile); True when
    it cannot be told."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return True
    return fs.f_bavail * fs.f_frsize >= room


def sync_wal(path: str) -> None:
    """fsync the store's -wal (nothing if there is none); OSError if it cannot be."""
    try:
        fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # (all of it written out: nothing left in a -wal)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreFile:
    """Which file ``STATE_DIR/pods.db`` was when the store opened it (device and inode).
    Deleted or replaced under a running node agent, the file SQLite holds open is no longer
    the one a start reads: every pod stored since would be lost, and the pods before it too
    (deleted) or those the other file lacks (replaced)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._opened = _identity(path)
        #: The -wal SQLite has open (None: none seen yet; the first read after the journal
        #: mode is set makes it).
        self._wal = _identity(path + "-wal")

    def gone(self) -> str:
        """'' while the path is still the file opened; else what became of it."""
        return _became(self._opened, _identity(self.path))

    def wal_gone(self) -> str:
        """'' while ``PATH-wal`` is the -wal SQLite writes into; else what became of it. SQLite
        goes on writing into the file it holds open: deleted or replaced, every commit since
        its last checkpoint is lost at a crash (a start reads the file at the path)."""
        now = _identity(self.path + "-wal")
        if self._wal is None:
            self._wal = now
            return ""
        return _became(self._wal, now)

    def make_wal_again(self, db: sqlite3.Connection, what: str) -> None:
        """The -wal being ``what`` (``wal_gone``'s answer): write the pages SQLite holds in it
        into the database file and start a new -wal at its path (the journal mode set to
        DELETE and back to WAL, which needs no other connection open on the store; a file put
        at its path is removed then: a start would read it as the store's -wal). StoreError
        if that cannot be done now (tried again at the next write)."""
        try:
            # (a mode that cannot be changed may also be answered with the mode as it was)
            for mode in ("delete", "wal"):
                if (now := db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]) != mode:
                    raise sqlite3.OperationalError(f"the journal mode stayed {now}")
            db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # (makes the -wal)
        except sqlite3.Error as exc:
            raise StoreError(
                f"pod store {self.path}'s -wal was {what} while the node agent ran, and what it "
                f"holds cannot be written into the store now ({explain(self.path, exc)}): nothing "
                "more is stored until it can (each write tries again)"
            ) from exc
        self._wal = _identity(self.path + "-wal")
        log.warning(
            "pod store %s's -wal was %s while the node agent ran (what it held would have been lost "
            "at a crash): written into the store, and a new -wal made",
            self.path,
            what,
        )

    def moved(self, what: str) -> str:
        """Why a write is refused once the file is ``what`` (``gone``'s answer)."""
        return (
            f"pod store {self.path} was {what} while the node agent ran: nothing more is stored, so no "
            "pod is enrolled or removed, until it restarts; stop it (what it holds is written out "
            "beside the file then) and put the file back"
        )

    def keep_aside(self, db: sqlite3.Connection, what: str) -> StoreError:
        """At the close, the file being ``what``: what the store holds, written into a new file
        beside it (never over what is at the path now), and the error that says where."""
        kept = f"{self.path}.kept-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        try:
            # (made 0600 and empty first: VACUUM INTO writes into an empty file, with its mode)
            os.close(os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            db.execute("VACUUM INTO ?", (kept,))
        except (OSError, sqlite3.Error) as exc:
            return StoreError(
                f"pod store {self.path} was {what} while the node agent ran, and what it held could not "
                f"be written out as {kept} ({exc}): the pods it stored are lost"
            )
        return StoreError(
            f"pod store {self.path} was {what} while the node agent ran; what it held is written out "
            f"as {kept}: move that file to {self.path} (and remove any -wal and -shm beside it) before "
            "the next start"
        )


def _identity(path: str) -> tuple[int, int] | None:
    """The file at ``path`` (device and inode); None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _became(opened: tuple[int, int] | None, now: tuple[int, int] | None) -> str:
    """'' if the file at a path is still the one ``opened``; else what became of it."""
    if now == opened:
        return ""
    return "deleted" if now is None else "replaced by another file"
