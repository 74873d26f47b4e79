"""How a consolidated adapter behaves, measured the way model edits are (docs/method.md §7.3).

- *Answer level*: on held-out questions, how often the greedy answer says the memory's fact with the
  memory in context, without it, and without it but with the adapter.
- *Distribution level*: the mean KL from the with-memory model to the model without the memory (with
  and without the adapter) over the teacher-forced tokens of the with-memory answer; the next-token
  KL share (the first answer token only) is kept as a secondary figure, named for what it is.
- *Specificity*: on generic prompts, KL(base || adapted) at the next token, and whether the greedy
  next token and the greedy continuation stay the same.
- *Leak*: on questions about other things, how often the adapted model says this memory's fact.
"""

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from icldaemon.engine.answers import ANSWER_TOKENS, DownProjectionPatch, applied, greedy_answer, greedy_answers
from icldaemon.engine.measure import kl_divergence
from icldaemon.exceptions import BadInputError, NumericalError

Said = Callable[[str], bool]  # whether a decoded answer says the memory's fact


@dataclass
class AnswerExample:
    """A held-out question: the prompt with the memory and without it (token ids), and how to judge an answer."""

    with_ids: list[int]
    without_ids: list[int]
    said: Said
    with_answer_ids: list[int] | None = None  # the with-memory greedy answer, where already known


@dataclass
class AnswerFigures:
    examples: int
    with_memory_rate: float
    without_memory_rate: float
    adapter_rate: float
    answer_kl_without: float  # mean KL(with memory || without) over the with-memory answer's tokens, nats
    answer_kl_adapter: float  # the same with the adapter
    next_token_kl_share: float  # 1 - KL_adapter / KL_without at the first answer token only
    answers: list[tuple[str, str, str]] = field(default_factory=list, repr=False)  # with, without, adapter


@dataclass
class NeutralBaseline:
    """The base model on the generic prompts, computed once for all the adapters checked against it."""

    prompts: list[list[int]]
    log_probs: list[torch.Tensor]  # [vocab] at the last position, float64
    continuations: list[list[int]]


@dataclass
class Specificity:
    prompts: int
    mean_kl: float  # mean KL(base || adapted) at the next token, nats
    next_token_unchanged: float  # share of prompts whose greedy next token is the base model's
    continuation_unchanged: float  # share whose greedy continuation is the base model's, token for token


@dataclass
class Leak:
    examples: int
    rate: float  # share of the questions about other things whose adapted answer says the fact


def _scope(model, patch: DownProjectionPatch | None):
    return nullcontext() if patch is None else applied(model, patch)


def log_probs(model: PreTrainedModel, ids: Sequence[int], positions: slice | list[int] | int) -> torch.Tensor:
    """The model's next-token log-probabilities (float64) at `positions` of `ids`."""
    logits = model(input_ids=torch.tensor([list(ids)], device=model.device)).logits[0, positions]
    if not torch.isfinite(logits).all():
        raise NumericalError("non-finite logits while measuring an adapter")
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, clamped at 0 (rounding can make an exact match slightly negative)."""
    return kl_divergence(log_p, log_q).clamp_min(0)


@torch.no_grad()
def answer_figures(model: PreTrainedModel, tokenizer, patch: DownProjectionPatch | None,
                   examples: Sequence[AnswerExample], *, answer_tokens: int = ANSWER_TOKENS,
                   stop_ids: Sequence[int] = ()) -> AnswerFigures:
    """Answer-level and distribution-level figures of `patch` on held-out questions."""
    if not examples:
        raise BadInputError("no held-out questions to measure the adapter on")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    said = {"with": [], "without": [], "adapter": []}
    kl_without, kl_adapter, first_without, first_adapter, texts = [], [], [], [], []
    for example in examples:
        with_answer = example.with_answer_ids or greedy_answer(model, example.with_ids, answer_tokens, stop_ids)
        without_answer = greedy_answer(model, example.without_ids, answer_tokens, stop_ids)
        with _scope(model, patch):
            adapter_answer = greedy_answer(model, example.without_ids, answer_tokens, stop_ids)
        decoded = decode(with_answer), decode(without_answer), decode(adapter_answer)
        texts.append(decoded)
        for name, text in zip(("with", "without", "adapter"), decoded, strict=True):
            said[name].append(example.said(text))
        count = len(with_answer)
        with_positions = list(range(len(example.with_ids) - 1, len(example.with_ids) - 1 + count))
        without_positions = list(range(len(example.without_ids) - 1, len(example.without_ids) - 1 + count))
        reference = log_probs(model, example.with_ids + with_answer[:-1], with_positions)
        plain = _kl(reference, log_probs(model, example.without_ids + with_answer[:-1], without_positions))
        with _scope(model, patch):
            adapted = _kl(reference, log_probs(model, example.without_ids + with_answer[:-1], without_positions))
        kl_without.append(float(plain.mean()))
        kl_adapter.append(float(adapted.mean()))
        first_without.append(float(plain[0]))
        first_adapter.append(float(adapted[0]))
    mean_first_without = float(np.mean(first_without))
    return AnswerFigures(
        examples=len(examples),
        with_memory_rate=float(np.mean(said["with"])),
        without_memory_rate=float(np.mean(said["without"])),
        adapter_rate=float(np.mean(said["adapter"])),
        answer_kl_without=float(np.mean(kl_without)),
        answer_kl_adapter=float(np.mean(kl_adapter)),
        next_token_kl_share=(1.0 - float(np.mean(first_adapter)) / mean_first_without
                             if mean_first_without > 0 else float("nan")),
        answers=texts,
    )


@torch.no_grad()
def neutral_baseline(model: PreTrainedModel, prompts: Sequence[Sequence[int]], *, answer_tokens: int = ANSWER_TOKENS,
                     stop_ids: Sequence[int] = ()) -> NeutralBaseline:
    if not prompts:
        raise BadInputError("no generic prompts to measure specificity on")
    prompts = [list(ids) for ids in prompts]
    return NeutralBaseline(
        prompts=prompts,
        log_probs=[log_probs(model, ids, -1) for ids in prompts],
        continuations=greedy_answers(model, prompts, answer_tokens, stop_ids),
    )


@torch.no_grad()
def specificity(model: PreTrainedModel, patch: DownProjectionPatch, baseline: NeutralBaseline, *,
                answer_tokens: int = ANSWER_TOKENS, stop_ids: Sequence[int] = ()) -> Specificity:
    """What the adapter does to prompts it has nothing to do with."""
    kls, same_token = [], []
    with applied(model, patch):
        for ids, base_log_probs in zip(baseline.prompts, baseline.log_probs, strict=True):
            adapted = log_probs(model, ids, -1)
            kls.append(float(_kl(base_log_probs, adapted)))
            same_token.append(int(adapted.argmax()) == int(base_log_probs.argmax()))
        continuations = greedy_answers(model, baseline.prompts, answer_tokens, stop_ids)
    same_continuation = [ours == base for ours, base in zip(continuations, baseline.continuations, strict=True)]
    return Specificity(prompts=len(kls), mean_kl=float(np.mean(kls)),
                       next_token_unchanged=float(np.mean(same_token)),
                       continuation_unchanged=float(np.mean(same_continuation)))


@torch.no_grad()
def leak(model: PreTrainedModel, tokenizer, patch: DownProjectionPatch, prompts: Sequence[Sequence[int]],
         said: Said, *, answer_tokens: int = ANSWER_TOKENS, stop_ids: Sequence[int] = ()) -> Leak:
    """How often the adapted model says the fact in answers to questions about other things."""
    if not prompts:
        return Leak(examples=0, rate=float("nan"))
    hits = []
    with applied(model, patch):
        for ids in prompts:
            hits.append(said(tokenizer.decode(greedy_answer(model, ids, answer_tokens, stop_ids),
                                              skip_special_tokens=True)))
    return Leak(examples=len(hits), rate=float(np.mean(hits)))


# ---- judging a stored retrieval's answers, where no answer string is known ------------------------------

_WORD = re.compile(r"\w+")
# Words a memory shares with almost any answer about the user: never the fact itself.
FUNCTION_WORDS = frozenset(
    "the and for are was were has have had his her its their our your you user user's users is am be been "
    "with from that this what which who whom called named name names lives live works work likes like "
    "favourite favorite does did not".split()
)


def _words(text: str) -> set[str]:
    return {word.lower() for word in _WORD.findall(text)}


def fact_words(memory: str, with_answer: str, *, question: str = "", without_answer: str = "") -> frozenset[str]:
    """The memory's words that its with-memory answer says and that neither the question nor the answer
    without the memory has: what the memory added to the answer (empty: the answer did not use it).

    Content words only: three letters or more, or a digit; not a function word.
    """
    candidates = {word for word in _words(memory) & _words(with_answer)
                  if (len(word) >= 3 or any(character.isdigit() for character in word))
                  and word not in FUNCTION_WORDS}
    return frozenset(candidates - _words(question) - _words(without_answer))


def says_any(words: frozenset[str]) -> Said:
    """A judge: an answer says the fact when it has any of `words` (never, for no words)."""
    return lambda text: bool(words) and bool(words & _words(text))
