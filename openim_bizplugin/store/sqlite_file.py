"""One SQLite database file: pooled connections, serialised writes, errors as 503.

WAL mode lets readers run beside the one writer; ``busy_timeout`` makes
writers in other processes wait instead of failing ("database is locked"),
and :class:`WriterGate` hands the lock from one of our processes to the next
without the busy handler's sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator

from ..errors import StorageBusy, StorageRejected, StorageUnavailable

BUSY_TIMEOUT_MS = 30_000
IDLE_CONNECTIONS = 8
# After a checkpoint lets SQLite start the WAL over, the next commit cuts the file back to this
# size: without it a WAL stays as large as its largest burst (179 MB after 2,000 callbacks of 60 KB).
WAL_SIZE_LIMIT = 8 * 1024 * 1024
TRUNCATE_WAIT_MS = 100  # how long truncate_wal() waits for other processes' writers and readers
FREE_PAGES_RELEASED = 512  # pages one release_free_pages() hands back at most: a short write
GATE_PAUSES = (0.00005, 0.0005)  # the first and the longest pause between tries of WriterGate


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN ", re.IGNORECASE)


def _statements(script: str) -> list[str]:
    """The statements of *script*, split at the semicolons that end one (not those in comments)."""
    statements, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                statements.append(pending)
            pending = ""
    return statements


# SQLite's primary result codes for a failure of the moment (a lock, the disk, memory, a damaged
# file the operator must see to): the same write may succeed later. Any other failure (a value of a
# type SQLite cannot bind, too big, too many SQL variables, a constraint) fails again however often
# it is tried: one bad callback or recipient must then fail alone, not hold up the rest.
_TRANSIENT = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                        sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_PROTOCOL,
                        sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_NOLFS})


def storage_error(exc: sqlite3.Error, doing: str) -> StorageUnavailable:
    """*exc* as StorageUnavailable when it may pass, StorageRejected when it never will."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by Python's sqlite3 itself: binding a value, or a closed connection
        transient = "closed" in str(exc)
    else:
        transient = code & 0xFF in _TRANSIENT
    return (StorageUnavailable if transient else StorageRejected)(f"{doing}: {exc}")


def _adds_nothing(db: sqlite3.Connection, statement: str) -> bool:
    """Whether *statement* adds a column to a table the file lacks, or a column it has already."""
    altered = _ADD_COLUMN.match(statement)
    if not altered:
        return False
    column = statement[altered.end():].split()[0]
    columns = {row[1] for row in db.execute(f"PRAGMA table_info({altered[1]})")}
    return not columns or column in columns


class WriterGate:
    """Orders the writers of our processes on one file: an ``flock`` on ``<file>-writers``.

    SQLite's busy handler sleeps 1, 2, 5, 10 ... ms between tries, and the lock sits free while
    the waiters sleep: with serve's HTTP processes and its background process writing one file,
    p99 latency was 40-90 ms and two HTTP processes accepted no more than one (bench_intake).
    The gate is tried every 50-500 us instead. It only orders our own writers; SQLite's locking
    still keeps the file consistent, and other programs' writers still meet ``busy_timeout``.
    A gate file that cannot be opened (a read-only folder) leaves writes ungated.
    """

    def __init__(self, path: str) -> None:
        self.path = path + "-writers"
        self._fd: int | None = None
        self._pid = 0

    def acquire(self, deadline: float) -> bool:
        """Take the gate before *deadline* (time.monotonic); False when another writer kept it."""
        fd = self._fd_here()
        pause = GATE_PAUSES[0]
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(min(pause, left))
                pause = min(pause * 2, GATE_PAUSES[1])
        return True

    def release(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, 0

    def _fd_here(self) -> int | None:
        """This process's own open file: an flock belongs to the open file, which a fork shares."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._fd = None
        return self._fd


class _Connection(sqlite3.Connection):
    """A connection that remembers its ``synchronous`` level (a write may lower it) and busy timeout."""

    synchronous = ""
    busy_ms = BUSY_TIMEOUT_MS


class SqliteFile:
    """Connections to one database file with the given ``synchronous`` level."""

    def __init__(self, path: str, synchronous: str = "FULL", autocheckpoint: bool = True,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path, self.busy_timeout_ms = path, busy_timeout_ms
        self.synchronous = synchronous
        self.autocheckpoint = autocheckpoint
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._writer = threading.Lock()
        self._local = threading.local()  # .db: this thread's open transaction, if any
        self._at_once: _Connection | None = None  # execute_now's, busy_timeout 0
        self._gate = WriterGate(path)

    def _open(self, busy_timeout_ms: int | None = None) -> _Connection:
        busy_timeout_ms = self.busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
        try:
            db = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000,
                                 isolation_level=None, check_same_thread=False, factory=_Connection)
            db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:
                # a new file, before WAL mode writes its header (an older one: see vacuum()); the
                # pragma takes the write lock, so it is not set on every connection
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            db.synchronous = self.synchronous
            if not self.autocheckpoint:  # the owner calls checkpoint() at a time that suits it
                db.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"cannot open the database: {exc}") from exc
        return db

    @contextlib.contextmanager
    def borrow(self) -> Iterator[_Connection]:
        """A connection from the pool: as many as there are concurrent callers,
        at most IDLE_CONNECTIONS kept open between calls (threads come and go)."""
        with self._lock:
            db = self._idle.pop() if self._idle else None
        db = db or self._open()
        try:
            yield db
        finally:
            with self._lock:
                keep = len(self._idle) < IDLE_CONNECTIONS and not db.in_transaction
                if keep:
                    self._idle.append(db)
            if not keep:
                db.close()

    @contextlib.contextmanager
    def write(self, durable: bool = True, wait_seconds: float | None = None) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction; any SQLite failure becomes a 503.

        With *durable* False the commit runs at ``synchronous=NORMAL``: no fsync,
        so it survives a crash of the process but the last such commits may be
        lost on power loss. The next durable commit of the file syncs them too.

        Writers of this process queue on a lock first, then on the
        :class:`WriterGate` shared with our other processes: SQLite's own busy
        wait sleeps in steps of up to 100 ms, which made p99 latency ~85 ms
        under load; busy_timeout still covers other programs' writers. Inside a
        transaction this thread already holds (see :meth:`batch`), a write is
        a savepoint of it: undone alone when it fails, committed with it.

        With *wait_seconds*, neither wait (for our writers, then for another
        program's lock) lasts longer than that: StorageBusy (503 with
        Retry-After) instead, with nothing written. Without it a write waits
        as long as BUSY_TIMEOUT_MS (background work, which has no caller
        giving up on it).
        """
        outer = getattr(self._local, "db", None)
        if outer is not None:
            with self._savepoint(outer):
                yield outer
            return
        deadline = time.monotonic() + (BUSY_TIMEOUT_MS / 1000 if wait_seconds is None else wait_seconds)
        if not self._writer.acquire(timeout=-1 if wait_seconds is None else wait_seconds):
            raise self._busy(wait_seconds)
        try:
            # past the deadline a background write goes on ungated: SQLite's busy handler still waits
            if not self._gate.acquire(deadline) and wait_seconds is not None:
                raise self._busy(wait_seconds)
            try:
                busy_ms = BUSY_TIMEOUT_MS if wait_seconds is None else int(wait_seconds * 1000)
                with self.borrow() as db, self._transaction(db, self.synchronous if durable else "NORMAL", busy_ms):
                    yield db
            finally:
                self._gate.release()
        finally:
            self._writer.release()

    @staticmethod
    def _busy(wait_seconds: float | None) -> StorageBusy:
        return StorageBusy(f"the database is busy: no write could start within {wait_seconds:.2g} s",
                           headers={"Retry-After": str(max(1, round(wait_seconds or 1)))})

    def execute_now(self, sql: str, params: tuple, wait_seconds: float = 0.0) -> int:
        """One statement in a transaction of its own, without queueing: StorageBusy when
        this process's other writers hold the file longer than *wait_seconds*, or another
        process holds its lock at all. Returns the rowcount.

        One ``execute`` in autocommit on a connection with busy_timeout 0 (used only
        under the writer lock): each call into SQLite lets other threads take the GIL,
        and BEGIN, INSERT and COMMIT apart cost answers time (bench_callbacks).
        """
        if not self._writer.acquire(timeout=wait_seconds):
            raise StorageBusy("another write to this file is in progress")
        try:
            if self._at_once is None:
                try:
                    self._at_once = self._open(busy_timeout_ms=0)
                except StorageUnavailable as exc:  # e.g. locked while setting WAL: the waiting path
                    raise StorageBusy(str(exc)) from None
            return self._at_once.execute(sql, params).rowcount
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StorageBusy(f"the database is locked by another process: {exc}") from None
            raise storage_error(exc, "the database rejected the write") from exc
        except sqlite3.Error as exc:
            raise storage_error(exc, "the database rejected the write") from exc
        finally:
            self._writer.release()

    @contextlib.contextmanager
    def _transaction(self, db: _Connection, synchronous: str, busy_ms: int = BUSY_TIMEOUT_MS) -> Iterator[None]:
        try:
            if db.synchronous != synchronous:  # a pragma that takes effect outside a transaction only
                db.execute(f"PRAGMA synchronous = {synchronous}")
                db.synchronous = synchronous
            if db.busy_ms != busy_ms:
                db.execute(f"PRAGMA busy_timeout = {busy_ms}")
                db.busy_ms = busy_ms
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and busy_ms < BUSY_TIMEOUT_MS:
                    raise StorageBusy(f"the database is locked by another process: {exc}",
                                      headers={"Retry-After": str(max(1, round(busy_ms / 1000)))}) from None
                raise
            self._local.db = db
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                self._local.db = None
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise storage_error(exc, "the database rejected the write") from exc

    @staticmethod
    @contextlib.contextmanager
    def _savepoint(db: sqlite3.Connection) -> Iterator[None]:
        try:
            db.execute("SAVEPOINT nested")
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK TO nested")
                db.execute("RELEASE nested")
                raise
            db.execute("RELEASE nested")
        except sqlite3.Error as exc:
            raise storage_error(exc, "the database rejected the write") from exc

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make this thread's writes inside the block one transaction (one fsync, not one each)."""
        with self.write():
            yield

    def read(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            outer = getattr(self._local, "db", None)
            if outer is not None:  # inside this thread's transaction: see its own writes
                return outer.execute(sql, params).fetchall()
            with self.borrow() as db:
                return db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, "the database cannot be read") from exc

    def migrate(self, schema: str, version: int, upgrades: dict[int, list[str]] | None = None) -> None:
        """Create the tables of *schema* in a new file, add the new ones to an older file
        (every statement says IF NOT EXISTS); refuse a newer file. An older file first gets
        the *upgrades* of each version after its own (what IF NOT EXISTS cannot say: columns).
        A column added to a table the file does not have yet, or that the table has already, is
        skipped: the schema makes the table whole."""
        with self.write() as db:
            (found,) = db.execute("PRAGMA user_version").fetchone()
            if found < version:
                for step, statements in sorted((upgrades or {}).items()):
                    if 0 < found < step:  # 0: a new file, whose tables the schema makes whole
                        for statement in statements:
                            if _adds_nothing(db, statement):
                                continue
                            db.execute(statement)
                for statement in _statements(schema):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version}")
            elif found > version:
                raise StorageUnavailable(
                    f"database schema version {found} is newer than this release understands")

    def checkpoint(self) -> None:
        """Fold the WAL back into the file without waiting for readers or writers."""
        with contextlib.suppress(sqlite3.Error, StorageUnavailable), self.borrow() as db:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def wal_bytes(self) -> int:
        """The size of the WAL file now (0 when there is none)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def truncate_wal(self) -> None:
        """Fold the whole WAL back into the file and cut it to nothing, holding this process's
        writers back meanwhile (tens of ms for a few MB). A passive checkpoint never catches up
        with a file written without pause (each commit appends behind it), so its WAL grows
        without end: 443 MB in a minute of callbacks in bench/soak_retention. A writer of
        another process makes it give up after a moment; it is tried again later."""
        with contextlib.suppress(sqlite3.Error, StorageUnavailable), self._writer, self.borrow() as db:
            db.execute(f"PRAGMA busy_timeout = {TRUNCATE_WAIT_MS}")
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                db.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")

    @property
    def incremental(self) -> bool:
        """Whether the file uses incremental auto-vacuum (files made before it did not)."""
        return self.read("PRAGMA auto_vacuum")[0][0] == 2

    def release_free_pages(self, pages: int = FREE_PAGES_RELEASED) -> None:
        """Hand up to *pages* free pages back to the file system, while more than a quarter of
        the file is free (SQLite reuses free pages anyway; this shrinks it after a big sweep)."""
        with contextlib.suppress(sqlite3.Error, StorageUnavailable), self._writer, self.borrow() as db:
            (free,), (total,) = db.execute("PRAGMA freelist_count").fetchone(), db.execute("PRAGMA page_count").fetchone()
            if free * 4 > total:
                # executescript runs the pragma to its end (execute() steps once: one page)
                db.executescript(f"PRAGMA incremental_vacuum({int(pages)});")

    def vacuum(self) -> None:
        """Rewrite the whole file with incremental auto-vacuum: a file made before this release
        needs it once (it holds the write lock throughout: the time to copy the file)."""
        try:
            with self._writer, self.borrow() as db:
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                db.execute("VACUUM")
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"the database could not be vacuumed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        with self._writer:
            at_once, self._at_once = self._at_once, None
            self._gate.close()
        for db in idle + ([at_once] if at_once else []):
            with contextlib.suppress(sqlite3.Error):
                db.close()
