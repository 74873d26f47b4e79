"""A daemon given a model it cannot measure claims nothing: it checks the model first and exits in one line."""

import os
import subprocess
import sys

import psycopg
import transformers
from daemon_fixtures import byte_tokenizer
from daemon_processes import RawPrompt, insert_prompts


def save_mamba(directory):
    """A tiny random Mamba: it loads and runs, but has no MLP, so no weight patch exists for it."""
    tokenizer = byte_tokenizer()
    config = transformers.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, state_size=4, num_hidden_layers=2,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    transformers.MambaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_an_unsupported_model_fails_the_daemon_and_leaves_the_queue_alone(database_url, tmp_path):
    prompt_ids = list(insert_prompts(database_url, [RawPrompt("cheese => fromage\nbread =>")]))
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(save_mamba(tmp_path / "mamba")),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json"}

    finished = subprocess.run([sys.executable, "-m", "icldaemon", "run", "--worker-id", "unmeasurable"],
                              env=environment, capture_output=True, text=True, timeout=300)

    assert finished.returncode == 1
    errors = [line for line in finished.stderr.splitlines() if line.startswith("icldaemon:")]
    assert errors == ["icldaemon: architecture MambaForCausalLM is not supported: " + errors[0].split(": ", 2)[2]]
    assert "MLP" in errors[0]
    assert "prompt_claimed" not in finished.stderr + finished.stdout
    with psycopg.connect(database_url) as connection:
        rows = connection.execute("SELECT status, attempts FROM prompts WHERE id = ANY(%s)", (prompt_ids,)).fetchall()
    assert rows == [("queued", 0)]


def test_a_supported_model_is_checked_and_warmed_before_the_first_claim(database_url, tiny_model_dir, tmp_path):
    insert_prompts(database_url, [RawPrompt("cheese => fromage\nbread =>")])
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_model_dir),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path / "data"), "ICLD_LOG_FORMAT": "json"}

    finished = subprocess.run([sys.executable, "-m", "icldaemon", "run", "--once", "--worker-id", "checked"],
                              env=environment, capture_output=True, text=True, timeout=300)

    assert finished.returncode == 0, finished.stderr
    events = [line for line in (finished.stderr + finished.stdout).splitlines() if '"event"' in line]
    checked = next(index for index, line in enumerate(events) if '"model_checked"' in line)
    claimed = next(index for index, line in enumerate(events) if '"prompt_claimed"' in line)
    assert checked < claimed
