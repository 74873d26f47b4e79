"""What the database and the queue add to the engine's own time per prompt, side by side in one run.

The demo's prompts (few-shot examples, memory-augmented chats) measured in pairs on the bundled model:
once by the engine alone (render, measure) and once through the service (icl_submit, claim, lease
heartbeat, render, measure, COPY of every row, completion), one right after the other, the order
alternating from pair to pair. A busy machine's drift over minutes then falls on both halves of a
pair alike; the spread of the per-pair ratios shows the noise that is left. Uses a fresh database on
ICLD_BENCH_DATABASE_URL's server (default postgresql://postgres@127.0.0.1:5432/postgres), dropped
afterwards.

    .venv/bin/python bench/bench_end_to_end.py [--rounds 2]
"""

import argparse
import os
import platform
import statistics
import time
import uuid

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.demo import MEMORIES, PROMPTS
from icldaemon.engine.adapters import max_positions
from icldaemon.engine.loading import load_model
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.settings import load_settings
from icldaemon.store import migrate, queue
from icldaemon.worker import Worker

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def engine_alone(loaded, example: dict) -> float:
    """Seconds to render and measure one demo prompt with the engine alone."""
    started = time.perf_counter()
    example = dict(example)
    memories = [Memory(MEMORIES[key], key, index) for index, key in enumerate(example.pop("memories", []))]
    prompt = build_prompt(loaded.tokenizer, memories=memories, max_tokens=max_positions(loaded.model), **example)
    measure(loaded.model, prompt, model_name=loaded.name)
    return time.perf_counter() - started


def through_the_service(connection, worker: Worker, memory_ids: dict, example: dict) -> float:
    """Seconds from icl_submit to the prompt written and done, on the daemon's own claim-process path."""
    example = dict(example)
    keys = example.pop("memories", [])
    started = time.perf_counter()
    prompt_id = queue.submit(connection, memory_ids=[memory_ids[key] for key in keys], **example)
    claim = worker.claim(connection)
    if claim is None or claim.prompt_id != prompt_id:
        raise RuntimeError(f"prompt {prompt_id} was submitted but not claimed")
    status = worker.process(connection, claim)
    seconds = time.perf_counter() - started
    if status != "done":
        raise RuntimeError(f"prompt {prompt_id} ended {status!r} through the service")
    return seconds


def run(rounds: int = 2) -> dict:
    """Per demo prompt and round, a pair of seconds: engine alone and through the service, in alternating order."""
    server = os.environ.get("ICLD_BENCH_DATABASE_URL", DEFAULT_SERVER)
    database = f"icld_bench_e2e_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = make_url(server).set(database=database).render_as_string(hide_password=False)
    loaded = load_model(None, models_dir=load_settings().models_dir, device="cpu", dtype="float32")
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    pairs = []
    try:
        migrate.upgrade(url)
        worker = Worker(url, loaded, worker_id="bench")
        with queue.connect(url) as connection:
            with connection.transaction():
                memory_ids = {key: connection.execute(
                    "INSERT INTO memories (key, content) VALUES (%s, %s) RETURNING id", (key, content)).fetchone()[0]
                    for key, content in MEMORIES.items()}
            through_the_service(connection, worker, memory_ids, PROMPTS[0][1])  # warm-up, both paths
            engine_alone(loaded, PROMPTS[0][1])
            for round_index in range(rounds):
                for index, (_title, example) in enumerate(PROMPTS):
                    if (index + round_index) % 2 == 0:
                        engine = engine_alone(loaded, example)
                        service = through_the_service(connection, worker, memory_ids, example)
                    else:
                        service = through_the_service(connection, worker, memory_ids, example)
                        engine = engine_alone(loaded, example)
                    pairs.append({"engine_s": engine, "service_s": service})
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
    engine_total = sum(pair["engine_s"] for pair in pairs)
    service_total = sum(pair["service_s"] for pair in pairs)
    ratios = sorted(pair["service_s"] / pair["engine_s"] for pair in pairs)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"prompts": len(pairs), "pairs": pairs, "engine_s": engine_total, "service_s": service_total,
            "overhead": service_total / engine_total - 1, "median_pair_overhead": quartiles[1] - 1,
            "pair_overhead_quartiles": (quartiles[0] - 1, quartiles[2] - 1)}


def print_report(result: dict) -> None:
    prompts, engine, service = result["prompts"], result["engine_s"], result["service_s"]
    low, high = result["pair_overhead_quartiles"]
    print(f"model: bundled SmolLM2-135M-Instruct, float32, CPU; {prompts} prompts, each measured by the engine "
          f"alone and through the service, one right after the other")
    print(f"{'pass':<24} {'seconds':>8} {'per prompt':>11} {'vs engine':>10}")
    print(f"{'engine alone':<24} {engine:>8.2f} {engine / prompts:>11.3f} {1:>9.2f}x")
    print(f"{'through the service':<24} {service:>8.2f} {service / prompts:>11.3f} {service / engine:>9.2f}x")
    print(f"database and queue add {100 * result['overhead']:.1f}% to the engine's time (goal: at most 25%); "
          f"per pair: median {100 * result['median_pair_overhead']:+.1f}%, middle half {100 * low:+.1f}% "
          f"to {100 * high:+.1f}% (the noise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="times each demo prompt is measured per pass")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print_report(run(args.rounds))


if __name__ == "__main__":
    main()
