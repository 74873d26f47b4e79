"""The memory bank measured the way a user would meet it: traffic through the queue, adapters from the daemon.

Facts of many kinds (icldaemon/data/bank.json, a *dev* split on which defaults may be screened and a
*test* split touched only to report) become memories of one user. Each fact's memory is retrieved for
its direct questions as a retriever does, at rank 1, 2 or 3 beside the memories of two neighbouring
facts, so that it is also retrieved for their questions (irrelevant retrievals); the with-memory answers
are the model's own and sometimes ignore or refuse the fact. Everything goes through the product's path:

1. the prompts are submitted with `icl_submit` into a fresh database and measured by the daemon's worker
   (`Service.run_once`), which stores each retrieval's answer patches as float16;
2. `Consolidator` (what `icldaemon consolidate` runs) fits one adapter per memory (`--scope memory`) and
   one adapter for the whole group (`--scope all`: the bench's database holds only this user), with its
   own hold-out and quality gate, and writes them as PEFT directories;
3. each adapter is read back from its directory and judged on questions that were never submitted:
   the fact's held-out direct questions and its questions in other styles (terse, indirect, embedded in a
   task), greedy answers, with no memory in the context.

Conditions: the memory in the system prompt (with its two neighbours, as retrieved), no memory, the
fact's own adapter, all per-memory adapters stacked (deltas summed), a router over the per-memory adapters
(the question's mean hidden state against each memory's fitted questions' centroid; below the router's
threshold no adapter), and the group adapter. Figures: answers naming the fact (of the with-memory rate,
pooled and per kind), cross-fact confusion (an answer naming another fact's answer), neutral prompts (KL
at the next token, greedy next token kept), leak of each per-memory adapter into its neighbours'
questions, and the time per consolidated memory.

    .venv/bin/python bench/bench_bank.py --split dev --facts 8 [--fit-questions 8] [--keep-database]
    .venv/bin/python bench/bench_bank.py --split test --facts 8 --learn 8     # learned before asked

With `--learn N` no question of the dataset is submitted: each memory gets the N questions that
`icldaemon learn` generates (templates over its key), and every one of its dataset questions is judged.

Needs a PostgreSQL server where it may create a database (ICLD_BENCH_SERVER_URL, default
postgresql://postgres@127.0.0.1:5432/postgres).
"""

import argparse
import contextlib
import json
import os
import platform
import random
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
import torch
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.consolidate import ConsolidationRequest, Consolidator
from icldaemon.data import load_bank, load_neutral
from icldaemon.engine import answers, edit_figures
from icldaemon.engine.loading import load_model
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.learn import learn_memory, questions_for
from icldaemon.service import Service
from icldaemon.settings import load_settings
from icldaemon.store import migrate
from icldaemon.worker import Worker

SERVER_URL_VARIABLE = "ICLD_BENCH_SERVER_URL"
DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SYSTEM = "You are a helpful assistant. Use what you remember about the user."
NEIGHBOURS = 2  # memories retrieved beside the fact's own, so each memory is also retrieved for their questions
JUDGED_STYLES = ("terse", "indirect", "task")  # never submitted: the style shift
ANSWER_TOKENS = 24
ROUTER_QUANTILE = 0.05  # the router's threshold: this quantile of the fitted questions' similarity to their centroid
SEED = 20261208
# the bank issue's goals
GOAL_ANSWER_SHARE = 0.8
GOAL_KIND_SHARE = 0.5
GOAL_CONFUSION = 0.05
GOAL_NEXT_TOKEN_UNCHANGED = 0.95
GOAL_NEUTRAL_KL = 0.02
GOAL_LEAK = 0.10


@dataclass
class Judged:
    """Per condition, for every judged question: whether the answer names the fact, or another fact."""

    names: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    confused: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    kinds: dict[str, dict[str, list[bool]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))


def names_fact(answer: str, accepted) -> bool:
    lowered = answer.lower()
    return any(form.lower() in lowered for form in accepted)


class Bank:
    def __init__(self, loaded, facts, fit_questions: int, learned: int = 0):
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.facts, self.fit_questions, self.learned = facts, fit_questions, learned
        self.stop = answers.stop_token_ids(self.model, self.tokenizer)
        self.random = random.Random(SEED)
        self.memory_ids: list[int] = []

    def neighbours(self, index: int) -> list[int]:
        return [(index + step) % len(self.facts) for step in range(1, NEIGHBOURS + 1)]

    def fitted(self, index: int) -> list[str]:
        if self.learned:
            return questions_for(self.facts[index].key, self.facts[index].content, self.learned)
        return list(self.facts[index].questions["direct"][: self.fit_questions])

    def judged(self, index: int) -> list[str]:
        questions = self.facts[index].questions
        direct = questions["direct"] if self.learned else questions["direct"][self.fit_questions:]
        return [*direct, *(q for style in JUDGED_STYLES for q in questions[style])]

    def retrieved(self, index: int) -> list[int]:
        """The fact's memory and its neighbours' in a retriever's order: the fact at rank 1, 2 or 3."""
        order = self.neighbours(index)
        order.insert(self.random.randrange(len(order) + 1), index)
        return order

    def messages(self, question: str) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]

    def prompt_ids(self, question: str, memory_indices=()) -> list[int]:
        memories = [Memory(content=self.facts[i].content, key=self.facts[i].key, id=self.memory_ids[i])
                    for i in memory_indices]
        return build_prompt(self.tokenizer, messages=self.messages(question), memories=memories).input_ids

    def answer(self, ids: list[int], patch=None) -> str:
        with answers.applied(self.model, patch) if patch is not None else contextlib.nullcontext():
            answer_ids = answers.greedy_answer(self.model, ids, ANSWER_TOKENS, self.stop)
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True)

    @torch.no_grad()
    def embedding(self, question: str) -> np.ndarray:
        ids = self.tokenizer(question, return_tensors="pt")["input_ids"].to(self.model.device)
        hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        vector = hidden.mean(dim=0).double().cpu().numpy()
        return vector / np.linalg.norm(vector)


def fresh_database(server_url: str) -> str:
    name = f"icld_bench_bank_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    return url


def drop_database(server_url: str, url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def submit_traffic(bank: Bank, url: str, session_id: str) -> int:
    """Store the memories and queue every fitted question with its retrievals; returns the prompt count."""
    count = 0
    with psycopg.connect(url) as connection:
        for fact in bank.facts:
            bank.memory_ids.append(connection.execute("SELECT memory_id FROM icl_put_memory(%s, %s)",
                                                      (fact.key, fact.content)).fetchone()[0])
    if bank.learned:  # what `icldaemon learn` queues, each memory in its own learn session
        return sum(len(learn_memory(url, memory_id, bank.learned)) for memory_id in bank.memory_ids)
    with psycopg.connect(url) as connection:
        for index in range(len(bank.facts)):
            for question in bank.fitted(index):
                memory_ids = [bank.memory_ids[i] for i in bank.retrieved(index)]
                connection.execute("SELECT icl_submit(%s::jsonb, %s::bigint[], session_id => %s::uuid)",
                                   (json.dumps(bank.messages(question)), memory_ids, session_id))
                count += 1
    return count


@torch.no_grad()
def per_prompt_specificity(bank: Bank, prompts, patches) -> tuple[float, float]:
    """Mean next-token KL(base || adapted) and greedy next token kept, each prompt with its own patch (or none)."""
    kls, kept = [], []
    for ids, patch in zip(prompts, patches, strict=True):
        base = edit_figures.log_probs(bank.model, ids, -1)
        if patch is None:
            kls.append(0.0)
            kept.append(True)
            continue
        with answers.applied(bank.model, patch):
            adapted = edit_figures.log_probs(bank.model, ids, -1)
        kls.append(float(torch.sum(base.exp() * (base - adapted))))
        kept.append(int(adapted.argmax()) == int(base.argmax()))
    return float(np.mean(kls)), float(np.mean(kept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["dev", "test"], required=True)
    parser.add_argument("--facts", type=int, default=8, help="the first N facts of the split")
    parser.add_argument("--fit-questions", type=int, default=8, help="direct questions submitted per fact")
    parser.add_argument("--learn", type=int, default=0, metavar="N",
                        help="submit no dataset question: N generated questions per memory (icldaemon learn)")
    parser.add_argument("--memory-target", choices=["in_context", "alone"], default="in_context",
                        help="what each memory's adapter is fitted on (ConsolidationRequest.memory_target)")
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args()
    server_url = os.environ.get(SERVER_URL_VARIABLE, DEFAULT_SERVER_URL)

    settings = load_settings()
    print(f"# bench_bank {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}, split {args.split}, {args.facts} facts, "
          + (f"{args.learn} generated questions each (learned before asked)" if args.learn
             else f"{args.fit_questions} fitted questions each"), flush=True)
    loaded = load_model(None, models_dir=settings.models_dir, device="cpu", dtype="float32")
    facts = load_bank(args.split)[: args.facts]
    bank = Bank(loaded, facts, args.fit_questions, args.learn)
    url = fresh_database(server_url)
    adapters_dir = Path(tempfile.mkdtemp(prefix="icld-bank-adapters-"))
    try:
        run(bank, url, adapters_dir, settings, args)
    finally:
        if not args.keep_database:
            drop_database(server_url, url)
        else:
            print(f"database kept: {url}; adapters in {adapters_dir}")


def run(bank: Bank, url: str, adapters_dir: Path, settings, args) -> None:
    session_id = str(uuid.uuid4())
    started = time.perf_counter()
    prompts = submit_traffic(bank, url, session_id)
    service = Service(Worker(url, bank.loaded, worker_id="bench-bank"))
    counts = service.run_once()
    measured_seconds = time.perf_counter() - started
    print(f"traffic: {prompts} prompts, each fact's memory retrieved {len(bank.fitted(0))} times for its own "
          f"questions and about {NEIGHBOURS * len(bank.fitted(0))} for others'; measured by the worker in "
          f"{measured_seconds:.0f} s ({measured_seconds / prompts:.2f} s per prompt): {counts}", flush=True)

    consolidator = Consolidator(url, bank.loaded, adapters_dir,
                                generic_keys_dir=Path(settings.data_dir) / "generic-keys")
    consolidator.generic()
    consolidator.baseline()  # warm: the preservation keys and the neutral baseline outside the timed fits
    own, own_seconds = {}, []
    for index, memory_id in enumerate(bank.memory_ids):
        started = time.perf_counter()
        records = consolidator.run(ConsolidationRequest(scope="memory", memory_id=memory_id, min_patches=2,
                                                        memory_target=args.memory_target))
        own_seconds.append(time.perf_counter() - started)
        record = records[-1]
        own[index] = answers.load_lora(record.path)
        print(f"  adapter of {bank.facts[index].key!r}: {record.status}"
              f"{' (' + record.status_reason + ')' if record.status_reason else ''}, rank {own[index].rank}, "
              f"{own_seconds[-1]:.0f} s", flush=True)
    started = time.perf_counter()
    group_record = consolidator.run(ConsolidationRequest(scope="all", min_patches=2))[-1]
    group_seconds = time.perf_counter() - started
    group = answers.load_lora(group_record.path)
    print(f"  group adapter ({len(bank.facts)} memories): {group_record.status}"
          f"{' (' + group_record.status_reason + ')' if group_record.status_reason else ''}, rank {group.rank}, "
          f"{group_seconds:.0f} s", flush=True)
    stacked = own[0]
    for index in range(1, len(bank.facts)):
        stacked = stacked + own[index]

    # the router: each memory's centroid over the questions it was fitted on (the ones submitted)
    centroids = []
    for index in range(len(bank.facts)):
        vectors = np.stack([bank.embedding(q) for q in bank.fitted(index)])
        centroid = vectors.mean(axis=0)
        centroids.append(centroid / np.linalg.norm(centroid))
    own_similarity = [float(bank.embedding(q) @ centroids[i]) for i in range(len(bank.facts)) for q in bank.fitted(i)]
    threshold = float(np.quantile(own_similarity, ROUTER_QUANTILE))

    def routed(question: str):
        similarity = np.stack(centroids) @ bank.embedding(question)
        best = int(similarity.argmax())
        return (best if similarity[best] >= threshold else None), float(similarity[best])

    judged, routed_right, routed_total = Judged(), 0, 0
    others = {i: [form for j, fact in enumerate(bank.facts) if j != i for form in fact.answer[:1]]
              for i in range(len(bank.facts))}
    for index, fact in enumerate(bank.facts):
        for question in bank.judged(index):
            choice, _similarity = routed(question)
            routed_total += 1
            routed_right += choice == index
            conditions = {
                "with memory": bank.answer(bank.prompt_ids(question, bank.retrieved(index))),
                "no memory": bank.answer(bank.prompt_ids(question)),
                "own adapter": bank.answer(bank.prompt_ids(question), own[index]),
                # what its target assumed: the other memories of its retrievals still in the context
                "neighbours only": bank.answer(bank.prompt_ids(question, bank.neighbours(index))),
                "own adapter, neighbours in context": bank.answer(bank.prompt_ids(question, bank.neighbours(index)),
                                                                  own[index]),
                "stacked": bank.answer(bank.prompt_ids(question), stacked),
                "router": bank.answer(bank.prompt_ids(question), None if choice is None else own[choice]),
                "group adapter": bank.answer(bank.prompt_ids(question), group),
            }
            for name, text in conditions.items():
                hit = names_fact(text, fact.answer)
                judged.names[name].append(hit)
                judged.kinds[name][fact.kind].append(hit)
                judged.confused[name].append(any(form.lower() in text.lower() for form in others[index]))
        print(f"  judged {fact.key!r}: " + ", ".join(
            f"{name} {sum(judged.names[name][-len(bank.judged(index)):])}" for name in judged.names), flush=True)

    # neutral prompts and leak
    neutral = consolidator._chat_prompts(load_neutral())
    baseline = consolidator.baseline()
    own_specificity = [edit_figures.specificity(bank.model, own[i], baseline, stop_ids=bank.stop)
                       for i in range(len(bank.facts))]
    stacked_specificity = edit_figures.specificity(bank.model, stacked, baseline, stop_ids=bank.stop)
    group_specificity = edit_figures.specificity(bank.model, group, baseline, stop_ids=bank.stop)
    neutral_texts = [chat[-1]["content"] for chat in load_neutral()]
    router_choices = [routed(text)[0] for text in neutral_texts]
    router_kl, router_kept = per_prompt_specificity(bank, neutral, [None if c is None else own[c]
                                                                    for c in router_choices])
    leaks = []
    for index, fact in enumerate(bank.facts):
        for other in bank.neighbours(index):
            for question in bank.judged(other)[:2]:
                leaks.append(names_fact(bank.answer(bank.prompt_ids(question), own[index]), fact.answer))

    report(bank, judged, {
        "own adapter": (float(np.mean([s.mean_kl for s in own_specificity])),
                        float(np.mean([s.next_token_unchanged for s in own_specificity]))),
        "stacked": (stacked_specificity.mean_kl, stacked_specificity.next_token_unchanged),
        "router": (router_kl, router_kept),
        "group adapter": (group_specificity.mean_kl, group_specificity.next_token_unchanged),
    }, leaks, routed_right, routed_total, sum(c is not None for c in router_choices), len(router_choices),
        own_seconds, group_seconds, group.rank)


def report(bank, judged, specificity, leaks, routed_right, routed_total, routed_neutral, neutral_count, own_seconds,
           group_seconds, group_rank) -> None:
    with_memory = judged.names["with memory"]
    reference = sum(with_memory)
    print(f"\n## held-out answers naming the fact, of {len(with_memory)} ({len(bank.facts)} facts x "
          f"{len(bank.judged(0))} questions never submitted: held-out direct ones and {', '.join(JUDGED_STYLES)})")
    print("| condition | names the fact | of the with-memory rate | weakest kind (share) | confusion | "
          "neutral KL | next token kept |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, hits in judged.names.items():
        share = sum(hits) / reference if reference else float("nan")
        kinds = []
        for kind, kind_hits in judged.kinds[name].items():
            kind_reference = sum(judged.kinds["with memory"][kind])
            if kind_reference:
                kinds.append((sum(kind_hits) / kind_reference, kind))
        weakest = f"{min(kinds)[1]} ({min(kinds)[0]:.0%})" if kinds else "-"
        confusion = float(np.mean(judged.confused[name]))
        kl, kept = specificity.get(name, (float("nan"), float("nan")))
        print(f"| {name} | {sum(hits)} | {share:.0%} | {weakest} | {confusion:.1%} | {kl:.4f} | {kept:.1%} |")
    print(f"\nleak of each per-memory adapter into its neighbours' questions: {np.mean(leaks):.1%} of {len(leaks)}")
    print(f"router: {routed_right} of {routed_total} judged questions routed to their own memory; "
          f"{routed_neutral} of {neutral_count} neutral prompts routed to some adapter")
    print(f"time: {np.mean(own_seconds):.0f} s per memory's adapter (warm: preservation keys cached), group adapter "
          f"of {len(bank.facts)} memories {group_seconds:.0f} s at rank {group_rank}")
    goals = {"answers pooled": GOAL_ANSWER_SHARE, "confusion": GOAL_CONFUSION,
             "next token kept": GOAL_NEXT_TOKEN_UNCHANGED, "neutral KL": GOAL_NEUTRAL_KL, "leak": GOAL_LEAK}
    print("goals: " + ", ".join(f"{name} {value}" for name, value in goals.items()))


if __name__ == "__main__":
    main()
