"""Context distillation: the baseline a user would otherwise pick to turn a memory into weights.

A PEFT LoRA on the same modules as the consolidated adapter (every layer's down projection), at the same
rank, trained with AdamW so that the model without the memory matches the model with it on the same
teacher-forced answer tokens:

    loss = sum over examples and answer positions t of KL(p_with(. | with + y_<t) || p_student(. | without + y_<t))
           / the number of answer positions

The teacher is the frozen base model, run once. The trained factors come back as a DownProjectionPatch,
so the same figures measure both methods (`answers.applied`); the LoRA layers are unloaded again, and the
model is left with its own modules and weights, in eval mode, its parameters not requiring grad.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from icldaemon.engine.adapters import max_positions
from icldaemon.engine.answers import DownProjectionPatch, down_projection_names
from icldaemon.exceptions import BadInputError, NumericalError

STEPS = 125  # AdamW steps, each over every example (full batch)
LEARNING_RATE = 2e-3
ADAPTER_NAME = "default"


@dataclass
class DistillationExample:
    with_ids: list[int]  # the prompt with the memory in context
    without_ids: list[int]  # the same prompt without it, closed up
    answer_ids: list[int]  # the with-memory model's own greedy answer (teacher-forced)


def _check(model: PreTrainedModel, examples: Sequence[DistillationExample]) -> None:
    if not examples:
        raise BadInputError("no examples to distil")
    limit = max_positions(model)
    vocabulary = model.get_input_embeddings().num_embeddings
    for index, example in enumerate(examples):
        if not example.with_ids or not example.without_ids or not example.answer_ids:
            raise BadInputError(f"distillation example {index} has an empty prompt or answer")
        for name, prompt in (("with", example.with_ids), ("without", example.without_ids)):
            tokens = len(prompt) + len(example.answer_ids) - 1
            if limit is not None and tokens > limit:
                raise BadInputError(f"distillation example {index} has {tokens} tokens {name} the memory; "
                                    f"the model's context is {limit}")
            ids = [*prompt, *example.answer_ids]
            if min(ids) < 0 or max(ids) >= vocabulary:
                raise BadInputError(f"distillation example {index} has token ids outside the model's vocabulary "
                                    f"of {vocabulary}")


def _answer_log_probs(model, prompt: Sequence[int], answer: Sequence[int]) -> torch.Tensor:
    """Log-probabilities at the positions that predict the answer (the last prompt token on): [T, vocab]."""
    ids = torch.tensor([[*prompt, *answer[:-1]]], device=model.device)
    # the answer positions are the sequence's last len(answer): the LM head runs on those only
    logits = model(input_ids=ids, logits_to_keep=len(answer), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def distil(model: PreTrainedModel, examples: Sequence[DistillationExample], *, rank: int = 4, steps: int = STEPS,
           learning_rate: float = LEARNING_RATE, seed: int = 0,
           progress: Callable[[int, float], None] | None = None) -> DownProjectionPatch:
    """Train a down-projection LoRA by context distillation; returns its factors, the model unchanged.

    `progress(step, loss)` is called after every step with the loss before that step's update (the mean
    KL per answer position, in nats). `seed` fixes PEFT's initialisation of lora_A (lora_B starts at
    zero); the global random state is left as it was.
    """
    from peft import LoraConfig, LoraModel

    _check(model, examples)
    if rank < 1:
        raise BadInputError(f"rank must be at least 1, got {rank}")
    if steps < 1:
        raise BadInputError(f"steps must be at least 1, got {steps}")
    if not learning_rate > 0:
        raise BadInputError(f"the learning rate must be positive, got {learning_rate}")
    pairs = sum(len(example.answer_ids) for example in examples)
    model.eval()
    with torch.no_grad():
        teachers = [_answer_log_probs(model, example.with_ids, example.answer_ids) for example in examples]

    names = down_projection_names(model)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The tuner itself rather than get_peft_model: the PeftModel wrapper also prepares the model for
        # gradient checkpointing (an input hook that unload leaves behind) and reads a deprecated property.
        tuner = LoraModel(model, config, ADAPTER_NAME)
    try:
        layers = [model.get_submodule(name) for name in names]
        factors = [(layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]) for layer in layers]
        for lora_A, lora_B in factors:
            # trained in float32 also on a half-precision model; the LoRA layer casts its input to match
            lora_A.float()
            lora_B.float()
        parameters = [parameter for pair in factors for module in pair for parameter in module.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        # dropout stays off: the student runs in eval mode, as the teacher did
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for example, teacher in zip(examples, teachers, strict=True):
                student = _answer_log_probs(model, example.without_ids, example.answer_ids)
                loss = F.kl_div(student, teacher, reduction="sum", log_target=True) / pairs
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise NumericalError(f"the distillation loss is {total} at step {step}")
            optimizer.step()
            if progress is not None:
                progress(step, total)
        lora_A = np.stack([lora_A.weight.detach().float().cpu().numpy() for lora_A, _ in factors])
        lora_B = np.stack([lora_B.weight.detach().float().cpu().numpy() for _, lora_B in factors])
    finally:
        tuner.unload()
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return DownProjectionPatch(lora_A=lora_A, lora_B=lora_B, ridge=0.0, preservation=0.0, pairs=pairs)
