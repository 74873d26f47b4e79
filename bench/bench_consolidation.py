"""Consolidation fidelity against the number of calibration queries K (the paper's Figure 4, on a real model).

Each fact is one memory among three in a chat's system prompt, asked about by 20 paraphrased
questions. Every chat is measured by the engine (the fact's exact patch at its query); for K = 1, 2,
4, 8, 16 the static patch is fitted on the first K questions' patches and checked on the last four,
which it never saw: the share of the context's effect (KL to the full-context prediction) that it
recovers, applied at the query position only and at every position (the LoRA adapter), and how often
the greedy next token is kept. At the largest K the bias and weight halves are also tried alone.

    .venv/bin/python bench/bench_consolidation.py [--facts 4] [--plot bench/consolidation.png]
"""

import argparse
import platform
import time
from dataclasses import replace

import numpy as np

from icldaemon.consolidate import RANK
from icldaemon.engine.consolidation import (
    RIDGE,
    FidelityExample,
    PatchSet,
    fit_sequential_static_patch,
    fit_static_patch,
    measure_fidelity,
    without_segments,
)
from icldaemon.engine.loading import load_model
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.settings import load_settings

CALIBRATION_SIZES = (1, 2, 4, 8, 16)
HELD_OUT = 4
DISTRACTORS = ("The user's favourite colour is green.", "The user works night shifts at a bakery.")
FACTS = {
    "locker": ("The user's gym locker code is 4719.", [
        "What is my gym locker code?", "Remind me of my locker code.", "Which code opens my gym locker?",
        "I forgot my locker combination. What is it?", "Tell me the code for my locker.", "My locker code, please?",
        "What numbers open my locker at the gym?", "Do you know my gym locker code?", "What was my locker code again?",
        "Can you tell me the combination of my locker?", "How do I open my gym locker?", "Locker code?",
        "What's the code on my locker?", "I need my locker code.", "Which combination did I set for my locker?",
        "Give me my locker code.", "What is the combination for my gym locker?", "What code does my locker use?",
        "Please remind me how to unlock my locker.", "Say my locker code.",
    ]),
    "sister": ("The user's sister is called Ingrid.", [
        "What is my sister's name?", "What's my sister called?", "Remind me of my sister's name.",
        "Who is my sister?", "Do you remember my sister's name?", "Tell me my sister's name.",
        "My sister is called what?", "What do I call my sister?", "Name my sister.",
        "What was my sister's name again?", "Can you tell me who my sister is?", "Sister's name?",
        "What name does my sister have?", "Who's my sister?", "I forgot my sister's name. What is it?",
        "How is my sister named?", "Please say my sister's name.", "What's the name of my sister?",
        "Who is the user's sister?", "Which name does my sister go by?",
    ]),
    "city": ("The user lives in Porto.", [
        "Where do I live?", "Which city do I live in?", "What is my home town?", "Remind me where I live.",
        "Do you know where I live?", "In what city is my home?", "Where is my home?", "Tell me where I live.",
        "Which city am I from?", "What city do I live in again?", "Where's my house?", "My city?",
        "Where do I reside?", "Which town is my home?", "Name the city I live in.", "Where am I living now?",
        "What city is home for me?", "Where is my flat?", "Can you say where I live?", "In which city do I live?",
    ]),
    "pet": ("The user has a grey cat called Miso.", [
        "What is my cat's name?", "What's my cat called?", "Remind me of my cat's name.", "What pet do I have?",
        "Do you know my cat's name?", "Tell me the name of my cat.", "My cat is called what?",
        "What do I call my cat?", "Name my pet.", "What was my cat's name again?", "Which animal do I own?",
        "Cat's name?", "What is my pet called?", "Who is my cat?", "I forgot my cat's name. What is it?",
        "What colour is my cat?", "Please say my cat's name.", "What's the name of my pet?",
        "What kind of pet do I keep?", "How is my cat named?",
    ]),
}


def fact_examples(loaded, fact_key: str):
    """Per question of one fact: its exact patch for the fact and the with/without token ids."""
    content, questions = FACTS[fact_key]
    memories = [Memory(DISTRACTORS[0], "colour", 1), Memory(content, fact_key, 2), Memory(DISTRACTORS[1], "work", 3)]
    patches, examples = [], []
    for question in questions:
        prompt = build_prompt(loaded.tokenizer, messages=[{"role": "user", "content": question}], memories=memories)
        measurement = measure(loaded.model, prompt, stride=len(prompt.input_ids))
        segment = next(segment for segment in measurement.segments if segment.memory_id == 2)
        patches.append(segment.ablation)
        examples.append(FidelityExample(prompt.input_ids, without_segments(prompt, {segment.label})))
    return patches, examples


def patch_set(ablations) -> PatchSet:
    return PatchSet(np.stack([a.delta for a in ablations]), np.stack([a.a_tilde for a in ablations]),
                    np.stack([a.bias_delta for a in ablations]))


def run(facts: int = len(FACTS), rank: int = RANK, ridge: float = RIDGE, plot: str | None = None) -> dict:
    settings = load_settings()
    loaded = load_model(settings.model, models_dir=settings.models_dir, device="cpu", dtype="float32")
    started = time.perf_counter()
    per_fact = {}
    for fact_key in list(FACTS)[:facts]:
        patches, examples = fact_examples(loaded, fact_key)
        train, train_examples, held_out = patches[:-HELD_OUT], examples[:-HELD_OUT], examples[-HELD_OUT:]
        rows, sequential = {}, {}
        for size in CALIBRATION_SIZES:
            static = fit_static_patch(patch_set(train[:size]), rank=rank, ridge=ridge)
            rows[size] = measure_fidelity(loaded.model, static, held_out)
            layered = fit_sequential_static_patch(loaded.model, train_examples[:size], rank=rank, ridge=ridge)
            sequential[size] = measure_fidelity(loaded.model, layered, held_out)
            print(f"  {fact_key} K={size}: query {rows[size].recovered_query:.1%}, LoRA direct "
                  f"{rows[size].recovered_all:.1%}, LoRA layer by layer {sequential[size].recovered_all:.1%}", flush=True)
        largest = fit_static_patch(patch_set(train[: CALIBRATION_SIZES[-1]]), rank=rank, ridge=ridge)
        rows["bias only"] = measure_fidelity(loaded.model, replace(largest, left=np.zeros_like(largest.left)), held_out)
        rows["weight only"] = measure_fidelity(loaded.model, replace(largest, bias=np.zeros_like(largest.bias)),
                                               held_out)
        per_fact[fact_key] = (rows, sequential)
    seconds = time.perf_counter() - started

    table = {}
    for label in [*CALIBRATION_SIZES, "bias only", "weight only"]:
        results = [rows[label] for rows, _ in per_fact.values()]
        layered = [sequential[label] for _, sequential in per_fact.values() if label in sequential]
        kl_without = np.mean([r.kl_without for r in results])
        table[label] = {
            "recovered_sequential": (float(1 - np.mean([r.kl_adapter_all for r in layered]) / kl_without)
                                     if layered else None),
            "greedy_sequential": float(np.mean([r.greedy_match_all for r in layered])) if layered else None,
            "kl_without": float(kl_without),
            "recovered_query": float(1 - np.mean([r.kl_adapter_query for r in results]) / kl_without),
            "recovered_all": float(1 - np.mean([r.kl_adapter_all for r in results]) / kl_without),
            "greedy_without": float(np.mean([r.greedy_match_without for r in results])),
            "greedy_query": float(np.mean([r.greedy_match_query for r in results])),
            "greedy_all": float(np.mean([r.greedy_match_all for r in results])),
        }
    if plot:
        _plot(table, plot)
    return {"model": loaded.name, "facts": list(per_fact), "rank": rank, "ridge": ridge, "held_out": HELD_OUT,
            "table": table, "seconds": seconds}


def _plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(CALIBRATION_SIZES)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(sizes, [table[k]["recovered_query"] for k in sizes], "o-", label="static patch at the query position")
    axis.plot(sizes, [table[k]["recovered_all"] for k in sizes], "s--", label="direct fit at every position")
    axis.plot(sizes, [table[k]["recovered_sequential"] for k in sizes], "^-",
              label="LoRA adapter: layer-by-layer fit, every position")
    axis.axhline(0, color="grey", linewidth=0.8)
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(k) for k in sizes])
    axis.set_xlabel("calibration queries K")
    axis.set_ylabel("share of the context's effect recovered\n(held-out queries, 1 - KL ratio)")
    axis.set_title("Consolidated memory patches, SmolLM2-135M-Instruct")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_report(result: dict) -> None:
    print(f"consolidation fidelity: {result['model']}, facts {', '.join(result['facts'])}, rank {result['rank']}, "
          f"ridge {result['ridge']}, {result['held_out']} held-out paraphrases per fact, "
          f"{platform.processor() or platform.machine()}, {result['seconds']:.0f} s")
    print("recovered: share of the context's effect (KL) recovered on held-out paraphrases; query: direct fit at the "
          "query position; direct: the same patch at every position; LoRA: layer-by-layer fit at every position "
          "(what `icldaemon consolidate` exports)")
    print(f"{'K':>12}  {'KL without':>10}  {'query':>7}  {'direct':>7}  {'LoRA':>7}  "
          f"{'greedy kept: without / query / LoRA':>36}")
    for label, row in result["table"].items():
        sequential = "-" if row["recovered_sequential"] is None else f"{row['recovered_sequential']:.1%}"
        greedy = "-" if row["greedy_sequential"] is None else f"{row['greedy_sequential']:.0%}"
        print(f"{label!s:>12}  {row['kl_without']:>10.4f}  {row['recovered_query']:>7.1%}  {row['recovered_all']:>7.1%}"
              f"  {sequential:>7}  {row['greedy_without']:>14.0%} / {row['greedy_query']:>4.0%} / {greedy:>4}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=len(FACTS), help=f"how many facts (at most {len(FACTS)})")
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--ridge", type=float, default=RIDGE)
    parser.add_argument("--plot", help="write the figure to this PNG")
    args = parser.parse_args()
    print_report(run(args.facts, args.rank, args.ridge, args.plot))


if __name__ == "__main__":
    main()
