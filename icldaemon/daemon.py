"""The daemon: claims prompts, measures them with the engine, writes the results; the only layer using both.

The worker thread claims and measures; a writer thread, on its own connection, writes each measured
prompt (one transaction that stores its rows and marks it done) while the worker measures the next,
so that the database never makes the engine wait. At most one measured prompt waits for the writer; a
prompt keeps its lease until its transaction commits, and a crash before that leaves it to be claimed
again when the lease expires.

`Worker.run_once()` drains the queue and returns. `Worker.run_forever()` keeps going: a LISTEN on
icl_prompts wakes it as soon as a prompt is committed, an APScheduler job polls as a fallback and
another keeps the log's monthly partitions ahead; SIGTERM or SIGINT stops claiming, lets the current
job finish within the stop timeout (else puts it back in the queue) and returns 0. A lost database
connection is reopened; any other fault of the worker or the writer thread ends `run_forever` with 1,
for the supervisor to restart the process.
"""

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Full, Queue
from typing import Any

import psycopg
import torch
from apscheduler.schedulers.background import BackgroundScheduler
from pydantic import NonNegativeInt, PositiveFloat
from pydantic_settings import BaseSettings, SettingsConfigDict

from icldaemon.assembly import assemble_prompt
from icldaemon.consolidate import ConsolidationRequest, ConsolidationSettings, Consolidator
from icldaemon.engine.answers import (
    ANSWER_TOKENS,
    AnswerPatch,
    answer_patch,
    greedy_answer,
    stop_token_ids,
    supports_answer_patches,
)
from icldaemon.engine.loading import LoadedModel
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import SegmentedPrompt
from icldaemon.engine.result import Measurement
from icldaemon.exceptions import BadInputError, DatabaseError, IcldaemonError, NumericalError
from icldaemon.logs import get_logger
from icldaemon.sdnotify import Notifier
from icldaemon.store import queue, writer
from icldaemon.store.database import create_unpooled_engine_for, translate_errors
from icldaemon.store.partitions import ensure_partitions
from icldaemon.store.retention import drop_expired_partitions

POLL_INTERVAL = 5.0  # seconds between polls when no notification arrives
LEASE_SECONDS = queue.LEASE_SECONDS  # seconds
MAX_ATTEMPTS = queue.MAX_ATTEMPTS
BACKOFF_SECONDS = queue.BACKOFF_SECONDS  # seconds before the second attempt, doubling after
STOP_TIMEOUT = 30.0  # seconds the current job may take to finish after SIGTERM
PARTITION_MAINTENANCE_HOURS = 24.0  # hours between partition maintenance runs
LISTEN_TIMEOUT = 1.0  # seconds the listener waits before checking whether to stop
MAIN_LOOP_TICK = 0.5  # seconds between the main thread's checks (stop, systemd status and watchdog)
ABANDON_TIMEOUT = 5.0  # seconds a released job's thread gets to leave the model before the process exits anyway
WRITE_QUEUE_DEPTH = 1  # measured prompts waiting for the writer: a slow database slows measuring, not memory
HANDOFF_TICK = 0.5  # seconds between checks that the writer is alive while a measured prompt waits for it


class DaemonSettings(BaseSettings):
    """The daemon's timings, overridable from the environment (ICLD_POLL_INTERVAL, ...)."""

    model_config = SettingsConfigDict(env_prefix="ICLD_", env_file=None, extra="ignore")

    poll_interval: float = POLL_INTERVAL
    lease_seconds: float = LEASE_SECONDS
    max_attempts: int = MAX_ATTEMPTS
    backoff_seconds: float = BACKOFF_SECONDS
    stop_timeout: float = STOP_TIMEOUT
    # days: monthly partitions of icl_dynamics_log that ended longer ago are dropped; unset keeps all
    retention_days: PositiveFloat | None = None
    # greedy answer tokens recorded per prompt, with the exact patch of removing each retrieved memory at
    # every answer position (docs/method.md §7); 0 records none (and consolidation has nothing to fit)
    answer_tokens: NonNegativeInt = ANSWER_TOKENS


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _JobAbandoned(Exception):
    """The daemon is stopping and has put the prompt back in the queue."""


@contextlib.contextmanager
def _on_module_calls(call: Callable[[], None]) -> Iterator[None]:
    """While the model runs: `call()` before every module call (of any model, on any thread)."""
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: call())
    try:
        yield
    finally:
        handle.remove()


def _abandonable(abandoned: threading.Event, moved: Callable[[], None]):
    """While the model runs: every module call is progress; once `abandoned` is set, the next raises _JobAbandoned."""

    def check() -> None:
        moved()
        if abandoned.is_set():
            raise _JobAbandoned()

    return _on_module_calls(check)


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


class _Heartbeat:
    """Renews a claim's lease on its own connection while the model runs.

    A failed renewal (the server restarting, the connection cut) is retried on a new connection at
    the next beat, so a long job keeps its lease across a database outage shorter than the lease; the
    lease is only lost when the prompt no longer belongs to this worker.
    """

    def __init__(self, url: str, claim: queue.Claim, lease_seconds: float):
        self.url, self.claim, self.lease_seconds = url, claim, lease_seconds
        self.lost = threading.Event()
        self.renewals = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.prompt_id}", daemon=True)

    def _run(self) -> None:
        log = get_logger(prompt_id=self.claim.prompt_id, worker_id=self.claim.worker_id)
        connection: psycopg.Connection | None = None
        failing = False
        try:
            while not self._done.wait(self.lease_seconds / 3):
                try:
                    if connection is None:
                        connection = queue.connect(self.url)
                    held = queue.renew_lease(connection, self.claim, self.lease_seconds)
                except DatabaseError as exc:
                    if not failing:
                        log.warning("lease_renewal_failed", error=str(exc))
                    failing = True
                    connection = _close_quietly(connection)
                    continue
                if failing:
                    log.info("lease_renewal_resumed")
                    failing = False
                if not held:
                    self.lost.set()
                    log.warning("lease_lost")
                    return
                self.renewals += 1
        finally:
            _close_quietly(connection)

    def start(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (at once, or after a renewal under way); the lease then runs out on its own."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "_Heartbeat":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _close_quietly(connection: psycopg.Connection | None) -> None:
    """Close a connection that may already be broken; returns None for the caller's variable."""
    if connection is not None:
        with contextlib.suppress(psycopg.Error):
            connection.close()
    return None


@dataclass
class _Measured:
    """A measured prompt on its way to the database: its claim, its prepared rows, the heartbeat holding its lease."""

    claim: queue.Claim
    prepared: writer.PreparedResults
    heartbeat: _Heartbeat
    log: Any
    started: float  # perf_counter at the claim
    tokens: int
    context_tokens: int
    measure_seconds: float


class _ResultWriter:
    """Writes measured prompts on its own thread and connection while the worker measures the next ones.

    At most WRITE_QUEUE_DEPTH prompts wait: a worker with one more to hand over waits for the writer. A
    lost connection costs the prompt being written its attempt (its lease runs out, it is claimed again)
    and is reopened for the next; any other fault stops the worker (`Worker._failure`).
    """

    def __init__(self, worker: "Worker"):
        self._worker = worker
        self._jobs: Queue[_Measured | None] = Queue(maxsize=WRITE_QUEUE_DEPTH)
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

    def submit(self, job: _Measured) -> bool:
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

    def _done_with(self, job: _Measured) -> None:
        job.heartbeat.stop()  # written, failed, or left for its lease to run out and be claimed again
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _run(self) -> None:
        connection: psycopg.Connection | None = None
        job: _Measured | None = None
        progress = self._worker.progress
        try:
            while True:
                progress.idle("write")
                if (job := self._jobs.get()) is None:
                    break
                progress.moved("write")
                status = None
                try:
                    if connection is None:
                        connection = queue.connect(self._worker.url)
                    status = self._worker.write(connection, job)
                except DatabaseError as exc:
                    job.heartbeat.stop()
                    self._worker.log.error("writer_database_error", prompt_id=job.claim.prompt_id, error=str(exc))
                    connection = _close_quietly(connection)
                if status is not None:
                    self._worker._finished(job.claim, status)
                self._done_with(job)
                job = None
        except Exception as exc:  # noqa: BLE001 - a fault outside any write: stop the worker with a failing exit code
            self._worker._fail_worker(exc)
        finally:
            _close_quietly(connection)
            for waiting in [job, *self._drain_jobs()]:
                if waiting is not None:
                    self._done_with(waiting)

    def _drain_jobs(self) -> list[_Measured]:
        waiting = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if job is not None:
                waiting.append(job)
        return waiting


class Worker:
    def __init__(
        self,
        url: str,
        loaded: LoadedModel,
        *,
        worker_id: str | None = None,
        poll_interval: float = POLL_INTERVAL,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_seconds: float = BACKOFF_SECONDS,
        stop_timeout: float = STOP_TIMEOUT,
        stride: int = 1,
        retention_days: float | None = None,
        on_processed: Callable[[int, str], None] | None = None,
        consolidation: ConsolidationSettings | None = None,
        adapters_dir: Path | None = None,
        answer_tokens: int = ANSWER_TOKENS,
    ):
        self.url = url
        self.loaded = loaded
        self.worker_id = worker_id or default_worker_id()
        self.poll_interval, self.lease_seconds, self.max_attempts = poll_interval, lease_seconds, max_attempts
        self.backoff_seconds, self.stop_timeout, self.stride = backoff_seconds, stop_timeout, stride
        self.on_processed = on_processed
        self.answer_tokens = answer_tokens
        self.retention_days = retention_days
        self.log = get_logger(worker_id=self.worker_id, model=loaded.name)
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._current: queue.Claim | None = None
        self._listening = threading.Event()
        self._abandoned = threading.Event()
        self.progress = _Progress()
        # Consolidation runs the model, so it runs on the worker thread, between prompts.
        self.consolidation = consolidation
        self.adapters_dir = adapters_dir
        self._consolidation_due = threading.Event()
        self._consolidator: Consolidator | None = None
        self._failure: Exception | None = None  # what killed the worker or the writer thread, if anything did
        self._counts: Counter = Counter()  # prompts per status they ended in, this run
        self._finished_lock = threading.Lock()  # the worker and the writer thread both report prompts
        self._results: _ResultWriter | None = None

    @classmethod
    def from_settings(cls, url: str, loaded: LoadedModel, settings: DaemonSettings | None = None, **options):
        settings = settings or DaemonSettings()
        return cls(url, loaded, poll_interval=settings.poll_interval, lease_seconds=settings.lease_seconds,
                   max_attempts=settings.max_attempts, backoff_seconds=settings.backoff_seconds,
                   stop_timeout=settings.stop_timeout, retention_days=settings.retention_days,
                   answer_tokens=settings.answer_tokens, **options)

    # --- one prompt

    def assemble(self, connection: psycopg.Connection, claim: queue.Claim) -> SegmentedPrompt:
        """The claimed prompt rendered with its memories in rank order; BadInputError names what is wrong."""
        return assemble_prompt(self.loaded.tokenizer, self.loaded.model, messages=claim.messages, text=claim.text,
                               retrievals=queue.retrievals(connection, claim.prompt_id))

    def answer_patches(self, prompt: SegmentedPrompt) -> dict[int, AnswerPatch]:
        """Per retrieved memory, its exact patch at every position of the model's own with-memory answer."""
        memories = [segment for segment in prompt.labelled_segments if segment.memory_id is not None]
        if self.answer_tokens < 1 or not memories or not supports_answer_patches(self.loaded.model):
            return {}
        model = self.loaded.model
        answer = greedy_answer(model, prompt.input_ids, self.answer_tokens,
                               stop_token_ids(model, self.loaded.tokenizer))
        return {segment.memory_id: answer_patch(model, prompt.input_ids, prompt.without({segment.label}), answer)
                for segment in memories}

    def measure_prompt(self, prompt: SegmentedPrompt) -> tuple[Measurement, dict[int, AnswerPatch]]:
        """The engine's part: the prompt's measurement and each retrieved memory's answer-position patch."""
        measurement = measure(self.loaded.model, prompt, stride=self.stride, model_name=self.loaded.name)
        return measurement, self.answer_patches(prompt)

    def process(self, connection: psycopg.Connection, claim: queue.Claim) -> str:
        """Measure one claimed prompt and write its results; returns its status afterwards ('lost' if taken away)."""
        measured = self.measure_claimed(connection, claim)
        return measured if isinstance(measured, str) else self.write(connection, measured)

    def measure_claimed(self, connection: psycopg.Connection, claim: queue.Claim) -> _Measured | str:
        """Measure one claimed prompt and prepare its rows, its lease held; or the status it ended in."""
        log = self.log.bind(prompt_id=claim.prompt_id, attempt=claim.attempts)
        log.info("prompt_claimed")
        started = time.perf_counter()
        if claim.attempts > self.max_attempts:
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: no attempts left after "
                              f"{self.max_attempts}; the last one's lease expired", retry=False)
        heartbeat = _Heartbeat(self.url, claim, self.lease_seconds).start()
        try:
            prompt = self.assemble(connection, claim)
            with _abandonable(self._abandoned, lambda: self.progress.moved("work")):
                measurement, answer_patches = self.measure_prompt(prompt)
            measurement.model["revision"] = self.loaded.revision
            prepared = writer.prepare(
                measurement, writer.RunSource(claim.prompt_id, session_id=claim.session_id, stride=self.stride),
                answer_patches,
            )
        except _JobAbandoned:
            heartbeat.stop()
            log.warning("prompt_abandoned")
            return "released"
        except (BadInputError, NumericalError) as exc:
            heartbeat.stop()
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: {exc}", retry=False)
        except Exception as exc:  # noqa: BLE001 - any other failure is retried; the error text is kept
            heartbeat.stop()
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: {type(exc).__name__}: {exc}",
                              retry=True)
        if heartbeat.lost.is_set():
            heartbeat.stop()
            log.warning("prompt_lost")
            return "lost"
        return _Measured(claim, prepared, heartbeat, log, started, tokens=len(measurement.input_ids),
                         context_tokens=len(measurement.tokens),
                         measure_seconds=measurement.timings.get("measure_s", 0.0))

    def write(self, connection: psycopg.Connection, measured: _Measured) -> str:
        """Write a measured prompt's rows and mark it done, then let its lease go; returns its status."""
        claim, log = measured.claim, measured.log
        try:
            run_id = writer.write(connection, claim, measured.prepared)
        except (BadInputError, NumericalError) as exc:
            measured.heartbeat.stop()
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: {exc}", retry=False)
        except Exception as exc:  # noqa: BLE001 - any other failure is retried; the error text is kept
            measured.heartbeat.stop()
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: {type(exc).__name__}: {exc}",
                              retry=True)
        measured.heartbeat.stop()
        if run_id is None:
            log.warning("prompt_lost")
            return "lost"
        log.info("run_measured", run_id=run_id, tokens=measured.tokens, context_tokens=measured.context_tokens,
                 seconds=round(time.perf_counter() - measured.started, 3),
                 measure_seconds=round(measured.measure_seconds, 3))
        return "done"

    def _fail(self, connection, claim: queue.Claim, log, error: str, *, retry: bool) -> str:
        # A connection lost with the server (a restart) cannot even roll back: the DatabaseError sends the
        # worker to reconnect, and the prompt's lease expires and it is claimed again.
        with translate_errors(queue.connection_url(connection), f"rolling back prompt {claim.prompt_id}"):
            if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                connection.rollback()
        status = queue.fail(connection, claim, error, retry=retry, max_attempts=self.max_attempts,
                            backoff_base_seconds=self.backoff_seconds) or "lost"
        log.warning("prompt_failed", status=status, error=error)
        return status

    # --- draining the queue

    def _finished(self, claim: queue.Claim, status: str) -> None:
        with self._finished_lock:
            self._counts[status] += 1
            if self.on_processed is not None:
                self.on_processed(claim.prompt_id, status)

    def _fail_worker(self, exc: Exception) -> None:
        """A fault outside any job: stop, and have run_forever exit 1 (run_once raises it)."""
        # Not retried in-process: the state that raised is unknown. The process exits 1 so that a
        # supervisor (systemd's Restart=on-failure) starts a fresh one; a prompt this process held
        # goes back to the queue when its lease expires.
        if self._failure is None:
            self._failure = exc
        self.log.error("worker_failed", error=str(exc), error_type=type(exc).__name__, exc_info=True)
        self.stop()

    def _drain(self, connection: psycopg.Connection) -> None:
        results, progress = self._results, self.progress
        while not self._stopping.is_set():
            progress.moved("work")
            claim = queue.claim(connection, self.worker_id, self.lease_seconds)
            if claim is None:
                if not results.busy():
                    return
                progress.idle("work")  # waiting for the writer, whose own progress is watched
                results.flush()  # a write that fails may put its prompt back in the queue: look again
                continue
            self._current = claim
            try:
                measured = self.measure_claimed(connection, claim)
            finally:
                self._current = None
            if isinstance(measured, str):
                self._finished(claim, measured)
                continue
            progress.idle("work")
            if not results.submit(measured):
                return  # the writer stopped on a fault, and stopped the worker

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A writer thread for this run; every prompt handed to it is written (or given up) on leaving."""
        self._counts, self._failure = Counter(), None
        with _ResultWriter(self) as self._results:
            yield

    def run_once(self) -> Counter:
        """Process prompts until none is due; returns how many ended in each status."""
        with self._writing(), queue.connect(self.url) as connection:
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
                with queue.connect(self.url, autocommit=True) as connection:
                    queue.listen(connection)
                    self.log.info("listening")
                    self._listening.set()
                    while not self._stopping.is_set():
                        for _notify in connection.notifies(timeout=LISTEN_TIMEOUT, stop_after=1):
                            self._wake.set()
            except (DatabaseError, psycopg.Error) as exc:
                self.log.warning("listen_failed", error=str(exc))
                self._stopping.wait(self.poll_interval)

    def _work(self) -> None:
        with self._writing():
            while not self._stopping.is_set():
                try:
                    with queue.connect(self.url) as connection:
                        while not self._stopping.is_set():
                            self._wake.clear()
                            self._drain(connection)
                            if self._consolidation_due.is_set() and not self._stopping.is_set():
                                self._consolidation_due.clear()
                                self.consolidate()
                                continue
                            self.progress.idle("work")
                            self._wake.wait()
                except (DatabaseError, psycopg.Error) as exc:
                    self.log.error("worker_database_error", error=str(exc))
                    self._stopping.wait(self.poll_interval)
                except Exception as exc:  # noqa: BLE001 - a fault outside any job: stop with a failing exit code
                    self._fail_worker(exc)
                    return

    def consolidate(self) -> None:
        """One scheduled consolidation of every due group; a failing group is logged and skipped."""
        if self.consolidation is None or self.adapters_dir is None:
            return
        if self._consolidator is None:  # keeps the neutral prompts' baseline between runs
            self._consolidator = Consolidator(self.url, self.loaded, self.adapters_dir)
        try:
            with _on_module_calls(lambda: self.progress.moved("work")):
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
        engine = create_unpooled_engine_for(self.url)
        try:
            with engine.begin() as connection:
                created = ensure_partitions(connection)
                dropped = drop_expired_partitions(connection, self.retention_days) if self.retention_days else []
            if created:
                self.log.info("partitions_created", partitions=created)
            if dropped:
                self.log.info("partitions_dropped", partitions=dropped, retention_days=self.retention_days)
        except DatabaseError as exc:
            self.log.error("partition_maintenance_failed", error=str(exc))
        finally:
            engine.dispose()

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

    def _activity(self) -> str:
        current = self._current
        return f"measuring prompt {current.prompt_id}" if current is not None else "waiting for prompts"

    def run_forever(self) -> int:
        """Serve until SIGTERM/SIGINT (or stop()); returns the exit code: 0, or 1 if the worker thread failed."""
        self.log.info("daemon_started", poll_interval=self.poll_interval, lease_seconds=self.lease_seconds)
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
                                   current_prompt=self._current and self._current.prompt_id)
                elif withheld and not stalled:
                    self.log.info("watchdog_resumed")
                withheld = bool(stalled)
                if not stalled:
                    notifier.watchdog()
                self._stopping.wait(tick)
            self.log.info("daemon_stopping", current_prompt=self._current and self._current.prompt_id)
            notifier.stopping()
            self._stopping.set()
            self._wake.set()
            worker.join(self.stop_timeout)
            scheduler.shutdown(wait=False)
            current = self._current
            if worker.is_alive() and current is not None:
                with queue.connect(self.url) as connection:
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
