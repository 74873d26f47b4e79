"""The log at scale: bytes per (layer, token), query speed and the service's own ceiling, revision 0006 beside today.

    .venv/bin/python bench/bench_storage.py [--runs 2000] [--tokens 2048] [--real-prompts 2] [--repeat 3]
                                            [--aggregate-repeat 1] [--ceiling-prompts 200]

Three parts, each measured side by side in one run, on databases made on ICLD_BENCH_DATABASE_URL's server
(default postgresql://postgres@127.0.0.1:5432/postgres) and dropped afterwards:

1. Bytes on real runs. The bundled model measures `--real-prompts` prompts of `--tokens` tokens and the demo's
   prompts on this machine's CPU (its time per long prompt is the engine's own rate here). Every measurement is
   written by today's writer into a database at head and by revision 0006's writer (bench/legacy_layout.py) into
   one at revision 0006; pg_total_relation_size over the log's partitions, indexes and TOAST included (today: also
   the prompt hash that moved to measurement_runs), after writing less before (the empty tables' own pages),
   divided by the (layer, context token) values logged.
2. Query speed. `--runs` synthetic runs of `--tokens` context tokens x 30 layers (the bundled model's shape) in
   each layout, their monthly partitions unlogged (the write-ahead log is not what is compared), vacuumed. Then
   every dashboard panel and sql/ query that reads icl_dynamics_log or icl_analytics.run_layers, run_layers
   itself, `icldaemon plot`'s query and one session's final update norms, old and new in turns: per-run
   queries on three runs `--repeat` times each, queries over every run `--aggregate-repeat` times (on revision
   0006 each reads and sorts the whole log). Medians, and their ratio new / old.
3. The service's ceiling. `--ceiling-prompts` prompts through the daemon's own loop (claim, lease heartbeat,
   the prompt's retrievals, the rows prepared on the worker thread, the writer thread's one transaction per
   prompt) with an engine that returns a precomputed 30 x `--tokens` measurement at once; beside it, the
   writers alone on the same rows: today's (prepare and write, one prompt after the other) and revision 0006's.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))
import legacy_layout  # noqa: E402

from icldaemon.columns import DYNAMICS_NAMES  # noqa: E402
from icldaemon.engine.result import Ablation, Measurement, TokenInfo  # noqa: E402
from icldaemon.service import Service  # noqa: E402
from icldaemon.store import migrate, queue, writer  # noqa: E402
from icldaemon.store.database import create_unpooled_engine_for  # noqa: E402
from icldaemon.store.partitions import LOG_TABLES, ensure_partitions  # noqa: E402
from icldaemon.store.queries import load_analytics_queries, load_queries  # noqa: E402
from icldaemon.worker import Worker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
NUM_LAYERS = 30  # the bundled model's, SmolLM2-135M
MODEL = "bench-model"
SESSIONS = 40  # synthetic runs are spread over this many sessions
DISTINCT_RUNS = 8  # synthetic runs repeat this many sets of values
PLOTTED_LAYERS = ("0", "10", "20", "29")  # the run dashboard's layer selection
TARGET_BYTES = 80  # per (layer, token) on disk, indexes included
TARGET_ROWS_PER_SECOND = 1_000_000  # (layer, token) values the service logs per second with an instant engine
MAX_QUERY_RATIO = 1.5  # new / old


# --- databases


def _server() -> str:
    return os.environ.get("ICLD_BENCH_DATABASE_URL", DEFAULT_SERVER)


class Databases:
    """Benchmark databases on the server, each migrated to a revision; all dropped on leaving."""

    def __init__(self, label: str):
        self.prefix = f"icld_bench_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.names: list[str] = []

    def create(self, revision: str) -> str:
        name = f"{self.prefix}_{len(self.names)}"
        with psycopg.connect(_server(), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.names.append(name)
        url = make_url(_server()).set(database=name).render_as_string(hide_password=False)
        migrate.upgrade(url, revision)
        return url

    def __enter__(self) -> "Databases":
        return self

    def __exit__(self, *exc_info) -> None:
        with psycopg.connect(_server(), autocommit=True) as admin:
            for name in self.names:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _this_month() -> tuple[datetime.datetime, datetime.datetime]:
    today = datetime.datetime.now(datetime.UTC).date()
    start = datetime.datetime(today.year, today.month, 1, tzinfo=datetime.UTC)
    end = datetime.datetime(today.year + today.month // 12, today.month % 12 + 1, 1, tzinfo=datetime.UTC)
    return start, end


def monthly_partitions(url: str, legacy: bool) -> list[str]:
    """This month's partitions of the log's tables (as the daemon's maintenance makes them); their names."""
    if not legacy:
        engine = create_unpooled_engine_for(url)
        try:
            with engine.begin() as connection:
                return ensure_partitions(connection, 0)
        finally:
            engine.dispose()
    start, end = _this_month()
    name = f"icl_dynamics_log_y{start.year:04d}m{start.month:02d}"
    with psycopg.connect(url) as connection:
        connection.execute(sql.SQL("CREATE TABLE {} PARTITION OF icl_dynamics_log FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(name), sql.Literal(start), sql.Literal(end)))
    return [name]


def log_partitions(connection, legacy: bool) -> list[str]:
    """The partitions that hold the log's rows: revision 0006's table's, or today's two tables'."""
    tables = ["icl_dynamics_log"] if legacy else list(LOG_TABLES)
    return [name for (name,) in connection.execute(
        "SELECT tree.relid::regclass::text FROM unnest(%s::regclass[]) AS log_table(relid) "
        "CROSS JOIN LATERAL pg_partition_tree(log_table.relid) AS tree WHERE tree.isleaf", (tables,))]


def log_bytes(url: str, legacy: bool) -> int:
    """Bytes on disk of the log: its partitions with their indexes and TOAST; today's also the moved prompt hash."""
    with psycopg.connect(url) as connection:
        partitions = log_partitions(connection, legacy)
        total = sum(connection.execute("SELECT pg_total_relation_size(%s::regclass)", (name,)).fetchone()[0]
                    for name in partitions)
        if not legacy:
            total += connection.execute(
                "SELECT coalesce(sum(pg_column_size(prompt_hash)), 0) FROM measurement_runs").fetchone()[0]
    return total


# --- measurements


def synthetic_measurement(num_layers: int, num_tokens: int, seed: int) -> Measurement:
    """A measurement of the real shape, with curves of the real kind: norms that grow and settle, a path that sums."""
    rng = np.random.default_rng(seed)
    tokens_axis = np.arange(1, num_tokens + 1)
    scale = rng.uniform(0.5, 3.0, size=(num_layers, 1))
    settle = rng.uniform(20, 400, size=(num_layers, 1))
    update = scale * (1 - np.exp(-tokens_axis / settle)) * rng.uniform(0.97, 1.03, size=(num_layers, num_tokens))
    marginal = np.abs(np.diff(update, axis=1, prepend=0.0)) + rng.uniform(0, 1e-3, size=(num_layers, num_tokens))
    dynamics = {
        "delta_norm": update * rng.uniform(5, 20, size=(num_layers, 1)),
        "update_frobenius_norm": update,
        "marginal_update_norm": marginal,
        "cumulative_update_norm": np.cumsum(marginal, axis=1),
        "implicit_learning_rate": rng.uniform(1e-4, 1e-2, size=(num_layers, num_tokens)),
        "bias_update_norm": update * rng.uniform(0.5, 2, size=(num_layers, 1)),
    }
    words = (REPO / "README.md").read_text(encoding="utf-8").split()
    tokens = [TokenInfo(index=index, position=index + 1, text=" " + words[(seed * 997 + index) % len(words)],
                        segment="context" if index % 500 < 450 else "memory:1",
                        memory_id=None if index % 500 < 450 else 1) for index in range(num_tokens)]
    ablation = Ablation(delta=np.zeros((num_layers, 4), np.float32), a_tilde=np.ones((num_layers, 4), np.float32),
                        bias_delta=np.zeros((num_layers, 4), np.float32), update_frobenius_norm=np.zeros(num_layers),
                        kl=0.5, max_abs_logit_error=3e-5, patched_kl=1e-9)
    return Measurement(input_ids=list(range(num_tokens + 2)), anchor_tokens=1, query_position=num_tokens + 1,
                       tokens=tokens, dynamics=dynamics, measured_prefixes=list(range(1, num_tokens + 1)),
                       context_ablation=ablation, segments=[],
                       model={"name": MODEL, "num_layers": num_layers, "dtype": "float32", "device": "cpu"},
                       timings={"plain_forward_s": 0.01, "measure_s": 0.03})


def _long_prompt(tokenizer, tokens: int, offset: int):
    """A raw prompt of `tokens` tokens: the anchor (one token), English-like context, the query (one token)."""
    from icldaemon.engine.prompt import Segment, SegmentedPrompt

    words = " ".join(((REPO / "README.md").read_text(encoding="utf-8") + " "
                      + (REPO / "docs" / "method.md").read_text(encoding="utf-8")).split()[offset * 500:] * 4)
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")]  # the anchor, as bench_engine.py has it
    ids += tokenizer(words, add_special_tokens=False)["input_ids"][: tokens - 1]
    return SegmentedPrompt(ids, [Segment("anchor", "anchor", 0, 1), Segment("context", "context", 1, len(ids) - 1),
                                 Segment("query", "query", len(ids) - 1, len(ids))])


def real_measurements(prompts: int, tokens: int) -> dict:
    """The bundled model's measurements of `prompts` long prompts and of the demo's prompts, with the long ones' time."""
    from icldaemon.demo import MEMORIES, PROMPTS
    from icldaemon.engine.adapters import max_positions
    from icldaemon.engine.loading import load_model
    from icldaemon.engine.measure import measure
    from icldaemon.engine.prompt import Memory, build_prompt
    from icldaemon.settings import load_settings

    loaded = load_model(None, models_dir=load_settings().models_dir, device="cpu", dtype="float32")
    long, seconds = [], []
    for index in range(prompts):
        prompt = _long_prompt(loaded.tokenizer, tokens, index)
        started = time.perf_counter()
        long.append(measure(loaded.model, prompt, model_name=loaded.name))
        seconds.append(time.perf_counter() - started)
    memory_ids = {key: index for index, key in enumerate(MEMORIES, start=1)}
    demo = []
    for _title, example in PROMPTS:
        example = dict(example)
        memories = [Memory(MEMORIES[key], key, memory_ids[key]) for key in example.pop("memories", [])]
        prompt = build_prompt(loaded.tokenizer, memories=memories, max_tokens=max_positions(loaded.model), **example)
        demo.append(measure(loaded.model, prompt, model_name=loaded.name))
    return {"long": long, "demo": demo, "engine_seconds": seconds, "memories": MEMORIES, "memory_ids": memory_ids}


def _insert_prompts(connection, count: int) -> None:
    connection.execute("INSERT INTO prompts (text) SELECT 'bench prompt ' || n FROM generate_series(1, %s) AS n",
                       (count,))


def write_today(url: str, measurements: list[Measurement], memory_ids: dict | None = None) -> None:
    """Each measurement through today's writer: a queued prompt claimed and written, as the daemon does."""
    with queue.connect(url) as connection:
        with connection.transaction():
            for key, memory_id in (memory_ids or {}).items():
                connection.execute("INSERT INTO memories (id, key, content) OVERRIDING SYSTEM VALUE "
                                   "VALUES (%s, %s, 'bench')", (memory_id, key))
            _insert_prompts(connection, len(measurements))
        for measurement in measurements:
            claim = queue.claim(connection, "bench")
            writer.write_measurement(connection, claim, measurement, writer.RunSource(claim.prompt_id))


def write_legacy(url: str, measurements: list[Measurement]) -> None:
    """Each measurement through revision 0006's writer, one COPY and one transaction each."""
    with psycopg.connect(url) as connection:
        for run_id, measurement in enumerate(measurements, start=1):
            legacy_layout.copy_dynamics(connection, legacy_layout.dynamics_copy_chunks(
                measurement.dynamics, measurement.tokens, run_id=run_id, prompt_id=run_id, session_id=uuid.uuid4(),
                prompt_hash=writer.prompt_hash(measurement.input_ids), model=measurement.model["name"]))
            connection.commit()


def logged_values(measurements: list[Measurement]) -> int:
    return sum(m.dynamics[DYNAMICS_NAMES[0]].size for m in measurements)


def bytes_part(prompts: int, tokens: int) -> dict:
    measured = real_measurements(prompts, tokens)
    result = {"engine_seconds": measured["engine_seconds"], "tokens": tokens,
              "engine_context_tokens": [len(m.tokens) for m in measured["long"]]}
    with Databases("bytes") as databases:
        for label in ("long", "demo"):
            today, legacy = databases.create("head"), databases.create(legacy_layout.REVISION)
            monthly_partitions(today, legacy=False)
            monthly_partitions(legacy, legacy=True)
            empty = {"old": log_bytes(legacy, legacy=True), "new": log_bytes(today, legacy=False)}
            write_today(today, measured[label], measured["memory_ids"])
            write_legacy(legacy, measured[label])
            values = logged_values(measured[label])
            # what the runs added: the empty tables' own pages (index metapages, ...) are there before any run
            result[label] = {"prompts": len(measured[label]), "values": values,
                             "context_tokens": [len(m.tokens) for m in measured[label]],
                             "old_bytes": log_bytes(legacy, legacy=True) - empty["old"],
                             "new_bytes": log_bytes(today, legacy=False) - empty["new"],
                             "empty_bytes": empty}
    return result


# --- query speed


def _set_unlogged(url: str, partitions: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        for name in partitions:
            connection.execute(sql.SQL("ALTER TABLE {} SET UNLOGGED").format(sql.Identifier(name)))


def _runs_and_prompts(connection, runs: int, tokens: int, sessions: list[uuid.UUID]) -> None:
    connection.execute(
        "INSERT INTO prompts (id, text, status, session_id, finished_at) OVERRIDING SYSTEM VALUE "
        "SELECT n, 'bench prompt', 'done', (%s::uuid[])[1 + n %% %s], now() FROM generate_series(1, %s) AS n",
        (sessions, SESSIONS, runs))
    connection.execute(
        "INSERT INTO measurement_runs (id, prompt_id, model, dtype, device, num_layers, total_tokens, context_tokens, "
        "anchor_tokens, query_position, stride, plain_forward_s, measure_s, max_abs_logit_error, exactness_kl, "
        "context_kl, method_version) OVERRIDING SYSTEM VALUE "
        "SELECT n, n, %s, 'float32', 'cpu', %s, %s, %s, 1, %s, 1, 0.01, 0.03, 3e-5, 1e-9, 0.5, 2 "
        "FROM generate_series(1, %s) AS n", (MODEL, NUM_LAYERS, tokens + 2, tokens, tokens + 1, runs))


def fill(url: str, runs: int, tokens: int, sessions: list[uuid.UUID], legacy: bool, progress: str) -> float:
    """`runs` synthetic runs in one layout (this month's partition, unlogged); returns the seconds it took."""
    started = time.perf_counter()
    _set_unlogged(url, monthly_partitions(url, legacy))
    measurements = [synthetic_measurement(NUM_LAYERS, tokens, seed) for seed in range(DISTINCT_RUNS)]
    prepared = [writer.prepare(m, writer.RunSource(0)) for m in measurements]
    with psycopg.connect(url) as connection:
        _runs_and_prompts(connection, runs, tokens, sessions)
        connection.commit()
        for run_id in range(1, runs + 1):
            index = run_id % DISTINCT_RUNS
            if legacy:
                measurement = measurements[index]
                legacy_layout.copy_dynamics(connection, legacy_layout.dynamics_copy_chunks(
                    measurement.dynamics, measurement.tokens, run_id=run_id, prompt_id=run_id,
                    session_id=sessions[run_id % SESSIONS], prompt_hash=writer.prompt_hash(measurement.input_ids),
                    model=MODEL))
            else:
                with connection.cursor() as cursor:
                    with cursor.copy(writer.LAYERS_COPY) as copy:
                        copy.write(prepared[index].layers_payload(run_id))
                    with cursor.copy(writer.TOKENS_COPY) as copy:
                        copy.write(prepared[index].tokens_payload(run_id))
                connection.execute("UPDATE measurement_runs SET prompt_hash = %s WHERE id = %s",
                                   (prepared[index].run["prompt_hash"], run_id))
            connection.commit()
            if run_id % max(runs // 10, 1) == 0:
                print(f"  {progress}: {run_id:,} of {runs:,} runs, {time.perf_counter() - started:.0f} s", flush=True)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def _panel_queries() -> list[tuple[str, str, str]]:
    """(name, kind, SQL) of every dashboard panel reading the log or run_layers; kind 'run' or 'all'."""
    found = []
    for path in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        board = json.loads(path.read_text(encoding="utf-8"))
        panels = [p for panel in board["panels"] for p in [panel, *panel.get("panels", [])]]
        for panel in panels:
            for target in panel.get("targets", []):
                query = target["rawSql"]
                if "icl_dynamics_log" in query or "icl_analytics.run_layers" in query:
                    kind = "run" if "$run" in query else "all"
                    found.append((f"{path.stem.removeprefix('icldaemon-')} panel: {panel['title']}", kind, query))
    return found


def _sql_queries() -> list[tuple[str, str, str]]:
    found = []
    for name, (query, _parameters) in load_analytics_queries(REPO / "sql").items():
        if "icl_dynamics_log" in query or "icl_analytics.run_layers" in query:
            found.append((f"sql/ {name}", "run" if "%(run_id)s" in query else "all", query))
    package = load_queries()
    found.append(("icldaemon plot (run_dynamics)", "run", package["run_dynamics"]))
    found.append(("one session's final update norm per layer", "session",
                  package["session_final_update_norm_by_layer"]))
    found.append(("view icl_analytics.run_layers, every row", "all", "SELECT * FROM icl_analytics.run_layers"))
    found.append(("view icl_analytics.run_layers, one run", "run",
                  "SELECT * FROM icl_analytics.run_layers WHERE run_id = %(run_id)s"))
    return found


def expand(query: str, run_id: int, session_id: uuid.UUID) -> tuple[str, dict]:
    """A panel's SQL as Grafana sends it for the last 7 days (the dashboards' default range), or a named query's."""
    moment_to = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
    moment_from = moment_to - datetime.timedelta(days=7)
    query = re.sub(r"\$__timeFilter\(([^)]*)\)",
                   lambda match: f"{match[1]} BETWEEN '{moment_from.isoformat()}' AND '{moment_to.isoformat()}'", query)
    query = query.replace("$run", str(run_id)).replace("$model", MODEL)
    query = query.replace("$layer", ",".join(f"'{layer}'" for layer in PLOTTED_LAYERS))
    parameters = {"run_id": run_id, "model": MODEL, "session_id": session_id,
                  "since": moment_from, "limit": 10}
    return query, parameters


def _time(url: str, query: str, parameters: dict) -> float:
    with psycopg.connect(url, autocommit=True) as connection:
        started = time.perf_counter()
        rows = connection.execute(query, parameters if "%(" in query else None).fetchall()
        seconds = time.perf_counter() - started
    if not rows:
        raise RuntimeError(f"no rows: {query}")
    return seconds


def query_part(runs: int, tokens: int, repeat: int, aggregate_repeat: int) -> dict:
    queries = _panel_queries() + _sql_queries()
    with Databases("queries") as databases:
        old, new = databases.create(legacy_layout.REVISION), databases.create("head")
        sessions = [uuid.uuid4() for _ in range(SESSIONS)]
        fill_seconds = {"old": fill(old, runs, tokens, sessions, legacy=True, progress="revision 0006"),
                        "new": fill(new, runs, tokens, sessions, legacy=False, progress="today")}
        sizes = {"old": log_bytes(old, legacy=True), "new": log_bytes(new, legacy=False)}
        session_id = sessions[1]
        probe_runs = [max(1, runs // 4), max(1, runs // 2), max(1, 3 * runs // 4)]
        timings = []
        for name, kind, text in queries:
            times = {"old": [], "new": []}
            if kind == "run":
                rounds = [(run_id, r) for r in range(repeat) for run_id in probe_runs]
            else:  # over every run, or one session's: on revision 0006 each reads the whole log
                rounds = [(probe_runs[0], r) for r in range(aggregate_repeat)]
            for turn, (run_id, _) in enumerate(rounds):
                statement, parameters = expand(text, run_id, session_id)
                order = (("old", old), ("new", new)) if turn % 2 == 0 else (("new", new), ("old", old))
                for label, url in order:
                    times[label].append(_time(url, statement, parameters))
            timings.append({"name": name, "kind": kind, "old_s": statistics.median(times["old"]),
                            "new_s": statistics.median(times["new"]), "samples": len(rounds)})
            print(f"  {name}: {timings[-1]['old_s']:.3f} s vs {timings[-1]['new_s']:.3f} s", flush=True)
    return {"runs": runs, "tokens": tokens, "values": runs * tokens * NUM_LAYERS, "fill_seconds": fill_seconds,
            "sizes": sizes, "queries": timings}


# --- the service's ceiling


class InstantEngineWorker(Worker):
    """The daemon's loop with an engine that returns a precomputed measurement at once."""

    def __init__(self, url: str, measurement: Measurement, **options):
        loaded = SimpleNamespace(name=MODEL, revision=None, model=None, tokenizer=None)
        super().__init__(url, loaded, **options)
        self.measurement = measurement
        self.write_seconds = 0.0

    def assemble(self, connection, claim):
        queue.retrievals(connection, claim.prompt_id)  # the service's own read of the prompt's memories
        return None

    def measure_prompt(self, prompt):
        return self.measurement, {}

    def write(self, connection, measured):
        started = time.perf_counter()
        try:
            return super().write(connection, measured)
        finally:
            self.write_seconds += time.perf_counter() - started


def ceiling_part(prompts: int, tokens: int) -> dict:
    measurement = synthetic_measurement(NUM_LAYERS, tokens, seed=1)
    values = measurement.dynamics[DYNAMICS_NAMES[0]].size
    with Databases("ceiling") as databases:
        url = databases.create("head")
        monthly_partitions(url, legacy=False)
        with psycopg.connect(url) as connection:
            _insert_prompts(connection, prompts)
        worker = InstantEngineWorker(url, measurement, worker_id="bench")
        started = time.perf_counter()
        counts = Service(worker).run_once()
        seconds = time.perf_counter() - started
        if counts != {"done": prompts}:
            raise RuntimeError(f"the instant engine's prompts ended {dict(counts)}")

        # the writers alone on the same rows, in turns: today's (prepare, then one transaction per prompt) and 0006's
        legacy = databases.create(legacy_layout.REVISION)
        monthly_partitions(legacy, legacy=True)
        alone = {"today": [], "0006": []}
        batch = max(prompts // 10, 3)
        with psycopg.connect(url) as connection:
            _insert_prompts(connection, batch * 3)
        for _round in range(3):
            started_today = time.perf_counter()
            write_today_claimed(url, measurement, batch)
            alone["today"].append(batch * values / (time.perf_counter() - started_today))
            started_legacy = time.perf_counter()
            write_legacy(legacy, [measurement] * batch)
            alone["0006"].append(batch * values / (time.perf_counter() - started_legacy))
    return {"prompts": prompts, "tokens": tokens, "num_layers": NUM_LAYERS, "values_per_prompt": values,
            "seconds": seconds,
            "prompts_per_second": prompts / seconds, "values_per_second": prompts * values / seconds,
            "writer_busy": worker.write_seconds / seconds,
            "today_writer_alone": statistics.median(alone["today"]),
            "legacy_writer_alone": statistics.median(alone["0006"])}


def write_today_claimed(url: str, measurement: Measurement, count: int) -> None:
    with queue.connect(url) as connection:
        for _ in range(count):
            claim = queue.claim(connection, "bench-alone")
            writer.write_measurement(connection, claim, measurement, writer.RunSource(claim.prompt_id))


# --- all three


def run(runs: int = 2000, tokens: int = 2048, real_prompts: int = 2, repeat: int = 3, aggregate_repeat: int = 1,
        ceiling_prompts: int = 200) -> dict:
    result = {}
    print("part 1: bytes on real runs of the bundled model", flush=True)
    result["bytes"] = bytes_part(real_prompts, tokens)
    print("part 3: the service's ceiling with an instant engine", flush=True)
    result["ceiling"] = ceiling_part(ceiling_prompts, tokens)
    print(f"part 2: query speed on {runs:,} runs in each layout", flush=True)
    result["queries"] = query_part(runs, tokens, repeat, aggregate_repeat)
    return result


def _ratio_summary(timings: list[dict], kinds: tuple[str, ...]) -> tuple[float, float, str]:
    chosen = [t for t in timings if t["kind"] in kinds]
    ratios = [t["new_s"] / t["old_s"] for t in chosen]
    worst = max(chosen, key=lambda t: t["new_s"] / t["old_s"])
    return statistics.median(ratios), max(ratios), worst["name"]


def print_report(result: dict) -> None:
    measured = result["bytes"]
    print("bytes per (layer, context token) on disk that the runs added to the log's partitions, indexes and TOAST "
          "included:")
    print(f"{'runs':<44} {'values':>10} {'rev. 0006':>10} {'today':>8} {'smaller':>8}")
    for label, title in (("long", f"bundled model, {measured['long']['prompts']} prompts of "
                                  f"{measured['long']['context_tokens'][0]:,} context tokens"),
                         ("demo", f"bundled model, the {measured['demo']['prompts']} demo prompts "
                                  f"({min(measured['demo']['context_tokens'])}-{max(measured['demo']['context_tokens'])} "
                                  "tokens)")):
        part = measured[label]
        old, new = part["old_bytes"] / part["values"], part["new_bytes"] / part["values"]
        print(f"{title:<44} {part['values']:>10,} {old:>10.1f} {new:>8.1f} {old / new:>7.1f}x")
    long = measured["long"]
    verdict = "meets" if long["new_bytes"] / long["values"] <= TARGET_BYTES else "misses"
    print(f"today's layout {verdict} the target of {TARGET_BYTES} bytes per (layer, token) on real runs")

    ceiling = result["ceiling"]
    engine_seconds = statistics.median(measured["engine_seconds"])
    engine_values = NUM_LAYERS * statistics.median(measured["engine_context_tokens"])
    print(f"\nthe service with an instant engine: {ceiling['prompts']} prompts of {ceiling['tokens']:,} context tokens "
          f"x {NUM_LAYERS} layers ({ceiling['values_per_prompt']:,} values each)")
    print(f"{'':<44} {'prompts/s':>10} {'values/s':>12}")
    print(f"{'service ceiling (claim .. commit, pipelined)':<44} {ceiling['prompts_per_second']:>10.1f} "
          f"{ceiling['values_per_second']:>12,.0f}")
    for key, label in (("today_writer_alone", "today's writer alone, one prompt after another"),
                       ("legacy_writer_alone", "revision 0006's writer alone")):
        print(f"{label:<44} {ceiling[key] / ceiling['values_per_prompt']:>10.1f} {ceiling[key]:>12,.0f}")
    print(f"{'the engine on this CPU (bundled model)':<44} {1 / engine_seconds:>10.3f} "
          f"{engine_values / engine_seconds:>12,.0f}")
    verdict = "meets" if ceiling["values_per_second"] >= TARGET_ROWS_PER_SECOND else "misses"
    print(f"the writer thread was busy {ceiling['writer_busy']:.0%} of the time; the ceiling {verdict} the target of "
          f"{TARGET_ROWS_PER_SECOND:,} values/s")
    print(f"an engine (a GPU) that measures a {ceiling['tokens']:,}-token prompt in under "
          f"{1000 / ceiling['prompts_per_second']:.0f} ms waits for the service; this CPU takes {engine_seconds:.1f} s, "
          f"{engine_seconds * ceiling['prompts_per_second']:.0f}x longer")

    queries = result["queries"]
    print(f"\nquery time on {queries['runs']:,} runs of {queries['tokens']:,} tokens x {NUM_LAYERS} layers "
          f"({queries['values']:,} values; log {queries['sizes']['old'] / 2**30:.1f} GiB in revision 0006, "
          f"{queries['sizes']['new'] / 2**30:.2f} GiB today), median seconds:")
    print(f"{'query':<66} {'rev. 0006':>10} {'today':>8} {'ratio':>7}")
    for timing in queries["queries"]:
        print(f"{timing['name'][:66]:<66} {timing['old_s']:>10.3f} {timing['new_s']:>8.3f} "
              f"{timing['new_s'] / timing['old_s']:>6.2f}x")
    for kinds, label in ((("run", "session"), "one run or session"), (("all",), "every run")):
        median, worst, worst_name = _ratio_summary(queries["queries"], kinds)
        verdict = "within" if worst <= MAX_QUERY_RATIO else "beyond"
        print(f"queries over {label}: today / revision 0006 median {median:.2f}x, worst {worst:.2f}x ({worst_name}), "
              f"{verdict} {MAX_QUERY_RATIO}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="synthetic runs in each layout for the query times")
    parser.add_argument("--tokens", type=int, default=2048, help="context tokens per run")
    parser.add_argument("--real-prompts", type=int, default=2, help="long prompts the bundled model measures")
    parser.add_argument("--repeat", type=int, default=3, help="times each per-run query runs on each of 3 runs")
    parser.add_argument("--aggregate-repeat", type=int, default=1, help="times each query over every run runs")
    parser.add_argument("--ceiling-prompts", type=int, default=200, help="prompts through the instant engine")
    args = parser.parse_args()
    print_report(run(args.runs, args.tokens, args.real_prompts, args.repeat, args.aggregate_repeat,
                     args.ceiling_prompts))


if __name__ == "__main__":
    main()
