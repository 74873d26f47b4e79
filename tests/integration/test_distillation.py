"""Context distillation, the baseline: it learns the memory, and leaves the model as it was."""

from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_engine_families import VOCAB, tiny_model

from icldaemon.engine.answers import applied, greedy_answer
from icldaemon.engine.distillation import DistillationExample, distil
from icldaemon.exceptions import BadInputError

ANCHOR, MEMORY, QUESTION, ANSWER = 4, 7, 9, 5  # tokens
# weights larger than the default 0.02, so that the memory moves the answer's distribution (KL ~0.36 nats)
INITIALIZER_RANGE = 0.2
STEPS, LEARNING_RATE = 30, 2e-2  # the tiny model converges faster than the bundled one: a short run suffices


def example(seed: int, model) -> DistillationExample:
    """Random tokens: anchor + memory + question with the memory, anchor + question without; the greedy answer."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (ANCHOR + MEMORY + QUESTION,), generator=generator).tolist()
    with_ids = ids
    without_ids = ids[:ANCHOR] + ids[ANCHOR + MEMORY :]
    return DistillationExample(with_ids, without_ids, greedy_answer(model, with_ids, ANSWER))


def answer_kls(model, example: DistillationExample, patch=None) -> list[float]:
    """KL(with memory || without) at each answer position, from two plain forward passes over the whole sequence."""
    with torch.no_grad():
        teacher = model(torch.tensor([example.with_ids + example.answer_ids[:-1]])).logits[0].double()
        ids = torch.tensor([example.without_ids + example.answer_ids[:-1]])
        if patch is None:
            student = model(ids).logits[0].double()
        else:
            with applied(model, patch):
                student = model(ids).logits[0].double()
    kls = []
    for t in range(len(example.answer_ids)):
        log_p = torch.log_softmax(teacher[len(example.with_ids) - 1 + t], -1)
        log_q = torch.log_softmax(student[len(example.without_ids) - 1 + t], -1)
        kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
    return kls


def pooled_kl(model, examples, patch=None) -> float:
    kls = [kl for example in examples for kl in answer_kls(model, example, patch)]
    return sum(kls) / len(kls)


@pytest.fixture(scope="module")
def distilled():
    model = tiny_model("llama", initializer_range=INITIALIZER_RANGE)
    examples = [example(seed, model) for seed in (3, 4, 5, 6)]
    probe = torch.tensor([torch.randint(1, VOCAB, (24,), generator=torch.Generator().manual_seed(9)).tolist()])
    with torch.no_grad():
        logits = model(probe).logits.clone()
    weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    modules = {name: type(module) for name, module in model.named_modules()}
    attributes = set(vars(model))
    rng_state = torch.random.get_rng_state()
    losses = []
    patch = distil(model, examples, rank=4, steps=STEPS, learning_rate=LEARNING_RATE,
                   progress=lambda step, loss: losses.append((step, loss)))
    return SimpleNamespace(model=model, examples=examples, probe=probe, logits=logits, weights=weights,
                           modules=modules, attributes=attributes, rng_state=rng_state, losses=losses, patch=patch)


def test_the_model_is_left_exactly_as_it_was(distilled):
    model = distilled.model
    assert {name: type(module) for name, module in model.named_modules()} == distilled.modules
    assert not any(isinstance(module, BaseTunerLayer) or "lora" in name for name, module in model.named_modules())
    assert set(vars(model)) == distilled.attributes  # no peft_config left behind
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, distilled.weights[name], rtol=0, atol=0)
        assert not parameter.requires_grad, name
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(distilled.probe).logits, distilled.logits, rtol=0, atol=0)
    assert torch.equal(torch.random.get_rng_state(), distilled.rng_state)


def test_distillation_halves_the_answer_kl(distilled):
    model, examples = distilled.model, distilled.examples
    without = pooled_kl(model, examples)
    patched = pooled_kl(model, examples, distilled.patch)
    assert without > 0.1  # the memory matters to the answer
    assert patched < 0.5 * without
    # the first step's loss is the KL before training (lora_B starts at zero), as the reference computes it
    steps, losses = zip(*distilled.losses, strict=True)
    assert list(steps) == list(range(1, STEPS + 1))
    assert losses[0] == pytest.approx(without, rel=1e-4)
    assert losses[-1] < 0.5 * losses[0]


def test_the_patch_matches_the_model(distilled):
    patch, config = distilled.patch, distilled.model.config
    assert patch.lora_A.shape == (config.num_hidden_layers, 4, config.intermediate_size)
    assert patch.lora_B.shape == (config.num_hidden_layers, config.hidden_size, 4)
    assert patch.lora_A.dtype.kind == "f" and patch.lora_B.dtype.kind == "f"
    assert patch.rank == 4 and patch.pairs == sum(len(example.answer_ids) for example in distilled.examples)
    assert patch.ridge == 0 and patch.preservation == 0
    assert abs(patch.lora_B).max() > 0  # trained: PEFT starts lora_B at zero


def test_the_same_seed_gives_the_same_patch(distilled):
    model, examples = distilled.model, distilled.examples[:2]
    first = distil(model, examples, steps=2, seed=1)
    second = distil(model, examples, steps=2, seed=1)
    other = distil(model, examples, steps=2, seed=2)
    torch.testing.assert_close(torch.as_tensor(first.lora_A), torch.as_tensor(second.lora_A), rtol=0, atol=0)
    assert not torch.equal(torch.as_tensor(first.lora_A), torch.as_tensor(other.lora_A))


def test_bad_input_is_named(distilled):
    model, good = distilled.model, distilled.examples[0]
    with pytest.raises(BadInputError, match="no examples"):
        distil(model, [])
    with pytest.raises(BadInputError, match="example 1 has an empty prompt or answer"):
        distil(model, [good, DistillationExample(good.with_ids, good.without_ids, [])])
    with pytest.raises(BadInputError, match="context is 256"):
        distil(model, [DistillationExample(good.with_ids * 20, good.without_ids, good.answer_ids)])
    with pytest.raises(BadInputError, match="vocabulary of 97"):
        distil(model, [DistillationExample(good.with_ids, good.without_ids + [VOCAB], good.answer_ids)])
    assert not any("lora" in name for name, _ in model.named_modules())
