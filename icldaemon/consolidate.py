"""Consolidation: a group's answer-position patches become a down-projection LoRA adapter, checked like an edit.

A group is one memory ("memory:12"), one session ("session:<uuid>") or everything ("all") of the
loaded model, weights revision and method version. When a group has at least `min_patches` answer
patches (retrievals) that no adapter of it has used, they are split by age: the newest `held_out`
share is kept out of the fit. The rest, relevant retrievals and irrelevant ones alike, are fitted into
a LoRA on the down projections with a preservation term on the shipped generic prompts, then refitted on
the keys the adapted model itself produces (docs/method.md §7); with method `distillation`, a LoRA of the
same form is trained on them by context distillation instead, the baseline. The held-out retrievals, rebuilt from
the database, measure it like a model edit: answer level, the answer tokens' KL, specificity on the
neutral prompts, leak. A quality gate accepts or rejects the version; a rejected version is listed with
its reason and never current.

The adapter directory is written under a temporary name and renamed into place, then listed in
`adapters` in one transaction with the patches it used; a directory that is not listed there is never a
finished adapter.
"""

import math
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from icldaemon.assembly import assemble_prompt
from icldaemon.data import load_generic, load_neutral
from icldaemon.engine import answers, edit_figures, generic_cache
from icldaemon.engine.adapters import adapter_for
from icldaemon.engine.loading import LoadedModel
from icldaemon.engine.prompt import build_prompt
from icldaemon.engine.result import METHOD_VERSION
from icldaemon.exceptions import BadInputError, ConsolidationError, IcldaemonError
from icldaemon.logs import get_logger
from icldaemon.staging import staged_directory
from icldaemon.store import adapters as store
from icldaemon.store import queue

SCOPES = ("memory", "session", "all")
METHOD = "down_projection"  # the exact patches fitted (docs/method.md §7)
DISTILLATION = "distillation"  # context distillation by gradient steps, the baseline (engine/distillation.py)
METHODS = (METHOD, DISTILLATION)
MEMORY_TARGETS = ("in_context", "alone")
MIN_PATCHES = 8  # new retrievals a group needs before a new adapter version is fitted
HELD_OUT = 0.25  # share of a group's retrievals (the newest of each kind) kept out of the fit to check the adapter
GROUP_ENERGY = 0.9  # a group adapter's rank: the smallest that keeps this share of every layer's fitted delta
MAX_ABS_LOG_PROB_ERROR = 1e-3  # a group target whose own check misses by more is logged (answer tokens' log-probs)
INTERVAL_MINUTES = 60.0  # minutes between scheduled consolidations
# the quality gate
MIN_ANSWER_SHARE = 0.5  # adapter answer rate at least this share of the with-memory rate on held-out questions
MIN_NEXT_TOKEN_UNCHANGED = 0.9  # share of neutral prompts whose greedy next token the adapter keeps
MAX_NEUTRAL_KL = 0.05  # nats, mean KL(base || adapted) at the next token of the neutral prompts
MAX_LEAK = 0.25  # share of irrelevant held-out questions whose adapted answer says the fact


class ConsolidationSettings(BaseSettings):
    """The scheduled consolidation and its quality gate (ICLD_CONSOLIDATE_...)."""

    model_config = SettingsConfigDict(env_prefix="ICLD_CONSOLIDATE_", env_file=None, extra="ignore")

    interval_minutes: float = Field(default=INTERVAL_MINUTES,
                                    description="Minutes between consolidations; 0 turns the job off.")
    cron: str | None = Field(default=None, description="A crontab expression (UTC) used instead of the interval, "
                                                       "for example '0 3 * * *'.")
    scope: Literal["memory", "session", "all"] = Field(
        default="memory",
        description="What one adapter covers: memory (one per memory), session (one per session) or all (one for "
        "everything).")
    rank: int = Field(default=answers.RANK, ge=1, description="Rank of the LoRA adapters.")
    min_patches: int = Field(default=MIN_PATCHES, ge=2, description="New retrievals a group needs for a new version.")
    ridge: float = Field(default=answers.RIDGE, gt=0, description="Ridge lambda as a share of the mean squared key.")
    preservation: float = Field(default=answers.PRESERVATION, ge=0,
                                description="Weight of the generic prompts against the retrievals in the fit.")
    focus: float = Field(default=answers.FOCUS, ge=0,
                         description="Answer positions weighted by 1 + focus x how much the memory raises their "
                                     "token (nats); 0: every position alike.")
    refinements: int = Field(default=answers.REFINEMENTS, ge=0,
                             description="Refits on the keys the adapted model produces; 0: the exact patches' "
                                         "keys only.")
    held_out: float = Field(default=HELD_OUT, gt=0, lt=1, description="Share of retrievals held out to check.")
    min_answer_share: float = Field(default=MIN_ANSWER_SHARE, ge=0,
                                    description="Gate: adapter answer rate over the with-memory rate, at least.")
    min_next_token_unchanged: float = Field(default=MIN_NEXT_TOKEN_UNCHANGED, ge=0, le=1,
                                            description="Gate: neutral prompts' greedy next token kept, at least.")
    max_neutral_kl: float = Field(default=MAX_NEUTRAL_KL, ge=0, description="Gate: mean neutral KL, nats, at most.")
    max_leak: float = Field(default=MAX_LEAK, ge=0, le=1, description="Gate: leak rate, at most.")


@dataclass(frozen=True)
class QualityGate:
    min_answer_share: float = MIN_ANSWER_SHARE
    min_next_token_unchanged: float = MIN_NEXT_TOKEN_UNCHANGED
    max_neutral_kl: float = MAX_NEUTRAL_KL
    max_leak: float = MAX_LEAK

    def verdict(self, level: edit_figures.AnswerFigures | None, neutral: edit_figures.Specificity,
                leak: edit_figures.Leak) -> str | None:
        """None when the version passes, else the reason it does not."""
        if level is None or level.with_memory_rate == 0:
            return "no held-out question's answer used the memory: nothing to check the adapter against"
        share = level.adapter_rate / level.with_memory_rate
        reasons = []
        if share < self.min_answer_share:
            reasons.append(f"answers name the fact {level.adapter_rate:.0%} of the time with the adapter against "
                           f"{level.with_memory_rate:.0%} with the memory ({share:.0%} < {self.min_answer_share:.0%})")
        if neutral.next_token_unchanged < self.min_next_token_unchanged:
            reasons.append(f"neutral prompts' next token kept {neutral.next_token_unchanged:.0%} < "
                           f"{self.min_next_token_unchanged:.0%}")
        if neutral.mean_kl > self.max_neutral_kl:
            reasons.append(f"neutral KL {neutral.mean_kl:.4f} > {self.max_neutral_kl} nats")
        if leak.examples and leak.rate > self.max_leak:
            reasons.append(f"leak {leak.rate:.0%} > {self.max_leak:.0%}")
        return "; ".join(reasons) or None


@dataclass(frozen=True)
class ConsolidationRequest:
    scope: str = "memory"
    memory_id: int | None = None
    session_id: str | None = None
    rank: int = answers.RANK
    min_patches: int = MIN_PATCHES
    ridge: float = answers.RIDGE
    preservation: float = answers.PRESERVATION
    focus: float = answers.FOCUS
    refinements: int = answers.REFINEMENTS
    held_out: float = HELD_OUT
    gate: QualityGate = QualityGate()
    method: str = METHOD
    # one memory's target: "in_context" (its stored patches: removed from a prompt that keeps its other
    # memories) or "alone" (recomputed: the memory alone in the prompt against no memory, what a model that
    # holds no memory in its context needs); being screened, see docs/consolidation.md
    memory_target: str = "in_context"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise BadInputError(f"scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.memory_id is not None and self.scope != "memory":
            raise BadInputError(f"--memory-id needs scope memory, not {self.scope}")
        if self.session_id is not None and self.scope != "session":
            raise BadInputError(f"--session-id needs scope session, not {self.scope}")
        if self.rank < 1:
            raise BadInputError(f"rank must be at least 1, got {self.rank}")
        if self.min_patches < 2:
            raise BadInputError(f"min_patches must be at least 2 (one to fit, one held out), got {self.min_patches}")
        if self.ridge <= 0:
            raise BadInputError(f"ridge must be positive, got {self.ridge}")
        if self.preservation < 0:
            raise BadInputError(f"preservation must not be negative, got {self.preservation}")
        if self.focus < 0:
            raise BadInputError(f"focus must not be negative, got {self.focus}")
        if self.refinements < 0:
            raise BadInputError(f"refinements must not be negative, got {self.refinements}")
        if not 0 < self.held_out < 1:
            raise BadInputError(f"held_out must be between 0 and 1, got {self.held_out}")
        if self.method not in METHODS:
            raise BadInputError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.memory_target not in MEMORY_TARGETS:
            raise BadInputError(f"memory_target {self.memory_target!r} is not one of {', '.join(MEMORY_TARGETS)}")

    @classmethod
    def from_settings(cls, settings: ConsolidationSettings, **overrides) -> "ConsolidationRequest":
        gate = QualityGate(settings.min_answer_share, settings.min_next_token_unchanged, settings.max_neutral_kl,
                           settings.max_leak)
        values = dict(scope=settings.scope, rank=settings.rank, min_patches=settings.min_patches,
                      ridge=settings.ridge, preservation=settings.preservation, focus=settings.focus,
                      refinements=settings.refinements,
                      held_out=settings.held_out, gate=gate)
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def scope_key(self) -> str | None:
        """The one group asked for, or None for every group of the scope."""
        if self.memory_id is not None:
            return f"memory:{self.memory_id}"
        if self.session_id is not None:
            return f"session:{uuid.UUID(str(self.session_id))}"
        return "all" if self.scope == "all" else None


@dataclass
class AdapterRecord:
    id: int
    scope_key: str
    version: int
    path: Path
    patch_count: int
    held_out_count: int
    status: str
    status_reason: str | None
    answer: edit_figures.AnswerFigures | None
    neutral: edit_figures.Specificity
    leak: edit_figures.Leak
    fit_seconds: float
    method: str = METHOD


@dataclass
class _HeldOut:
    examples: list[edit_figures.AnswerExample]  # retrievals whose with-memory answer used the memory
    leak_prompts: list[list[int]]  # retrievals whose answer did not: the prompt without the memory
    fact_words: frozenset[str]  # what the memory added to its relevant answers, over all of them


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-") or "model"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def stratified_split(kinds, share: float, order) -> tuple[list, list]:
    """(fit, held out) of items in kinds (each a list, oldest first): of each kind the newest `share`, at least
    one where the kind has two or more and never all of it; both lists in `order`."""
    fit, held_out = [], []
    for members in kinds:
        held = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(share * len(members))))
        fit.extend(members[: len(members) - held])
        held_out.extend(members[len(members) - held :])
    return sorted(fit, key=order), sorted(held_out, key=order)


def _question(messages: list | None, text: str | None) -> str:
    if text is not None:
        return text
    return "\n".join(str(message.get("content", "")) for message in messages or [] if isinstance(message, dict))


class Consolidator:
    def __init__(self, url: str, loaded: LoadedModel, adapters_dir: Path, generic_keys_dir: Path | None = None):
        self.url, self.loaded, self.adapters_dir = url, loaded, adapters_dir
        # beside the adapters in the data directory (Settings.adapters_dir is <data_dir>/adapters)
        self.generic_keys_dir = generic_keys_dir or Path(adapters_dir).parent / generic_cache.GENERIC_KEYS_DIR
        self.adapter = adapter_for(loaded.model)
        self.num_layers = self.adapter.num_layers(loaded.model)
        self.d_model = loaded.model.config.hidden_size
        self.key = store.GroupKey(loaded.name, loaded.revision or None, METHOD_VERSION)
        self.stop = answers.stop_token_ids(loaded.model, loaded.tokenizer)
        self.log = get_logger(model=loaded.name)
        self._generic: list[np.ndarray] | None = None
        self._baseline: edit_figures.NeutralBaseline | None = None
        self._sources: dict[int, tuple] = {}  # prompt id -> its source and retrievals, for one group at a time

    def _chat_prompts(self, chats: list[list[dict]]) -> list[list[int]]:
        prompts = []
        for chat in chats:
            try:
                prompts.append(build_prompt(self.loaded.tokenizer, messages=chat).input_ids)
            except (BadInputError, ValueError):  # a tokenizer without a chat template: the text alone
                prompts.append(self.loaded.tokenizer(chat[-1]["content"])["input_ids"])
        return prompts

    def generic(self) -> list[np.ndarray]:
        """The shipped generic prompts' keys, for the fit's preservation term; computed once per model weights and
        kept in the data directory (engine/generic_cache.py)."""
        if self._generic is None:
            prompts = self._chat_prompts(load_generic())
            self.log.info("preservation_keys_started", prompts=len(prompts))
            started = time.perf_counter()
            self._generic = generic_cache.cached_generic_keys(
                self.loaded.model, prompts, self.generic_keys_dir, adapter=self.adapter,
                answer_tokens=answers.ANSWER_TOKENS, stop_ids=self.stop)
            self.log.info("preservation_keys_computed", prompts=len(prompts), rows=len(self._generic[0]),
                          seconds=round(time.perf_counter() - started, 3))
        return self._generic

    def baseline(self) -> edit_figures.NeutralBaseline:
        """The base behaviour on the shipped neutral prompts, for the checks; computed once. The neutral and
        the generic prompts share no prompt."""
        if self._baseline is None:
            self._baseline = edit_figures.neutral_baseline(self.loaded.model, self._chat_prompts(load_neutral()),
                                                           stop_ids=self.stop)
        return self._baseline

    # --- which groups

    def groups(self, connection: queue.Connection, request: ConsolidationRequest) -> list[tuple[str, int, int]]:
        """(scope_key, patches, new patches) of every group due for a new version."""
        rows = store.due_groups(connection, self.key, scope=request.scope, scope_key=request.scope_key,
                                min_patches=request.min_patches)
        if request.scope_key is not None and not rows:
            raise BadInputError(self._why_not_due(connection, request))
        return rows

    def _why_not_due(self, connection: queue.Connection, request: ConsolidationRequest) -> str:
        counted = store.due_groups(connection, self.key, scope=request.scope, scope_key=request.scope_key,
                                   min_patches=0)
        model = f"model {self.loaded.name} (weights {self.loaded.revision or 'unknown'})"
        if not counted:
            others = store.models_of_memory(connection, request.memory_id) if request.memory_id is not None else []
            elsewhere = [f"{patches} of {name} (weights {revision or 'unknown'})" for name, revision, patches in others]
            return (f"{request.scope_key} has no answer patches of {model}"
                    + (f"; it has {', '.join(elsewhere)}" if elsewhere else "")
                    + " (answer patches are recorded while ICLD_ANSWER_TOKENS is above 0)")
        _, patches, new = counted[0]
        return (f"{request.scope_key} has {new} new answer patches of {model} ({patches} in all); at least "
                f"{request.min_patches} are needed (--min-patches)")

    # --- one group

    def _source(self, connection: queue.Connection, prompt_id: int) -> tuple[list | None, str | None, list]:
        """A measured prompt's messages or text and its retrievals, read once per consolidation of a group (the
        split, the fit and the checks each rebuild it)."""
        if prompt_id not in self._sources:
            messages, text = store.prompt_source(connection, prompt_id)
            self._sources[prompt_id] = (messages, text, queue.retrievals(connection, prompt_id))
        return self._sources[prompt_id]

    def _rebuilt(self, connection: queue.Connection, patch: store.StoredAnswerPatch, event: str,
                 group: bool = False, alone: bool = False):
        """The retrieval's token ids as it was measured and without the memory (`group`: without every memory it
        holds, which are all of the group's; `alone`: the memory alone against none, the other memories out of
        both), its source and its retrievals; None (logged) where it can no longer be rebuilt."""
        messages, text, retrievals = self._source(connection, patch.prompt_id)
        try:
            prompt = assemble_prompt(self.loaded.tokenizer, self.loaded.model, messages=messages, text=text,
                                     retrievals=retrievals)
        except BadInputError as exc:
            self.log.warning(event, run_id=patch.run_id, error=str(exc))
            return None
        label = f"memory:{patch.memory_id}"
        labels = {segment.label for segment in prompt.segments}
        if label not in labels:
            self.log.warning(event, run_id=patch.run_id, error=f"{label} is not in the prompt")
            return None
        memories = {name for name in labels if name.startswith("memory:")}
        with_ids = prompt.without(memories - {label}) if alone else prompt.input_ids
        removed = memories if group or alone else {label}
        return with_ids, prompt.without(removed), messages, text, retrievals

    def _refine_examples(self, connection: queue.Connection, fit: list[store.StoredAnswerPatch],
                         event: str = "refinement_skipped", group: bool = False,
                         alone: bool = False) -> list[answers.RefineExample]:
        """The fitted retrievals as the model runs them, with and without the memory (`group`: without all of
        the group's); each rebuilt from the database, one that cannot be is logged as `event` and left out."""
        examples = []
        for patch in fit:
            rebuilt = self._rebuilt(connection, patch, event, group, alone)
            if rebuilt is not None:
                with_ids, without_ids, *_source = rebuilt
                examples.append(answers.RefineExample(with_ids, without_ids, patch.answer_ids))
        return examples

    def _held_out(self, connection: queue.Connection, held_out: list[store.StoredAnswerPatch],
                  group: bool = False, alone: bool = False) -> _HeldOut:
        decode = lambda ids: self.loaded.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        relevant, irrelevant, all_words = [], [], set()
        for patch in held_out:
            rebuilt = self._rebuilt(connection, patch, "held_out_skipped", group, alone)
            if rebuilt is None:
                continue
            with_ids, without_ids, messages, text, retrievals = rebuilt
            content = self._content(patch, retrievals, group)
            without_answer = answers.greedy_answer(self.loaded.model, without_ids, len(patch.answer_ids), self.stop)
            words = edit_figures.fact_words(content, decode(patch.answer_ids), question=_question(messages, text),
                                            without_answer=decode(without_answer))
            if words:
                all_words |= words
                relevant.append(edit_figures.AnswerExample(with_ids, without_ids, edit_figures.says_any(words),
                                                           with_answer_ids=None if alone else patch.answer_ids))
            else:
                irrelevant.append(without_ids)
        return _HeldOut(relevant, irrelevant, frozenset(all_words))

    @staticmethod
    def _content(patch: store.StoredAnswerPatch, retrievals: list[queue.Retrieval], group: bool) -> str:
        """What the memory said (`group`: what all of the prompt's memories said)."""
        if group:
            return "\n".join(r.content or "" for r in retrievals)
        return next(r.content for r in retrievals if r.memory_id == patch.memory_id) or ""

    def _split(self, connection: queue.Connection, patches: list[store.StoredAnswerPatch], share: float,
               group: bool) -> tuple[list[store.StoredAnswerPatch], list[store.StoredAnswerPatch]]:
        """(fit, held out): the newest `share` of the relevant retrievals and of the irrelevant ones, each kind
        apart, so that a kind with two or more retrievals is always checked, and never only one kind.

        Relevant: the stored with-memory answer says a content word of the memory that the question does
        not (the held-out check later also compares with the answer without the memory).
        """
        decode = lambda ids: self.loaded.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        kinds: dict[bool, list[store.StoredAnswerPatch]] = {True: [], False: []}
        for patch in patches:
            messages, text, retrievals = self._source(connection, patch.prompt_id)
            content = self._content(patch, retrievals, group)
            kinds[bool(edit_figures.fact_words(content, decode(patch.answer_ids),
                                               question=_question(messages, text)))].append(patch)
        return stratified_split(kinds.values(), share, order=lambda patch: (patch.run_id, patch.memory_id))

    def _recomputed_targets(self, connection: queue.Connection, fit: list[store.StoredAnswerPatch], log,
                            alone: bool = False
                            ) -> tuple[list[np.ndarray], list[np.ndarray], list[answers.RefineExample]]:
        """Per layer the keys and values of exact patches at each fitted retrieval's answer positions, recomputed
        from the rebuilt prompts (two teacher-forced passes each, each checked by its own patched run) where the
        stored ones are not what the adapted model needs: for a group, removing all of its memories that the
        prompt holds (one row set per prompt); with `alone`, one memory alone against none."""
        if not alone:
            fit = list({patch.run_id: patch for patch in reversed(fit)}.values())[::-1]  # one row set per prompt
        examples = self._refine_examples(connection, fit, "group_target_skipped", group=not alone, alone=alone)
        if not examples:
            raise ConsolidationError(f"none of the {len(fit)} fitted retrievals' prompts can be rebuilt")
        targets = [answers.answer_patch(self.loaded.model, example.with_ids, example.without_ids, example.answer_ids,
                                        self.adapter) for example in examples]
        worst = max(target.max_abs_log_prob_error for target in targets)
        if worst > MAX_ABS_LOG_PROB_ERROR:
            log.warning("group_target_inexact", max_abs_log_prob_error=worst, limit=MAX_ABS_LOG_PROB_ERROR)
        keys = [np.concatenate([target.key[layer_idx] for target in targets]) for layer_idx in range(self.num_layers)]
        values = [np.concatenate([target.value[layer_idx] for target in targets])
                  for layer_idx in range(self.num_layers)]
        log.info("group_targets_computed", retrievals=len(examples), max_abs_log_prob_error=worst)
        return keys, values, examples

    def _fitted(self, connection: queue.Connection, fit: list[store.StoredAnswerPatch], request: ConsolidationRequest,
                generic: list[np.ndarray], log=None) -> tuple[answers.DownProjectionPatch, dict]:
        """The exact patches fitted; with the parameters the version records.

        One memory: its stored patches (float16). A group: the patches of removing all of its memories,
        computed from the rebuilt prompts, one per fitted prompt, at a rank chosen by retained energy (at most
        `request.rank` per memory of the group).
        """
        group = request.scope != "memory"
        energy, rank = None, request.rank
        if group:
            keys, values, examples = self._recomputed_targets(connection, fit, log or self.log)
            memories = len({patch.memory_id for patch in fit})  # every (prompt, memory) retrieval of the fit
            energy, rank = GROUP_ENERGY, request.rank * max(1, memories)
            row_weights_line_up = True
        elif request.memory_target == "alone":
            keys, values, examples = self._recomputed_targets(connection, fit, log or self.log, alone=True)
            row_weights_line_up = True
        else:
            a_tilde = np.concatenate([patch.a_tilde for patch in fit], axis=1)  # [num_layers, pairs, d_model]
            keys = answers.keys_from_inputs(self.loaded.model, a_tilde, self.adapter)
            values = [np.concatenate([patch.value[layer_idx] for patch in fit])
                      for layer_idx in range(self.num_layers)]
            examples = self._refine_examples(connection, fit) if request.refinements or request.focus else []
            row_weights_line_up = len(examples) == len(fit)
        weights = answers.answer_weights(self.loaded.model, examples, request.focus) if examples else None
        # the exact patches' rows are weighted where every fitted retrieval could be rebuilt (their rows line up)
        row_weights = np.concatenate(weights) if weights and row_weights_line_up else None
        patch = answers.fit_down_projection(keys, values, generic, rank=rank, ridge=request.ridge,
                                            preservation=request.preservation, weights=row_weights, energy=energy)
        if request.refinements:
            patch = answers.refine(self.loaded.model, patch, keys, values, examples, generic, ridge=request.ridge,
                                   preservation=request.preservation, refinements=request.refinements,
                                   adapter=self.adapter, weights=weights, key_weights=row_weights)
        return patch, {"ridge": request.ridge, "preservation": request.preservation, "focus": request.focus,
                       "refinements": request.refinements, "energy": energy,
                       "retained_energy": None if patch.retained_energy is None else
                       [round(share, 6) for share in patch.retained_energy],
                       "target": "all of the group's memories removed" if group else
                       "the memory alone against none" if request.memory_target == "alone" else "the memory removed"}

    def _distilled(self, connection: queue.Connection, fit: list[store.StoredAnswerPatch],
                   request: ConsolidationRequest, log) -> tuple[answers.DownProjectionPatch, dict]:
        """The baseline: a LoRA of the same form trained by context distillation on the fitted retrievals'
        answers (their stored patches are not used, only which retrievals and answers they are); with the
        parameters the version records: no ridge and no preservation term (the ridge column holds 0, as the
        trained patch's record does)."""
        from icldaemon.engine.distillation import LEARNING_RATE, STEPS, DistillationExample, distil

        examples = [DistillationExample(example.with_ids, example.without_ids, example.answer_ids)
                    for example in self._refine_examples(connection, fit, "distillation_skipped",
                                                         group=request.scope != "memory")]
        if not examples:
            raise ConsolidationError(f"none of the {len(fit)} fitted retrievals' prompts can be rebuilt to distil on")
        every = max(1, STEPS // 10)

        def progress(step: int, loss: float) -> None:
            if step % every == 0 or step == STEPS:
                log.info("distillation_progress", step=step, steps=STEPS, loss=round(loss, 6))

        patch = distil(self.loaded.model, examples, rank=request.rank, steps=STEPS, learning_rate=LEARNING_RATE,
                       progress=progress)
        return patch, {"ridge": 0.0, "preservation": None, "focus": None, "refinements": None, "steps": STEPS,
                       "learning_rate": LEARNING_RATE}

    def consolidate_group(self, connection: queue.Connection, request: ConsolidationRequest,
                          scope_key: str) -> AdapterRecord:
        self._sources.clear()
        patches = store.answer_patches(connection, self.key, scope=request.scope, scope_key=scope_key,
                                       num_layers=self.num_layers, d_model=self.d_model)
        count = len(patches)
        if count < 2:
            raise BadInputError(f"{scope_key} has {count} retrieval(s); at least 2 are needed (one to fit, one held "
                                "out)")
        group = request.scope != "memory"
        # a group splits whole prompts: one prompt's retrievals of several of its memories never straddle the split
        of_run: dict[int, list[store.StoredAnswerPatch]] = {}
        for patch in patches:
            of_run.setdefault(patch.run_id, []).append(patch)
        units = [members[0] for members in of_run.values()] if group else patches
        fit, held_out = self._split(connection, units, request.held_out, group)
        if not held_out:  # two retrievals of different kinds: the newer is checked
            fit, held_out = units[:-1], units[-1:]
        if not fit:
            raise BadInputError(f"{scope_key} has retrievals of {len(units)} prompt(s); at least 2 are needed (one to "
                                "fit, one held out)")
        if group:
            fit = [patch for unit in fit for patch in of_run[unit.run_id]]
            held_out = [patch for unit in held_out for patch in of_run[unit.run_id]]
        held_count = len(held_out)
        log = self.log.bind(scope_key=scope_key, patches=count, held_out=held_count)
        log.info("consolidation_started")
        baseline = self.baseline()
        # the preservation term's keys, which only the fit uses, once per process and outside the fit's time
        generic = self.generic() if request.method == METHOD else None
        started = time.perf_counter()
        if request.method == DISTILLATION:
            patch, fit_parameters = self._distilled(connection, fit, request, log)
        else:
            patch, fit_parameters = self._fitted(connection, fit, request, generic, log)
        fit_seconds = time.perf_counter() - started
        log.info("adapter_fitted", method=request.method, pairs=patch.pairs, seconds=round(fit_seconds, 3))
        if fit_parameters.get("energy") is not None:
            log.info("group_rank_chosen", rank=patch.rank, energy=fit_parameters["energy"],
                     least_retained=min(patch.retained_energy))
        elif patch.rank < request.rank:
            reason = (f"only {patch.pairs} (retrieval, answer position) pairs to fit, from {len(fit)} retrieval(s)"
                      if patch.pairs < request.rank else f"the model's width is {self.d_model}")
            log.warning("rank_lowered", requested_rank=request.rank, rank=patch.rank, reason=reason)

        checks = self._held_out(connection, list({p.run_id: p for p in held_out}.values()) if group else held_out,
                                group, alone=not group and request.memory_target == "alone")
        level = (edit_figures.answer_figures(self.loaded.model, self.loaded.tokenizer, patch, checks.examples,
                                             stop_ids=self.stop) if checks.examples else None)
        neutral = edit_figures.specificity(self.loaded.model, patch, baseline, stop_ids=self.stop)
        leak = edit_figures.leak(self.loaded.model, self.loaded.tokenizer, patch, checks.leak_prompts,
                                 edit_figures.says_any(checks.fact_words), stop_ids=self.stop)
        reason = request.gate.verdict(level, neutral, leak)
        status = "accepted" if reason is None else "rejected"

        version, listed = store.next_version(connection, self.loaded.name, scope_key)
        directory = self.adapters_dir / _slug(self.loaded.name) / _slug(scope_key) / f"v{version}"
        figures = {"answer": None if level is None else {k: v for k, v in asdict(level).items() if k != "answers"},
                   "neutral": asdict(neutral), "leak": asdict(leak)}
        metadata = {
            "scope_key": scope_key, "version": version, "model": self.loaded.name, "method": request.method,
            "method_version": METHOD_VERSION, "model_revision": self.loaded.revision, "rank": patch.rank,
            **fit_parameters, "status": status, "status_reason": reason,
            "fit_patches": [[p.run_id, p.memory_id] for p in fit],
            "held_out_patches": [[p.run_id, p.memory_id] for p in held_out], "figures": figures,
        }
        self._write_directory(directory, listed, patch, metadata)
        row = {
            "scope": request.scope, "scope_key": scope_key,
            "memory_id": fit[0].memory_id if request.scope == "memory" else None,
            "session_id": scope_key.removeprefix("session:") if request.scope == "session" else None,
            **self.key.parameters(), "version": version, "layers": list(range(patch.num_layers)),
            "rank": patch.rank, "ridge": fit_parameters["ridge"], "patch_count": len(fit),
            "held_out_count": len(held_out), "path": str(directory), "method": request.method, "status": status,
            "status_reason": reason, "preservation": fit_parameters["preservation"], "fit_seconds": fit_seconds,
            "answer_examples": 0 if level is None else level.examples,
            "with_memory_rate": _finite_or_none(level and level.with_memory_rate),
            "without_memory_rate": _finite_or_none(level and level.without_memory_rate),
            "adapter_rate": _finite_or_none(level and level.adapter_rate),
            "answer_kl_without": _finite_or_none(level and level.answer_kl_without),
            "answer_kl_adapter": _finite_or_none(level and level.answer_kl_adapter),
            "next_token_kl_share": _finite_or_none(level and level.next_token_kl_share),
            "neutral_prompts": neutral.prompts, "neutral_kl": _finite_or_none(neutral.mean_kl),
            "neutral_next_token_unchanged": neutral.next_token_unchanged,
            "neutral_continuation_unchanged": neutral.continuation_unchanged,
            "leak_examples": leak.examples, "leak_rate": _finite_or_none(leak.rate),
        }
        del row["method_version"]
        try:
            adapter_id = store.insert_adapter(connection, row, {
                "fit": [(p.run_id, p.memory_id) for p in fit],
                "held_out": [(p.run_id, p.memory_id) for p in held_out],
            })
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("adapter_written", adapter_id=adapter_id, version=version, path=str(directory), method=request.method,
                 rank=patch.rank, status=status, reason=reason, adapter_rate=row["adapter_rate"],
                 with_memory_rate=row["with_memory_rate"], neutral_kl=row["neutral_kl"], leak_rate=row["leak_rate"])
        return AdapterRecord(adapter_id, scope_key, version, directory, len(fit), len(held_out), status, reason,
                             level, neutral, leak, fit_seconds, request.method)

    def _write_directory(self, directory: Path, listed: set[str], patch, metadata: dict) -> None:
        """Write into a temporary sibling and rename it into place: a directory there is complete."""
        def failed(exc: OSError) -> ConsolidationError:
            return ConsolidationError(f"cannot write the adapter directory {directory}: {exc}")

        with staged_directory(directory, failed) as temporary:
            directory.parent.mkdir(parents=True, exist_ok=True)
            if directory.exists() and str(directory) not in listed:
                shutil.rmtree(directory)  # left by a run that stopped between the rename and the listing
            answers.export_lora(self.loaded.model, patch, temporary, base_model=self.loaded.name, metadata=metadata,
                                adapter=self.adapter)

    # --- every due group

    def run(self, request: ConsolidationRequest, *, raise_errors: bool = True) -> list[AdapterRecord]:
        """Consolidate every due group of the request; with raise_errors False a failing group is logged and skipped."""
        records = []
        with queue.connect(self.url) as connection:
            try:
                groups = self.groups(connection, request)
            except BadInputError as exc:
                if raise_errors:
                    raise
                # on a schedule, nothing due is not an error
                self.log.info("consolidation_not_due", scope=request.scope, reason=str(exc))
                return []
            self.log.info("consolidation_due", scope=request.scope, groups=len(groups))
            for scope_key, _patches, _new in groups:
                if not store.try_lock(connection, self.loaded.name, scope_key):
                    self.log.info("consolidation_skipped", scope_key=scope_key, reason="another daemon holds it")
                    continue
                try:
                    records.append(self.consolidate_group(connection, request, scope_key))
                except IcldaemonError as exc:
                    if raise_errors:
                        raise
                    self.log.error("consolidation_failed", scope_key=scope_key, error=str(exc),
                                   error_type=type(exc).__name__)
                finally:
                    store.unlock(connection, self.loaded.name, scope_key)
        return records


def describe(record: AdapterRecord) -> str:
    level, neutral, leak = record.answer, record.neutral, record.leak
    answer = ("no held-out answer used the memory" if level is None else
              f"answers naming the fact: {level.adapter_rate:.0%} with the adapter, {level.with_memory_rate:.0%} with "
              f"the memory, {level.without_memory_rate:.0%} without (of {level.examples}); answer-token KL "
              f"{level.answer_kl_without:.3f} -> {level.answer_kl_adapter:.3f} nats")
    leaked = f"leak {leak.rate:.0%} of {leak.examples}" if leak.examples else "no question to check a leak on"
    verdict = record.status + (f" ({record.status_reason})" if record.status_reason else "")
    fitted = "distilled" if record.method == DISTILLATION else "fitted"
    return (f"{record.scope_key} v{record.version} {verdict}: {fitted} on {record.patch_count} retrievals in "
            f"{record.fit_seconds:.1f} s, checked on {record.held_out_count} held out: {answer}; neutral prompts: KL "
            f"{neutral.mean_kl:.4f} nats, next token kept {neutral.next_token_unchanged:.0%}, continuation kept "
            f"{neutral.continuation_unchanged:.0%}; {leaked}\n  {record.path}")
