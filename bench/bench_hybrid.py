"""Hybrid attention + state-space models: the engine against one plain forward pass, beside the naive loop.

A Falcon-H1 config of realistic width (hidden 512, 4 layers, 16 Mamba2 heads of 64 x 128 state, 8
attention heads, muP multipliers away from 1; random weights, the Mamba2 steps and decays drawn as
Mamba's own initialisation draws them, so that some heads remember hundreds of tokens), float32, CPU. For each context length: one plain forward pass of the prompt (the model's own code); the
engine's exact per-token dynamics for every prefix and every layer, with the check (the mixers in the
dual form); the naive loop (two forward passes per prefix, all layers hooked at once), timed on
sampled prefixes and summed over all prefixes by a linear fit. Peak memory is the process's resident
peak (VmHWM, the model included), plain and engine each in a fresh process.

`--large` adds one measurement of 2,048 context tokens on the Falcon-H1-0.5B shape (36 layers, hidden
1,024, 8 attention heads with 2 key/value heads, 24 Mamba2 heads of 64 x 128 state, d_ssm 1,536, MLP
2,048, vocabulary 32,784; random weights): its time against a plain pass, its peak memory and its
check.

    .venv/bin/python bench/bench_hybrid.py [--tokens 256 1024 2048] [--large] [--threads N]

`--threads` sets torch's threads (default: every core); on a CPU shared with other work, one thread
gives steadier ratios, since the copies' many small operations suffer more from waiting threads than
a plain pass's large ones.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

DEFAULT_TOKENS = (256, 1024, 2048)
LARGE_TOKENS = 2048
SAMPLED_PREFIXES = 4
VOCAB = 32784
MULTIPLIERS = dict(  # muP multipliers away from 1, as in the released models (the cost does not depend on them)
    attention_in_multiplier=1.0, attention_out_multiplier=0.9375, key_multiplier=0.390625,
    embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625,
    mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_in_multiplier=1.25, ssm_out_multiplier=0.23570226039551587,
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)
SHAPES = {
    "bench": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, mamba_d_ssm=1024, mamba_n_heads=16, mamba_d_head=64,
                  mamba_d_state=128),
    "0.5b": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=36, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64,
                 mamba_d_state=128),
}
DESCRIPTIONS = {
    "bench": "Falcon-H1, hidden 512, 4 layers, 16 x 64 x 128 Mamba2 state, random weights, float32, CPU",
    "0.5b": "Falcon-H1-0.5B shape, 36 layers, hidden 1,024, 24 x 64 x 128 Mamba2 state, random weights, float32, CPU",
}


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_model(shape: str, seed: int = 0):
    import torch
    import transformers

    config = transformers.FalconH1Config(vocab_size=VOCAB, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=128,
                                         mamba_rms_norm=False, max_position_embeddings=16384, **SHAPES[shape],
                                         **MULTIPLIERS)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = transformers.FalconH1ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = layer.mamba
            # Mamba's initialisation: steps log-uniform in [0.001, 0.1], decay rates uniform in [1, 16]
            dt = torch.exp(torch.rand(mixer.num_heads, generator=generator) * (math.log(0.1) - math.log(0.001))
                           + math.log(0.001))
            mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            mixer.A_log.copy_(torch.log(1 + 15 * torch.rand(mixer.num_heads, generator=generator)))
    return model


def build_prompt(tokens: int, seed: int = 1):
    import torch

    from icldaemon.engine.prompt import Segment, SegmentedPrompt

    generator = torch.Generator().manual_seed(seed)
    ids = [1] + torch.randint(2, VOCAB, (tokens + 1,), generator=generator).tolist()
    return SegmentedPrompt(ids, [Segment("anchor", "anchor", 0, 1), Segment("context", "context", 1, tokens + 1),
                                 Segment("query", "query", tokens + 1, tokens + 2)])


def child(method: str, tokens: int, shape: str, threads: int) -> dict:
    import numpy as np
    import torch

    from icldaemon.engine.measure import measure

    torch.set_num_threads(threads)
    model, prompt = build_model(shape), build_prompt(tokens)
    ids = torch.tensor([prompt.input_ids])

    def plain():
        model(ids, logits_to_keep=1)

    def engine():
        return measure(model, prompt, attribute_segments=False, plain_forward_repeats=0)

    with torch.no_grad():
        model(ids[:, :32], logits_to_keep=1)  # warm-up
        if method == "time":
            # alternated in one process, the fastest of each: the ratio survives a busy machine better
            # and the process's CPU seconds beside the wall clock: other work on the machine inflates the latter
            rounds = 1 if shape == "0.5b" else 5
            timings = {"plain": [], "engine": [], "plain_cpu": [], "engine_cpu": []}
            error = 0.0
            for _ in range(rounds):
                for name, run in (("plain", plain), ("engine", engine)):
                    started, started_cpu = time.perf_counter(), time.process_time()
                    result = run()
                    timings[name].append(time.perf_counter() - started)
                    timings[name + "_cpu"].append(time.process_time() - started_cpu)
                    if result is not None:
                        error = max(error, result.exactness["max_abs_logit_error"])
            return {**{name: min(values) for name, values in timings.items()}, "max_abs_logit_error": error}
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
        return {"seconds": float(sum(intercept + slope * prefix for prefix in range(1, n + 1)))}


def run_child(method: str, tokens: int, shape: str, threads: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", method, str(tokens), shape, str(threads)],
                            capture_output=True, text=True, env={**os.environ, "ICLD_LOG_FORMAT": "json"})
    if result.returncode != 0:
        raise SystemExit(f"{method} at {tokens} tokens ({shape}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _row(tokens: int, shape: str, naive: bool, threads: int) -> dict:
    timing = run_child("time", tokens, shape, threads)
    plain_memory = run_child("memory-plain", tokens, shape, threads)
    engine_memory = run_child("memory-engine", tokens, shape, threads)
    return {"tokens": tokens, "shape": shape, "plain_s": timing["plain"], "engine_s": timing["engine"],
            "plain_cpu_s": timing["plain_cpu"], "engine_cpu_s": timing["engine_cpu"],
            "max_abs_logit_error": timing["max_abs_logit_error"],
            "naive_s": run_child("naive", tokens, shape, threads)["seconds"] if naive else None,
            "plain_peak_mib": plain_memory["peak_mib"], "engine_peak_mib": engine_memory["peak_mib"],
            "plain_growth_mib": plain_memory["growth_mib"], "engine_growth_mib": engine_memory["growth_mib"]}


def run(tokens=DEFAULT_TOKENS, large: bool = False, threads: int | None = None) -> dict:
    """Per context length on the bench shape: plain, engine and naive seconds, peak memory, the check; and
    with `large`, one row for 2,048 tokens on the Falcon-H1-0.5B shape (no naive column)."""
    threads = threads or os.cpu_count() or 1
    rows = [_row(length, "bench", naive=True, threads=threads) for length in tokens]
    if large:
        rows.append(_row(LARGE_TOKENS, "0.5b", naive=False, threads=threads))
    return {"model": DESCRIPTIONS["bench"], "threads": threads, "rows": rows}


def print_report(result: dict) -> None:
    print(f"{'shape':>6} {'tokens':>7} {'plain s':>8} {'engine s':>9} {'engine/plain':>13} {'cpu ratio':>10} "
          f"{'naive/plain':>12} {'plain peak MiB':>15} {'engine peak MiB':>16} {'peak ratio':>11} "
          f"{'growth MiB plain/engine':>24} {'check':>9}")
    for row in result["rows"]:
        plain = row["plain_s"]
        naive = float("nan") if row["naive_s"] is None else row["naive_s"] / plain
        growth = f"{row['plain_growth_mib']:.0f} / {row['engine_growth_mib']:.0f}"
        print(f"{row['shape']:>6} {row['tokens']:>7} {plain:>8.3f} {row['engine_s']:>9.3f} "
              f"{row['engine_s'] / plain:>12.2f}x {row['engine_cpu_s'] / row['plain_cpu_s']:>9.2f}x "
              f"{naive:>11.0f}x {row['plain_peak_mib']:>15.0f} "
              f"{row['engine_peak_mib']:>16.0f} {row['engine_peak_mib'] / row['plain_peak_mib']:>10.2f}x "
              f"{growth:>24} {row['max_abs_logit_error']:>9.1e}", flush=True)
    print(f"bench: {DESCRIPTIONS['bench']}; 0.5b: {DESCRIPTIONS['0.5b']}; torch threads: {result['threads']}")
    print("engine: every prefix, every layer, with the exactness check (check: its largest logit error); plain: one "
          "forward pass of the same prompt, fastest of 5 (1 on the 0.5b shape), alternated in one process (cpu "
          "ratio: the same in the process's CPU seconds, less sensitive to other work on the machine); naive: two "
          f"passes per prefix, timed on {SAMPLED_PREFIXES} sampled prefixes, fitted linearly, summed over all "
          "prefixes; peak: the process's resident peak, model included, each in a fresh process; growth: over the "
          "built model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=list(DEFAULT_TOKENS))
    parser.add_argument("--large", action="store_true", help="also 2,048 tokens on the Falcon-H1-0.5B shape")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, tokens, shape, threads = args.child
        print(json.dumps(child(method, int(tokens), shape, int(threads))))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}")
    print_report(run(args.tokens, args.large, args.threads))


if __name__ == "__main__":
    main()
