"""Helpers shared by the benchmarks in this folder (Linux: they read /proc).

Processes are started and stopped by pid (never by name); figures come from
``/proc/<pid>/stat`` and ``/proc/<pid>/status`` so nothing beyond the standard
library is needed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


LISTENING = "listening on http://"  # what `openim-bizplugin serve` and the bare servers announce


# -- side B of the request benchmarks: a bare endpoint served like the sidecar ------------------
def serve_like_the_sidecar(app, log_path=lambda path: path.split("?", 1)[0]) -> int:  # type: ignore[no-untyped-def]
    """Serve the Flask *app* the way ``openim-bizplugin serve`` serves the sidecar: the same HTTP
    engine with its default limits, as many HTTP processes (``[server] workers``' default, the CPU
    count), one logging line per request (the path through *log_path*); SIGTERM stops it after the
    requests in flight; announces ``listening on http://HOST:PORT`` on stdout."""
    import logging

    from openim_bizplugin.config import ServerConfig
    from openim_bizplugin.web import server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = ServerConfig()
    limits = server.httpserver.Limits(defaults.threads, defaults.max_connections, defaults.header_timeout_seconds,
                                      defaults.body_timeout_seconds, defaults.keepalive_seconds,
                                      defaults.shutdown_seconds, defaults.max_body_bytes * 4 + 65536)
    server.masked_path = log_path  # what the access lines show
    return server.serve_app(app, workers=defaults.worker_count, limits=limits, announce=sys.stdout)


# -- the sidecar's config ----------------------------------------------------------------------
def catalogue_without_rate_limits(folder: Path) -> Path:
    """A copy of the shipped catalogue in *folder*/schemas with every per-recipient rate limit removed."""
    catalogue = folder / "schemas"
    shutil.copytree(REPO / "schemas", catalogue)
    for toml in catalogue.glob("*/type.toml"):
        toml.write_text("".join(line for line in toml.read_text().splitlines(keepends=True)
                                if not line.startswith("rate_limit ")))
    return catalogue


def write_sidecar_config(path: Path, *, api_url: str, openim_secret: str, admin: str, callback_token: str,
                         storage_url: str, workers: int, client: str, client_secret: str,
                         schemas: Path = REPO / "schemas", extra: dict[str, dict] | None = None) -> Path:
    """Write a sidecar config for a benchmark to *path*: loopback, port 0, one client allowed every type.

    *extra* adds or overrides keys per table, e.g. ``{"delivery": {"batch_size": 100}}``.
    """
    import json

    tables: dict[str, dict] = {
        "server": {"host": "127.0.0.1", "port": 0},
        # FakeOpenIM's default flavor: no release probe (its 1001 answer would count as an error)
        "openim": {"api_url": api_url, "secret": openim_secret, "admin_user_id": admin, "sender_id": admin,
                   "version": "main"},
        "callbacks": {"token": callback_token},
        "storage": {"url": storage_url},
        "schemas": {"dir": schemas.as_posix()},
        "delivery": {"workers": workers},
        f"clients.{client}": {"secrets": [client_secret], "allowed_types": ["*"]},
    }
    for table, values in (extra or {}).items():
        tables[table].update(values)
    text = "\n".join(f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
                     for table, values in tables.items())
    path.write_text(text)
    return path


# -- processes ---------------------------------------------------------------------------------
@dataclass
class Child:
    """A subprocess started by a benchmark, with the line it announced itself with."""

    name: str
    proc: subprocess.Popen
    line: str          # the announcement, without its prefix
    spawned: float     # time.monotonic() at Popen
    announced: float   # time.monotonic() when the announcement was read
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def host_port(self) -> tuple[str, int]:
        """Where a server child listens, from its ``HOST:PORT`` announcement."""
        host, port = self.line.rsplit(":", 1)
        return host, int(port)

    @classmethod
    def start(cls, name: str, argv: list[str], prefix: str, log_path: Path, *, cwd: Path | None = None,
              stdin: int | None = None, timeout: float = 60) -> Child:
        """Start *argv* (stderr to *log_path*) and wait for a stdout line starting with *prefix*."""
        with log_path.open("wb") as log:
            spawned = time.monotonic()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=stdin, cwd=cwd, text=True,
                                    bufsize=1, start_new_session=True)  # a group of its own: see stop()
        deadline = spawned + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(prefix):
                return cls(name, proc, line.strip()[len(prefix):], spawned, time.monotonic(), log_path)
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} did not start ({' '.join(argv)}):\n{tail}")

    def pause(self) -> None:
        """Freeze every process of this child's group (SIGSTOP) until :meth:`resume`."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal this child (by pid) and wait for it; SIGKILL if it does not exit in *timeout*.
        SIGKILL goes to its whole process group: a crash of ``serve`` takes all its processes."""
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class FakeOpenIMProcess:
    """The parent's handle on a fake OpenIM run as ``SCRIPT --fake-openim`` in its own process, so its
    CPU does not compete for the benchmark's GIL; it answers each stdin command with one JSON line."""

    def __init__(self, script: Path, work: Path) -> None:
        import threading

        self.child = Child.start("fake OpenIM", [sys.executable, str(script), "--fake-openim"],
                                 LISTENING, work / "fake-openim.log", stdin=subprocess.PIPE)
        self.url = f"http://{self.child.line}"
        self._lock = threading.Lock()

    def ask(self, command: str):  # type: ignore[no-untyped-def]
        import json

        with self._lock:
            self.child.proc.stdin.write(command + "\n")
            self.child.proc.stdin.flush()
            return json.loads(self.child.proc.stdout.readline())

    def stats(self) -> dict:
        """What the fake answered since the last call (and start counting afresh)."""
        return self.ask("stats")

    def cpu(self) -> float:
        return cpu_seconds(self.child.pid)

    def stop(self) -> None:
        if self.child.proc.poll() is None:
            self.child.proc.stdin.close()
        self.child.stop(timeout=10)


def console_script(name: str = "openim-bizplugin") -> str:
    """The package's console script next to this interpreter (the editable install), else from PATH."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is *pid* (``serve``'s HTTP and background processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of *pid* and its children, summed, in kB;
    empty once it has exited. With children (``serve``), VmRSS is the sum of their proportional
    set sizes (Pss): pages the forked processes share are counted once, not once per process."""
    found: dict[str, int] = {}
    pids = [pid, *child_pids(pid)]
    for each in pids:
        try:
            text = Path(f"/proc/{each}/status").read_text()
            if len(pids) > 1:
                text += Path(f"/proc/{each}/smaps_rollup").read_text().replace("Pss:", "VmPss:", 1)
        except OSError:
            if each == pid:
                return {}
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "VmPss"):
                found[key] = found.get(key, 0) + int(value.split()[0])
    if "VmPss" in found:
        found["VmRSS"] = found.pop("VmPss")
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid* so far, its children's included (live ones, and
    those it waited for), or nan once it has exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    ticks = sum(int(f) for f in fields[11:15])
    for child in child_pids(pid):
        try:
            ticks += sum(int(f) for f in Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[11:15])
        except OSError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


class RedisProcess:
    """A ``redis-server`` of a benchmark's own on a free loopback port, its files in *folder*.

    *fsync* is the AOF policy: ``always`` (every write on disk before Redis
    answers, what SQLite's ``synchronous=FULL`` promises), ``everysec``, or
    ``no`` for no AOF at all (and no RDB snapshots either).
    """

    def __init__(self, folder: Path, fsync: str = "always", timeout: float = 10) -> None:
        import shutil
        import socket

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        aof = ["--appendonly", "no"] if fsync == "no" else ["--appendonly", "yes", "--appendfsync", fsync]
        self.fsync = fsync
        self.log_path = folder / "redis.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--dir", str(folder), *aof], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"redis-server did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def version(self) -> str:
        found = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        return next((part[2:] for part in found.split() if part.startswith("v=")), "?")

    def stop(self) -> None:
        """SIGTERM by pid (SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sqlite_files(db: Path) -> list[Path]:
    """The SQLite file *db* with its ``-wal`` and ``-shm`` companions."""
    return [Path(f"{db}{suffix}") for suffix in ("", "-wal", "-shm")]


def tear_down(work: Path, keep: bool, processes: Iterable = (), files: Iterable[Path] = ()) -> None:
    """Stop *processes* in turn (their own ``stop()``), then say *work* is kept, or delete it and *files*."""
    for process in processes:
        process.stop()
    if keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        for path in files:
            path.unlink(missing_ok=True)


# -- load generators -------------------------------------------------------------------------------
def post_once(conn: HTTPConnection, target: str, body: bytes, headers: dict, errors: dict) -> tuple[int, bytes] | None:
    """POST *body* on *conn*: (status, answer body), or None if the connection failed (counted in *errors*
    under the exception's name; the connection is closed and retried after a 10 ms pause)."""
    try:
        conn.request("POST", target, body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, HTTPException) as exc:
        conn.close()
        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        time.sleep(0.01)
        return None


def _put_result(queue, send: Callable, job: tuple) -> None:  # type: ignore[no-untyped-def]
    queue.put(send(*job))


def run_senders(send: Callable, jobs: list[tuple], generator: str, empty: Callable) -> list:
    """Call ``send(*job)`` for every job at once in threads (*generator* "thread", a failed one leaves
    ``empty()``) or forked processes ("process", results in the order they finish); the results."""
    if generator == "process":
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_put_result, args=(queue, send, job)) for job in jobs]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        return results
    results = [empty() for _ in jobs]

    def target(i: int) -> None:
        results[i] = send(*jobs[i])

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def merged_counts(counts: Iterable[dict]) -> dict:
    """The sum of several ``{key: count}`` dicts (keys in the order first seen)."""
    merged: dict = {}
    for one in counts:
        for key, n in one.items():
            merged[key] = merged.get(key, 0) + n
    return merged


def generator_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the forked senders of a load generator)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- machine context -------------------------------------------------------------------------------
def dist_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def filesystem_of(path: Path) -> str:
    """The file system type of the mount holding *path* (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def fsync_ms(directory: Path, count: int = 50) -> float:
    """Median time of one 4 KiB write + fsync in *directory*, in ms."""
    probe = directory / "fsync-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            began = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        probe.unlink()
    return statistics.median(times) * 1000


def machine_lines(db_dir: Path, dists: tuple[str, ...]) -> list[str]:
    """Lines describing where a run happened, for the head of a report."""
    versions = " / ".join(dist_version(d) for d in dists)
    return [
        f"cpus            {os.cpu_count()} (usable by this process: {usable_cpus()})",
        f"python          {platform.python_version()} ({platform.python_implementation()})",
        f"{'/'.join(dists):<15} {versions}",
        f"sqlite          {sqlite3.sqlite_version}",
        f"load average    {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at start",
        f"database dir    {db_dir} ({filesystem_of(db_dir)}; median fsync {fsync_ms(db_dir):.3f} ms)",
    ]


# -- command line ----------------------------------------------------------------------------------
def add_common_options(parser: argparse.ArgumentParser, *, folder_holds: str, strict_when: str | None = None,
                       db_files: str | None = None, profile_help: str | None = None,
                       profile_metavar: str = "DIR") -> None:
    """Add the options the benchmarks share, those with a text given: --db-dir and --sidecar-cmd (*db_files*),
    --profile and --profile-clock (*profile_help*), --keep (always), --strict (*strict_when*), --summary-json."""
    if db_files:
        parser.add_argument("--db-dir", help=f"folder for the sidecar's {db_files} (default: the temp folder)")
        parser.add_argument("--sidecar-cmd", metavar="CMD",
                            help="start side A with this shell-split command instead of `openim-bizplugin serve "
                                 "-c {config}` (e.g. another checkout or a patched build); {config} is replaced, "
                                 "and the command must print the sidecar's `listening on http://HOST:PORT` line")
    if profile_help:
        parser.add_argument("--profile", metavar=profile_metavar, help=profile_help)
        parser.add_argument("--profile-clock", choices=("cpu", "wall"), default="cpu",
                            help="what --profile measures: each thread's CPU time (default) or wall time")
    parser.add_argument("--keep", action="store_true", help=f"keep the temp folder ({folder_holds})")
    if strict_when:
        parser.add_argument("--strict", action="store_true", help=f"exit 1 when {strict_when}")
    parser.add_argument("--summary-json", metavar="PATH",
                        help="also write the key figures to PATH as JSON (bench/run)")


def sidecar_cmd_argv(command: str, config: Path) -> list[str]:
    """The argv of a ``--sidecar-cmd`` *command*: shell-split, ``{config}`` replaced by *config*."""
    import shlex

    return [part.replace("{config}", str(config)) for part in shlex.split(command)]


# -- figures ---------------------------------------------------------------------------------------
def percentile_ms(seconds: list[float], q: float) -> float:
    """The *q* quantile (0..1, nearest rank, as bench_intake computes it) of *seconds*, in ms; nan if empty."""
    if not seconds:
        return float("nan")
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def package_source(package: Path) -> str:
    """Where the code under test comes from: its folder and, in a git checkout, the commit (+ local edits)."""
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"from {package} (not a git checkout)"
    return f"from {package} at {commit}" + (" with uncommitted edits" if dirty else "")


# -- profiling every thread of a server ---------------------------------------------------------------
def profile_threads(clock: str = "cpu") -> list:
    """From now on, run every new ``threading.Thread`` of this process under its own cProfile profiler.

    cProfile only sees the thread that enables it, so ``threading.Thread.run``
    is wrapped (in this process only, not in the package). Returns the list
    that collects ``(thread name, profile)`` pairs; merge them with
    :func:`dump_profiles` once the threads are done. With *clock* "cpu" each
    profile counts its thread's CPU time, so waiting (fsync, locks, the GIL,
    the network) drops out; "wall" keeps it.
    """
    import cProfile
    import threading

    profiles: list = []
    lock = threading.Lock()
    original = threading.Thread.run

    def run_profiled(self: threading.Thread) -> None:
        profile = cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()
        with lock:
            profiles.append((self.name, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run_profiled  # type: ignore[method-assign]
    return profiles


def dump_profiles(profiles: list, out: Path, keep=lambda name: True) -> int:  # type: ignore[no-untyped-def]
    """Merge the profiles of the threads whose name passes *keep* into *out*; returns how many were merged."""
    import pstats

    chosen = [p for name, p in profiles if keep(name) and p.getstats()]
    if not chosen:
        return 0
    merged = pstats.Stats(chosen[0])
    for p in chosen[1:]:
        merged.add(p)
    merged.dump_stats(str(out))
    return len(chosen)


def print_profile_top(path: Path, title: str, top: int = 15, sort: str = "tottime") -> None:
    """Print the *top* functions of a pstats file by *sort*, indented, lines cut at 160 characters."""
    import io
    import pstats

    if not path.exists():
        print(f"  (no profile written: {path})")
        return
    text = io.StringIO()
    pstats.Stats(str(path), stream=text).sort_stats(sort).print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print(f"\n{title} ({path}), top {top} by {sort}:")
    for line in lines[start - 1 if start else 0:]:
        print("  " + line[:160])


# -- machine-readable summaries (read by bench/run) ------------------------------------------------
def figure(name: str, figure: str, value, *, unit: str = "", baseline=None, ratio=None,  # type: ignore[no-untyped-def]
           target: str = "", passed: bool | None = None) -> dict:
    """One row of a summary: *value* of *figure* for *name*, against *baseline*; *passed* None = no target."""
    def clean(x):  # type: ignore[no-untyped-def]
        return None if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))) else x

    if ratio is None and isinstance(value, (int, float)) and isinstance(baseline, (int, float)) and baseline:
        ratio = value / baseline
    return {"name": name, "figure": figure, "value": clean(value), "unit": unit, "baseline": clean(baseline),
            "ratio": clean(ratio), "target": target, "pass": passed}


def write_summary(path: str | Path, benchmark: str, sizes: str, figures: list[dict],
                  problems: list[str] = ()) -> None:  # type: ignore[assignment]
    """Write the key figures of a run as JSON for ``bench/run`` (``--summary-json PATH``)."""
    import json

    Path(path).write_text(json.dumps({"benchmark": benchmark, "sizes": sizes, "figures": figures,
                                      "problems": list(problems)}, indent=1, allow_nan=False) + "\n")


def write_summary_with_checks(path: str | Path, benchmark: str, sizes: str, figures: list[dict],
                              problems: list[str], checked: str) -> None:
    """Write the summary, closed by the figure "<benchmark> checks": *checked*, with len(*problems*) against 0."""
    figures.append(figure(f"{benchmark} checks", checked, len(problems), unit="problems", target="0",
                          passed=not problems))
    write_summary(path, benchmark, sizes, figures, problems)
