"""The worker over a queue of good and bad prompts, with a tiny random model loaded from a directory."""

import json
import threading

import numpy as np
import psycopg
import pytest
import structlog.testing
import torch
from daemon_fixtures import MAX_POSITIONS, save_tiny_model

from icldaemon.engine.answers import ANSWER_TOKENS, answer_patch
from icldaemon.engine.loading import load_model
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.service import Service
from icldaemon.worker import Worker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    return load_model(str(directory), models_dir=tmp_path_factory.mktemp("models"), device="cpu")


def insert(connection, *, text=None, messages=None, memory_ids=(), priority=0) -> int:
    prompt_id = connection.execute(
        "INSERT INTO prompts (text, messages, priority) VALUES (%s, %s::jsonb, %s) RETURNING id",
        (text, None if messages is None else json.dumps(messages), priority),
    ).fetchone()[0]
    for rank, memory_id in enumerate(memory_ids, start=1):
        connection.execute("INSERT INTO memory_retrievals (prompt_id, memory_id, rank) VALUES (%s, %s, %s)",
                           (prompt_id, memory_id, rank))
    return prompt_id


def test_run_once_measures_good_prompts_and_fails_bad_ones_by_name(database_url, tiny):
    memories = {"pet": "The user has a grey cat called Miso.", "city": "The user lives in Lisbon.", "empty": "   "}
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is my cat called?"}]
    with psycopg.connect(database_url) as connection:
        memory_id = {key: connection.execute("INSERT INTO memories (key, content) VALUES (%s, %s) RETURNING id",
                                             (key, content)).fetchone()[0] for key, content in memories.items()}
        good = {
            "few-shot": insert(connection, text="cheese => fromage\nbread => pain\nwater =>"),
            "chat": insert(connection, messages=chat, memory_ids=[memory_id["city"], memory_id["pet"]]),
        }
        bad = {
            "malformed": insert(connection, messages={"role": "user", "content": "not a list"}),
            "no content": insert(connection, messages=[{"role": "user"}]),
            "empty memory": insert(connection, text="Hello there", memory_ids=[memory_id["empty"]]),
            "too long": insert(connection, text="x" * (MAX_POSITIONS + 10)),
        }
    processed = []

    service = Service(Worker(database_url, tiny, worker_id="test"), on_processed=lambda *args: processed.append(args))
    counts = service.run_once()

    assert counts == {"done": 2, "failed": 4}
    assert sorted(prompt_id for prompt_id, _ in processed) == sorted([*good.values(), *bad.values()])
    with psycopg.connect(database_url) as connection:
        status = {row[0]: row[1:] for row in connection.execute("SELECT id, status, last_error, attempts FROM prompts")}
        runs = connection.execute("SELECT prompt_id, id, num_layers, context_tokens, total_tokens FROM measurement_runs"
                                  ).fetchall()
        logged = dict(connection.execute("SELECT run_id, count(*) FROM icl_dynamics_log GROUP BY run_id").fetchall())
        effects = [row[0] for row in connection.execute("SELECT memory_id FROM memory_effects ORDER BY memory_id")]
        patches = connection.execute("SELECT count(*) FROM memory_patches").fetchone()[0]
        segments = connection.execute("SELECT DISTINCT segment, memory_id FROM icl_dynamics_log "
                                      "WHERE memory_id IS NOT NULL ORDER BY memory_id").fetchall()
        method_versions = connection.execute("SELECT DISTINCT method_version FROM measurement_runs").fetchall()

    for prompt_id in good.values():
        assert status[prompt_id] == ("done", None, 1)
    assert method_versions == [(3,)]  # the current definition: docs/method.md §5
    expected_errors = {
        "malformed": "messages must be a non-empty JSON list",
        "no content": "message 0 is not a",
        "empty memory": f"memory:{memory_id['empty']} is empty",
        "too long": f"the prompt has {MAX_POSITIONS + 11} tokens; the model's context is {MAX_POSITIONS}",
    }
    for name, prompt_id in bad.items():
        state, error, attempts = status[prompt_id]
        assert state == "failed" and attempts == 1, name
        assert error.startswith(f"prompt {prompt_id}: ") and expected_errors[name] in error, (name, error)

    chat_prompt = build_prompt(tiny.tokenizer, messages=chat, max_tokens=MAX_POSITIONS, memories=[
        Memory(memories["city"], "city", memory_id["city"]), Memory(memories["pet"], "pet", memory_id["pet"])])
    expected_context = chat_prompt.query_position - chat_prompt.anchor_tokens
    by_prompt = {prompt_id: (run_id, layers, context, total) for prompt_id, run_id, layers, context, total in runs}
    assert set(by_prompt) == set(good.values())
    assert by_prompt[good["chat"]][2:] == (expected_context, len(chat_prompt.input_ids))
    for run_id, layers, context, _total in by_prompt.values():
        assert layers == 2 and logged[run_id] == layers * context
    assert effects == sorted([memory_id["pet"], memory_id["city"]])
    assert patches == 2
    assert segments == sorted([(f"memory:{memory_id[key]}", memory_id[key]) for key in ("pet", "city")],
                              key=lambda row: row[1])


    # every retrieved memory's patch at the answer positions: the answer is the model's own greedy one (an
    # argmax loop of the test's), the stored float16 factors are the engine's
    with psycopg.connect(database_url) as connection:
        stored = connection.execute(
            "SELECT memory_id, answer_ids, num_layers, d_model, a_tilde, value, max_abs_log_prob_error "
            "FROM memory_answer_patches ORDER BY memory_id").fetchall()
    answer = []
    with torch.no_grad():
        for _ in range(ANSWER_TOKENS):
            token = int(tiny.model(torch.tensor([chat_prompt.input_ids + answer])).logits[0, -1].argmax())
            answer.append(token)
            if token == tiny.tokenizer.eos_token_id:
                break
    assert [row[0] for row in stored] == sorted(memory_id[key] for key in ("pet", "city"))
    for stored_id, answer_ids, layers, width, a_tilde, value, error in stored:
        assert answer_ids == answer and (layers, width) == (2, tiny.model.config.hidden_size)
        label = f"memory:{stored_id}"
        expected = answer_patch(tiny.model, chat_prompt.input_ids, chat_prompt.without({label}), answer)
        shape = (layers, len(answer), width)
        np.testing.assert_allclose(np.frombuffer(value, "<f2").reshape(shape), expected.value, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(np.frombuffer(a_tilde, "<f2").reshape(shape), expected.a_tilde, rtol=2e-3,
                                   atol=2e-3)
        assert error < 1e-4


def test_the_worker_alone_claims_measures_and_writes_one_prompt_at_a_time(database_url, tiny):
    import threading

    from icldaemon.store import queue

    with psycopg.connect(database_url) as connection:
        first = insert(connection, text="cheese => fromage\nwater =>", priority=1)
        second = insert(connection, text="bread => pain\nsea =>")
    worker = Worker(database_url, tiny, worker_id="alone")
    before = set(threading.enumerate())

    with queue.connect(database_url) as connection:
        statuses = [worker.run_next(connection) for _ in range(3)]

    assert statuses == ["done", "done", None]
    assert set(threading.enumerate()) == before  # no thread of its own left behind (the heartbeats are joined)
    with psycopg.connect(database_url) as connection:
        runs = connection.execute("SELECT prompt_id, context_tokens FROM measurement_runs ORDER BY id").fetchall()
        logged = connection.execute("SELECT run_id, count(*) FROM icl_dynamics_log GROUP BY run_id ORDER BY run_id"
                                    ).fetchall()
        statuses = connection.execute("SELECT status, attempts FROM prompts ORDER BY id").fetchall()
    assert [prompt_id for prompt_id, _ in runs] == [first, second]  # by priority
    layers = tiny.model.config.num_hidden_layers
    assert [count for _, count in logged] == [layers * context for _, context in runs]
    assert statuses == [("done", 1), ("done", 1)]


def test_a_failed_job_is_retried_and_the_error_kept(database_url, tiny, monkeypatch):
    with psycopg.connect(database_url) as connection:
        prompt_id = insert(connection, text="one two three four")
    service = Service(Worker(database_url, tiny, worker_id="test", max_attempts=2, backoff_seconds=0.0))
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("device lost")

    monkeypatch.setattr("icldaemon.worker.measure", flaky)
    counts = service.run_once()

    assert counts == {"queued": 1, "failed": 1} and len(calls) == 2
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT status, attempts, last_error FROM prompts").fetchone() == (
            "failed", 2, f"prompt {prompt_id}: RuntimeError: device lost")


def test_the_lease_heartbeat_reconnects_after_its_connection_is_cut(database_url):
    from icldaemon.store import queue
    from icldaemon.worker import Heartbeat

    with psycopg.connect(database_url, autocommit=True) as observer:
        insert(observer, text="a long job")
        with queue.connect(database_url) as claimer:
            claim = queue.claim(claimer, "test", lease_seconds=0.9)
        before = {row[0] for row in observer.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")}

        def lease() -> object:
            return observer.execute("SELECT lease_expires_at FROM prompts WHERE id = %s",
                                    (claim.prompt_id,)).fetchone()[0]

        with Heartbeat(database_url, claim, lease_seconds=0.9) as heartbeat:
            wait_until(lambda: heartbeat.renewals >= 1)
            heartbeat_pids = [row[0] for row in observer.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
                if row[0] not in before]
            assert len(heartbeat_pids) == 1
            observer.execute("SELECT pg_terminate_backend(%s)", (heartbeat_pids[0],))
            cut_at = observer.execute("SELECT now()").fetchone()[0]
            renewals_at_cut = heartbeat.renewals
            # The beat after the cut fails; the one after reconnects and renews.
            wait_until(lambda: heartbeat.renewals >= renewals_at_cut + 2)
            assert not heartbeat.lost.is_set()
            assert (lease() - cut_at).total_seconds() > 0.9  # renewed after the cut: now() + the lease


def test_run_forever_exits_1_when_the_worker_thread_fails_outside_a_job(database_url, tiny):
    with psycopg.connect(database_url, autocommit=True) as connection:
        prompt_id = insert(connection, text="one two three four")

    def broken_callback(processed_id: int, status: str) -> None:
        raise RuntimeError(f"callback broke after prompt {processed_id}")

    service = Service(Worker(database_url, tiny, worker_id="test"), poll_interval=0.2, stop_timeout=2.0,
                      on_processed=broken_callback)
    assert service.run_forever() == 1
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT status FROM prompts WHERE id = %s", (prompt_id,)).fetchone() == ("done",)


EVENT_TIMEOUT = 60.0  # seconds; a safety net only: each wait ends on an event the other thread sets


class StoppedWhileMeasuring(Worker):
    """A worker whose job stops the service (as SIGTERM would) and then waits until `may_finish` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.service: Service | None = None
        self.may_finish = threading.Event()

    def measure_prompt(self, prompt):
        self.service.stop()
        assert self.may_finish.wait(EVENT_TIMEOUT)
        return super().measure_prompt(prompt)


class JobEndsBetweenReads(Service):
    """The worker thread's job ends, and clears _current, just after the main thread's first read of it.

    No listener, so that the main loop never reads _current for systemd's status: its first read is the one
    made once it stops.
    """

    def __init__(self, worker: StoppedWhileMeasuring, **options):
        self._claim, self._job_ended, self.main_thread_reads = None, threading.Event(), 0
        super().__init__(worker, **options)
        worker.service = self

    @property
    def _current(self):
        claim = self._claim
        if threading.current_thread() is threading.main_thread():
            self.main_thread_reads += 1
            if self.main_thread_reads == 1:
                self.worker.may_finish.set()
                assert self._job_ended.wait(EVENT_TIMEOUT)
        return claim

    @_current.setter
    def _current(self, claim):
        if claim is None and self._claim is not None:
            self._job_ended.set()
        self._claim = claim

    def _listen(self) -> None:
        self._stopping.wait()


def test_a_job_that_ends_while_the_daemon_stops_is_logged_once_and_the_daemon_exits_0(database_url, tiny):
    with psycopg.connect(database_url, autocommit=True) as connection:
        prompt_id = insert(connection, text="one two three four")
    service = JobEndsBetweenReads(StoppedWhileMeasuring(database_url, tiny, worker_id="test"), poll_interval=60.0,
                                  stop_timeout=EVENT_TIMEOUT)

    with structlog.testing.capture_logs() as logs:
        exit_code = service.run_forever()

    assert exit_code == 0
    stopping = [entry for entry in logs if entry["event"] == "daemon_stopping"]
    assert [entry["current_prompt"] for entry in stopping] == [prompt_id]  # as it was when read, once
    assert not [entry for entry in logs if entry["event"] == "prompt_released"]  # the job ended: nothing to release
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT status FROM prompts WHERE id = %s", (prompt_id,)).fetchone() == ("done",)


def wait_until(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- writing beside measuring


class TimedWorker(Worker):
    """A worker whose engine returns one measurement of the tiny model after `measure_seconds` and whose writes
    take `write_seconds` longer, recording when each prompt is measured and written."""

    def __init__(self, *args, measure_seconds: float, write_seconds: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.measure_seconds, self.write_seconds = measure_seconds, write_seconds
        self.measurement = None
        self.measured: dict[int, tuple[float, float]] = {}
        self.written: dict[int, tuple[float, float]] = {}

    def measure_prompt(self, prompt):
        import time

        if self.measurement is None:  # the real engine once; every prompt then takes the same time
            self.measurement = super().measure_prompt(prompt)
        started = time.monotonic()
        time.sleep(self.measure_seconds)
        self.measured[len(self.measured)] = (started, time.monotonic())
        return self.measurement

    def write(self, connection, measured):
        import time

        started = time.monotonic()
        time.sleep(self.write_seconds)
        status = super().write(connection, measured)
        self.written[measured.claim.prompt_id] = (started, time.monotonic())
        return status


def test_a_prompt_is_written_while_the_next_is_measured_and_at_most_one_waits(database_url, tiny):
    with psycopg.connect(database_url) as connection:
        prompt_ids = [insert(connection, text=f"cheese => fromage {index}", priority=-index) for index in range(6)]
    # writes slower than measuring: the worker runs ahead until one prompt waits for the writer
    worker = TimedWorker(database_url, tiny, worker_id="test", measure_seconds=0.1, write_seconds=0.6)

    counts = Service(worker).run_once()

    assert counts == {"done": 6}
    measured = [worker.measured[index] for index in range(6)]  # in claim order: prompt_ids, by priority
    written = [worker.written[prompt_id] for prompt_id in prompt_ids]
    # while prompt n was written, a later prompt was being measured
    for index in range(3):
        assert any(start < written[index][1] and written[index][0] < end for start, end in measured[index + 1:]), index
    # one prompt written, one waiting, one measured: the worker starts prompt n only once n-3 is written
    for index in range(3, 6):
        assert measured[index][0] >= written[index - 3][1], index
    assert any(measured[index][0] < written[index - 2][1] for index in range(2, 6))  # and it does run that far ahead
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM prompts WHERE status = 'done' AND attempts = 1").fetchone() == (6,)


def test_a_waiting_prompt_keeps_its_lease_until_its_transaction_commits(database_url, tiny):
    with psycopg.connect(database_url) as connection:
        for index in range(4):
            insert(connection, text=f"bread => pain {index}")
    # every prompt waits for the writer far longer than its lease: only the heartbeat keeps it
    worker = TimedWorker(database_url, tiny, worker_id="test", lease_seconds=0.6, measure_seconds=0.0,
                         write_seconds=1.5)
    rival = Service(Worker(database_url, tiny, worker_id="rival"))

    counts = Service(worker).run_once()
    rival_counts = rival.run_once()

    assert counts == {"done": 4} and rival_counts == {}
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*), sum(attempts) FROM prompts WHERE status = 'done'").fetchone() == (4, 4)
        assert connection.execute("SELECT count(DISTINCT prompt_id) FROM measurement_runs").fetchone() == (4,)


def test_a_write_that_fails_puts_its_prompt_back_and_the_others_are_written(database_url, tiny, monkeypatch):
    from icldaemon.store import writer

    with psycopg.connect(database_url) as connection:
        prompt_ids = [insert(connection, text=f"water => eau {index}", priority=-index) for index in range(3)]
    original, calls = writer.write, []

    def failing_once(connection, claim, prepared):
        calls.append(claim.prompt_id)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return original(connection, claim, prepared)

    monkeypatch.setattr("icldaemon.store.writer.write", failing_once)
    counts = Service(Worker(database_url, tiny, worker_id="test", backoff_seconds=0.0)).run_once()

    assert counts == {"queued": 1, "done": 3}
    assert calls.count(prompt_ids[0]) == 2
    with psycopg.connect(database_url) as connection:
        rows = connection.execute("SELECT id, status, attempts, last_error FROM prompts ORDER BY id").fetchall()
        runs = connection.execute("SELECT count(*), count(DISTINCT prompt_id) FROM measurement_runs").fetchone()
    assert rows[0] == (prompt_ids[0], "done", 2, None) and [row[1:3] for row in rows[1:]] == [("done", 1), ("done", 1)]
    assert runs == (3, 3)
