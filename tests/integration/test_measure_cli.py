"""`icldaemon measure` as a user runs it: a subprocess, a saved model directory, files in and out."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from icldaemon.columns import DYNAMICS_NAMES


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    directory = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512)
    config.architectures = ["LlamaForCausalLM"]
    transformers.set_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def run_cli(*args, cwd):
    environment = {**os.environ, "ICLD_DATA_DIR": str(cwd / "data"), "ICLD_LOG_FORMAT": "json",
                   "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "icldaemon", *args], capture_output=True, text=True, cwd=cwd,
                          env=environment, timeout=300)


def test_measure_writes_the_json_contract_and_a_plot(tmp_path, model_dir):
    (tmp_path / "chat.json").write_text(json.dumps([{"role": "user", "content": "What is the name of my cat?"}]))
    (tmp_path / "memories.json").write_text(json.dumps([
        {"id": 4, "key": "pet", "content": "The user has a grey cat called Miso."},
        {"id": 5, "key": "colour", "content": "The user's favourite colour is teal."},
    ]))
    result = run_cli("measure", "--model", str(model_dir), "--messages-file", "chat.json", "--memories-file",
                     "memories.json", "--json", "out.json", "--plot", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exactness: max |logit error|" in result.stdout
    document = json.loads((tmp_path / "out.json").read_text())
    n = document["query_position"] - document["anchor_tokens"]
    assert len(document["tokens"]) == n and document["tokens"][0]["position"] == document["anchor_tokens"]
    assert document["query_position"] == len(document["input_ids"]) - 1
    for name in DYNAMICS_NAMES:
        values = np.array(document["dynamics"][name], dtype=float)
        assert values.shape == (3, n) and np.isfinite(values).all()
    assert [segment["memory_id"] for segment in document["segments"]] == [4, 5]
    assert all(len(segment["update_frobenius_norm"]) == 3 for segment in document["segments"])
    assert document["exactness"]["max_abs_logit_error"] < 1e-5
    assert set(document["timings"]) >= {"plain_forward_s", "measure_s"}
    assert set(document["model"]) >= {"name", "num_layers", "dtype", "device"}
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # structured logs carry event names and never the prompt's text
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert {"measure_started", "run_measured"} <= {event["event"] for event in events}
    assert "Miso" not in result.stderr


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"chat.json": "not json"}, "messages file chat.json is not valid JSON"),
        ({"chat.json": json.dumps([{"role": "user"}])}, "message 0 is not a"),
        ({"chat.json": json.dumps([{"role": "user", "content": "hi"}]), "memories.json": json.dumps([{"id": 1}])},
         "memory 0 in memories.json has no string \"content\""),
    ],
)
def test_bad_input_exits_with_a_message(tmp_path, model_dir, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    arguments = ["measure", "--model", str(model_dir), "--messages-file", "chat.json"]
    if "memories.json" in files:
        arguments += ["--memories-file", "memories.json"]
    result = run_cli(*arguments, cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_summary_shows_the_anchor_and_a_text_prompt_is_measured_from_its_first_word(tmp_path, model_dir,
                                                                                        tiny_tokenizer):
    text = "Translate English to French: cheese =>"
    (tmp_path / "prompt.txt").write_text(text)

    result = run_cli("measure", "--model", str(model_dir), "--text-file", "prompt.txt", "--json", "out.json",
                     cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "out.json").read_text())
    words = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # the tokenizer defines BOS without adding it: BOS is put in front, and every word of the text is context
    assert document["input_ids"] == [tiny_tokenizer.bos_token_id, *words]
    assert (document["anchor_tokens"], document["anchor_text"]) == (1, "<|bos|>")
    first = tiny_tokenizer.decode(words[:1])
    assert document["tokens"][0]["text"] == first and text.startswith(first)
    assert (f"prompt {len(words) + 1} tokens: 1 anchor '<|bos|>', {len(words) - 1} context from {first!r}, 1 query"
            in result.stdout)
