"""Screen the shipped facts on a model: how often it names each fact with and without its memory.

    python -m icldaemon.data.screen [--model M] [--keys pet,job] [--show]

For each fact and each of its questions, the chat is a system message (the memories block, as
`render_memories` writes it, in front of SYSTEM_PROMPT) and the question. With memory, the block
holds the fact's memory and two other facts' memories as distractors (the next two facts in file
order; the fact's place among the three turns with the question's index). Without memory, the
system message is SYSTEM_PROMPT alone. The model answers greedily in MAX_NEW_TOKENS tokens, and a
reply counts when `Fact.said_in` finds the fact in it. Prints, per fact, the count of questions
answered with and without memory.

On the bundled SmolLM2-135M-Instruct (CPU, float32, one thread, about 8 minutes) every fact is named
with its memory on 12 to 16 of its 20 questions (166 of 240 in all) and without it on none. The
model's failures are mostly refusals ("as a helpful assistant, I'm ...") to plain "What is my X?"
questions, and now and then a distractor's value given instead; the questions keep a few of those.
"""

import argparse
import sys

import torch

from icldaemon.data import Fact, load_facts
from icldaemon.engine.prompt import Memory, build_prompt

SYSTEM_PROMPT = "You are a helpful assistant. Use what you remember about the user.\n"
MAX_NEW_TOKENS = 16
DISTRACTORS = 2


def memories_for(facts: list[Fact], index: int, question_index: int) -> list[Memory]:
    """The fact's memory among DISTRACTORS other facts' memories, at a place set by the question."""
    others = [(index + step) % len(facts) for step in range(1, DISTRACTORS + 1)]
    order = list(others)
    order.insert(question_index % (DISTRACTORS + 1), index)
    return [Memory(content=facts[i].content, key=facts[i].key, id=i + 1) for i in order]


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


@torch.no_grad()
def reply(loaded, messages: list[dict], memories: list[Memory]) -> str:
    tokenizer, model = loaded.tokenizer, loaded.model
    if memories:
        input_ids = build_prompt(tokenizer, messages=messages, memories=memories).input_ids
    else:
        input_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(input_ids, dict) or hasattr(input_ids, "input_ids"):
            input_ids = input_ids["input_ids"]
    ids = torch.tensor([list(input_ids)], device=model.device)
    output = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        temperature=None, top_p=None, top_k=None,
    )
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def screen(loaded, facts: list[Fact], keys: set[str] | None = None, show: bool = False) -> list[tuple[str, int, int]]:
    rows = []
    for index, fact in enumerate(facts):
        if keys and fact.key not in keys:
            continue
        with_memory = without_memory = 0
        for question_index, question in enumerate(fact.questions):
            answered = reply(loaded, chat(question), memories_for(facts, index, question_index))
            bare = reply(loaded, chat(question), [])
            with_memory += fact.said_in(answered)
            without_memory += fact.said_in(bare)
            if show:
                print(f"  [{fact.key}] {question}\n    with:    {answered!r}\n    without: {bare!r}", flush=True)
        rows.append((fact.key, with_memory, without_memory))
        print(f"{fact.key:<20} with memory {with_memory:2d}/{len(fact.questions)}   "
              f"without memory {without_memory:2d}/{len(fact.questions)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or hub id (default: the bundled model)")
    parser.add_argument("--keys", default=None, help="comma-separated fact keys to screen (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show", action="store_true", help="print every question and both replies")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from icldaemon.engine.loading import load_model
    from icldaemon.settings import load_settings

    settings = load_settings()
    loaded = load_model(args.model, models_dir=settings.models_dir, device=args.device, dtype="float32")
    keys = set(args.keys.split(",")) if args.keys else None
    rows = screen(loaded, load_facts(), keys, args.show)
    total = sum(len(fact.questions) for fact in load_facts() if not keys or fact.key in keys)
    print(f"{'total':<20} with memory {sum(r[1] for r in rows):3d}/{total}  "
          f"without memory {sum(r[2] for r in rows):3d}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
