"""The demo of the whole service on the embedded defaults.

Starts the embedded PostgreSQL, migrates it, stores example memories (by key: a second run reuses them and
their ids) and queues prompts (few-shot examples, a memory-augmented chat) as an application would, runs the
daemon until they are measured, and prints from SQL what was learned where, with the ids of the memories and
runs. Runs with no configuration: the embedded database and the bundled model.
"""

import sys
import uuid

from tqdm import tqdm

from icldaemon.engine.loading import load_configured_model
from icldaemon.exceptions import IcldaemonError
from icldaemon.logs import configure_logging
from icldaemon.service import Service
from icldaemon.settings import load_settings
from icldaemon.store import queue
from icldaemon.store.database import database_url
from icldaemon.store.memories import runs_of_prompts, upsert_memory
from icldaemon.store.migrate import current, upgrade
from icldaemon.store.runs import session_report

# Stored in this order, so that a fresh database numbers them 1, 2, 3 as examples/memories.json and README do.
MEMORIES = {
    "pet": "The user has a grey cat called Miso.",
    "favourite colour": "The user's favourite colour is teal.",
    "city": "The user lives in Lisbon and cycles to work.",
}
SYSTEM = "You are a helpful assistant. Use what you remember about the user."
PROMPTS = [
    ("few-shot translation", dict(text=(
        "Translate English to French.\nsea otter => loutre de mer\ncheese => fromage\n"
        "peppermint => menthe poivrée\nplush giraffe => girafe en peluche\nbread =>"))),
    ("few-shot sentiment", dict(text=(
        "Review: I loved every minute. Sentiment: positive\nReview: Dull and far too long. Sentiment: negative\n"
        "Review: A warm, funny film. Sentiment: positive\nReview: I want my money back. Sentiment:"))),
    ("chat: the cat's name", dict(messages=[{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "What is my cat called?"}],
                                  memories=["pet", "favourite colour", "city"])),
    ("chat: where the user lives", dict(messages=[{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": "Which city do I live in?"}],
                                        memories=["city", "pet"])),
    ("chat: a bike colour", dict(messages=[{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": "What colour should I paint my bike?"}],
                                 memories=["favourite colour", "city"])),
]

BAR_WIDTH = 40  # characters for the largest per-layer update
PROMPT_COLUMNS = (
    "context: tokens between the anchor and the query, each one measured; layers: the model's layers",
    "max |logit err|: largest logit difference between the model with the context and the patched model without "
    "it (the exactness check; below 1e-4 in float32)",
    "patch KL: KL(with context || patched), nats, the same check on the distribution",
    "context KL: KL(with context || without it) at the query, nats: the context's effect on the next token",
    "seconds: wall time of the measurement (every prefix and layer, and each memory)",
)
MEMORY_COLUMNS = (
    "runs: prompts it was retrieved for; mean KL: KL(with it || without it) at the query, nats, mean over those runs",
    "mean ||dW||F: Frobenius norm of its rank-1 weight patch, mean over layers and runs; mean ||db||: its bias "
    "patch's norm, likewise (norms have no unit)",
)


def _store_memories(connection) -> dict[str, int]:
    """The example memories upserted by key: key -> id."""
    return {key: upsert_memory(connection, key, content).memory_id for key, content in MEMORIES.items()}


def _insert_examples(connection, session_id: uuid.UUID, memory_ids: dict[str, int]) -> dict[int, str]:
    titles = {}
    for title, example in PROMPTS:
        example = dict(example)
        keys = example.pop("memories", [])
        prompt_id = queue.submit(connection, memory_ids=[memory_ids[key] for key in keys],
                                 session_id=str(session_id), **example)
        titles[prompt_id] = title
    return titles


def _report(connection, session_id: uuid.UUID, titles: dict[int, str]) -> list[int]:
    """Print what was learned where; returns the run ids."""
    report = session_report(connection, session_id)
    run_ids = runs_of_prompts(connection, list(titles))
    print("\nPer prompt (table measurement_runs): does the exact patch reproduce the model, and how much does the "
          "whole context change its next token?")
    for line in PROMPT_COLUMNS:
        print(f"  {line}")
    print(f"{'prompt':<28} {'run':>5} {'context':>7} {'layers':>6} {'max |logit err|':>15} {'patch KL':>9} "
          f"{'context KL':>10} {'seconds':>7}")
    for row in report.prompts:
        prompt_id, _kind, context, layers, error, exactness_kl, context_kl, seconds = row
        print(f"{titles.get(prompt_id, prompt_id):<28} {run_ids.get(prompt_id, '-'):>5} {context:>7} {layers:>6} "
              f"{error:>15.2e} {exactness_kl:>9.1e} {context_kl:>10.4f} {seconds:>7.2f}")
    print("\nPer memory (table memory_effects): how much the answer depends on it, and the size of its weight patch")
    for line in MEMORY_COLUMNS:
        print(f"  {line}")
    print(f"{'id':>3} {'memory':<18} {'runs':>4} {'mean KL':>9} {'mean ||dW||F':>13} {'mean ||db||':>12}")
    for memory_id, key, runs, mean_kl, update_norm, bias_norm in report.memories:
        print(f"{memory_id:>3} {key:<18} {runs:>4} {mean_kl:>9.4f} {update_norm:>13.4f} {bias_norm:>12.4f}")
    print("\nPer layer (table icl_dynamics_log, one row per run, layer and context token): the implicit update after "
          "the whole context")
    print("  ||dW||F: Frobenius norm of the rank-1 patch of the layer's first dense layer(s); ||db||: norm of its bias "
          "patch; both mean over the prompts, no unit")
    print(f"{'layer':>5} {'||dW||F':>9} {'||db||':>9}")
    layers = report.layers
    largest = max((update_norm for _layer, update_norm, _bias in layers), default=0.0) or 1.0
    for layer_idx, update_norm, bias_norm in layers:
        print(f"{layer_idx:>5} {update_norm:>9.4f} {bias_norm:>9.4f}  {'#' * round(BAR_WIDTH * update_norm / largest)}")
    return sorted(run_ids.values())


def _next_steps(pgdata: str | None, run_ids: list[int], memory_id: int) -> None:
    where = f"the embedded PostgreSQL in {pgdata}" if pgdata else "the database of ICLD_DATABASE_URL"
    print(f"\nThe results are stored in {where}: tables measurement_runs, memory_effects, icl_dynamics_log, "
          "and the views of schema icl_analytics (sql/README.md).")
    if pgdata:
        print("The embedded database runs only while a command does; `icldaemon db` holds it up for psql.")
    steps = [("icldaemon runs", "every run, with its id, exactness and cost"),
             ("icldaemon memories list", "the memories, how often retrieved and measured"),
             ("icldaemon db", ("prints the database's URL and keeps it up until Ctrl-C" if pgdata else
                               "prints the database's URL") + "; then: psql \"URL\" -c "
                              "'SELECT * FROM icl_analytics.memory_ranking'"),
             (f"icldaemon consolidate --memory-id {memory_id} --min-patches 2",
              "its answer patches fitted into a LoRA adapter (minutes; by default after 8 retrievals)")]
    if run_ids:
        steps.insert(0, (f"icldaemon plot {min(run_ids)} --out run.png", "a run drawn: per-token curves, layer x token "
                                                                         "heatmap"))
    width = max(len(command) for command, _what in steps)
    print("Next:")
    for command, what in steps:
        print(f"  .venv/bin/{command:<{width}}  # {what}")


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_format, "warning" if settings.log_level == "info" else settings.log_level)
    session_id = uuid.uuid4()
    try:
        loaded = load_configured_model(settings)
        with database_url(settings) as url:
            upgrade(url)
            print(f"database ready at schema revision {current(url)}")
            with queue.connect(url) as connection:
                memory_ids = _store_memories(connection)
                titles = _insert_examples(connection, session_id, memory_ids)
            print("memories: " + ", ".join(f"{memory_id} {key}" for key, memory_id in memory_ids.items()))
            print(f"queued {len(titles)} prompts (session {session_id})")
            with tqdm(total=len(titles), desc="measuring", unit="prompt", file=sys.stderr) as progress:
                service = Service.from_settings(url, loaded, settings, worker_id="demo",
                                                on_processed=lambda prompt_id, status: progress.update(1))
                counts = service.run_once()
            print(", ".join(f"{count} {status}" for status, count in sorted(counts.items())))
            with queue.connect(url) as connection:
                run_ids = _report(connection, session_id, titles)
            # the memory retrieved most often by the demo's prompts
            _next_steps(None if settings.database_url else str(settings.pgdata_dir), run_ids, memory_ids["city"])
    except IcldaemonError as exc:
        print(f"icldaemon demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
