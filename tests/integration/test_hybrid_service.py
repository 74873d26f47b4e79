"""A hybrid model (a tiny random Falcon-H1 saved as a model directory) through what the engine serves:
`icldaemon measure` with --json and --plot, the daemon's stored runs and patches, and consolidation into a
PEFT adapter whose effect is the engine's own (the down multiplier, 1.9 here, corrected)."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import psycopg
import pytest
import torch
import transformers
from daemon_fixtures import byte_tokenizer
from safetensors.torch import load_file
from test_engine_families import slow_decay

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.consolidate import ConsolidationRequest, Consolidator
from icldaemon.engine import answers
from icldaemon.engine.loading import load_model
from icldaemon.service import Service
from icldaemon.worker import Worker

HYBRID_CHECK = 1e-4  # docs/method.md §8.4
FACT = "The user's locker code is 4-7-1-9."
QUESTIONS = ["What is my locker code?", "Remind me of the code for my locker.", "Which code opens my locker?",
             "Tell me the locker code.", "My locker code, please?", "What's the code again?"]
OTHERS = ["The user likes tea.", "The user lives in Porto.", "The user has two sisters.", "The user runs daily.",
          "The user is a nurse.", "The user owns a bike."]


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-falcon-h1")
    tokenizer = byte_tokenizer()
    config = transformers.FalconH1Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_n_groups=2, mamba_chunk_size=8, max_position_embeddings=512, initializer_range=0.3,
        mlp_multipliers=[0.7, 1.9], bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config.architectures = ["FalconH1ForCausalLM"]
    torch.manual_seed(0)
    model = transformers.FalconH1ForCausalLM(config).eval()
    slow_decay(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def falcon(falcon_dir, tmp_path_factory):
    return load_model(str(falcon_dir), models_dir=tmp_path_factory.mktemp("models"), device="cpu")


def test_measure_writes_the_json_contract_and_a_plot_for_a_hybrid(tmp_path, falcon_dir):
    (tmp_path / "chat.json").write_text(json.dumps([{"role": "user", "content": "What is the name of my cat?"}]))
    (tmp_path / "memories.json").write_text(json.dumps([
        {"id": 4, "key": "pet", "content": "The user has a grey cat called Miso."},
        {"id": 5, "key": "colour", "content": "The user's favourite colour is teal."},
    ]))
    environment = {**os.environ, "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json",
                   "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "icldaemon", "measure", "--model", str(falcon_dir), "--messages-file", "chat.json",
         "--memories-file", "memories.json", "--json", "out.json", "--plot", "out.png"],
        capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "out.json").read_text())
    n = document["query_position"] - document["anchor_tokens"]
    assert n > 16  # the context spans several of the mixer's 8-token pieces
    for name in DYNAMICS_NAMES:
        values = np.array(document["dynamics"][name], dtype=float)
        assert values.shape == (2, n) and np.isfinite(values).all()
    assert document["model"]["family"] == "falcon_h1"
    assert [segment["memory_id"] for segment in document["segments"]] == [4, 5]
    assert document["exactness"]["max_abs_logit_error"] < HYBRID_CHECK
    assert all(segment["exactness"]["max_abs_logit_error"] < HYBRID_CHECK for segment in document["segments"])
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_daemon_stores_a_hybrid_run_and_its_memory_consolidates_into_a_peft_adapter(database_url, falcon,
                                                                                         tmp_path):
    with psycopg.connect(database_url) as connection:
        fact_id = connection.execute("INSERT INTO memories (key, content) VALUES ('locker', %s) RETURNING id",
                                     (FACT,)).fetchone()[0]
        for question, other in zip(QUESTIONS, OTHERS, strict=True):
            other_id = connection.execute("INSERT INTO memories (key, content) VALUES ('about', %s) RETURNING id",
                                          (other,)).fetchone()[0]
            connection.execute("SELECT icl_submit(%s::jsonb, %s::bigint[])",
                               (json.dumps([{"role": "user", "content": question}]), [fact_id, other_id]))
    assert Service(Worker(database_url, falcon, worker_id="test")).run_once() == {"done": len(QUESTIONS)}
    with psycopg.connect(database_url) as connection:
        runs = connection.execute("SELECT num_layers, max_abs_logit_error FROM measurement_runs").fetchall()
        effects = connection.execute("SELECT max(max_abs_logit_error), count(*) FROM memory_effects").fetchone()
        patches = connection.execute("SELECT count(*) FROM memory_patches").fetchone()[0]
        answer_errors = [error for (error,) in connection.execute(
            "SELECT max_abs_log_prob_error FROM memory_answer_patches")]
    assert len(runs) == len(QUESTIONS) and all(layers == 2 and error < HYBRID_CHECK for layers, error in runs)
    assert effects[0] < HYBRID_CHECK and effects[1] == patches == 2 * len(QUESTIONS)
    # the answer patches' own check: rank-1 changes of the down projection, whose output Falcon-H1 multiplies
    # by 1.9 before it joins the residual, reproduce the run with the memory
    assert len(answer_errors) == 2 * len(QUESTIONS) and max(answer_errors) < HYBRID_CHECK

    records = Consolidator(database_url, falcon, tmp_path / "adapters").run(
        ConsolidationRequest(memory_id=fact_id, rank=2, min_patches=4))
    assert len(records) == 1
    path = records[0].path
    config = json.loads((path / "adapter_config.json").read_text())
    assert not config.get("lora_bias") and all(name.endswith("feed_forward.down_proj")
                                               for name in config["target_modules"])
    weights = load_file(str(path / answers.ADAPTER_WEIGHTS_FILE))
    names = answers.down_projection_names(falcon.model)
    patch = answers.DownProjectionPatch(
        lora_A=np.stack([weights[f"base_model.model.{name}.lora_A.weight"].numpy() for name in names]),
        lora_B=np.stack([weights[f"base_model.model.{name}.lora_B.weight"].numpy() for name in names]),
        ridge=0.0, preservation=0.0, pairs=0)

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(falcon.model), str(path)).eval()
    loaded_again = peft_model.load_adapter(str(path), adapter_name="again")
    assert loaded_again.missing_keys == [] and loaded_again.unexpected_keys == []
    peft_model.delete_adapter("again")
    ids = torch.tensor([falcon.tokenizer("What is my locker code?")["input_ids"]])
    with torch.no_grad():
        base = falcon.model(ids).logits
        with answers.applied(falcon.model, patch):
            hooked = falcon.model(ids).logits
        loaded = peft_model(ids).logits
    assert (hooked - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, hooked, rtol=1e-4, atol=1e-5)
