"""Where a callback is kept before OpenIM hears "continue": the inbox at once, or a spool file (SPEC §6).

OpenIM posts its after-callbacks from an in-memory queue: two workers and 100
slots per OpenIM process (``pkg/common/webhook``); when the slots are taken,
the caller — msg-RPC ``SendMsg``, msgtransfer, the gateway — blocks for up to
3 s and then drops the callback (``memamq.MemoryQueue.Push`` in
openimsdk/tools). An answer that waits on our storage therefore slows every
chat message of the deployment. So a callback is kept in one of two places,
neither of which waits:

- **the inbox**, when its write can start at once: SQLite, and no other
  thread or process holds the inbox's write lock (``record_callback_now``);
- otherwise **this process's spool**: an append-only file beside the store,
  one ``write()`` per callback under a lock only appends take. Like the inbox
  (``synchronous=NORMAL``) it survives the process being killed — the bytes
  are in the page cache — but not power loss: an fsync per answer would make
  answers wait on a slow disk, which is what this is for.

A thread of the process (:class:`~..background.BackgroundLoop`) drains the
spool into the inbox in batches, oldest first, and empties or deletes what it
has drained. A record drained twice (killed between the inbox commit and the
truncation) is the same callback twice: the inbox keeps one (natural key).

Several processes (gunicorn workers, replicas on one host) each write files
of their own, named ``<host>-<pid>-<tag>-<n>.spool`` and locked with
``flock`` while the process lives. A file whose lock can be taken belongs to a
process that ended (the kernel drops the lock with the process, SIGKILL
included): every draining process looks for such files when it starts and
every :data:`ADOPT_EVERY_SECONDS`, replays one into the inbox under its lock
and deletes it. So a spool is drained by its own process, or by the next one
that runs on the same directory: ``serve``, a gunicorn worker that spools, or
``openim-bizplugin worker``.

Bounds: a process's files hold at most ``max_bytes`` (``[callbacks]
spool_max_bytes``); a callback that would go past it is answered "continue"
and dropped, logged and counted (``result="spool-full"``), as OpenIM itself
drops a callback its full queue cannot take. A segment that reaches
:attr:`CallbackSpool.segment_bytes` is closed to appends (a new one takes
them) and deleted once drained, so a spool that never empties stays bounded
too. Draining reads at most :data:`READ_BYTES` (or one record) at a time.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..background import BackgroundLoop
from ..config import StorageConfig
from ..errors import StorageUnavailable
from ..store.base import Store

log = logging.getLogger(__name__)

SUFFIX = ".spool"
BATCH = 500  # callbacks per inbox write
READ_BYTES = 1024 * 1024  # read from a spool file at a time (a longer record is read whole)
SEGMENT_BYTES = 4 * 1024 * 1024  # at most; a quarter of max_bytes when that is smaller
ADOPT_EVERY_SECONDS = 5.0  # how often a draining process looks for files of processes that ended
RETRY_SECONDS = 1.0  # after the store refused a batch
GATHER_SECONDS = 0.005  # let spooled callbacks gather into one inbox write
FULL_LOG_EVERY_SECONDS = 10.0
STALE_TMP_SECONDS = 60.0  # a file being created is renamed at once; one left this long is litter

Callback = tuple[str, str, str, int]  # command, natural key, body, received_ms


class SpoolFull(StorageUnavailable):
    """This process's spool holds ``max_bytes`` already: the callback is not kept."""


def default_spool_dir(storage: StorageConfig) -> Path:
    """Beside a SQLite file (``bizplugin.db`` → ``bizplugin-spool/``); for Redis, a folder of the
    temp directory named by the storage URL, so two deployments on one host never share one."""
    if storage.sqlite_path is not None:
        return storage.sqlite_path.with_name(f"{storage.sqlite_path.stem}-spool")
    digest = hashlib.sha256(storage.url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"openim-bizplugin-spool-{digest}"


def encode(callback: Callback) -> bytes:
    """One record: a CRC-32 of the JSON, the JSON, a newline (JSON escapes any newline inside)."""
    text = json.dumps(callback, ensure_ascii=False, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def decode(chunk: bytes, limit: int) -> tuple[list[Callback], int]:
    """Up to *limit* whole records of *chunk* and the bytes they took; an unreadable line is skipped
    (and logged), an unfinished last line is left for later."""
    records: list[Callback] = []
    used = 0
    while len(records) < limit:
        end = chunk.find(b"\n", used)
        if end < 0:
            break
        line, used = chunk[used:end], end + 1
        try:
            crc, _, text = line.partition(b" ")
            if int(crc, 16) != zlib.crc32(text):
                raise ValueError("checksum mismatch")
            command, key, body, received_ms = json.loads(text)
            records.append((command, key, body, int(received_ms)))
        except (ValueError, TypeError) as exc:
            log.error("callback spool: an unreadable record was skipped (%s)", exc,
                      extra={"event": "callback.spool_corrupt"})
    return records, used


@dataclass
class _Segment:
    """One of this process's spool files, open and locked."""

    path: Path
    fd: int
    size: int = 0  # bytes of whole records written
    drained: int = 0  # bytes whose callbacks are in the inbox


class CallbackSpool:
    """Keeps callbacks that the inbox cannot take at once, and drains them into it; see the module docs."""

    def __init__(self, directory: Path, store: Store, *, max_bytes: int,
                 on_stored: Callable[[], None] = lambda: None, adopt_every: float = ADOPT_EVERY_SECONDS) -> None:
        self.directory, self.store, self.max_bytes = Path(directory), store, max_bytes
        self.on_stored, self.adopt_every = on_stored, adopt_every
        self.segment_bytes = max(1, min(SEGMENT_BYTES, max_bytes // 4))
        self._reset()
        # a forked child (gunicorn) must not append to its parent's files or think its loop runs
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (spool := this()) is not None and spool._reset(forked=True))

    def _reset(self, forked: bool = False) -> None:
        if forked:  # the parent's descriptors: closing our copies leaves the parent's locks alone
            for segment in self._segments:
                os.close(segment.fd)
        self._lock = threading.Lock()  # appends, and changes to the segment list
        self._drain_lock = threading.Lock()  # one drain round at a time
        self._segments: list[_Segment] = []
        self._name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._serial = itertools.count(1)
        self._next_adopt = self._retry_at = self._full_logged = 0.0
        self._stalled = self._closed = False
        self.loop = BackgroundLoop("callback-spool", self._round, gather_seconds=GATHER_SECONDS, full_round=BATCH)
        self._started = False

    # -- answering ---------------------------------------------------------------------
    def keep(self, command: str, key: str, body: str, received_ms: int) -> str:
        """Keep one callback without waiting: ``stored`` or ``duplicate`` (the inbox took it at
        once) or ``spooled``. Raises :class:`SpoolFull`, or StorageUnavailable when the spool
        file cannot be written (the callback is lost)."""
        self.start()  # a process that receives callbacks drains them, and replays spools left by others
        try:
            return "stored" if self.store.record_callback_now(command, key, body, received_ms) else "duplicate"
        except StorageUnavailable:  # busy (another writer holds the inbox) or failing: the spool keeps it
            pass
        self.append((command, key, body, received_ms))
        return "spooled"

    def append(self, callback: Callback) -> None:
        """Write *callback* to this process's spool (one ``write()``) and wake the drain."""
        record = encode(callback)
        with self._lock:
            segment = self._writable(len(record))
            try:
                written = os.write(segment.fd, record)
            except OSError as exc:
                raise StorageUnavailable(f"cannot write the callback spool {segment.path}: {exc}") from None
            if written != len(record):  # the disk filled up mid-record: no torn record before the next
                os.ftruncate(segment.fd, segment.size)
                raise StorageUnavailable(f"cannot write the callback spool {segment.path}: disk full")
            segment.size += written
        self.start()
        self.loop.wake()

    def _writable(self, size: int) -> _Segment:
        """The segment to append *size* bytes to (a new one when there is none or it is full)."""
        if sum(s.size for s in self._segments) + size > self.max_bytes:
            now = time.monotonic()
            if now >= self._full_logged + FULL_LOG_EVERY_SECONDS:
                self._full_logged = now
                log.error("callback spool %s is full (%d bytes): callbacks are answered and dropped until the "
                          "store takes them again", self.directory, self.max_bytes,
                          extra={"event": "callback.spool_full"})
            raise SpoolFull(f"the callback spool holds {self.max_bytes} bytes already")
        if self._segments and self._segments[-1].size < self.segment_bytes:
            return self._segments[-1]
        if self._closed:
            raise StorageUnavailable("the callback spool is closed")
        path = self.directory / f"{self._name}-{next(self._serial):06d}{SUFFIX}"
        creating = path.with_suffix(".tmp")  # locked before it gets the name others look for
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(creating, path)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create a callback spool file in {self.directory}: {exc}") from None
        self._segments.append(_Segment(path, fd))
        return self._segments[-1]

    # -- draining ----------------------------------------------------------------------
    def start(self) -> None:
        """Drain in a thread of this process (once; also after a fork)."""
        if self._started:  # the usual case, on every callback: no lock
            return
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
        self.loop.start(1)

    def _round(self) -> int:
        """The loop's round: a drain, unless the store refused the last one a moment ago."""
        return 0 if time.monotonic() < self._retry_at else self.drain()

    def drain(self) -> int:
        """One round: this process's spool into the inbox, then (when due) the files of processes
        that ended. Returns how many callbacks reached the inbox; never raises for storage."""
        with self._drain_lock:
            return self._drain()

    def _drain(self) -> int:
        try:
            moved = self._drain_own()
            if time.monotonic() >= self._next_adopt:
                moved += self.adopt()
                self._next_adopt = time.monotonic() + self.adopt_every
        except StorageUnavailable as exc:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            if not self._stalled:
                self._stalled = True
                log.warning("callback spool: the store does not take spooled callbacks yet (%s); they are kept "
                            "and retried", exc, extra={"event": "callback.spool_stalled"})
            return 0
        if self._stalled:
            self._stalled = False
            log.info("callback spool: the store takes spooled callbacks again",
                     extra={"event": "callback.spool_resumed"})
        if moved:
            self.on_stored()
        return moved

    def pending_bytes(self) -> int:
        """Bytes of this process's spool not yet in the inbox."""
        with self._lock:
            return sum(s.size - s.drained for s in self._segments)

    def _drain_own(self) -> int:
        moved = 0
        with self._lock:
            segments = [(s, s.size) for s in self._segments]
        for segment, end in segments:
            while segment.drained < end and moved < BATCH:
                records, used = self._read(segment.fd, segment.drained, end, BATCH - moved)
                if not used:  # cannot happen (appends write whole records); never loop on it
                    break
                self._store(records)
                segment.drained += used
                moved += len(records)
        self._settle()
        return moved

    def _settle(self) -> None:
        """Delete drained segments that no longer take appends; empty the current one once drained."""
        with self._lock:
            if self._closed:
                return
            for segment in list(self._segments):
                if segment.drained < segment.size or not segment.size:
                    continue
                if segment is self._segments[-1]:
                    os.ftruncate(segment.fd, 0)  # appends continue at the new end (O_APPEND)
                    segment.size = segment.drained = 0
                else:
                    os.unlink(segment.path)
                    os.close(segment.fd)
                    self._segments.remove(segment)

    def _read(self, fd: int, offset: int, end: int, limit: int) -> tuple[list[Callback], int]:
        """Whole records from *offset* (at most *limit*), reading at most READ_BYTES unless one record is longer."""
        want = min(end - offset, READ_BYTES)
        while True:
            chunk = os.pread(fd, want, offset)
            records, used = decode(chunk, limit)
            if used or len(chunk) < want or offset + want >= end:
                return records, used
            want = min(end - offset, want * 2)  # one record longer than what was read

    def _store(self, records: list[Callback]) -> None:
        if records:
            self.store.record_callbacks(records)

    def adopt(self) -> int:
        """Replay and delete the spool files of processes that ended; returns the callbacks replayed."""
        moved = 0
        if not self.directory.is_dir():
            return 0
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(self._name):
                continue
            if path.suffix == SUFFIX:
                moved += self._adopt_file(path)
            elif path.suffix == ".tmp":
                self._remove_litter(path)
        return moved

    def _adopt_file(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # another process adopted it meanwhile
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive and drains it itself
                return 0
            info = os.fstat(fd)
            if info.st_nlink == 0:  # adopted and deleted by another process after we opened it
                return 0
            offset = moved = 0
            while offset < info.st_size:
                records, used = self._read(fd, offset, info.st_size, BATCH)
                if not used:  # a record cut short by the kill: its write never returned, so never answered
                    break
                self._store(records)
                offset, moved = offset + used, moved + len(records)
            os.unlink(path)
        finally:
            os.close(fd)
        log.log(logging.INFO if moved else logging.DEBUG, "callback spool: replayed %d callbacks from %s, left by "
                "a process that ended", moved, path.name, extra={"event": "callback.spool_adopted", "callbacks": moved})
        return moved

    @staticmethod
    def _remove_litter(path: Path) -> None:
        """A file whose creator was killed between creating and naming it (empty: nothing was written)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > STALE_TMP_SECONDS:
                os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)

    def close(self, timeout: float = 3.0) -> None:
        """Stop draining; delete this process's drained files. What is not drained stays, for the
        next process to replay (a drain stuck on a locked store is left to the process's exit)."""
        deadline = time.monotonic() + timeout
        self.loop.stop(timeout)
        if not self._drain_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return
        try:
            with self._lock:
                self._closed = True
                for segment in self._segments:
                    if segment.drained >= segment.size:
                        os.unlink(segment.path)
                    os.close(segment.fd)
                self._segments = []
        finally:
            self._drain_lock.release()
