"""The worker: claims a prompt, measures it with the engine and writes its results, one job at a time.

It joins the engine and the store for the daemon's measuring, as assembly.py (a prompt rebuilt from its
rows), consolidate.py, service.py, demo.py and cli.py join them for their own jobs; the engine itself
never imports the store, nor the store torch (tests/unit/test_layers.py). It owns no threads of its own
but a claim's heartbeat, which renews the lease on its own connection while the model runs, so that a
long job keeps its prompt: `Worker.run_next(connection)` claims, measures and writes one prompt and
returns its status.
The service (service.py) runs the same steps with the writing on a thread of its own, and adds the
listening, the schedule, signals, systemd and exit codes.
"""

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from icldaemon.assembly import assemble_prompt
from icldaemon.engine.answers import AnswerPatch, answer_patch, greedy_answer, stop_token_ids, supports_answer_patches
from icldaemon.engine.loading import LoadedModel
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import SegmentedPrompt
from icldaemon.engine.result import Measurement
from icldaemon.exceptions import BadInputError, DatabaseError, NumericalError
from icldaemon.logs import get_logger
from icldaemon.settings import ANSWER_TOKENS, BACKOFF_SECONDS, LEASE_SECONDS, MAX_ATTEMPTS, Settings
from icldaemon.store import queue, writer
from icldaemon.store.queue import Connection


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobAbandoned(Exception):
    """The service is stopping and has put the prompt back in the queue."""


@contextlib.contextmanager
def on_module_calls(call: Callable[[], None]) -> Iterator[None]:
    """While the model runs: `call()` before every module call (of any model, on any thread); it may raise
    JobAbandoned to leave the model."""
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: call())
    try:
        yield
    finally:
        handle.remove()


def _no_step() -> None:
    return None


class Heartbeat:
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
        connection: Connection | None = None
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
                    connection = queue.close_quietly(connection)
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
            queue.close_quietly(connection)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (at once, or after a renewal under way); the lease then runs out on its own."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


@dataclass
class Measured:
    """A measured prompt on its way to the database: its claim, its prepared rows, the heartbeat holding its lease."""

    claim: queue.Claim
    prepared: writer.PreparedResults
    heartbeat: Heartbeat
    log: Any
    started: float  # perf_counter at the claim
    tokens: int
    context_tokens: int
    measure_seconds: float


class Worker:
    """Claims, measures and writes prompts of one loaded model; every step takes the connection to use."""

    def __init__(
        self,
        url: str,
        loaded: LoadedModel,
        *,
        worker_id: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_seconds: float = BACKOFF_SECONDS,
        stride: int = 1,
        answer_tokens: int = ANSWER_TOKENS,
    ):
        self.url = url
        self.loaded = loaded
        self.worker_id = worker_id or default_worker_id()
        self.lease_seconds, self.max_attempts, self.backoff_seconds = lease_seconds, max_attempts, backoff_seconds
        self.stride, self.answer_tokens = stride, answer_tokens
        self.log = get_logger(worker_id=self.worker_id, model=loaded.name)

    @classmethod
    def from_settings(cls, url: str, loaded: LoadedModel, settings: Settings, **options) -> "Worker":
        return cls(url, loaded, lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
                   backoff_seconds=settings.backoff_seconds, answer_tokens=settings.answer_tokens, **options)

    def claim(self, connection: Connection) -> queue.Claim | None:
        """The next due prompt, leased to this worker; None when none is due."""
        return queue.claim(connection, self.worker_id, self.lease_seconds)

    def run_next(self, connection: Connection) -> str | None:
        """Claim, measure and write one prompt; its status afterwards, or None when none was due."""
        claim = self.claim(connection)
        return None if claim is None else self.process(connection, claim)

    # --- one prompt

    def assemble(self, connection: Connection, claim: queue.Claim) -> SegmentedPrompt:
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

    def process(self, connection: Connection, claim: queue.Claim) -> str:
        """Measure one claimed prompt and write its results; returns its status afterwards ('lost' if taken away)."""
        measured = self.measure_claimed(connection, claim)
        return measured if isinstance(measured, str) else self.write(connection, measured)

    def measure_claimed(self, connection: Connection, claim: queue.Claim,
                        step: Callable[[], None] = _no_step) -> Measured | str:
        """Measure one claimed prompt and prepare its rows, its lease held; or the status it ended in.

        `step` is called before every module call of the model: the service's progress watch, and its
        way out (raising JobAbandoned) when it stops in the middle of a job.
        """
        log = self.log.bind(prompt_id=claim.prompt_id, attempt=claim.attempts)
        log.info("prompt_claimed")
        started = time.perf_counter()
        if claim.attempts > self.max_attempts:
            return self._fail(connection, claim, log, f"prompt {claim.prompt_id}: no attempts left after "
                              f"{self.max_attempts}; the last one's lease expired", retry=False)
        heartbeat = Heartbeat(self.url, claim, self.lease_seconds).start()
        try:
            prompt = self.assemble(connection, claim)
            with on_module_calls(step):
                measurement, answer_patches = self.measure_prompt(prompt)
            measurement.model["revision"] = self.loaded.revision
            prepared = writer.prepare(
                measurement, writer.RunSource(claim.prompt_id, session_id=claim.session_id, stride=self.stride),
                answer_patches,
            )
        except JobAbandoned:
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
        return Measured(claim, prepared, heartbeat, log, started, tokens=len(measurement.input_ids),
                        context_tokens=len(measurement.tokens),
                        measure_seconds=measurement.timings.get("measure_s", 0.0))

    def write(self, connection: Connection, measured: Measured) -> str:
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

    def _fail(self, connection: Connection, claim: queue.Claim, log, error: str, *, retry: bool) -> str:
        status = queue.fail(connection, claim, error, retry=retry, max_attempts=self.max_attempts,
                            backoff_base_seconds=self.backoff_seconds) or "lost"
        log.warning("prompt_failed", status=status, error=error)
        return status
