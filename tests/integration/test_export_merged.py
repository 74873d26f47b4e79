"""`icldaemon export`: an adapter version merged into its model's weights, as a plain transformers checkpoint."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import psycopg
import pytest
import torch
from daemon_fixtures import save_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from icldaemon.consolidate import ConsolidationRequest, Consolidator
from icldaemon.engine.answers import DownProjectionPatch, down_projection_names, export_lora
from icldaemon.engine.loading import load_model
from icldaemon.engine.merge import merge_adapter
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.exceptions import BadInputError
from icldaemon.service import Service
from icldaemon.worker import Worker

FACT = "The user's locker code is 4-7-1-9."
QUESTIONS = ["What is my locker code?", "Which code opens my locker?", "Tell me the locker code.", "Locker code?"]
LOGIT_TOLERANCE = 1e-4  # merged checkpoint against the base model with the PEFT adapter applied
PATCH_SCALE = 0.5  # of the random LoRA factors: a change of the logits far above the tolerance


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny(tiny_dir, tmp_path):
    """Loaded afresh for each test: a merge changes the model's weights."""
    return load_model(str(tiny_dir), models_dir=tmp_path / "models", device="cpu")


def measure_questions(url: str, loaded) -> int:
    """Queue one chat per question retrieving the fact, measure them (answer patches included); the fact's id."""
    with psycopg.connect(url) as connection:
        fact_id = connection.execute("INSERT INTO memories (key, content) VALUES ('locker', %s) RETURNING id",
                                     (FACT,)).fetchone()[0]
        for question in QUESTIONS:
            connection.execute("SELECT icl_submit(%s::jsonb, %s::bigint[])",
                               (json.dumps([{"role": "user", "content": question}]), [fact_id]))
    assert Service(Worker(url, loaded, worker_id="test")).run_once() == {"done": len(QUESTIONS)}
    return fact_id


def random_adapter(loaded, directory, seed: int = 1, rank: int = 2):
    """A random rank-`rank` change of every down projection, written as the consolidator writes its adapters."""
    down = loaded.model.get_submodule(down_projection_names(loaded.model)[0])
    layers = loaded.model.config.num_hidden_layers
    generator = np.random.default_rng(seed)
    patch = DownProjectionPatch(
        lora_A=PATCH_SCALE * generator.standard_normal((layers, rank, down.in_features)).astype(np.float32),
        lora_B=PATCH_SCALE * generator.standard_normal((layers, down.out_features, rank)).astype(np.float32),
        ridge=0.05, preservation=0.0, pairs=rank)
    return export_lora(loaded.model, patch, directory, base_model=loaded.name), patch


def list_adapter(url: str, path, *, model: str, revision: str | None, scope_key: str = "memory:1",
                 status: str = "accepted") -> int:
    """One adapters row for a directory, as consolidation lists it (fewer figures); its id."""
    with psycopg.connect(url) as connection:
        return connection.execute(
            "INSERT INTO adapters (scope, scope_key, model, model_revision, version, layers, rank, ridge, patch_count, "
            "held_out_count, path, method, status, status_reason) VALUES ('memory', %s, %s, %s, 1, "
            "'{0,1}', 2, 0.05, 6, 2, %s, 'down_projection', %s, %s) RETURNING id",
            (scope_key, model, revision, str(path), status, "the test's reason" if status == "rejected" else None),
        ).fetchone()[0]


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # [positions, vocab]


def chat_ids(tokenizer) -> list[int]:
    return build_prompt(tokenizer, messages=[{"role": "user", "content": "What is my locker code?"}],
                        memories=[Memory(FACT, "locker", 1)]).input_ids


def adapted_logits(tiny_dir, tmp_path, adapter_dir, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, base with the adapter applied by PEFT) logits, from a fresh load of the base model."""
    from peft import PeftModel

    base = load_model(str(tiny_dir), models_dir=tmp_path / "models", device="cpu").model
    base_logits = logits(base, ids)
    return base_logits, logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval(), ids)


def plain_load(directory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()


def test_the_merged_checkpoint_is_the_base_model_plus_the_lora_change(tiny, tiny_dir, tmp_path):
    adapter_dir, patch = random_adapter(tiny, tmp_path / "adapter")
    original = {name: tiny.model.get_submodule(name).weight.detach().clone()
                for name in down_projection_names(tiny.model)}
    out_dir = tmp_path / "exports" / "merged"
    out_dir.parent.mkdir()

    assert merge_adapter(tiny.model, adapter_dir, out_dir, tiny.tokenizer) == out_dir

    files = {path.name for path in out_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter_") or name.endswith((".bin", ".pt")) for name in files)
    assert [path.name for path in out_dir.parent.iterdir()] == ["merged"]  # no temporary sibling left
    # the stored down projections, against W + B @ A computed here (PEFT's scaling is 1: lora_alpha = r)
    stored = load_file(out_dir / "model.safetensors")
    for layer_idx, (name, weight) in enumerate(original.items()):
        expected = weight.double() + torch.from_numpy(patch.lora_B[layer_idx]).double() @ torch.from_numpy(
            patch.lora_A[layer_idx]).double()
        torch.testing.assert_close(stored[f"{name}.weight"].double(), expected, rtol=0, atol=1e-5)
    # every other tensor is the base model's own
    base_tensors = load_file(tiny_dir / "model.safetensors")
    for name, tensor in base_tensors.items():
        if name.removesuffix(".weight") not in original:
            assert torch.equal(stored[name], tensor), name

    merged = plain_load(out_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = chat_ids(tiny.tokenizer)
    base_logits, peft_logits = adapted_logits(tiny_dir, tmp_path, adapter_dir, ids)
    merged_logits = logits(merged, ids)
    assert (merged_logits - peft_logits).abs().max() < LOGIT_TOLERANCE
    assert (merged_logits - base_logits).abs().max() > 100 * LOGIT_TOLERANCE


def test_a_target_that_holds_anything_or_no_adapter_is_refused_and_nothing_is_written(tiny, tmp_path):
    adapter_dir, _ = random_adapter(tiny, tmp_path / "adapter")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match=f"{occupied} exists and is not empty"):
        merge_adapter(tiny.model, adapter_dir, occupied, tiny.tokenizer)
    assert [path.name for path in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(BadInputError, match=f"{occupied / 'keep.txt'} exists and is not a directory"):
        merge_adapter(tiny.model, adapter_dir, occupied / "keep.txt", tiny.tokenizer)
    with pytest.raises(BadInputError, match=f"the adapter directory {tmp_path / 'gone'} holds no adapter_config.json"):
        merge_adapter(tiny.model, tmp_path / "gone", tmp_path / "merged", tiny.tokenizer)
    assert not (tmp_path / "merged").exists()

    empty = tmp_path / "empty"  # an empty directory is taken
    empty.mkdir()
    merge_adapter(tiny.model, adapter_dir, empty, tiny.tokenizer)
    assert (empty / "model.safetensors").is_file()


def test_a_lora_bias_on_layers_without_a_bias_is_refused_and_the_model_left_as_it_was(tiny, tiny_dir, tmp_path):
    # the form of versions before schema revision 0006: gate/up LoRA with lora_bias, on a Llama without MLP biases
    from peft import LoraConfig, get_peft_model

    reference = load_model(str(tiny_dir), models_dir=tmp_path / "models", device="cpu").model
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj"], lora_bias=True, bias="none",
                        task_type="CAUSAL_LM")
    with pytest.warns(UserWarning, match="lora_bias"):
        old = get_peft_model(reference, config)
    with warnings.catch_warnings():  # PEFT takes lora_B's 1-D bias for an ungathered ZeRO-3 shard
        warnings.filterwarnings("ignore", message=".*LoRA tensor.*invalid shape")
        old.save_pretrained(tmp_path / "gate-up-bias")
    ids = chat_ids(tiny.tokenizer)
    before = logits(tiny.model, ids)

    with pytest.raises(BadInputError, match=r"carries a LoRA bias \(lora_bias\) on 4 layers that have no bias"):
        merge_adapter(tiny.model, tmp_path / "gate-up-bias", tmp_path / "merged", tiny.tokenizer)

    assert not (tmp_path / "merged").exists()
    assert not any("lora" in name for name, _ in tiny.model.named_modules())
    assert torch.equal(logits(tiny.model, ids), before)


# --- the command line, as a user runs it


def run_export(environment, *arguments) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icldaemon", "export", *arguments], env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def environment(database_url, tiny_dir, tmp_path):
    return {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_dir), "ICLD_DEVICE": "cpu",
            "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}


def test_export_merges_a_fitted_adapter_and_refuses_a_rejected_one_unless_allowed(database_url, tiny, tiny_dir,
                                                                                   tmp_path, environment):
    fact_id = measure_questions(database_url, tiny)
    [record] = Consolidator(database_url, tiny, tmp_path / "adapters").run(
        ConsolidationRequest(memory_id=fact_id, min_patches=2))
    assert record.status == "rejected"  # a random tiny model's answers cannot pass the gate
    out_dir = tmp_path / "merged"

    refused = run_export(environment, "--adapter", str(record.id), "--merged", str(out_dir))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"icldaemon: adapter {record.id} (memory:{fact_id} v1) was rejected by the quality gate (")
    assert refused.stderr.strip().endswith("--allow-rejected exports it anyway")
    assert not out_dir.exists()

    done = run_export(environment, "--adapter", str(record.id), "--merged", str(out_dir), "--allow-rejected")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out_dir}\n"
    events = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    [merged_event] = [event for event in events if event["event"] == "adapter_merged"]
    assert (merged_event["adapter_id"], merged_event["path"], merged_event["model"]) == (
        record.id, str(out_dir), str(tiny_dir))
    assert merged_event["model_revision"] == tiny.revision
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []

    ids = chat_ids(tiny.tokenizer)
    base_logits, peft_logits = adapted_logits(tiny_dir, tmp_path, record.path, ids)
    merged_logits = logits(plain_load(out_dir), ids)
    assert (merged_logits - peft_logits).abs().max() < LOGIT_TOLERANCE
    assert (merged_logits - base_logits).abs().max() > 10 * LOGIT_TOLERANCE

    again = run_export(environment, "--adapter", str(record.id), "--merged", str(out_dir), "--allow-rejected")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        f"icldaemon: --merged {out_dir} exists and is not empty; give a new or empty directory")


def test_export_refuses_by_name_an_unknown_adapter_another_model_or_weights_and_a_missing_directory(
        database_url, tiny, tiny_dir, tmp_path, environment):
    adapter_dir, _ = random_adapter(tiny, tmp_path / "adapter")
    out_dir = tmp_path / "merged"
    other_model = list_adapter(database_url, adapter_dir, model="org/other-model", revision=tiny.revision)
    other_weights = list_adapter(database_url, adapter_dir, model=str(tiny_dir), revision="0123456789abcdef",
                                 scope_key="memory:2")
    unrecorded = list_adapter(database_url, adapter_dir, model=str(tiny_dir), revision=None, scope_key="memory:3")
    moved = list_adapter(database_url, tmp_path / "moved", model=str(tiny_dir), revision=tiny.revision,
                         scope_key="memory:4")
    expected = {
        "9999": "icldaemon: adapter 9999 does not exist (see `icldaemon adapters`)",
        str(other_model): f"icldaemon: adapter {other_model} (memory:1 v1) was fitted on org/other-model; the loaded "
                          f"model is {tiny_dir} (set ICLD_MODEL)",
        str(other_weights): f"icldaemon: adapter {other_weights} (memory:2 v1) was fitted on the weights "
                            f"0123456789abcdef of {tiny_dir}; the loaded weights are {tiny.revision}, and its change "
                            "is exact only for the weights it was fitted on",
        str(unrecorded): f"icldaemon: adapter {unrecorded} (memory:3 v1) was fitted on the weights (not recorded) of "
                         f"{tiny_dir}; the loaded weights are {tiny.revision}, and its change is exact only for the "
                         "weights it was fitted on",
        str(moved): f"icldaemon: adapter {moved} (memory:4 v1): the adapter directory {tmp_path / 'moved'} holds no "
                    "adapter_config.json (moved or deleted?)",
    }
    for adapter_id, message in expected.items():
        refused = run_export(environment, "--adapter", adapter_id, "--merged", str(out_dir))
        assert refused.returncode == 1, adapter_id
        assert refused.stderr.strip().splitlines()[-1] == message
    assert not out_dir.exists() and not [path for path in tmp_path.iterdir() if path.name.startswith(".")]

    nowhere = run_export(environment, "--adapter", str(other_model), "--merged", str(tmp_path / "no" / "merged"))
    assert nowhere.returncode == 1
    assert nowhere.stderr.strip() == (f"icldaemon: --merged {tmp_path / 'no' / 'merged'}: the directory "
                                      f"{tmp_path / 'no'} does not exist")
