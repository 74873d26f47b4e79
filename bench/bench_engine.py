"""Engine speed and memory against one plain forward pass, on the bundled model, side by side.

For each context length: one plain forward pass of the prompt; the engine's exact per-token dynamics
for every prefix and every layer; the naive loop (two forward passes per prefix, all layers hooked at
once); the original brief's method (two forward passes per prefix *and per layer*). The naive and
brief columns are timed on sampled prefixes and summed over all prefixes (their cost grows linearly
with the prefix length), which the table says. Peak memory is the process's resident peak (VmHWM, the
model included) and its growth over the loaded model, each method in a fresh process.

    .venv/bin/python bench/bench_engine.py [--tokens 120 512 2048] [--long]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

SAMPLED_PREFIXES = 6
DEFAULT_TOKENS = (120, 512, 2048)
LONG_TOKENS = 8192
NAIVE_MAX_TOKENS = 2048  # the naive and brief columns above this length would take hours


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _prompt(tokenizer, tokens: int):
    from icldaemon.engine.prompt import Segment, SegmentedPrompt

    # any fixed English-like text will do: the engine's own source, repeated
    words = (REPO / "icldaemon" / "engine" / "measure.py").read_text().split() * 20
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][: tokens - 1]
    ids = [tokenizer.convert_tokens_to_ids("<|im_start|>")] + ids
    return SegmentedPrompt(ids, [Segment("anchor", "anchor", 0, 1), Segment("context", "context", 1, len(ids) - 1),
                                 Segment("query", "query", len(ids) - 1, len(ids))])


def child(method: str, tokens: int) -> dict:
    import numpy as np
    import torch

    from icldaemon.engine.loading import load_model
    from icldaemon.engine.measure import measure
    from icldaemon.settings import load_settings

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model(None, models_dir=load_settings().models_dir, device="cpu", dtype="float32")
    model, prompt = loaded.model, _prompt(loaded.tokenizer, tokens)
    ids = torch.tensor([prompt.input_ids])

    def plain():
        model(ids, logits_to_keep=1)

    def engine():
        measure(model, prompt, attribute_segments=False, plain_forward_repeats=0)

    with torch.no_grad():
        model(ids[:, :32], logits_to_keep=1)  # warm-up
        if method == "time":
            # alternated in one process, the fastest of each: the ratio survives a busy machine better
            rounds = 1 if tokens > 2048 else 3
            timings = {"plain": [], "engine": []}
            for _ in range(rounds):
                for name, run in (("plain", plain), ("engine", engine)):
                    started = time.perf_counter()
                    run()
                    timings[name].append(time.perf_counter() - started)
            return {name: min(values) for name, values in timings.items()}
        if method in ("memory-plain", "memory-engine"):
            before = _resident_kib("VmRSS")
            _reset_peak()
            (plain if method == "memory-plain" else engine)()
            return {"peak_mib": _resident_kib("VmHWM") / 1024, "growth_mib": (_resident_kib("VmHWM") - before) / 1024}
        from engine_reference import run_recording

        anchor, query, n = prompt.anchor_tokens, prompt.query_position, prompt.context_tokens
        sampled = sorted({max(1, round(n * (k + 1) / SAMPLED_PREFIXES)) for k in range(SAMPLED_PREFIXES)})
        per_prefix = []
        for prefix in sampled:
            started = time.perf_counter()
            full, _ = run_recording(model, prompt.input_ids[: anchor + prefix] + prompt.input_ids[query:])
            run_recording(model, prompt.input_ids[:anchor] + prompt.input_ids[query:], overwrite=full["h"])
            per_prefix.append(time.perf_counter() - started)
        # linear in the prefix length: fit a + b * prefix on the samples and sum over all prefixes
        slope, intercept = np.polyfit(sampled, per_prefix, 1) if len(sampled) > 1 else (0.0, per_prefix[0])
        seconds = float(sum(intercept + slope * prefix for prefix in range(1, n + 1)))
        if method == "brief":
            seconds *= model.config.num_hidden_layers
        return {"seconds": seconds}


def run_child(method: str, tokens: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", method, str(tokens)], capture_output=True,
                            text=True, env={**os.environ, "ICLD_LOG_FORMAT": "json"})
    if result.returncode != 0:
        raise SystemExit(f"{method} at {tokens} tokens failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(tokens=DEFAULT_TOKENS, long: bool = False) -> dict:
    """Per context length: plain and engine seconds, naive and brief seconds (up to 2,048 tokens), peak memory."""
    rows = []
    for length in list(tokens) + ([LONG_TOKENS] if long else []):
        timing = run_child("time", length)
        plain_memory, engine_memory = run_child("memory-plain", length), run_child("memory-engine", length)
        row = {"tokens": length, "plain_s": timing["plain"], "engine_s": timing["engine"],
               "naive_s": None, "brief_s": None,
               "plain_peak_mib": plain_memory["peak_mib"], "engine_peak_mib": engine_memory["peak_mib"],
               "plain_growth_mib": plain_memory["growth_mib"], "engine_growth_mib": engine_memory["growth_mib"]}
        if length <= NAIVE_MAX_TOKENS:
            row["naive_s"] = run_child("naive", length)["seconds"]
            row["brief_s"] = run_child("brief", length)["seconds"]
        rows.append(row)
    return {"model": "bundled SmolLM2-135M-Instruct, float32, CPU", "rows": rows}


def print_report(result: dict) -> None:
    print(f"{'tokens':>7} {'plain s':>8} {'engine s':>9} {'engine/plain':>13} {'naive/plain':>12} "
          f"{'brief/plain':>12} {'plain peak MiB':>15} {'engine peak MiB':>16} {'peak ratio':>11} "
          f"{'growth MiB plain/engine':>24}")
    for row in result["rows"]:
        plain = row["plain_s"]
        naive_ratio = float("nan") if row["naive_s"] is None else row["naive_s"] / plain
        brief_ratio = float("nan") if row["brief_s"] is None else row["brief_s"] / plain
        growth = f"{row['plain_growth_mib']:.0f} / {row['engine_growth_mib']:.0f}"
        print(f"{row['tokens']:>7} {plain:>8.3f} {row['engine_s']:>9.3f} {row['engine_s'] / plain:>12.2f}x "
              f"{naive_ratio:>11.0f}x {brief_ratio:>11.0f}x {row['plain_peak_mib']:>15.0f} "
              f"{row['engine_peak_mib']:>16.0f} {row['engine_peak_mib'] / row['plain_peak_mib']:>10.2f}x "
              f"{growth:>24}", flush=True)
    print(f"engine: every prefix, every layer, with the exactness check; plain: one forward pass of the same prompt, "
          f"fastest of 3 (1 above 2,048 tokens), alternated in one process; naive and brief: timed on "
          f"{SAMPLED_PREFIXES} sampled prefixes, fitted linearly, summed over all prefixes; peak: the process's "
          f"resident peak, model included, each in a fresh process; growth: over the loaded model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=list(DEFAULT_TOKENS))
    parser.add_argument("--long", action="store_true", help=f"also {LONG_TOKENS:,} tokens (engine and plain only)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}; "
          "model: bundled SmolLM2-135M-Instruct, float32, CPU")
    print_report(run(args.tokens, args.long))


if __name__ == "__main__":
    main()
