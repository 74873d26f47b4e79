"""Context distillation, the baseline: it learns, and leaves the model as it was."""

import numpy as np
import torch
from test_answers import prompts
from test_engine_families import tiny_model

from icldaemon.engine.answers import applied
from icldaemon.engine.distillation import DistillationExample, distil


def answer_kl(model, example, patch=None) -> float:
    """Mean KL(with memory || without) over the answer positions, computed with plain forward passes."""
    with torch.no_grad():
        teacher = model(torch.tensor([example.with_ids + example.answer_ids[:-1]])).logits[0]
        start = len(example.with_ids) - 1
        log_p = torch.log_softmax(teacher[start : start + len(example.answer_ids)].double(), -1)
        ids = torch.tensor([example.without_ids + example.answer_ids[:-1]])
        if patch is None:
            student = model(ids).logits[0]
        else:
            with applied(model, patch):
                student = model(ids).logits[0]
        start = len(example.without_ids) - 1
        log_q = torch.log_softmax(student[start : start + len(example.answer_ids)].double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_distillation_learns_the_memory_and_leaves_the_model_unchanged():
    model = tiny_model("llama")
    examples = [DistillationExample(*prompts(seed)) for seed in (3, 4, 5, 6)]
    probe = torch.tensor([prompts(9)[0]])
    with torch.no_grad():
        before = model(probe).logits.clone()
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    patch = distil(model, examples, rank=4, steps=60, learning_rate=1e-2)

    assert patch.lora_A.shape == (2, 4, 64) and patch.lora_B.shape == (2, 32, 4)
    assert not any("lora" in name for name, _ in model.named_modules())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(probe).logits, before, rtol=0, atol=0)
    without = np.mean([answer_kl(model, example) for example in examples])
    distilled = np.mean([answer_kl(model, example, patch) for example in examples])
    assert distilled < 0.5 * without
