"""Consolidation measured like model edits: does the model, given the adapter, say the fact?

The shipped facts (icldaemon/data/facts.json: names, codes, places, preferences, dates; 20
paraphrased questions each) about one fictional user. For each fact, its memory sits among two
others in a chat's system prompt. Retrievals of the fact's memory: its 20 questions (relevant) and 8
questions about the two other memories (irrelevant: the memory is in the prompt but not asked about).
Each retrieval gives the exact patch of removing the memory at every answer position of the model's
own with-memory answer, computed once. The questions are dealt into 5 folds of 4; for each fold one
down-projection LoRA is fitted on the other 16 questions and the 8 irrelevant retrievals, with a
preservation term on the shipped generic prompts (icldaemon/data/generic.json) and two refinements on
the adapted model's own keys, as `icldaemon consolidate` fits, and checked on the fold's 4 (five-fold
cross-validation: every question is held out once, 20 held-out answers per fact instead of 4).
Checked on:

- answer level: the held-out questions, greedy 16-token answers naming the fact with the memory in
  context, without it, and without it but with the adapter; the mean KL to the with-memory model over
  the answer tokens; the next-token KL share (first answer token only, secondary);
- specificity: the shipped neutral prompts (none of them in the preservation term): KL(base || adapted)
  at the next token, greedy next token and 16-token continuation unchanged (each fold's adapter; the
  mean over the folds);
- leak: 4 questions about the other memories, asked without this memory but with its adapter;
- interference: each fact's held-out answers with its adapter stacked (deltas summed) with 1, 3 and
  7 other facts' adapters of the same fold;
- the baseline: context distillation (a PEFT LoRA on the same modules at the same rank, trained with
  AdamW on the same answer tokens), the same figures and its time, on the first fold of the
  `--distil-facts` facts (the first N, or the facts A to B-1), beside our adapter of the same fold.

    .venv/bin/python bench/bench_consolidation.py [--facts 12] [--folds 5] [--distil-facts 1|A:B] [--rank 8] [--explain]

`--explain` also prints, per fact, its held-out questions with the answers with the memory and with the
adapter, and the neutral prompts whose greedy next token the adapter changes, with the base model's
margin there (its top token's probability minus the second's): what a missed goal looks like.
"""

import argparse
import platform
import time
from dataclasses import asdict

import numpy as np
import torch

from icldaemon.data import load_facts, load_generic, load_neutral
from icldaemon.engine import answers, edit_figures, generic_cache
from icldaemon.engine.loading import load_model
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.settings import load_settings

SYSTEM = "You are a helpful assistant. Use what you remember about the user."
FOLDS = 5  # each fact's 20 questions in 5 folds of 4: fit on 16, check on 4, every question checked once
IRRELEVANT_PER_OTHER = 4  # questions about each of the two other memories, with this memory in the prompt
LEAK_PER_OTHER = 2
COMPANY = (1, 3, 7)
# the goals of the consolidation issue
GOAL_ANSWER_SHARE = 0.8  # of the with-memory rate, pooled
GOAL_FACT_SHARE = 0.5  # no fact below this share of its with-memory rate
GOAL_NEXT_TOKEN_UNCHANGED = 0.95
GOAL_NEUTRAL_KL = 0.02  # nats
GOAL_LEAK = 0.10


class Bench:
    def __init__(self, loaded, facts):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.facts = facts
        self.stop = answers.stop_token_ids(self.model, self.tokenizer)

    def memory(self, index: int) -> Memory:
        fact = self.facts[index]
        return Memory(content=fact.content, key=fact.key, id=index + 1)

    def others(self, index: int) -> tuple[int, int]:
        return (index + 1) % len(self.facts), (index + 2) % len(self.facts)

    def prompt(self, question: str, memory_indices: list[int]):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        return build_prompt(self.tokenizer, messages=messages, memories=[self.memory(i) for i in memory_indices])

    def retrievals(self, index: int) -> tuple[list, list, list]:
        """(relevant, irrelevant, leak) prompts for fact `index`: (with ids, without ids) pairs; leak: ids.

        Relevant: every question about the fact, its memory among the two others. Irrelevant: questions
        about the two others with this memory in the prompt too. Leak: other questions about the two others,
        without this memory.
        """
        fact, (first, second) = self.facts[index], self.others(index)
        label = f"memory:{index + 1}"
        relevant, irrelevant, leaks = [], [], []
        for question in fact.questions:
            prompt = self.prompt(question, [index, first, second])
            relevant.append((prompt.input_ids, prompt.without({label})))
        for other, company in ((first, second), (second, first)):
            for question in self.facts[other].questions[:IRRELEVANT_PER_OTHER]:
                prompt = self.prompt(question, [other, index, company])
                irrelevant.append((prompt.input_ids, prompt.without({label})))
            for question in self.facts[other].questions[-LEAK_PER_OTHER:]:
                leaks.append(self.prompt(question, [other, company]).input_ids)
        return relevant, irrelevant, leaks

    def answer_patches(self, pairs, progress=None) -> tuple[list, list[float], list[float]]:
        """The patches, and per retrieval the seconds spent on its greedy answer and on its patch."""
        result, answer_seconds, patch_seconds = [], [], []
        for number, (with_ids, without_ids) in enumerate(pairs, 1):
            if progress:
                progress(number, len(pairs))
            started = time.perf_counter()
            answer = answers.greedy_answer(self.model, with_ids, answers.ANSWER_TOKENS, self.stop)
            answered = time.perf_counter()
            result.append(answers.answer_patch(self.model, with_ids, without_ids, answer))
            answer_seconds.append(answered - started)
            patch_seconds.append(time.perf_counter() - answered)
        return result, answer_seconds, patch_seconds

    def figures(self, index: int, patch, held_out, leaks, baseline) -> dict:
        fact = self.facts[index]
        examples = [edit_figures.AnswerExample(w, wo, fact.said_in, with_answer_ids=answer_ids)
                    for w, wo, answer_ids in held_out]
        level = edit_figures.answer_figures(self.model, self.tokenizer, patch, examples, stop_ids=self.stop)
        specific = edit_figures.specificity(self.model, patch, baseline, stop_ids=self.stop)
        leaked = edit_figures.leak(self.model, self.tokenizer, patch, leaks, fact.said_in, stop_ids=self.stop)
        return {**{k: v for k, v in asdict(level).items() if k != "answers"},
                "answers": level.answers, "neutral": asdict(specific), "leak": leaked.rate}

    @torch.no_grad()
    def flipped(self, patch, baseline) -> list[tuple[int, str, str, float]]:
        """The neutral prompts whose greedy next token `patch` changes: (index, before, after, base margin)."""
        flips = []
        with answers.applied(self.model, patch):
            for number, (ids, base) in enumerate(zip(baseline.prompts, baseline.log_probs, strict=True)):
                adapted = edit_figures.log_probs(self.model, ids, -1)
                if int(adapted.argmax()) != int(base.argmax()):
                    top = torch.topk(base.exp(), 2).values
                    flips.append((number, self.tokenizer.decode([int(base.argmax())]),
                                  self.tokenizer.decode([int(adapted.argmax())]), float(top[0] - top[1])))
        return flips


def fold_of(question_index: int, folds: int = FOLDS) -> int:
    """The fold in which a question is held out: questions are dealt to the folds in turn."""
    return question_index % folds


def pooled_folds(rows: list[dict]) -> dict:
    """One fact's figures over its folds: rates over every held-out question (the folds are equally large),
    the other figures as means over the folds' adapters."""
    def mean(name, part=None):
        return float(np.mean([(row[part] if part else row)[name] for row in rows]))

    neutral = {name: mean(name, "neutral") for name in rows[0]["neutral"]}
    pooled = {name: mean(name) for name in ("with_memory_rate", "without_memory_rate", "adapter_rate",
                                            "answer_kl_without", "answer_kl_adapter", "next_token_kl_share", "leak")}
    return {**pooled, "neutral": neutral, "examples": sum(row["examples"] for row in rows),
            "answers": [answer for row in rows for answer in row["answers"]]}


def run(facts: int | None = None, distil_facts: int | range = 1, rank: int = answers.RANK,
        ridge: float = answers.RIDGE, preservation: float = answers.PRESERVATION, distil_steps: int = 125,
        folds: int = FOLDS, refinements: int = answers.REFINEMENTS, focus: float = answers.FOCUS, progress=None,
        explain: bool = False, generic_file: str | None = None,
        generic_positions: int = answers.GENERIC_POSITIONS) -> dict:
    progress = progress or (lambda message: print(message, flush=True))  # shown at once also when redirected
    distil_facts = range(distil_facts) if isinstance(distil_facts, int) else distil_facts
    if not 1 <= folds <= FOLDS:
        raise SystemExit(f"--folds must be between 1 and {FOLDS}, got {folds}")
    settings = load_settings()
    loaded = load_model(None, models_dir=settings.models_dir, device="cpu", dtype="float32")
    all_facts = load_facts()
    chosen = all_facts if facts is None else all_facts[:facts]
    bench = Bench(loaded, all_facts)
    started = time.perf_counter()
    neutral_prompts = [build_prompt(loaded.tokenizer, messages=chat).input_ids for chat in load_neutral()]
    baseline = edit_figures.neutral_baseline(loaded.model, neutral_prompts, stop_ids=bench.stop)
    generic_prompts = [build_prompt(loaded.tokenizer, messages=chat).input_ids for chat in load_generic(generic_file)]
    generic = generic_cache.cached_generic_keys(loaded.model, generic_prompts,
                                                settings.data_dir / generic_cache.GENERIC_KEYS_DIR, generic_positions,
                                                answer_tokens=answers.ANSWER_TOKENS, stop_ids=bench.stop)
    progress(f"  neutral baseline ({len(neutral_prompts)} prompts) and the preservation term's keys "
             f"({len(generic_prompts)} other prompts): {time.perf_counter() - started:.0f} s")
    per_fact, adapters, held = {}, {}, {}
    for index, fact in enumerate(chosen):
        relevant, irrelevant, leaks = bench.retrievals(index)
        pairs = relevant + irrelevant
        patches, answer_seconds, patch_seconds = bench.answer_patches(
            pairs, lambda done, total: print(f"    retrieval {done}/{total}", end="\r", flush=True))
        fold_rows = []
        for fold in range(folds):
            held_indices = [i for i in range(len(relevant)) if fold_of(i) == fold]
            fit_indices = [i for i in range(len(relevant)) if fold_of(i) != fold]
            fit_indices += [len(relevant) + i for i in range(len(irrelevant))]
            fit_started = time.perf_counter()
            adapter = answers.fit_answer_patches(
                [patches[i] for i in fit_indices], generic, rank=rank, ridge=ridge, preservation=preservation,
                model=loaded.model, prompts=[pairs[i] for i in fit_indices], refinements=refinements, focus=focus)
            fit_seconds = time.perf_counter() - fit_started
            held_out = [(*relevant[i], patches[i].answer_ids) for i in held_indices]
            row = bench.figures(index, adapter, held_out, leaks, baseline)
            row.update(fit_seconds=fit_seconds, patch_seconds=sum(patch_seconds[i] for i in fit_indices),
                       answer_seconds=sum(answer_seconds[i] for i in fit_indices), pairs=adapter.pairs)
            if explain:
                row["held_out_questions"] = [fact.questions[i] for i in held_indices]
                row["flipped"] = bench.flipped(adapter, baseline)
            if fold == 0 and index in distil_facts:
                from icldaemon.engine.distillation import DistillationExample, distil

                distil_started = time.perf_counter()
                distilled = distil(loaded.model, [DistillationExample(*pairs[i], patches[i].answer_ids)
                                                  for i in fit_indices], rank=rank, steps=distil_steps)
                distil_seconds = time.perf_counter() - distil_started
                row["distillation"] = {**bench.figures(index, distilled, held_out, leaks, baseline),
                                       "seconds": distil_seconds}
            fold_rows.append(row)
            adapters[index, fold], held[index, fold] = adapter, held_out
        row = pooled_folds(fold_rows)
        row.update(folds=fold_rows, check=max(p.max_abs_log_prob_error for p in patches),
                   fit_seconds=float(np.mean([r["fit_seconds"] for r in fold_rows])),
                   patch_seconds=float(np.mean([r["patch_seconds"] for r in fold_rows])),
                   answer_seconds=float(np.mean([r["answer_seconds"] for r in fold_rows])))
        if "distillation" in fold_rows[0]:
            row["distillation"] = {**fold_rows[0]["distillation"], "ours": fold_rows[0]}
        per_fact[fact.key] = row
        progress(f"  {fact.key}: with memory {row['with_memory_rate']:.0%}, without {row['without_memory_rate']:.0%}, "
                 f"adapter {row['adapter_rate']:.0%} ({row['examples']} held out); neutral KL "
                 f"{row['neutral']['mean_kl']:.4f}, next token kept {row['neutral']['next_token_unchanged']:.0%}; "
                 f"leak {row['leak']:.0%}; per adapter: patches {row['patch_seconds']:.0f} s, fit "
                 f"{row['fit_seconds']:.1f} s (answers {row['answer_seconds']:.0f} s)"
                 + (f"; distillation adapter {row['distillation']['adapter_rate']:.0%}, neutral KL "
                    f"{row['distillation']['neutral']['mean_kl']:.4f}, next token kept "
                    f"{row['distillation']['neutral']['next_token_unchanged']:.0%}, leak "
                    f"{row['distillation']['leak']:.0%}, in {row['distillation']['seconds']:.0f} s"
                    if "distillation" in row else ""))
    interference = {}
    for company in COMPANY:
        if company >= len(chosen):
            continue
        rates = []
        for (index, fold), adapter in adapters.items():
            stacked = adapter
            for offset in range(1, company + 1):
                stacked = stacked + adapters[(index + offset) % len(chosen), fold]
            fact = all_facts[index]
            with answers.applied(loaded.model, stacked):
                for _with_ids, without_ids, _answer in held[index, fold]:
                    answer = answers.greedy_answer(loaded.model, without_ids, answers.ANSWER_TOKENS, bench.stop)
                    rates.append(fact.said_in(loaded.tokenizer.decode(answer, skip_special_tokens=True)))
        interference[company] = float(np.mean(rates))
    return {"model": loaded.name, "rank": rank, "ridge": ridge, "preservation": preservation, "folds": folds,
            "refinements": refinements, "focus": focus,
            "per_fact": per_fact, "interference": interference, "seconds": time.perf_counter() - started,
            "neutral_prompts": len(neutral_prompts), "threads": torch.get_num_threads(),
            "summary": summarise(per_fact)}


def summarise(per_fact: dict) -> dict:
    def pooled(rows, name):
        return float(np.mean([row[name] for row in rows]))

    rows = list(per_fact.values())
    distilled = [row["distillation"] for row in rows if "distillation" in row]
    ours_on_distilled = [row["ours"] for row in distilled]  # our adapter of the same fold
    summary = {
        "facts": len(rows),
        "examples": sum(row["examples"] for row in rows),
        "with_memory_rate": pooled(rows, "with_memory_rate"),
        "without_memory_rate": pooled(rows, "without_memory_rate"),
        "adapter_rate": pooled(rows, "adapter_rate"),
        "answer_kl_without": pooled(rows, "answer_kl_without"),
        "answer_kl_adapter": pooled(rows, "answer_kl_adapter"),
        "next_token_kl_share": pooled(rows, "next_token_kl_share"),
        "neutral_kl": float(np.mean([row["neutral"]["mean_kl"] for row in rows])),
        "next_token_unchanged": float(np.mean([row["neutral"]["next_token_unchanged"] for row in rows])),
        "continuation_unchanged": float(np.mean([row["neutral"]["continuation_unchanged"] for row in rows])),
        "leak": pooled(rows, "leak"),
        "fit_seconds": float(np.mean([row["patch_seconds"] + row["fit_seconds"] for row in rows])),
        "answer_seconds": float(np.mean([row["answer_seconds"] for row in rows])),
        "weakest_fact_share": min((row["adapter_rate"] / row["with_memory_rate"] for row in rows
                                   if row["with_memory_rate"] > 0), default=float("nan")),
    }
    if distilled:
        summary["distillation"] = {
            "facts": len(distilled),
            "adapter_rate": pooled(distilled, "adapter_rate"),
            "ours_adapter_rate": pooled(ours_on_distilled, "adapter_rate"),
            "neutral_kl": float(np.mean([row["neutral"]["mean_kl"] for row in distilled])),
            "ours_neutral_kl": float(np.mean([row["neutral"]["mean_kl"] for row in ours_on_distilled])),
            "next_token_unchanged": float(np.mean([row["neutral"]["next_token_unchanged"] for row in distilled])),
            "ours_next_token_unchanged": float(np.mean([row["neutral"]["next_token_unchanged"]
                                                        for row in ours_on_distilled])),
            "leak": pooled(distilled, "leak"),
            "seconds": float(np.mean([row["seconds"] for row in distilled])),
            "ours_seconds": float(np.mean([row["patch_seconds"] + row["fit_seconds"] for row in ours_on_distilled])),
        }
    return summary


def print_report(result: dict) -> None:
    summary = result["summary"]
    print(f"consolidation: {result['model']}, {summary['facts']} facts, rank {result['rank']}, ridge "
          f"{result['ridge']}, preservation {result['preservation']}, focus {result['focus']}, refinements "
          f"{result['refinements']}, {result['neutral_prompts']} neutral prompts, "
          f"{platform.processor() or platform.machine()}, {result['threads']} threads, {result['seconds']:.0f} s")
    print(f"{result['folds']} of {FOLDS} folds per fact: each fold's adapter fitted on the other folds' questions and "
          f"the irrelevant retrievals, checked on its own; {summary['examples']} held-out answers in all")
    print("answer rates: held-out questions whose greedy 16-token answer names the fact (with the memory / without it "
          "/ without it, with the adapter); KL: mean over the with-memory answer's tokens; neutral: KL(base || "
          "adapted) at the next token and greedy next token kept; leak: questions about other memories answered "
          "with this fact")
    print(f"{'fact':>18}  {'with':>5} {'without':>7} {'adapter':>7}  {'KL w/o':>7} {'KL adapter':>10}  "
          f"{'neutral KL':>10} {'kept':>5} {'cont.':>5}  {'leak':>5}  {'check':>7}  {'s':>4}  distillation")
    for key, row in result["per_fact"].items():
        distilled = row.get("distillation")
        baseline = (f"adapter {distilled['adapter_rate']:.0%}, neutral KL {distilled['neutral']['mean_kl']:.4f}, "
                    f"kept {distilled['neutral']['next_token_unchanged']:.0%}, leak {distilled['leak']:.0%}, "
                    f"{distilled['seconds']:.0f} s" if distilled else "-")
        print(f"{key:>18}  {row['with_memory_rate']:>5.0%} {row['without_memory_rate']:>7.0%} "
              f"{row['adapter_rate']:>7.0%}  {row['answer_kl_without']:>7.3f} {row['answer_kl_adapter']:>10.3f}  "
              f"{row['neutral']['mean_kl']:>10.4f} {row['neutral']['next_token_unchanged']:>5.0%} "
              f"{row['neutral']['continuation_unchanged']:>5.0%}  {row['leak']:>5.0%}  {row['check']:>7.1e}  "
              f"{row['patch_seconds'] + row['fit_seconds']:>4.0f}  {baseline}")
    print("rates over every held-out answer of the folds, other figures the mean over the folds' adapters; s: per "
          "adapter, its retrievals' patches and the fit; distillation (first fold): its training. Both use the same "
          "with-memory answers, "
          "generated once (not counted in either)")
    share = summary["adapter_rate"] / summary["with_memory_rate"] if summary["with_memory_rate"] else float("nan")
    print(f"pooled: with memory {summary['with_memory_rate']:.0%}, without {summary['without_memory_rate']:.0%}, "
          f"adapter {summary['adapter_rate']:.0%} ({share:.0%} of the "
          f"with-memory rate; weakest fact {summary['weakest_fact_share']:.0%}); answer KL {summary['answer_kl_without']:.3f}"
          f" -> {summary['answer_kl_adapter']:.3f}; next-token KL share {summary['next_token_kl_share']:.0%}; neutral "
          f"KL {summary['neutral_kl']:.4f}, next token kept {summary['next_token_unchanged']:.0%}, continuation kept "
          f"{summary['continuation_unchanged']:.0%}; leak {summary['leak']:.0%}; {summary['fit_seconds']:.0f} s per "
          f"adapter (patches and fit; the greedy with-memory answers, which both methods need, "
          f"{summary['answer_seconds']:.0f} s more)")
    if result["interference"]:
        print("interference: held-out answers naming the fact with its adapter stacked with k others: " + ", ".join(
            f"k={k}: {rate:.0%}" for k, rate in result["interference"].items()))
    distilled = summary.get("distillation")
    if distilled:
        print(f"context distillation on the first fold of {distilled['facts']} facts: adapter "
              f"{distilled['adapter_rate']:.0%} (ours "
              f"{distilled['ours_adapter_rate']:.0%}), neutral KL {distilled['neutral_kl']:.4f} (ours "
              f"{distilled['ours_neutral_kl']:.4f}), next token kept {distilled['next_token_unchanged']:.0%} (ours "
              f"{distilled['ours_next_token_unchanged']:.0%}), leak "
              f"{distilled['leak']:.0%}; {distilled['seconds']:.0f} s per adapter against "
              f"{distilled['ours_seconds']:.0f} s "
              f"({distilled['seconds'] / distilled['ours_seconds']:.1f}x)")
    goals = [
        ("adapter rate >= 80% of the with-memory rate, pooled",
         summary["adapter_rate"] >= GOAL_ANSWER_SHARE * summary["with_memory_rate"]),
        ("no fact below half its with-memory rate", summary["weakest_fact_share"] >= GOAL_FACT_SHARE),
        ("greedy next token kept on >= 95% of neutral prompts", summary["next_token_unchanged"] >= GOAL_NEXT_TOKEN_UNCHANGED),
        ("mean neutral KL <= 0.02 nats", summary["neutral_kl"] <= GOAL_NEUTRAL_KL),
        ("leak <= 10%", summary["leak"] <= GOAL_LEAK),
    ]
    if distilled:
        goals += [
            ("answer level at least distillation's", distilled["ours_adapter_rate"] >= distilled["adapter_rate"]),
            ("neutral KL at most distillation's", distilled["ours_neutral_kl"] <= distilled["neutral_kl"]),
            ("neutral next token kept at least as often as with distillation's",
             distilled["ours_next_token_unchanged"] >= distilled["next_token_unchanged"]),
            ("a tenth of distillation's time or less", distilled["ours_seconds"] * 10 <= distilled["seconds"]),
        ]
    for name, met in goals:
        print(f"  goal {'met   ' if met else 'MISSED'}  {name}")
    if any("flipped" in fold for row in result["per_fact"].values() for fold in row["folds"]):
        print_explanation(result)


def print_explanation(result: dict) -> None:
    folds = [fold for row in result["per_fact"].values() for fold in row["folds"]]
    margins = [margin for fold in folds for *_, margin in fold["flipped"]]
    print(f"\nheld-out answers (with the memory / with the adapter) where the two differ in naming the fact, and "
          f"flipped neutral prompts; {len(margins)} flips over {len(folds)} adapters, base margin (top-1 minus top-2 "
          f"probability) median {np.median(margins) if margins else 0:.3f}")
    for key, row in result["per_fact"].items():
        print(f"== {key}")
        said = next(fact for fact in load_facts() if fact.key == key).said_in
        for number, fold in enumerate(row["folds"]):
            for question, (with_memory, _without, adapted) in zip(fold["held_out_questions"], fold["answers"],
                                                                  strict=True):
                if said(with_memory) != said(adapted):
                    print(f"  fold {number} {question!r}\n    with the memory: {with_memory!r}\n"
                          f"    with the adapter: {adapted!r}")
            for prompt, before, after, margin in fold["flipped"]:
                print(f"  fold {number} neutral prompt {prompt}: {before!r} -> {after!r}, base margin {margin:.3f}")


def fact_range(text: str) -> range:
    """`--distil-facts`: "N" is the first N facts (0: none), "A:B" the facts A to B-1 (distillation takes 15 to 28
    minutes per adapter on 2 cores, so a run can add facts to an earlier run's instead of repeating them)."""
    try:
        start, _, stop = text.rpartition(":")
        chosen = range(int(start or 0), int(stop))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or A:B (fact indices), got {text!r}") from None
    if chosen.start < 0 or chosen.stop < 0 or (start and not chosen):
        raise argparse.ArgumentTypeError(f"expected 0 <= A < B, got {text!r}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, help="how many of the shipped facts (default: all)")
    parser.add_argument("--folds", type=int, default=FOLDS,
                        help=f"how many of the {FOLDS} folds to run (default: all: every question held out once)")
    parser.add_argument("--distil-facts", type=fact_range, default=range(1),
                        help="facts on whose first fold context distillation also runs: N, the first N (default 1; 0: "
                             "none), or A:B, the facts A to B-1 counted from 0 (3:8: the fourth to the eighth)")
    parser.add_argument("--distil-steps", type=int, default=125)
    parser.add_argument("--rank", type=int, default=answers.RANK)
    parser.add_argument("--ridge", type=float, default=answers.RIDGE)
    parser.add_argument("--preservation", type=float, default=answers.PRESERVATION)
    parser.add_argument("--refinements", type=int, default=answers.REFINEMENTS)
    parser.add_argument("--focus", type=float, default=answers.FOCUS)
    parser.add_argument("--generic", help="a JSON file of generic chats for the preservation term, in the shape of "
                                          "icldaemon/data/generic.json (default: that file)")
    parser.add_argument("--generic-positions", type=int, default=answers.GENERIC_POSITIONS,
                        help=f"generic keys sampled per layer (default {answers.GENERIC_POSITIONS})")
    parser.add_argument("--explain", action="store_true", help="print the held-out answers and the flipped neutral "
                                                               "prompts")
    args = parser.parse_args()
    print_report(run(args.facts, args.distil_facts, args.rank, args.ridge, args.preservation, args.distil_steps,
                     args.folds, args.refinements, args.focus, explain=args.explain, generic_file=args.generic,
                     generic_positions=args.generic_positions))


if __name__ == "__main__":
    main()
