"""What the database and the queue add to the engine's own time per prompt, side by side in one run.

The demo's prompts (few-shot examples, memory-augmented chats) measured twice on the bundled model:
once by the engine alone (render, measure), once through the service (icl_submit, claim, lease
heartbeat, measure, COPY of every row, completion), the engine-alone pass repeated after it so that
drift on a busy machine shows. Uses a fresh database on ICLD_BENCH_DATABASE_URL's server (default
postgresql://postgres@127.0.0.1:5432/postgres), dropped afterwards.

    .venv/bin/python bench/bench_end_to_end.py [--rounds 2]
"""

import argparse
import os
import platform
import time
import uuid

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.daemon import Worker
from icldaemon.demo import MEMORIES, PROMPTS
from icldaemon.engine.loading import load_model
from icldaemon.engine.measure import max_positions, measure
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.settings import load_settings
from icldaemon.store import migrate, queue

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def engine_alone(loaded, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        for _title, example in PROMPTS:
            example = dict(example)
            memories = [Memory(MEMORIES[key], key, index) for index, key in enumerate(example.pop("memories", []))]
            prompt = build_prompt(loaded.tokenizer, memories=memories, max_tokens=max_positions(loaded.model),
                                  **example)
            measure(loaded.model, prompt, model_name=loaded.name)
    return time.perf_counter() - started


def through_the_service(url: str, loaded, rounds: int) -> tuple[float, int]:
    with queue.connect(url) as connection:
        with connection.transaction():
            memory_ids = {key: connection.execute("INSERT INTO memories (key, content) VALUES (%s, %s) RETURNING id",
                                                  (key, content)).fetchone()[0] for key, content in MEMORIES.items()}
        for _ in range(rounds):
            for _title, example in PROMPTS:
                example = dict(example)
                keys = example.pop("memories", [])
                queue.submit(connection, memory_ids=[memory_ids[key] for key in keys], **example)
    started = time.perf_counter()
    counts = Worker(url, loaded, worker_id="bench").run_once()
    return time.perf_counter() - started, counts["done"]


def run(rounds: int = 2) -> dict:
    """Seconds for the demo's prompts `rounds` times: engine alone before, through the service, engine alone after."""
    server = os.environ.get("ICLD_BENCH_DATABASE_URL", DEFAULT_SERVER)
    database = f"icld_bench_e2e_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = make_url(server).set(database=database).render_as_string(hide_password=False)
    loaded = load_model(None, models_dir=load_settings().models_dir, device="cpu", dtype="float32")
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        migrate.upgrade(url)
        engine_alone(loaded, 1)  # warm-up
        before = engine_alone(loaded, rounds)
        service, done = through_the_service(url, loaded, rounds)
        after = engine_alone(loaded, rounds)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    prompts = rounds * len(PROMPTS)
    if done != prompts:
        raise RuntimeError(f"only {done} of {prompts} prompts were measured through the service")
    return {"prompts": prompts, "engine_before_s": before, "service_s": service, "engine_after_s": after,
            "overhead": service / min(before, after) - 1}


def print_report(result: dict) -> None:
    prompts, before, service, after = (result[key] for key in ("prompts", "engine_before_s", "service_s",
                                                               "engine_after_s"))
    engine = min(before, after)
    print(f"model: bundled SmolLM2-135M-Instruct, float32, CPU; {prompts} prompts, all done through the service")
    print(f"{'pass':<36} {'seconds':>8} {'per prompt':>11} {'vs engine':>10}")
    print(f"{'engine alone (before)':<36} {before:>8.2f} {before / prompts:>11.3f} {before / engine:>9.2f}x")
    print(f"{'through the service':<36} {service:>8.2f} {service / prompts:>11.3f} {service / engine:>9.2f}x")
    print(f"{'engine alone (after)':<36} {after:>8.2f} {after / prompts:>11.3f} {after / engine:>9.2f}x")
    print(f"database and queue add {100 * result['overhead']:.1f}% to the engine's time (goal: at most 25%); "
          f"the two engine-alone passes differ by {100 * (max(before, after) / engine - 1):.0f}%, the noise floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="times each demo prompt is measured per pass")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print_report(run(args.rounds))


if __name__ == "__main__":
    main()
