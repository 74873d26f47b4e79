"""`python -m icldaemon run` as real processes, and the result rows one measurement must leave, counted independently.

The expected counts do not come from the engine: under the byte-level tokenizer of the tiny test models
a raw prompt is BOS (the anchor), one token per UTF-8 byte of the memories block and the text, and the
last byte is the query; so a prompt has `bytes - 1` context tokens and `num_layers x (bytes - 1)` rows
in icl_dynamics_log, and one memory_effects and one memory_patches row per retrieved memory.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg

STARTUP_TIMEOUT = 120.0  # seconds for a daemon to import torch, load the model and LISTEN
MEMORIES_HEADER = "Relevant memories:\n"  # the rendering the README documents: a header, one "- key: content" line each


class Daemon:
    """One `icldaemon run` process; `settings` become ICLD_* variables (lease_seconds=2 -> ICLD_LEASE_SECONDS=2)."""

    def __init__(self, database_url: str, model_dir: Path, data_dir: Path, worker_id: str, **settings):
        self.worker_id = worker_id
        environment = {
            **os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(model_dir), "ICLD_DEVICE": "cpu",
            "ICLD_DATA_DIR": str(data_dir), "ICLD_LOG_FORMAT": "json",
            # several daemons share two cores here; one thread each keeps them from fighting over them
            "OMP_NUM_THREADS": "1",
        }
        environment.update({f"ICLD_{name.upper()}": str(value) for name, value in settings.items()})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "icldaemon", "run", "--worker-id", worker_id, "--no-migrate"],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def events(self, name: str | None = None) -> list[dict]:
        parsed = []
        for line in list(self.lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or entry.get("event") == name:
                parsed.append(entry)
        return parsed

    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def wait_for(self, event: str, timeout: float, count: int = 1) -> dict:
        """The `count`-th `event` of this process, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(event)
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"{self.worker_id}: no {event!r} event #{count}; output:\n{self.output()}")

    def terminate(self, timeout: float = 60.0) -> int:
        return terminate_all([self], timeout)[0]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reader.join(5)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self.process.stdout.close()


def terminate_all(daemons: list[Daemon], timeout: float = 60.0) -> list[int]:
    """SIGTERM to every daemon at once, then their exit codes."""
    for daemon in daemons:
        daemon.process.send_signal(signal.SIGTERM)
    return_codes = [daemon.process.wait(timeout) for daemon in daemons]
    for daemon in daemons:
        daemon._reader.join(5)
    return return_codes


def wait_for_statuses(url: str, statuses: dict[str, int], timeout: float) -> float:
    """Wait until the prompts table holds exactly `statuses` ({'done': 30}); returns the seconds it took."""
    started = time.monotonic()
    counts: dict = {}
    while time.monotonic() - started < timeout:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
                counts = dict(connection.execute("SELECT status, count(*) FROM prompts GROUP BY status").fetchall())
        except psycopg.OperationalError:
            counts = {"unreachable": 1}
        if counts == statuses:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"prompts {counts}, expected {statuses} after {timeout} s")


# --- prompts whose results are known in advance


@dataclass(frozen=True)
class RawPrompt:
    """A raw prompt and the (key, content) of the memories retrieved for it, in rank order."""

    text: str
    memories: tuple[tuple[str, str], ...] = ()

    @property
    def context_tokens(self) -> int:
        block = MEMORIES_HEADER + "".join(f"- {key}: {content}\n" for key, content in self.memories)
        rendered = (block if self.memories else "") + self.text
        return len(rendered.encode("utf-8")) - 1


def insert_prompts(url: str, prompts: list[RawPrompt]) -> dict[int, RawPrompt]:
    """Insert the prompts, their memories and retrievals; returns them by prompt id."""
    by_id = {}
    with psycopg.connect(url) as connection:
        memory_ids: dict[tuple[str, str], int] = {}
        for prompt in prompts:
            for memory in prompt.memories:
                if memory not in memory_ids:
                    memory_ids[memory] = connection.execute(
                        "INSERT INTO memories (key, content) VALUES (%s, %s) RETURNING id", memory).fetchone()[0]
            prompt_id = connection.execute(
                "SELECT icl_submit(NULL, %s::bigint[], text => %s)",
                ([memory_ids[memory] for memory in prompt.memories], prompt.text)).fetchone()[0]
            by_id[prompt_id] = prompt
    return by_id


def assert_each_measured_exactly_once(url: str, prompts: dict[int, RawPrompt], num_layers: int) -> Counter:
    """Every prompt done with one measurement run and exactly that run's rows; returns attempts per prompt."""
    with psycopg.connect(url) as connection:
        statuses = dict(connection.execute("SELECT id, status FROM prompts").fetchall())
        attempts = Counter(dict(connection.execute("SELECT id, attempts FROM prompts").fetchall()))
        runs = connection.execute("SELECT prompt_id, id, num_layers, context_tokens FROM measurement_runs").fetchall()
        logged = connection.execute(
            "SELECT prompt_id, run_id, count(*) FROM icl_dynamics_log GROUP BY prompt_id, run_id").fetchall()
        effects = dict(connection.execute("SELECT run_id, count(*) FROM memory_effects GROUP BY run_id").fetchall())
        patches = dict(connection.execute("SELECT run_id, count(*) FROM memory_patches GROUP BY run_id").fetchall())

    assert statuses == dict.fromkeys(prompts, "done")
    runs_per_prompt = Counter(prompt_id for prompt_id, *_ in runs)
    assert set(runs_per_prompt.values()) == {1}, [p for p, n in runs_per_prompt.items() if n != 1]
    run_of = {prompt_id: run_id for prompt_id, run_id, *_ in runs}
    assert set(run_of) == set(prompts)
    for prompt_id, run_id, layers, context in runs:
        assert (layers, context) == (num_layers, prompts[prompt_id].context_tokens), prompt_id
    # no rows of a run that did not commit: every logged (prompt, run) pair is the prompt's one run
    expected_rows = {(prompt_id, run_of[prompt_id]): num_layers * prompt.context_tokens
                     for prompt_id, prompt in prompts.items()}
    assert {(prompt_id, run_id): rows for prompt_id, run_id, rows in logged} == expected_rows
    expected_memories = {run_of[prompt_id]: len(prompt.memories) for prompt_id, prompt in prompts.items()
                         if prompt.memories}
    assert effects == expected_memories
    assert patches == expected_memories
    return attempts
