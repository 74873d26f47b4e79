"""Context distillation: the baseline a user would otherwise pick to turn a memory into weights.

A PEFT LoRA on the same modules as the consolidated adapter (every layer's down projection), at the same
rank, trained with AdamW so that the model without the memory matches the model with it on the same
teacher-forced answer tokens: the mean over answer positions of KL(p_with || p_student). The trained
factors come back as a DownProjectionPatch, so the same figures measure both; the model is left as it
was (the LoRA layers are unloaded).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from icldaemon.engine.answers import DownProjectionPatch, down_projection_names
from icldaemon.exceptions import BadInputError

STEPS = 125  # AdamW steps, each over every example
LEARNING_RATE = 2e-3


@dataclass
class DistillationExample:
    with_ids: list[int]  # the prompt with the memory in context
    without_ids: list[int]  # the same prompt without it, closed up
    answer_ids: list[int]  # the with-memory model's own greedy answer (teacher-forced)


def _positions(prompt: Sequence[int], answer: Sequence[int]) -> list[int]:
    return list(range(len(prompt) - 1, len(prompt) - 1 + len(answer)))


def distil(model: PreTrainedModel, examples: Sequence[DistillationExample], *, rank: int = 4, steps: int = STEPS,
           learning_rate: float = LEARNING_RATE, seed: int = 0,
           progress: Callable[[int, float], None] | None = None) -> DownProjectionPatch:
    """Train a down-projection LoRA by context distillation; returns its factors, the model unchanged."""
    from peft import LoraConfig, get_peft_model

    if not examples:
        raise BadInputError("no examples to distil")
    if steps < 1 or rank < 1:
        raise BadInputError(f"steps and rank must be at least 1, got {steps} and {rank}")
    device = model.device
    with torch.no_grad():
        teachers = []
        for example in examples:
            logits = model(input_ids=torch.tensor([example.with_ids + example.answer_ids[:-1]], device=device)).logits
            teachers.append(torch.log_softmax(logits[0, _positions(example.with_ids, example.answer_ids)].float(), -1))
    names = down_projection_names(model)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none")
    student = get_peft_model(model, config)
    try:
        student.train()
        parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate)
        pairs = sum(len(example.answer_ids) for example in examples)
        for step in range(steps):
            optimizer.zero_grad()
            total = 0.0
            for example, teacher in zip(examples, teachers, strict=True):
                ids = torch.tensor([example.without_ids + example.answer_ids[:-1]], device=device)
                logits = student(input_ids=ids).logits[0, _positions(example.without_ids, example.answer_ids)]
                log_q = torch.log_softmax(logits.float(), -1)
                loss = (teacher.exp() * (teacher - log_q)).sum() / pairs
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            if progress:
                progress(step + 1, total)
        lora_A = np.stack([student.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.detach()
                           .float().cpu().numpy() for name in names])
        lora_B = np.stack([student.get_submodule(f"base_model.model.{name}").lora_B["default"].weight.detach()
                           .float().cpu().numpy() for name in names])
    finally:
        student.unload()
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
    return DownProjectionPatch(lora_A=lora_A, lora_B=lora_B, ridge=0.0, preservation=0.0,
                               pairs=sum(len(example.answer_ids) for example in examples))
