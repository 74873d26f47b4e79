"""Every benchmark in one run, side by side on one machine, and one table of what they measured.

    .venv/bin/python bench/run_all.py [--quick] [--skip engine,hybrid,writer,storage,end-to-end,consolidation]

The engine against one plain forward pass, the naive loop and the original brief's method
(bench_engine.py); the same for a hybrid attention + Mamba2 model, a Falcon-H1 of realistic width and
the Falcon-H1-0.5B shape at 2,048 tokens (bench_hybrid.py); the writer's binary COPY against
executemany and psql's \\copy (bench_writer.py);
the log's bytes per (layer, token), its query times and the service's ceiling with an instant engine,
each beside schema revision 0006's layout (bench_storage.py); what the database and the queue add to
the engine's time (bench_end_to_end.py); consolidation
measured like model edits, beside context distillation (bench_consolidation.py, when present). Each
section prints its own report as it finishes; the summary comes last, headed by the machine: CPU,
cores, memory, torch, and the load average before and after, since timings taken while other work
shares the CPU are noisy (ratios measured within one section suffer less than absolute times).
`--quick` uses short prompts, few rows and two facts; the full run takes about an hour on 2 cores.
Databases are made on ICLD_BENCH_DATABASE_URL's server (default postgresql://postgres@127.0.0.1:5432/postgres)
and dropped afterwards.
"""

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("engine", "hybrid", "writer", "storage", "end-to-end", "consolidation")
QUICK = {
    "engine": {"tokens": (120, 512)},
    "hybrid": {"tokens": (256,)},
    "writer": {"layers": 30, "tokens": 1000, "repeat": 1},
    "storage": {"runs": 50, "tokens": 2048, "real_prompts": 1, "repeat": 1, "aggregate_repeat": 1,
                "ceiling_prompts": 30},
    "end-to-end": {"rounds": 1},
    "consolidation": {"facts": 2, "folds": 1, "distil_facts": 1, "distil_steps": 20},
}
FULL = {
    "engine": {"tokens": (120, 512, 2048), "long": True},
    "hybrid": {"tokens": (256, 1024, 2048), "large": True},
    "writer": {"layers": 30, "tokens": 4000, "repeat": 3},
    "storage": {"runs": 2000, "tokens": 2048, "real_prompts": 2, "repeat": 3, "aggregate_repeat": 1,
                "ceiling_prompts": 200},
    "end-to-end": {"rounds": 2},
    "consolidation": {"distil_facts": 3},
}
MODULES = {"engine": "bench_engine", "hybrid": "bench_hybrid", "writer": "bench_writer",
           "storage": "bench_storage", "end-to-end": "bench_end_to_end", "consolidation": "bench_consolidation"}
NOT_AVAILABLE = "not available"


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = float("nan")
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 2**20
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "system": platform.platform()}


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def run_section(name: str, options: dict) -> tuple[dict | None, str | None, float]:
    """The section's result, or None with the reason it has none; and its seconds."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == MODULES[name]:
            return None, NOT_AVAILABLE, 0.0
        raise
    print(f"\n=== {name} ({MODULES[name]}.py) {options}", flush=True)
    try:
        result = module.run(**options)
        module.print_report(result)
    except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others' figures
        traceback.print_exc()
        return None, f"failed: {type(exc).__name__}: {exc}", time.perf_counter() - started
    return result, None, time.perf_counter() - started


def summary_rows(results: dict[str, dict | None], reasons: dict[str, str]) -> list[tuple[str, str, str]]:
    """(benchmark, figure, what it compares) for the summary table."""
    rows: list[tuple[str, str, str]] = []

    def missing(name: str, label: str) -> None:
        rows.append((label, reasons.get(name, "skipped"), ""))

    engine = results.get("engine")
    if engine is None:
        missing("engine", "engine vs plain forward")
    else:
        for row in engine["rows"]:
            tokens, plain = row["tokens"], row["plain_s"]
            rows.append((f"engine / plain forward, {tokens:,} tokens", f"{row['engine_s'] / plain:.2f}x",
                         f"{row['engine_s']:.3f} s vs {plain:.3f} s, every prefix and layer"))
            if row["naive_s"] is not None:
                rows.append((f"naive loop / plain forward, {tokens:,} tokens", f"{row['naive_s'] / plain:.0f}x",
                             f"engine is {row['naive_s'] / row['engine_s']:.0f}x faster"))
                rows.append((f"brief's method / plain forward, {tokens:,} tokens", f"{row['brief_s'] / plain:.0f}x",
                             f"engine is {row['brief_s'] / row['engine_s']:.0f}x faster"))
            rows.append((f"engine / plain peak memory, {tokens:,} tokens",
                         f"{row['engine_peak_mib'] / row['plain_peak_mib']:.2f}x",
                         f"{row['engine_peak_mib']:.0f} vs {row['plain_peak_mib']:.0f} MiB resident, model included"))
    hybrid = results.get("hybrid")
    if hybrid is None:
        missing("hybrid", "hybrid (Falcon-H1) engine vs plain forward")
    else:
        for row in hybrid["rows"]:
            tokens, plain = row["tokens"], row["plain_s"]
            what = "Falcon-H1-0.5B shape" if row["shape"] == "0.5b" else "Falcon-H1"
            rows.append((f"{what} engine / plain forward, {tokens:,} tokens", f"{row['engine_s'] / plain:.2f}x",
                         f"{row['engine_s']:.1f} s vs {plain:.1f} s ({row['engine_cpu_s'] / row['plain_cpu_s']:.2f}x "
                         f"in CPU seconds); check {row['max_abs_logit_error']:.1e}"))
            if row["naive_s"] is not None:
                rows.append((f"{what} naive loop / plain forward, {tokens:,} tokens", f"{row['naive_s'] / plain:.0f}x",
                             f"engine is {row['naive_s'] / row['engine_s']:.0f}x faster"))
            rows.append((f"{what} engine / plain peak memory, {tokens:,} tokens",
                         f"{row['engine_peak_mib'] / row['plain_peak_mib']:.2f}x",
                         f"{row['engine_peak_mib']:.0f} vs {row['plain_peak_mib']:.0f} MiB resident, model included"))
    writer = results.get("writer")
    if writer is None:
        missing("writer", "writer COPY vs executemany vs psql")
    else:
        rates = writer["rows_per_second"]
        rows.append(("writer binary COPY, (layer, token) values/s", f"{rates['copy']:,.0f}",
                     f"{writer['rows']:,} values as float32 arrays into icl_dynamics_layers"))
        rows.append(("COPY / executemany", f"{rates['copy'] / rates['executemany']:.1f}x",
                     f"executemany {rates['executemany']:,.0f} values/s"))
        psql = rates["psql \\copy"]
        rows.append(("COPY / psql \\copy of a CSV", f"{rates['copy'] / psql:.2f}x",
                     f"psql {psql:,.0f} values/s, process start included"))
    storage = results.get("storage")
    if storage is None:
        missing("storage", "log bytes, query times, service ceiling")
    else:
        rows.extend(storage_rows(storage))
    end_to_end = results.get("end-to-end")
    if end_to_end is None:
        missing("end-to-end", "service / engine alone")
    else:
        low, high = end_to_end["pair_overhead_quartiles"]
        rows.append(("service / engine alone, demo prompts", f"{1 + end_to_end['overhead']:.2f}x",
                     f"{end_to_end['prompts']} prompts in pairs, {end_to_end['service_s']:.1f} s vs "
                     f"{end_to_end['engine_s']:.1f} s; per pair middle half {low:+.0%} to {high:+.0%}"))
    consolidation = results.get("consolidation")
    if consolidation is None:
        missing("consolidation", "consolidation: answers naming the fact")
    else:
        summary = consolidation["summary"]
        rows.append((f"consolidation, answers naming the fact ({summary['facts']} facts)",
                     f"{summary['adapter_rate']:.0%} / {summary['with_memory_rate']:.0%}",
                     f"held out: with the adapter / with the memory in context (without: "
                     f"{summary['without_memory_rate']:.0%})"))
        rows.append(("consolidation, neutral prompts", f"{summary['neutral_kl']:.4f}",
                     f"mean KL(base || adapted) nats; next token kept {summary['next_token_unchanged']:.0%}, "
                     f"leak {summary['leak']:.0%}"))
        distilled = summary.get("distillation")
        if distilled:
            rows.append(("context distillation time / ours", f"{distilled['seconds'] / distilled['ours_seconds']:.1f}x",
                         f"answers {distilled['adapter_rate']:.0%} vs ours {distilled['ours_adapter_rate']:.0%}, neutral "
                         f"KL {distilled['neutral_kl']:.4f} vs {distilled['ours_neutral_kl']:.4f}"))
    return rows


def storage_rows(storage: dict) -> list[tuple[str, str, str]]:
    """The log's bytes before and after, the service's ceiling beside the engine, the query-speed ratios."""
    rows = []
    measured = storage["bytes"]
    for label, what in (("long", "long prompts"), ("demo", "demo prompts")):
        part = measured[label]
        old, new = part["old_bytes"] / part["values"], part["new_bytes"] / part["values"]
        tokens = part["context_tokens"]
        rows.append((f"log bytes per (layer, token), {what}", f"{old:.0f} -> {new:.1f}",
                     f"revision 0006 -> today, {old / new:.1f}x smaller; {part['prompts']} real runs of "
                     f"{min(tokens):,}-{max(tokens):,} context tokens, indexes and TOAST included"))
    ceiling = storage["ceiling"]
    engine_seconds = statistics.median(measured["engine_seconds"])
    layers = ceiling["num_layers"]
    engine_values = layers * statistics.median(measured["engine_context_tokens"])
    rows.append(("service ceiling, instant engine, values/s", f"{ceiling['values_per_second']:,.0f}",
                 f"{ceiling['prompts_per_second']:.1f} prompts/s of {ceiling['tokens']:,} tokens x {layers} layers; "
                 f"writer busy {ceiling['writer_busy']:.0%}; revision 0006's writer alone "
                 f"{ceiling['legacy_writer_alone']:,.0f}"))
    rows.append(("engine alone on this CPU, values/s", f"{engine_values / engine_seconds:,.0f}",
                 f"{engine_seconds:.1f} s per {ceiling['tokens']:,}-token prompt; an engine under "
                 f"{1000 / ceiling['prompts_per_second']:.0f} ms per prompt would wait for the service"))
    timings = storage["queries"]["queries"]
    for kinds, what in ((("run", "session"), "one run or session"), (("all",), "every run")):
        chosen = [t for t in timings if t["kind"] in kinds]
        ratios = sorted(t["new_s"] / t["old_s"] for t in chosen)
        rows.append((f"query time today / 0006, {what}", f"{statistics.median(ratios):.2f}x",
                     f"median of {len(chosen)} panels and queries on {storage['queries']['runs']:,} runs; "
                     f"worst {ratios[-1]:.2f}x, best {ratios[0]:.2f}x"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short prompts, few rows: a few minutes")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    if skipped - set(SECTIONS):
        parser.error(f"unknown sections {sorted(skipped - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")

    from icldaemon.logs import configure_logging

    configure_logging(log_format="console", log_level="warning")
    about = machine()
    load_before = load_average()
    options = QUICK if args.quick else FULL
    started = time.perf_counter()
    results: dict[str, dict | None] = {}
    reasons: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in SECTIONS:
        if name in skipped:
            reasons[name] = "skipped"
            continue
        results[name], reason, seconds[name] = run_section(name, options[name])
        if reason is not None:
            reasons[name] = reason

    print(f"\n=== summary ({'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + ")")
    print(f"machine: {about['cpu']}, {about['cores']} cores, {about['memory_gib']:.0f} GiB; torch {about['torch']} "
          f"({about['threads']} threads), Python {about['python']}, {about['system']}")
    print(f"load average (1/5/15 min) before: {load_before}, after: {load_average()}; above about "
          f"{about['cores']} the CPU was shared with other work and timings are noisy")
    rows = summary_rows(results, reasons)
    width = max(len(label) for label, _, _ in rows)
    figure_width = max(len(figure) for _, figure, _ in rows)
    print(f"{'benchmark':<{width}}  {'figure':>{figure_width}}  notes")
    for label, figure, note in rows:
        print(f"{label:<{width}}  {figure:>{figure_width}}  {note}")
    failed = [name for name, reason in reasons.items() if reason.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
