"""The service: runs a Worker (worker.py) with its writing on a thread, and as a long-running daemon.

A writer thread, on its own connection, writes each measured prompt (one transaction that stores its
rows and marks it done) while the worker measures the next, so that the database never makes the
engine wait. At most one measured prompt waits for the writer; a prompt keeps its lease until its
transaction commits, and a crash before that leaves it to be claimed again when the lease expires.

`Service.run_once()` drains the queue and returns. `Service.run_forever()` keeps going: a LISTEN on
icl_prompts wakes it as soon as a prompt is committed, an APScheduler job polls as a fallback, another
keeps the log's monthly partitions ahead, and consolidation runs on its schedule between prompts (with
`learn_new_memories`, after queuing and measuring questions about every memory not yet learned, learn.py);
SIGTERM or SIGINT stops claiming, lets the current job finish within the stop timeout (else puts it
back in the queue) and returns 0. A lost database connection is reopened; any other fault of the
worker or the writer thread ends `run_forever` with 1, for the supervisor to restart the process. The
main thread tells systemd the service's state and feeds its watchdog while the work moves.
"""

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Full, Queue

from apscheduler.schedulers.background import BackgroundScheduler

from icldaemon import learn
from icldaemon.consolidate import ConsolidationRequest, ConsolidationSettings, Consolidator
from icldaemon.engine.loading import LoadedModel
from icldaemon.exceptions import DatabaseError, IcldaemonError
from icldaemon.sdnotify import Notifier
from icldaemon.settings import POLL_INTERVAL, STOP_TIMEOUT, Settings
from icldaemon.store import queue
from icldaemon.store.queue import DATABASE_ERRORS, Connection
from icldaemon.store.retention import maintain_partitions
from icldaemon.worker import JobAbandoned, Measured, Worker, on_module_calls

PARTITION_MAINTENANCE_HOURS = 24.0  # hours between partition maintenance runs
LISTEN_TIMEOUT = 1.0  # seconds the listener waits before checking whether to stop
MAIN_LOOP_TICK = 0.5  # seconds between the main thread's checks (stop, systemd status and watchdog)
ABANDON_TIMEOUT = 5.0  # seconds a released job's thread gets to leave the model before the process exits anyway
WRITE_QUEUE_DEPTH = 1  # measured prompts waiting for the writer: a slow database slows measuring, not memory
HANDOFF_TICK = 0.5  # seconds between checks that the writer is alive while a measured prompt waits for it


class _Progress:
    """When each of the service's threads last moved; a thread waiting for work is idle and never stalls.

    The main thread feeds systemd's watchdog only while no thread is stalled (busy and unmoved for longer
    than the watchdog's timeout): a job stuck in a kernel or a lock wait stops the feeding, and systemd
    restarts the service. Moves: every module call of the model (measuring, consolidating), every claim,
    and each prompt the writer takes up.
    """

    def __init__(self):
        self._since: dict[str, float | None] = {}  # thread -> when it last moved; None: idle

    def moved(self, thread: str) -> None:
        self._since[thread] = time.monotonic()

    def idle(self, thread: str) -> None:
        self._since[thread] = None

    def stalled(self, limit: float) -> dict[str, float]:
        """The busy threads that have not moved for more than `limit` seconds, with those seconds."""
        now = time.monotonic()
        return {thread: now - since for thread, since in list(self._since.items())
                if since is not None and now - since > limit}


class _ResultWriter:
    """Writes measured prompts on its own thread and connection while the worker measures the next ones.

    At most WRITE_QUEUE_DEPTH prompts wait: a worker with one more to hand over waits for the writer. A
    lost connection costs the prompt being written its attempt (its lease runs out, it is claimed again)
    and is reopened for the next; any other fault stops the service (`Service._failure`).
    """

    def __init__(self, service: "Service"):
        self._service = service
        self._jobs: Queue[Measured | None] = Queue(maxsize=WRITE_QUEUE_DEPTH)
        self._pending = 0  # handed over and not yet written (or given up)
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="write", daemon=True)

    def __enter__(self) -> "_ResultWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        for job in self._drain_jobs():  # handed over as the writer stopped on a fault
            self._done_with(job)

    def busy(self) -> bool:
        with self._idle:
            return self._pending > 0

    def submit(self, job: Measured) -> bool:
        """Hand a measured prompt over, waiting while WRITE_QUEUE_DEPTH others wait for the writer; False (and
        the prompt left to its lease) when the writer has stopped."""
        with self._idle:
            self._pending += 1
        while self._thread.is_alive():
            try:
                self._jobs.put(job, timeout=HANDOFF_TICK)
                return True
            except Full:
                continue
        self._done_with(job)
        return False

    def flush(self) -> None:
        """Wait until every prompt handed over is written, or the writer has stopped."""
        with self._idle:
            while self._pending and self._thread.is_alive():
                self._idle.wait(HANDOFF_TICK)

    def _done_with(self, job: Measured) -> None:
        job.heartbeat.stop()  # written, failed, or left for its lease to run out and be claimed again
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run(self) -> None:
        service = self._service
        connection: Connection | None = None
        job: Measured | None = None
        try:
            while True:
                service.progress.idle("write")
                if (job := self._jobs.get()) is None:
                    break
                service.progress.moved("write")
                status = None
                try:
                    if connection is None:
                        connection = queue.connect(service.worker.url)
                    status = service.worker.write(connection, job)
                except DatabaseError as exc:
                    job.heartbeat.stop()
                    service.log.error("writer_database_error", prompt_id=job.claim.prompt_id, error=str(exc))
                    connection = queue.close_quietly(connection)
                if status is not None:
                    service.finished(job.claim, status)
                self._done_with(job)
                job = None
        except Exception as exc:  # noqa: BLE001 - a fault outside any write: stop the service with a failing exit code
            service.fail(exc)
        finally:
            queue.close_quietly(connection)
            for waiting in [job, *self._drain_jobs()]:
                if waiting is not None:
                    self._done_with(waiting)

    def _drain_jobs(self) -> list[Measured]:
        waiting = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job is not None:
                waiting.append(job)
        return waiting


class Service:
    """Runs a Worker: once over the queue, or as the daemon (threads, LISTEN, schedule, signals, systemd)."""

    def __init__(
        self,
        worker: Worker,
        *,
        poll_interval: float = POLL_INTERVAL,
        stop_timeout: float = STOP_TIMEOUT,
        retention_days: float | None = None,
        consolidation: ConsolidationSettings | None = None,
        adapters_dir: Path | None = None,
        learn_new_memories: bool = False,
        on_processed: Callable[[int, str], None] | None = None,
    ):
        self.worker = worker
        self.poll_interval, self.stop_timeout, self.retention_days = poll_interval, stop_timeout, retention_days
        self.on_processed = on_processed
        self.log = worker.log
        self.progress = _Progress()
        # Consolidation runs the model, so it runs on the worker thread, between prompts.
        self.consolidation = consolidation
        self.adapters_dir = adapters_dir
        self.learn_new_memories = learn_new_memories
        self._consolidation_due = threading.Event()
        self._consolidator: Consolidator | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._listening = threading.Event()
        self._abandoned = threading.Event()
        self._current: queue.Claim | None = None
        self._failure: Exception | None = None  # what killed the worker or the writer thread, if anything did
        self._counts: Counter = Counter()  # prompts per status they ended in, this run
        self._finished_lock = threading.Lock()  # the worker and the writer thread both report prompts
        self._results: _ResultWriter | None = None

    @classmethod
    def from_settings(cls, url: str, loaded: LoadedModel, settings: Settings, *, worker_id: str | None = None,
                      stride: int = 1, **options) -> "Service":
        worker = Worker.from_settings(url, loaded, settings, worker_id=worker_id, stride=stride)
        return cls(worker, poll_interval=settings.poll_interval, stop_timeout=settings.stop_timeout,
                   retention_days=settings.retention_days, learn_new_memories=settings.learn_new_memories, **options)

    # --- draining the queue

    def finished(self, claim: queue.Claim, status: str) -> None:
        with self._finished_lock:
            self._counts[status] += 1
            if self.on_processed is not None:
                self.on_processed(claim.prompt_id, status)

    def fail(self, exc: Exception) -> None:
        """A fault outside any job: stop, and have run_forever exit 1 (run_once raises it)."""
        # Not retried in-process: the state that raised is unknown. The process exits 1 so that a
        # supervisor (systemd's Restart=on-failure) starts a fresh one; a prompt this process held
        # goes back to the queue when its lease expires.
        if self._failure is None:
            self._failure = exc
        self.log.error("worker_failed", error=str(exc), error_type=type(exc).__name__, exc_info=True)
        self.stop()

    def _step(self) -> None:
        """Before every module call of a job: progress, and the way out once the job was released."""
        self.progress.moved("work")
        if self._abandoned.is_set():
            raise JobAbandoned()

    def _drain(self, connection: Connection) -> None:
        results, progress = self._results, self.progress
        while not self._stopping.is_set():
            progress.moved("work")
            claim = self.worker.claim(connection)
            if claim is None:
                if not results.busy():
                    return
                progress.idle("work")  # waiting for the writer, whose own progress is watched
                results.flush()  # a write that fails may put its prompt back in the queue: look again
                continue
            self._current = claim
            try:
                measured = self.worker.measure_claimed(connection, claim, self._step)
            finally:
                self._current = None
            if isinstance(measured, str):
                self.finished(claim, measured)
                continue
            progress.idle("work")
            if not results.submit(measured):
                return  # the writer stopped on a fault, and stopped the service

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A writer thread for this run; every prompt handed to it is written (or given up) on leaving."""
        self._counts, self._failure = Counter(), None
        with _ResultWriter(self) as self._results:
            yield

    def run_once(self) -> Counter:
        """Process prompts until none is due; returns how many ended in each status."""
        with self._writing(), queue.connect(self.worker.url) as connection:
            self._drain(connection)
        if self._failure is not None:
            raise self._failure
        return self._counts

    # --- the long-running service

    def stop(self) -> None:
        """Stop claiming; the current job finishes (within the stop timeout in run_forever)."""
        self._stopping.set()
        self._wake.set()

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                with queue.connect(self.worker.url, autocommit=True) as connection:
                    queue.listen(connection)
                    self.log.info("listening")
                    self._listening.set()
                    while not self._stopping.is_set():
                        if queue.wait_for_notification(connection, LISTEN_TIMEOUT):
                            self._wake.set()
            except DATABASE_ERRORS as exc:
                self.log.warning("listen_failed", error=str(exc))
                self._stopping.wait(self.poll_interval)

    def _work(self) -> None:
        with self._writing():
            while not self._stopping.is_set():
                try:
                    with queue.connect(self.worker.url) as connection:
                        while not self._stopping.is_set():
                            self._wake.clear()
                            self._drain(connection)
                            if self._consolidation_due.is_set() and not self._stopping.is_set():
                                self._consolidation_due.clear()
                                if self.learn_memories():  # measured now, so that this consolidation fits them
                                    self._drain(connection)
                                if not self._stopping.is_set():
                                    self.consolidate()
                                continue
                            self.progress.idle("work")
                            self._wake.wait()
                except DATABASE_ERRORS as exc:
                    self.log.error("worker_database_error", error=str(exc))
                    self._stopping.wait(self.poll_interval)
                except Exception as exc:  # noqa: BLE001 - a fault outside any job: stop with a failing exit code
                    self.fail(exc)
                    return

    def learn_memories(self) -> bool:
        """With learn_new_memories, queue questions about every memory not learned yet; whether any were queued."""
        if not self.learn_new_memories or self.consolidation is None or self.adapters_dir is None:
            return False
        try:
            submitted = learn.learn_new_memories(self.worker.url)
        except IcldaemonError as exc:  # logged; the consolidation and the measuring go on
            self.log.error("learn_failed", error=str(exc), error_type=type(exc).__name__)
            return False
        return bool(submitted)

    def consolidate(self) -> None:
        """One scheduled consolidation of every due group; a failing group is logged and skipped."""
        if self.consolidation is None or self.adapters_dir is None:
            return
        if self._consolidator is None:  # keeps the generic keys and the neutral baseline between runs
            self._consolidator = Consolidator(self.worker.url, self.worker.loaded, self.adapters_dir)
        try:
            with on_module_calls(lambda: self.progress.moved("work")):
                self._consolidator.run(ConsolidationRequest.from_settings(self.consolidation), raise_errors=False)
        except IcldaemonError as exc:  # logged; the daemon goes on measuring
            self.log.error("consolidation_failed", error=str(exc), error_type=type(exc).__name__)

    def _schedule_consolidation(self, scheduler: BackgroundScheduler) -> None:
        settings = self.consolidation
        if settings is None or self.adapters_dir is None:
            return

        def due() -> None:
            self._consolidation_due.set()
            self._wake.set()

        if settings.cron:
            from apscheduler.triggers.cron import CronTrigger

            scheduler.add_job(due, CronTrigger.from_crontab(settings.cron, timezone="UTC"), id="consolidate")
        elif settings.interval_minutes > 0:
            scheduler.add_job(due, "interval", minutes=settings.interval_minutes, id="consolidate")

    def maintain_partitions(self) -> None:
        try:
            created, dropped, applied = maintain_partitions(self.worker.url, self.retention_days)
        except DatabaseError as exc:
            self.log.error("partition_maintenance_failed", error=str(exc))
            return
        if self.retention_days and applied is None:
            self.log.warning("retention_not_configured", retention_days=self.retention_days,
                             hint="the schema owner sets it: icldaemon roles --retention-days")
        if created:
            self.log.info("partitions_created", partitions=created)
        if dropped:
            self.log.info("partitions_dropped", partitions=dropped, retention_days=self.retention_days)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda received, frame: self.stop())
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _current_prompt_id(self) -> int | None:
        """The prompt being measured, for the main thread's logs; read once, as the worker thread may clear it."""
        current = self._current
        return current.prompt_id if current is not None else None

    def _activity(self) -> str:
        current = self._current
        return f"measuring prompt {current.prompt_id}" if current is not None else "waiting for prompts"

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT (or stop()); returns the exit code: 0, or 1 if the worker thread failed."""
        self.log.info("daemon_started", poll_interval=self.poll_interval, lease_seconds=self.worker.lease_seconds)
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(self._wake.set, "interval", seconds=self.poll_interval, id="poll")
        scheduler.add_job(self.maintain_partitions, "interval", hours=PARTITION_MAINTENANCE_HOURS, id="partitions")
        self._schedule_consolidation(scheduler)
        listener = threading.Thread(target=self._listen, name="listen", daemon=True)
        worker = threading.Thread(target=self._work, name="work", daemon=True)
        notifier = Notifier()
        ready = False
        with self._signals():
            self.maintain_partitions()
            scheduler.start()
            listener.start()
            worker.start()
            # The main thread feeds systemd's watchdog while the work moves (_Progress): a job stuck in a kernel
            # or a lock wait, or a main loop that stops turning, gets the process restarted.
            tick = min(MAIN_LOOP_TICK, notifier.watchdog_interval or MAIN_LOOP_TICK)
            stall_limit = notifier.watchdog_timeout  # unmoved this long: systemd would have restarted a hung one
            withheld = False
            while worker.is_alive() and not self._stopping.is_set():
                if self._listening.is_set():
                    if not ready:
                        ready = notifier.ready(self._activity()) or True
                    notifier.status(self._activity())
                stalled = self.progress.stalled(stall_limit) if stall_limit else {}
                if stalled and not withheld:
                    self.log.error("watchdog_withheld", stalled_seconds={thread: round(seconds, 1)
                                                                          for thread, seconds in stalled.items()},
                                   current_prompt=self._current_prompt_id())
                elif withheld and not stalled:
                    self.log.info("watchdog_resumed")
                withheld = bool(stalled)
                if not stalled:
                    notifier.watchdog()
                self._stopping.wait(tick)
            self.log.info("daemon_stopping", current_prompt=self._current_prompt_id())
            notifier.stopping()
            self._stopping.set()
            self._wake.set()
            worker.join(self.stop_timeout)
            scheduler.shutdown(wait=False)
            current = self._current
            if worker.is_alive() and current is not None:
                with queue.connect(self.worker.url) as connection:
                    released = queue.release(connection, current)
                self.log.warning("prompt_released", prompt_id=current.prompt_id, released=released)
            if worker.is_alive():
                # The interpreter cannot finalise under a thread that is inside torch (the process aborts):
                # the released job leaves the model at its next module call.
                self._abandoned.set()
                worker.join(ABANDON_TIMEOUT)
            listener.join(LISTEN_TIMEOUT * 2)
        notifier.close()
        exit_code = 1 if self._failure is not None else 0
        self.log.info("daemon_stopped", exit_code=exit_code)
        if worker.is_alive():
            sys.stderr.flush()
            os._exit(exit_code)  # still inside native code: exit without finalising, rather than abort
        return exit_code
