"""Answer-position patches, the down-projection fit and its LoRA adapter, against independent computations."""

import numpy as np
import pytest
import torch
from engine_reference import run_recording
from test_engine_families import VOCAB, tiny_model

from icldaemon.engine import answers
from icldaemon.engine.adapters import adapter_for
from icldaemon.exceptions import BadInputError, UnsupportedArchitectureError

FAMILIES = ["llama", "qwen2", "phi3", "gpt2", "gpt_neox", "falcon_h1", "granitemoehybrid"]


def prompts(seed: int = 3, answer_tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (30,), generator=generator).tolist()
    with_ids = ids[:20]
    without_ids = ids[:4] + ids[11:20]  # the "memory" ids[4:11] taken out, closed up
    return with_ids, without_ids, ids[20 : 20 + answer_tokens]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_one_token_answer_patch_is_the_exact_patch_at_the_query(family):
    model = tiny_model(family)
    with_ids, without_ids, answer = prompts(answer_tokens=1)
    patch = answers.answer_patch(model, with_ids, without_ids, answer)
    full, _ = run_recording(model, with_ids)
    own, _ = run_recording(model, without_ids)
    # from the second layer on: the first layer sees the query's own embedding (its own position)
    hybrid, _ = run_recording(model, without_ids, overwrite=[own["h"][0], *full["h"][1:]])
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    for layer_idx in range(len(blocks) - 1):
        a_tilde = hybrid["a"][layer_idx]
        np.testing.assert_allclose(patch.a_tilde[layer_idx, 0], a_tilde.numpy(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            mlp_output = blocks[layer_idx].get_submodule(adapter.mlp)(a_tilde[None, None])[0, 0]
        # what joins the residual after the MLP module: its output times the block's own factor (GraniteMoeHybrid)
        mlp_output = mlp_output * adapter.mlp_output_factor(blocks[layer_idx])
        # the value is what the down projection must add: the residual's change over the factors after it
        expected = (full["h"][layer_idx + 1] - (hybrid["m"][layer_idx] + mlp_output)) / adapter.down_projection_factor(
            blocks[layer_idx])
        np.testing.assert_allclose(patch.value[layer_idx, 0], expected.numpy(), rtol=1e-4, atol=1e-5)
    assert patch.max_abs_log_prob_error < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_rank_one_down_projection_patches_reproduce_every_answer_position(family):
    """An independent check: hooks of the test's own add dD_t = v_t k_t^T / |k_t|^2 at each position."""
    model = tiny_model(family)
    with_ids, without_ids, answer = prompts()
    patch = answers.answer_patch(model, with_ids, without_ids, answer)
    adapter = adapter_for(model)
    positions = list(range(len(without_ids) - 1, len(without_ids) - 1 + len(answer)))
    handles = []
    for layer_idx, block in enumerate(adapter.blocks(model)):
        key = torch.as_tensor(patch.key[layer_idx], dtype=torch.float64)
        value = torch.as_tensor(patch.value[layer_idx], dtype=torch.float64)

        def add(module, args, output, key=key, value=value):
            output = output.clone()
            for row, position in enumerate(positions):
                k = args[0][0, position].double()
                output[0, position] += (value[row] * (k @ key[row]) / (key[row] @ key[row])).float()
            return output

        handles.append(block.get_submodule(adapter.down_proj).register_forward_hook(add))
    try:
        with torch.no_grad():
            patched = model(torch.tensor([without_ids + answer[:-1]])).logits[0, positions]
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        full_positions = list(range(len(with_ids) - 1, len(with_ids) - 1 + len(answer)))
        full = model(torch.tensor([with_ids + answer[:-1]])).logits[0, full_positions]
        plain = model(torch.tensor([without_ids + answer[:-1]])).logits[0, positions]
    assert (patched - full).abs().max() < 1e-4
    assert (plain - full).abs().max() > 1e-2  # the memory mattered


def test_keys_are_recomputed_from_the_stored_mlp_inputs():
    model = tiny_model("llama")
    patch = answers.answer_patch(model, *prompts())
    keys = answers.keys_from_inputs(model, patch.a_tilde)
    for layer_idx, key in enumerate(keys):
        np.testing.assert_allclose(key, patch.key[layer_idx], rtol=1e-5, atol=1e-6)


def ridge_reference(keys, values, generic, rank, ridge, preservation):
    """The normal equations of the stacked least-squares problem, solved in the primal, then an SVD."""
    count = len(keys)
    weight = np.sqrt(preservation * count / len(generic))
    inputs = np.concatenate([keys, weight * generic])
    targets = np.concatenate([values, np.zeros((len(generic), values.shape[1]))])
    penalty = ridge * np.mean(np.sum(keys**2, axis=1))
    delta = np.linalg.solve(inputs.T @ inputs + penalty * np.eye(inputs.shape[1]), inputs.T @ targets).T
    u, s, vt = np.linalg.svd(delta)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


@pytest.mark.parametrize(("count", "generic_count"), [(6, 5), (40, 30)], ids=["dual", "primal"])
def test_the_fit_is_the_ridge_solution_with_preservation(count, generic_count):
    generator = np.random.default_rng(0)
    d_ff, d_model = 48, 16
    keys = [generator.normal(size=(count, d_ff)) for _ in range(2)]
    values = [generator.normal(size=(count, d_model)) for _ in range(2)]
    generic = [generator.normal(size=(generic_count, d_ff)) for _ in range(2)]
    patch = answers.fit_down_projection(keys, values, generic, rank=3, ridge=0.1, preservation=2.0)
    assert patch.lora_A.shape == (2, 3, d_ff) and patch.lora_B.shape == (2, d_model, 3)
    for layer_idx in range(2):
        expected = ridge_reference(keys[layer_idx], values[layer_idx], generic[layer_idx], 3, 0.1, 2.0)
        np.testing.assert_allclose(patch.lora_B[layer_idx] @ patch.lora_A[layer_idx], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("count", "generic_count"), [(6, 5), (40, 30)], ids=["dual", "primal"])
def test_weighted_rows_give_the_weighted_ridge_solution(count, generic_count):
    """Against the normal equations written out: D = V^T W K (K^T W K + mu G^T G + lambda I)^-1, W = w / mean(w)."""
    generator = np.random.default_rng(2)
    d_ff, d_model, ridge, preservation = 48, 16, 0.1, 2.0
    keys, values = generator.normal(size=(count, d_ff)), generator.normal(size=(count, d_model))
    generic = generator.normal(size=(generic_count, d_ff))
    weights = generator.uniform(0.5, 6.0, size=count)
    patch = answers.fit_down_projection([keys], [values], [generic], rank=d_model, ridge=ridge,
                                        preservation=preservation, weights=weights)
    w = np.diag(weights / weights.mean())
    mu = preservation * count / generic_count
    penalty = ridge * np.mean(np.sum(keys**2, axis=1))  # of the rows as given: the weights do not move the ridge
    expected = values.T @ w @ keys @ np.linalg.inv(keys.T @ w @ keys + mu * generic.T @ generic
                                                    + penalty * np.eye(d_ff))
    np.testing.assert_allclose(patch.lora_B[0] @ patch.lora_A[0], expected, rtol=1e-6, atol=1e-9)
    # weights that are all alike are no weights at all
    alike = answers.fit_down_projection([keys], [values], [generic], rank=4, weights=np.full(count, 3.0))
    plain = answers.fit_down_projection([keys], [values], [generic], rank=4)
    np.testing.assert_allclose(alike.lora_B[0] @ alike.lora_A[0], plain.lora_B[0] @ plain.lora_A[0], rtol=1e-9)


@pytest.mark.parametrize("weights", [np.ones(5), np.array([1.0, 2.0, -1.0, 1.0, 1.0, 1.0]), np.zeros(6),
                                     np.array([1.0, np.nan, 1.0, 1.0, 1.0, 1.0])],
                         ids=["too few", "negative", "all zero", "nan"])
def test_bad_row_weights_are_refused_by_name(weights):
    generator = np.random.default_rng(3)
    with pytest.raises(BadInputError, match="weights must be 6 finite non-negative numbers"):
        answers.fit_down_projection([generator.normal(size=(6, 8))], [generator.normal(size=(6, 4))],
                                    weights=weights)


def test_preservation_keeps_generic_inputs_nearly_unchanged():
    generator = np.random.default_rng(1)
    keys, values = [generator.normal(size=(8, 40))], [generator.normal(size=(8, 10))]
    generic = [generator.normal(size=(30, 40))]
    free = answers.fit_down_projection(keys, values, generic, rank=8, ridge=0.01, preservation=0.0)
    kept = answers.fit_down_projection(keys, values, generic, rank=8, ridge=0.01, preservation=10.0)

    def moved(patch):
        return np.linalg.norm(generic[0] @ (patch.lora_B[0] @ patch.lora_A[0]).T)

    assert moved(kept) < 0.2 * moved(free)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_h1"])
def test_the_exported_adapter_loads_in_peft_as_a_plain_down_projection_lora(family, tmp_path):
    from peft import PeftModel

    model = tiny_model(family)
    patches = [answers.answer_patch(model, *prompts(seed)) for seed in (3, 4, 5)]
    layers = range(adapter_for(model).num_layers(model))
    patch = answers.fit_down_projection(
        [np.concatenate([p.key[layer_idx] for p in patches]) for layer_idx in layers],
        [np.concatenate([p.value[layer_idx] for p in patches]) for layer_idx in layers], rank=4)
    answers.export_lora(model, patch, tmp_path / "adapter", base_model="tiny")
    ids = torch.tensor([prompts(7)[0]])
    with torch.no_grad():
        base = model(ids).logits
        with answers.applied(model, patch):
            hooked = model(ids).logits
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path / "adapter")).eval()
    config = peft_model.peft_config["default"]
    assert not config.lora_bias and set(config.target_modules) == set(answers.down_projection_names(model))
    loaded_again = peft_model.load_adapter(str(tmp_path / "adapter"), adapter_name="again")
    assert loaded_again.missing_keys == [] and loaded_again.unexpected_keys == []
    peft_model.delete_adapter("again")
    with torch.no_grad():
        loaded = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert (hooked - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, hooked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)


def test_families_whose_mlp_output_is_normalised_are_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="post_feedforward_layernorm"):
        answers.answer_patch(tiny_model("gemma3"), *prompts())


def _rows_by_hand(model, patch, with_ids, without_ids, answer):
    """The refinement's rows from the test's own hooks: per layer the down projection's input at the answer
    positions of the adapted run without the memory, and full increment - adapted increment + the patch's addition."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)

    def run(ids, positions, lora):
        record = {"in": {}, "out": {}, "key": {}, "added": {}}
        handles = []
        for layer_idx, block in enumerate(blocks):
            def before(module, args, kwargs, layer_idx=layer_idx):
                hidden = args[0] if args else kwargs["hidden_states"]
                record["in"][layer_idx] = hidden[0, positions].clone()

            def after(module, args, kwargs, output, layer_idx=layer_idx):
                hidden = output[0] if isinstance(output, tuple) else output
                record["out"][layer_idx] = hidden[0, positions].clone()

            def down(module, args, output, layer_idx=layer_idx):
                record["key"][layer_idx] = args[0][0, positions].clone()
                if lora is None:
                    return None
                delta = torch.as_tensor(lora.lora_B[layer_idx] @ lora.lora_A[layer_idx], dtype=torch.float32)
                added = args[0] @ delta.T
                record["added"][layer_idx] = added[0, positions].clone()
                return output + added

            handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(block.register_forward_hook(after, with_kwargs=True))
            handles.append(block.get_submodule(adapter.down_proj).register_forward_hook(down))
        try:
            with torch.no_grad():
                model(torch.tensor([ids + answer[:-1]]))
        finally:
            for handle in handles:
                handle.remove()
        return record

    full = run(with_ids, list(range(len(with_ids) - 1, len(with_ids) - 1 + len(answer))), None)
    ours = run(without_ids, list(range(len(without_ids) - 1, len(without_ids) - 1 + len(answer))), patch)
    keys, values = [], []
    for layer_idx, block in enumerate(blocks):
        full_increment = full["out"][layer_idx] - full["in"][layer_idx]
        our_increment = ours["out"][layer_idx] - ours["in"][layer_idx]
        factor = adapter.down_projection_factor(block)
        keys.append(ours["key"][layer_idx].numpy())
        values.append(((full_increment - our_increment) / factor + ours["added"][layer_idx]).numpy())
    return keys, values


def _assert_fits_exact_and_refined_rows(fitted, patches, rows, generic, layers, weights=None):
    """`fitted` is the fit of the exact patches' rows and the by-hand `rows` together, at rank 4."""
    expected = answers.fit_down_projection(
        [np.concatenate([*(p.key[layer_idx] for p in patches), *(r[0][layer_idx] for r in rows)])
         for layer_idx in layers],
        [np.concatenate([*(p.value[layer_idx] for p in patches), *(r[1][layer_idx] for r in rows)])
         for layer_idx in layers], generic, rank=4, weights=weights)
    for layer_idx in layers:
        np.testing.assert_allclose(fitted.lora_B[layer_idx] @ fitted.lora_A[layer_idx],
                                   expected.lora_B[layer_idx] @ expected.lora_A[layer_idx], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon_h1"])
def test_refinement_refits_on_the_adapted_models_own_keys(family):
    model = tiny_model(family)
    cases = [prompts(seed) for seed in (3, 4, 5)]
    patches = [answers.answer_patch(model, *case) for case in cases]
    generic = answers.generic_keys(model, [prompts(9)[0]])
    direct = answers.fit_answer_patches(patches, generic, rank=4)
    refined = answers.fit_answer_patches(patches, generic, rank=4, model=model,
                                         prompts=[(w, wo) for w, wo, _ in cases], refinements=1, focus=0)
    layers = range(adapter_for(model).num_layers(model))
    rows = [_rows_by_hand(model, direct, *case) for case in cases]
    _assert_fits_exact_and_refined_rows(refined, patches, rows, generic, layers)
    assert refined.pairs == direct.pairs == sum(p.positions for p in patches)
    unrefined = answers.fit_answer_patches(patches, generic, rank=4, model=model,
                                           prompts=[(w, wo) for w, wo, _ in cases], refinements=0, focus=0)
    np.testing.assert_array_equal(unrefined.lora_A, direct.lora_A)


def test_a_second_refinement_replaces_the_first_ones_rows_with_its_own():
    """Two refinements: the exact patches' rows and the rows of a run under the first refinement's fit, by hand;
    the first refinement's own rows are not fitted again."""
    model = tiny_model("llama")
    cases = [prompts(seed) for seed in (3, 4, 5)]
    patches = [answers.answer_patch(model, *case) for case in cases]
    generic = answers.generic_keys(model, [prompts(9)[0]])
    pairs = [(w, wo) for w, wo, _ in cases]
    once = answers.fit_answer_patches(patches, generic, rank=4, model=model, prompts=pairs, refinements=1, focus=0)
    twice = answers.fit_answer_patches(patches, generic, rank=4, model=model, prompts=pairs, refinements=2, focus=0)
    layers = range(adapter_for(model).num_layers(model))
    rows = [_rows_by_hand(model, once, *case) for case in cases]
    _assert_fits_exact_and_refined_rows(twice, patches, rows, generic, layers)
    # the first layer's rows are the same in every refinement (its input is the embeddings, whatever the fit);
    # above it the second run's keys and values differ from the first's
    assert not np.allclose(twice.lora_B[-1] @ twice.lora_A[-1], once.lora_B[-1] @ once.lora_A[-1], rtol=1e-3)


def test_answer_positions_are_weighted_by_how_much_the_memory_raises_their_token():
    """The weights from the test's own forward passes: 1 + focus * max(0, log p(y_t | with) - log p(y_t | without));
    the fit and its refinement weigh the exact patches' rows and the refinement's rows by them."""
    model = tiny_model("llama")
    cases = [prompts(seed) for seed in (3, 4, 5)]
    patches = [answers.answer_patch(model, *case) for case in cases]
    generic = answers.generic_keys(model, [prompts(9)[0]])
    examples = [answers.RefineExample(w, wo, answer) for w, wo, answer in cases]

    def token_log_probs(ids, answer):
        with torch.no_grad():
            logits = model(torch.tensor([ids + answer[:-1]])).logits[0, len(ids) - 1:]
        return torch.log_softmax(logits.double(), -1)[torch.arange(len(answer)), answer].numpy()

    # a random tiny model's memory raises tokens by hundredths of a nat: a large focus makes the weights differ
    focus = 50.0
    by_hand = [1.0 + focus * np.maximum(token_log_probs(w, answer) - token_log_probs(wo, answer), 0.0)
               for w, wo, answer in cases]
    weights = answers.answer_weights(model, examples, focus=focus)
    for ours, expected in zip(weights, by_hand, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert max(float(w.max()) for w in weights) > 1.5  # some positions weigh much more than others
    assert all((w == 1.0).all() for w in answers.answer_weights(model, examples, focus=0.0))
    with pytest.raises(BadInputError, match="focus must not be negative"):
        answers.answer_weights(model, examples, focus=-1.0)

    layers = range(adapter_for(model).num_layers(model))
    rows_weights = np.concatenate(by_hand)
    initial = answers.fit_down_projection([np.concatenate([p.key[i] for p in patches]) for i in layers],
                                          [np.concatenate([p.value[i] for p in patches]) for i in layers], generic,
                                          rank=4, weights=rows_weights)
    refined = answers.fit_answer_patches(patches, generic, rank=4, model=model, prompts=[(w, wo) for w, wo, _ in cases],
                                         refinements=1, focus=focus)
    rows = [_rows_by_hand(model, initial, *case) for case in cases]
    _assert_fits_exact_and_refined_rows(refined, patches, rows, generic, layers,
                                        weights=np.concatenate([rows_weights, rows_weights]))


def test_refinement_brings_the_adapted_model_closer_to_the_one_with_the_memory():
    """On the fitted retrievals themselves, at full rank: the adapted model's answer log-probabilities move
    towards the with-memory model's when the fit sees the keys that the adapted model produces."""
    model = tiny_model("llama")
    cases = [prompts(seed) for seed in (3, 4, 5, 6)]
    patches = [answers.answer_patch(model, *case) for case in cases]

    def distance(patch):
        total = 0.0
        for with_ids, without_ids, answer in cases:
            with torch.no_grad():
                full = torch.log_softmax(
                    model(torch.tensor([with_ids + answer[:-1]])).logits[0, len(with_ids) - 1:], -1)
                with answers.applied(model, patch):
                    ours = torch.log_softmax(
                        model(torch.tensor([without_ids + answer[:-1]])).logits[0, len(without_ids) - 1:], -1)
            total += float((full.exp() * (full - ours)).sum(-1).mean())
        return total

    pairs = [(w, wo) for w, wo, _ in cases]
    direct = answers.fit_answer_patches(patches, rank=16, ridge=1e-3)
    refined = answers.fit_answer_patches(patches, rank=16, ridge=1e-3, model=model, prompts=pairs, refinements=1,
                                         focus=0)
    assert distance(refined) < 0.7 * distance(direct)


def test_generic_keys_put_every_answer_position_first_then_sample_the_prompts():
    model = tiny_model("llama")
    generic = [prompts(seed)[0] for seed in (11, 12)]
    stop = [VOCAB - 1]
    replies = [answers.greedy_answer(model, ids, 4, stop) for ids in generic]
    adapter = adapter_for(model)
    expected_answers, expected_prompts = [], []
    for ids, reply in zip(generic, replies, strict=True):
        recorded = {}
        down = adapter.blocks(model)[1].get_submodule(adapter.down_proj)
        handle = down.register_forward_hook(lambda module, args, output: recorded.update(key=args[0][0].clone()))
        try:
            with torch.no_grad():
                model(torch.tensor([ids + reply[:-1]]))
        finally:
            handle.remove()
        expected_answers.append(recorded["key"][len(ids) - 1:])
        expected_prompts.append(recorded["key"][1:len(ids) - 1])
    answer_rows = torch.cat(expected_answers).numpy()
    prompt_rows = torch.cat(expected_prompts).numpy()

    keys = answers.generic_rows(model, generic, limit=len(answer_rows) + 5, answer_tokens=4, stop_ids=stop)
    assert keys[1].shape == (len(answer_rows) + 5, answer_rows.shape[1])
    np.testing.assert_allclose(keys[1][: len(answer_rows)], answer_rows, rtol=1e-4, atol=1e-5)
    chosen = np.linspace(0, len(prompt_rows) - 1, 5).round().astype(int)
    np.testing.assert_allclose(keys[1][len(answer_rows):], prompt_rows[chosen], rtol=1e-4, atol=1e-5)

    plain = answers.generic_rows(model, generic, limit=10_000)
    assert len(plain[1]) == sum(len(ids) - 1 for ids in generic)


def test_generic_keys_keep_the_rows_second_moment_in_at_most_d_ff_rows_and_fit_as_every_row_does():
    model = tiny_model("llama")
    generic = [prompts(seed)[0] for seed in range(20, 26)]
    rows = answers.generic_rows(model, generic, limit=10_000)
    keys = answers.generic_keys(model, generic, limit=10_000)
    d_ff = model.config.intermediate_size
    assert len(rows[0]) > d_ff, "the case needs more rows than the down projection's input has dimensions"
    for layer_rows, layer_keys in zip(rows, keys, strict=True):
        assert layer_keys.shape == (d_ff, d_ff)
        np.testing.assert_allclose(layer_keys.T.astype(np.float64) @ layer_keys / len(layer_keys),
                                   layer_rows.T.astype(np.float64) @ layer_rows / len(layer_rows), rtol=1e-4, atol=1e-6)
    patches = [answers.answer_patch(model, *prompts(seed)) for seed in (3, 4)]
    layers = range(len(rows))
    fit_keys = [np.concatenate([patch.key[layer_idx] for patch in patches]) for layer_idx in layers]
    fit_values = [np.concatenate([patch.value[layer_idx] for patch in patches]) for layer_idx in layers]
    full_rank = model.config.hidden_size
    with_rows = answers.fit_down_projection(fit_keys, fit_values, rows, rank=full_rank, preservation=3.0)
    with_keys = answers.fit_down_projection(fit_keys, fit_values, keys, rank=full_rank, preservation=3.0)
    for layer_idx in layers:
        np.testing.assert_allclose(with_keys.lora_B[layer_idx] @ with_keys.lora_A[layer_idx],
                                   with_rows.lora_B[layer_idx] @ with_rows.lora_A[layer_idx], rtol=1e-4, atol=1e-6)
    # sampled with the model's answers, more rows than d_ff but fewer than there are: the same rows' moment
    stop = [VOCAB - 1]
    sampled = answers.generic_rows(model, generic, limit=d_ff + 7, answer_tokens=3, stop_ids=stop)
    reduced = answers.generic_keys(model, generic, limit=d_ff + 7, answer_tokens=3, stop_ids=stop)
    assert len(sampled[0]) == d_ff + 7 < len(rows[0])
    for layer_rows, layer_keys in zip(sampled, reduced, strict=True):
        np.testing.assert_allclose(layer_keys.T.astype(np.float64) @ layer_keys / len(layer_keys),
                                   layer_rows.T.astype(np.float64) @ layer_rows / len(layer_rows), rtol=1e-4, atol=1e-6)
    # fewer rows than d_ff are kept as they are
    few = answers.generic_keys(model, generic[:1], limit=10)
    np.testing.assert_array_equal(few[0], answers.generic_rows(model, generic[:1], limit=10)[0])


@pytest.mark.parametrize("sample", [answers.generic_rows, answers.generic_keys])
def test_generic_keys_refuse_an_empty_sample_by_name(sample):
    model = tiny_model("llama")
    generic = [prompts(9)[0]]
    with pytest.raises(BadInputError, match="generic positions to sample must be at least 1, got 0"):
        sample(model, generic, limit=0)
    with pytest.raises(BadInputError, match="need a position after the first .*: got 2 prompts of at most 1 tokens"):
        sample(model, [[5], []], limit=10)
    assert len(sample(model, generic, limit=1)[0]) == 1  # the smallest sample still has its row


def test_the_rank_chosen_by_energy_is_the_smallest_that_keeps_the_share_in_every_layer(tmp_path):
    generator = np.random.default_rng(3)
    keys = [generator.normal(size=(40, 24)) for _ in range(3)]
    # each layer's values of a known rank, so that the fitted deltas' spectra differ by layer
    values = [generator.normal(size=(40, rank)) @ generator.normal(size=(rank, 12)) for rank in (2, 5, 3)]

    full = answers.fit_down_projection(keys, values, rank=12, ridge=0.01, preservation=0.0)
    chosen = answers.fit_down_projection(keys, values, rank=12, ridge=0.01, preservation=0.0, energy=0.95)

    shares = []
    for layer_idx in range(3):  # the test's own SVD of each layer's full-rank delta
        delta = full.lora_B[layer_idx] @ full.lora_A[layer_idx]
        singular = np.linalg.svd(delta, compute_uv=False)
        shares.append(np.cumsum(singular**2) / np.sum(singular**2))
    expected = max(int(np.searchsorted(share, 0.95)) + 1 for share in shares)
    assert chosen.rank == expected
    assert chosen.retained_energy == pytest.approx([share[expected - 1] for share in shares], abs=1e-9)
    assert min(chosen.retained_energy) >= 0.95
    assert expected == 1 or any(share[expected - 2] < 0.95 for share in shares)  # one less would not do
    assert 1 < expected < 5  # the layers' own ranks made the choice non-trivial


def test_an_exported_adapter_reads_back_as_the_patch_it_holds(tmp_path):
    model = tiny_model("llama")
    generator = np.random.default_rng(5)
    num_layers, d_ff, d_model = model.config.num_hidden_layers, model.config.intermediate_size, model.config.hidden_size
    patch = answers.DownProjectionPatch(lora_A=generator.normal(size=(num_layers, 3, d_ff)),
                                        lora_B=generator.normal(size=(num_layers, d_model, 3)), ridge=0.1,
                                        preservation=2.0, pairs=7)

    answers.export_lora(model, patch, tmp_path / "adapter", base_model="tiny",
                        metadata={"ridge": 0.1, "preservation": 2.0})
    read = answers.load_lora(tmp_path / "adapter")

    assert read.lora_A == pytest.approx(patch.lora_A.astype(np.float32), abs=0)
    assert read.lora_B == pytest.approx(patch.lora_B.astype(np.float32), abs=0)
    assert (read.ridge, read.preservation) == (0.1, 2.0)
    with pytest.raises(BadInputError, match="not a readable adapter directory"):
        answers.load_lora(tmp_path / "nowhere")
