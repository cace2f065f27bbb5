"""The process tree of ``serve``: a supervisor and the children it forks.

The supervisor forks each child (an HTTP process or the background one),
starts again one that dies (after a pause that doubles while it keeps dying,
up to 30 s), and on SIGTERM/SIGINT asks every child to stop, waits for them to
drain, and kills what is left after the grace period. A child dies with the
supervisor (Linux: PR_SET_PDEATHSIG), so a ``kill -9`` of the supervisor does
not leave its children serving. Nothing here knows the app: the children's
work is given as runners.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from ..errors import BizError

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTART_PAUSE_SECONDS = (0.5, 30.0)  # a dead child is started again after this, doubling while it keeps dying
HEALTHY_SECONDS = 30.0  # a child that lived this long starts again after the shortest pause


class Stop:
    """Set by SIGTERM/SIGINT in a child process."""

    def __init__(self) -> None:
        self.flag = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.set)

    def set(self, *_: object) -> None:
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


Runner = Callable[[Stop, int], int]  # a child's work: (its stop flag, the fd to say "ready" on) -> exit code


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this child when the supervisor dies (kill -9 included)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Forks the children of ``serve``, starts again those that die, stops them all on SIGTERM.

    *children* are (role, runner) pairs; an ``http`` child says it is ready once it accepts
    connections, and :meth:`start` waits for all of them.
    """

    def __init__(self, children: list[tuple[str, Runner]], shutdown_seconds: float) -> None:
        self.slots, self.shutdown_seconds = children, shutdown_seconds
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
        self.pauses = [RESTART_PAUSE_SECONDS[0]] * len(children)
        self.due: dict[int, float] = {}  # slot -> when to start it again
        self.stopping = False
        self.ready_read, self.ready_write = os.pipe()

    def start(self, timeout: float = 60.0) -> None:
        """Start every child; return once the HTTP ones accept connections (or *timeout* passed)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._stop)
        for slot in range(len(self.slots)):
            self._spawn(slot)
        waiting = sum(role == "http" for role, _ in self.slots)
        deadline = time.monotonic() + timeout
        while waiting > 0 and not self.stopping and time.monotonic() < deadline:
            if select.select([self.ready_read], [], [], 0.1)[0]:
                waiting -= len(os.read(self.ready_read, 64))
            self._reap()

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT, then stop every child; returns the exit code."""
        while not self.stopping:
            self._reap()
            now = time.monotonic()
            for slot, when in list(self.due.items()):
                if when <= now:
                    del self.due[slot]
                    self._spawn(slot)
            time.sleep(0.1)
        return self._stop_children()

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _spawn(self, slot: int) -> None:
        role, parent = self.slots[slot][0], os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the child installs its own first
        pid = os.fork()
        if pid == 0:
            os._exit(self._child(slot, parent, blocked))
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.children[pid] = (slot, time.monotonic())
        log.info("started %s process %d", role, pid, extra={"event": "serve.child_started", "role": role,
                                                           "pid": pid})

    def _child(self, slot: int, parent: int, blocked: set) -> int:
        role, runner = self.slots[slot]
        code = 1
        try:
            os.close(self.ready_read)
            stop = Stop()
            _die_with_parent(parent)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            code = runner(stop, self.ready_write)
        except BaseException:
            log.exception("%s process failed", role)
        finally:
            logging.shutdown()
        return code

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot, started = self.children.pop(pid)
            lived = time.monotonic() - started
            self.pauses[slot] = RESTART_PAUSE_SECONDS[0] if lived > HEALTHY_SECONDS else min(
                self.pauses[slot] * 2, RESTART_PAUSE_SECONDS[1])
            self.due[slot] = time.monotonic() + self.pauses[slot]
            role = self.slots[slot][0]
            log.error("%s process %d ended (%s); starting another in %.1f s", role, pid, _exit_text(status),
                      self.pauses[slot], extra={"event": "serve.child_died", "role": role, "pid": pid})

    def _stop_children(self) -> int:
        log.info("stopping: %d processes drain", len(self.children), extra={"event": "serve.stopping"})
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_seconds + 5
        while self.children and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                pid, _status = os.waitpid(-1, os.WNOHANG)
                if pid:
                    self.children.pop(pid, None)
                    continue
            time.sleep(0.05)
        for pid in self.children:  # still there after the grace period
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        return 0


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def listening_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The socket every HTTP process accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise BizError(f"cannot listen on {host}:{port}: {exc.strerror or errno.errorcode.get(exc.errno)}") from None
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock
