"""Several worker processes on one port (``server.workers > 1``).

The supervisor is a plain, single-threaded process with no event loop. It:

1. migrates the database once, and sets ``PROMETHEUS_MULTIPROC_DIR`` to a
   fresh private directory so /metrics on any worker reports the sum over
   all workers (prometheus-client multiprocess mode);
2. opens the listening socket (SO_REUSEPORT set) and forks N workers that
   share it, each accepting on its own uvloop event loop. Only worker 0 runs
   the video task poller and the usage retention job.

   Why one shared socket rather than one SO_REUSEPORT socket per worker:
   with per-worker sockets the kernel hashes each new connection to one
   worker's accept queue, and when that worker stops (rolling restart) or
   dies, the connections waiting in its queue are reset (unless the host
   sets net.ipv4.tcp_migrate_req). With one queue shared by all workers, a
   worker that stops accepting leaves its share to the others: nothing
   queued is lost. SO_REUSEPORT on the socket still lets a second
   `gateway serve` bind the same port while this one drains;
3. waits for signals (blocked, read with ``sigtimedwait``, so there is no
   handler racing the main loop):

   - SIGCHLD: a worker that exits while the supervisor is not stopping is
     replaced by a new worker with the same index (after 1 s if it lived
     less than 1 s, so a worker that cannot start does not spin; after 5
     such exits in a row the supervisor stops and exits 1, for systemd's
     Restart=on-failure to take over); its live gauge files are removed
     (``mark_process_dead``) and the usage rows it had spooled but not
     written are written (gateway.store.spool).
   - SIGTERM / SIGINT: forwarded to every worker as SIGTERM; each stops
     accepting, finishes its in-flight requests and streams (up to
     ``server.graceful_timeout_s``), flushes its usage queue and exits 0.
     Workers still alive ``graceful_timeout_s + 5`` s later are killed. The
     supervisor exits 0 when every worker exited 0.
   - SIGHUP: the config file is re-read here (so replacement workers start
     with it) and SIGHUP is forwarded: each worker reloads (gateway.reload).
   - SIGUSR2: rolling restart, one worker at a time: a new worker with the
     same index is started and, once it listens, the old one is sent
     SIGTERM and drains as above. Use it to pick up settings that need a
     restart or new code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace

from .config import Config, ConfigError, load_config
from .listener import close_door
from .logs import set_worker, startup_fields
from .reload import SIGHUP, SIGUSR1, check_not_emptied, record_reload
from .server import ListenError, run, run_until_signal
from .store.base import Store, run_on_store
from .store.spool import spool_dir

log = logging.getLogger("gateway.supervisor")

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD}
READY_TIMEOUT_S = 30.0
PR_SET_PDEATHSIG = 1
MAX_QUICK_EXITS = 5  # consecutive workers dying within 1 s of start: stop, exit 1


@dataclass
class Worker:
    index: int
    pid: int
    started: float
    ready_fd: int  # read end of the worker's ready pipe; -1 once read
    retiring: bool = False


class Supervisor:
    """Starts, watches and stops the worker processes. ``run`` returns the
    exit code."""

    def __init__(self, cfg: Config, *, bundled_mock: bool = False) -> None:
        self.cfg = cfg
        self.bundled_mock = bundled_mock  # each worker runs its own (see run_until_signal)
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.failed = False
        self.port = cfg.server.port
        self._sock: socket.socket | None = None
        self._quick_exits = 0
        self._metrics_dir = ""

    # ---- lifecycle -----------------------------------------------------
    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self._metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        try:
            run_on_store(self.cfg.database, _nothing)  # migrate once, before N processes open it
            self._listen()
            for i in range(self.cfg.server.workers):
                self._spawn(i)
            for w in list(self.workers.values()):
                self._wait_ready(w)
            n = self.cfg.server.workers
            log.info(
                "gateway listening on %s:%d; upstreams: %s; models: %s; workers: %d",
                self.cfg.server.host, self.port, ", ".join(u.name for u in self.cfg.upstreams),
                ", ".join(m.name for m in self.cfg.models), n,
                extra={"fields": {**startup_fields(self.cfg, self.port, n),
                                  "worker_pids": [w.pid for w in self._by_index()]}},
            )
            self._loop()
        finally:
            self._stop_all()
            if self._sock is not None:
                self._sock.close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("supervisor stopped", extra={"fields": {"event": "stopped", "failed": self.failed}})
        return 1 if self.failed else 0

    def _loop(self) -> None:
        while not self.stopping:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            if info is None:
                self._reap()
                continue
            sig = info.si_signo
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                log.info("supervisor: %s, stopping %d workers", signal.Signals(sig).name, len(self.workers),
                         extra={"fields": {"event": "stopping"}})
                self.stopping = True
            elif sig in (signal.SIGHUP, signal.SIGUSR1):
                self._reload(force=sig == signal.SIGUSR1, sender=info.si_pid)
            elif sig == signal.SIGUSR2:
                self._rolling_restart()

    def _listen(self) -> None:
        """The one listening socket every worker accepts on."""
        try:
            self._sock = socket.create_server(
                (self.cfg.server.host, self.port), backlog=4096, reuse_port=True,
                family=socket.AF_INET6 if ":" in self.cfg.server.host else socket.AF_INET,
            )
        except OSError as e:
            raise ListenError(e, self.cfg.server.host, self.port) from None
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]

    # ---- workers -----------------------------------------------------
    def _by_index(self) -> list[Worker]:
        return sorted((w for w in self.workers.values() if not w.retiring), key=lambda w: w.index)

    def _spawn(self, index: int) -> Worker:
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            code = 1
            try:
                code = self._worker_main(index, wfd)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(wfd)
        w = Worker(index, pid, time.monotonic(), r)
        self.workers[pid] = w
        return w

    def _worker_main(self, index: int, ready_fd: int) -> int:
        from prometheus_client import values

        # A SIGHUP/SIGUSR2 arriving before the event loop installs its handlers
        # must not kill the worker (their default action is to terminate).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        _die_with_parent()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        set_worker(index)
        # prometheus-client picks its value class (in memory or mmap files)
        # when it is imported, which here was before the supervisor set
        # PROMETHEUS_MULTIPROC_DIR: pick again, now that it is set.
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        run(run_until_signal(self.cfg, bundled_mock=self.bundled_mock, worker=index, sock=self._sock,
                             ready_fd=ready_fd))
        return 0

    def _wait_ready(self, w: Worker) -> bool:
        """Wait until worker ``w`` listens. False if it died first."""
        if w.ready_fd < 0:
            return True
        ready, _, _ = select.select([w.ready_fd], [], [], READY_TIMEOUT_S)
        ok = bool(ready) and os.read(w.ready_fd, 1) == b"r"
        os.close(w.ready_fd)
        w.ready_fd = -1
        if not ok:
            log.error("worker %d (pid %d) did not start", w.index, w.pid)
        return ok

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        from prometheus_client import multiprocess

        w = self.workers.pop(pid, None)
        if w is None:
            return
        if w.ready_fd >= 0:
            os.close(w.ready_fd)
        multiprocess.mark_process_dead(pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and self.cfg.usage.spool:
            self._recover_usage()
        if code != 0:
            self.failed = self.failed or self.stopping or w.retiring
        if self.stopping or w.retiring:
            log.info("worker %d (pid %d) exited with %d", w.index, pid, code,
                     extra={"fields": {"event": "worker_exit", "worker_pid": pid, "code": code}})
            return
        log.warning("worker %d (pid %d) exited with %d; starting a new one", w.index, pid, code,
                    extra={"fields": {"event": "worker_exit", "worker_pid": pid, "code": code}})
        if time.monotonic() - w.started < 1.0:
            self._quick_exits += 1
            if self._quick_exits >= MAX_QUICK_EXITS:
                log.error("%d workers in a row exited within a second of starting; giving up", self._quick_exits)
                self.failed = self.stopping = True
                return
            time.sleep(1.0)
        else:
            self._quick_exits = 0
        new = self._spawn(w.index)
        if self._wait_ready(new):
            log.info("worker %d replaced: pid %d", w.index, new.pid,
                     extra={"fields": {"event": "worker_replaced", "worker_pid": new.pid}})

    def _recover_usage(self) -> None:
        """Write the usage rows a dead worker had spooled but not committed."""
        directory = spool_dir(self.cfg.database.path)
        try:
            n = run_on_store(self.cfg.database, lambda store: store.recover_spools(directory))
        except Exception as e:
            log.error("usage spool recovery failed (the next start retries): %s", e)
            return
        log.info("recovered %d usage rows of a dead worker", n,
                 extra={"fields": {"event": "usage_recovered", "rows": n}})

    def _signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def _stop_all(self) -> None:
        self.stopping = True
        if self._sock is not None and self.workers:
            # The shared socket first takes no new connection; the workers,
            # still accepting, empty its queue; only then are they stopped.
            # Otherwise every connection the kernel queued while they drained
            # would be reset when this process closes the socket.
            close_door([self._sock])
        for pid in list(self.workers):
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.graceful_timeout_s + 5
        while self.workers and time.monotonic() < deadline:
            self._reap()
            if self.workers:
                time.sleep(0.05)
        for pid in list(self.workers):
            log.error("worker pid %d did not stop in time; killing it", pid)
            self._signal(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self.workers.pop(pid, None)
            self.failed = True

    # ---- signals -------------------------------------------------------
    def _reload(self, *, force: bool, sender: int) -> None:
        """SIGHUP (SIGUSR1: forced) from the operator, or from a worker that
        took an admin API reload (and audited it): re-read the file for the
        workers started from now on, audit a reload asked from outside, and
        forward the signal so every worker reloads."""
        if self.cfg.source is not None:
            try:
                new = load_config(self.cfg.source)
                if not force:
                    check_not_emptied(self.cfg, new)
            except ConfigError as e:
                log.error("config reload refused by the supervisor: %s", e)
            else:
                old = self.cfg
                self.cfg = replace(new, server=old.server, database=old.database, usage=old.usage, admin=old.admin)
                if sender not in self.workers:
                    self._audit_reload(old, force)
        for pid in list(self.workers):
            self._signal(pid, signal.SIGUSR1 if force else signal.SIGHUP)

    def _audit_reload(self, old: Config, force: bool) -> None:
        assert self.cfg.source is not None
        try:
            record_reload(old.database, SIGUSR1 if force else SIGHUP, self.cfg.source, old, self.cfg)
        except Exception as e:  # the supervisor outlives any database failure
            # The reload stands; say loudly that its audit row is missing.
            log.error("config reload applied but not audited: %s", type(e).__name__)

    def _rolling_restart(self) -> None:
        """Replace every worker, one at a time, new before old: the port
        always has a listening worker."""
        if self.cfg.source is not None:
            try:
                loaded = load_config(self.cfg.source)
            except ConfigError as e:
                log.error("rolling restart refused: %s", e)
                return
            # The socket and the worker count stay as they are (and so do
            # any --host / --port / --workers given on the command line).
            kept = self.cfg.server
            server = replace(loaded.server, host=kept.host, port=kept.port, workers=kept.workers)
            self.cfg = replace(loaded, server=server)
        log.info("rolling restart of %d workers", len(self.workers), extra={"fields": {"event": "rolling_restart"}})
        for old in self._by_index():
            new = self._spawn(old.index)
            if not self._wait_ready(new):
                log.error("rolling restart stopped: the new worker %d did not start", old.index)
                return
            old.retiring = True
            self._signal(old.pid, signal.SIGTERM)
            try:
                _, status = os.waitpid(old.pid, 0)
            except ChildProcessError:
                continue
            self._exited(old.pid, status)
        log.info("rolling restart done", extra={"fields": {"event": "rolling_restart_done"}})


def _die_with_parent() -> None:
    """SIGTERM this worker if the supervisor dies (SIGKILL, OOM): a worker
    must never outlive it, holding the port. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


async def _nothing(store: Store) -> None:
    return None


def serve(cfg: Config, *, bundled_mock: bool = False) -> int:
    """``gateway serve`` with ``server.workers > 1``."""
    return Supervisor(cfg, bundled_mock=bundled_mock).run()
