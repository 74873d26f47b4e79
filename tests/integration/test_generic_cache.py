"""The generic keys' cache: what it returns is a fresh `generic_keys` computation, read without running the model
only for the same weights, prompts and arguments, and never from a damaged file."""

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch
from safetensors.numpy import save_file
from test_answers import prompts
from test_engine_families import VOCAB, tiny_model

from icldaemon.engine import answers, generic_cache

STOP = [VOCAB - 1]
ANSWER_TOKENS = 3


def generic_prompts() -> list[list[int]]:
    return [prompts(seed)[0] for seed in range(20, 26)]


def fresh(model, generic, limit=10_000, answer_tokens=ANSWER_TOKENS, stop_ids=STOP) -> list[np.ndarray]:
    return answers.generic_keys(model, generic, limit, answer_tokens=answer_tokens, stop_ids=stop_ids)


def cached(model, generic, cache_dir, limit=10_000, answer_tokens=ANSWER_TOKENS, stop_ids=STOP) -> list[np.ndarray]:
    return generic_cache.cached_generic_keys(model, generic, cache_dir, limit, answer_tokens=answer_tokens,
                                             stop_ids=stop_ids)


@contextmanager
def counted_forwards(model):
    """The model's forward calls while inside, the hook removed on exit."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def cache_events():
    with structlog.testing.capture_logs() as logs:
        events = []
        yield events
    events.extend(entry["event"] for entry in logs if entry["event"].startswith("generic_keys"))


def entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.iterdir())


def assert_same_keys(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for got_layer, expected_layer in zip(got, expected, strict=True):
        assert got_layer.dtype == expected_layer.dtype
        np.testing.assert_array_equal(got_layer, expected_layer)


def test_cached_keys_are_a_fresh_computation_and_a_second_call_reads_them_without_running_the_model(tmp_path):
    model, generic = tiny_model("llama"), generic_prompts()
    expected = fresh(model, generic)
    assert len(expected[0]) == model.config.intermediate_size, "the case reduces its rows to their second moment"

    with cache_events() as events, counted_forwards(model) as calls:
        first = cached(model, generic, tmp_path)
    assert events == ["generic_keys_cached"] and calls
    assert_same_keys(first, expected)
    (path,) = entries(tmp_path)  # one file, no temporary one left
    assert path.suffix == ".safetensors"

    with cache_events() as events, counted_forwards(model) as calls:
        second = cached(model, generic, tmp_path)
    assert events == ["generic_keys_loaded"] and not calls
    assert_same_keys(second, expected)
    # a copy of the model, the same weights: the same entry
    with counted_forwards(copy.deepcopy(model)) as calls:
        assert_same_keys(cached(copy.deepcopy(model), generic, tmp_path), expected)
    assert not calls and entries(tmp_path) == [path]


def test_changing_any_one_weight_changes_the_fingerprint():
    model = tiny_model("llama")
    original = generic_cache.parameters_fingerprint(model)
    assert generic_cache.parameters_fingerprint(copy.deepcopy(model)) == original
    names = [name for name, _ in model.named_parameters()]
    assert len(names) > 10
    for name in names:
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.get_parameter(name).view(-1)[-1] += 1e-3
        assert generic_cache.parameters_fingerprint(changed) != original, name


def test_a_changed_weight_is_recomputed_into_its_own_entry(tmp_path):
    model, generic = tiny_model("llama"), generic_prompts()
    cached(model, generic, tmp_path)
    (first_path,) = entries(tmp_path)
    down = model.model.layers[1].mlp.down_proj.weight
    original = down[0, 0].item()
    with torch.no_grad():
        down[0, 0] += 0.5
    expected = fresh(model, generic)

    with cache_events() as events, counted_forwards(model) as calls:
        changed = cached(model, generic, tmp_path)
    assert events == ["generic_keys_cached"] and calls
    assert_same_keys(changed, expected)
    assert len(entries(tmp_path)) == 2 and first_path in entries(tmp_path)

    with torch.no_grad():
        down[0, 0] = original  # the first weights again: their entry
    with cache_events() as events:
        cached(model, generic, tmp_path)
    assert events == ["generic_keys_loaded"]


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flipped_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


@pytest.mark.parametrize("damage", [truncated, flipped_last_byte, lambda data: b"", lambda data: b"{" * 64],
                         ids=["truncated", "one key changed", "empty", "garbage"])
def test_a_damaged_file_is_recomputed_and_replaced(tmp_path, damage):
    model, generic = tiny_model("llama"), generic_prompts()
    expected = fresh(model, generic)
    cached(model, generic, tmp_path)
    (path,) = entries(tmp_path)
    path.write_bytes(damage(path.read_bytes()))

    with cache_events() as events, counted_forwards(model) as calls:
        keys = cached(model, generic, tmp_path)
    assert events == ["generic_keys_cache_invalid", "generic_keys_cached"] and calls
    assert_same_keys(keys, expected)
    with cache_events() as events:
        assert_same_keys(cached(model, generic, tmp_path), expected)
    assert events == ["generic_keys_loaded"]


def test_a_file_whose_stored_fingerprint_differs_is_not_used(tmp_path):
    model, generic = tiny_model("llama"), generic_prompts()
    cached(model, generic, tmp_path)
    (path,) = entries(tmp_path)
    # another entry's keys, whole and consistent, under this entry's name
    other = fresh(model, generic, limit=7)
    save_file({f"keys.{layer_idx}": np.ascontiguousarray(keys) for layer_idx, keys in enumerate(other)}, str(path),
              metadata={"fingerprint": "0" * 64, "layers": str(len(other)),
                        "keys_sha256": generic_cache._keys_digest([np.ascontiguousarray(keys) for keys in other])})

    with cache_events() as events:
        keys = cached(model, generic, tmp_path)
    assert events == ["generic_keys_cache_invalid", "generic_keys_cached"]
    assert_same_keys(keys, fresh(model, generic))


@pytest.mark.parametrize("change", ["one prompt token", "one prompt fewer", "limit", "answer tokens", "stop ids"])
def test_other_prompts_or_arguments_get_their_own_entry(tmp_path, change):
    model, generic = tiny_model("llama"), generic_prompts()
    cached(model, generic, tmp_path)
    arguments = dict(limit=10_000, answer_tokens=ANSWER_TOKENS, stop_ids=STOP)
    if change == "one prompt token":
        generic[2][5] = (generic[2][5] + 1) % VOCAB
    elif change == "one prompt fewer":
        generic = generic[:-1]
    elif change == "limit":
        arguments["limit"] = 40
    elif change == "answer tokens":
        arguments["answer_tokens"] = 0
    else:
        arguments["stop_ids"] = [VOCAB - 2]

    with cache_events() as events:
        keys = cached(model, generic, tmp_path, **arguments)
    assert events == ["generic_keys_cached"]
    assert_same_keys(keys, fresh(model, generic, **arguments))
    assert len(entries(tmp_path)) == 2


def test_only_the_most_recently_written_entries_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(generic_cache, "CACHE_ENTRIES", 2)
    model, generic = tiny_model("llama"), generic_prompts()[:2]
    written = []
    for limit in (5, 6, 7):
        cached(model, generic, tmp_path, limit=limit)
        (newest,) = set(entries(tmp_path)) - set(written)
        written.append(newest)
        os.utime(newest, ns=(limit * 10**9, limit * 10**9))  # write times a second apart, whatever the clock's grain
    assert entries(tmp_path) == sorted(written[1:])


def test_a_cache_that_cannot_be_written_still_gives_the_keys_and_says_so(tmp_path):
    model, generic = tiny_model("llama"), generic_prompts()
    (tmp_path / "a-file").write_text("")
    with cache_events() as events:
        keys = cached(model, generic, tmp_path / "a-file" / "generic-keys")
    assert events == ["generic_keys_cache_not_written"]
    assert_same_keys(keys, fresh(model, generic))
