"""Consolidation against a real database: measured retrievals' answer patches become listed PEFT adapter versions."""

import copy
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import psycopg
import pytest
import structlog
import torch
from daemon_fixtures import save_tiny_model

from icldaemon.consolidate import ConsolidationRequest, Consolidator, QualityGate
from icldaemon.data import load_neutral
from icldaemon.engine.answers import FOCUS, PRESERVATION, REFINEMENTS
from icldaemon.engine.edit_figures import AnswerFigures, Leak, Specificity
from icldaemon.engine.loading import load_model
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.exceptions import BadInputError, ConsolidationError
from icldaemon.service import Service
from icldaemon.worker import Worker

FACT = "The user's locker code is 4-7-1-9."
QUESTIONS = [
    "What is my locker code?", "Remind me of the code for my locker.", "Which code opens my locker?",
    "I forgot my locker combination, what was it?", "Tell me the locker code.", "My locker code, please?",
    "How do I open my locker?", "What numbers open the locker?", "Locker code?", "What's the code again?",
]
OTHERS = ["The user likes tea.", "The user lives in Porto.", "The user has two sisters.", "The user runs daily.",
          "The user is a nurse.", "The user owns a bike.", "The user reads novels.", "The user plays chess.",
          "The user speaks Dutch.", "The user hates rain."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    return load_model(str(tiny_dir), models_dir=tmp_path_factory.mktemp("models"), device="cpu")


def measure_questions(url, tiny, questions, others) -> int:
    """Queue one chat per question, retrieving the fact and one other memory; measure them; the fact's id."""
    with psycopg.connect(url) as connection:
        fact_id = connection.execute("SELECT id FROM memories WHERE key = 'locker'").fetchone()
        if fact_id is None:
            fact_id = connection.execute("INSERT INTO memories (key, content) VALUES ('locker', %s) RETURNING id",
                                         (FACT,)).fetchone()
        for question, other in zip(questions, others, strict=True):
            other_id = connection.execute("INSERT INTO memories (key, content) VALUES ('about', %s) RETURNING id",
                                          (other,)).fetchone()[0]
            messages = [{"role": "user", "content": question}]
            connection.execute("SELECT icl_submit(%s::jsonb, %s::bigint[])",
                               (json.dumps(messages), [fact_id[0], other_id]))
    counts = Service(Worker(url, tiny, worker_id="test")).run_once()
    assert counts == {"done": len(questions)}
    return fact_id[0]


def neutral_prompts(tokenizer) -> list[list[int]]:
    return [build_prompt(tokenizer, messages=chat).input_ids for chat in load_neutral()]


def test_a_memory_becomes_a_listed_adapter_checked_like_an_edit(database_url, tiny, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:6], OTHERS[:6])
    adapters_dir = tmp_path / "adapters"

    records = Consolidator(database_url, tiny, adapters_dir).run(
        ConsolidationRequest(memory_id=fact_id, rank=2, min_patches=4))

    assert len(records) == 1
    record = records[0]
    assert (record.scope_key, record.version, record.patch_count, record.held_out_count) == (f"memory:{fact_id}", 1, 4, 2)
    assert sorted(path.name for path in record.path.parent.iterdir()) == ["v1"]  # no temporary directory left
    # the preservation term's keys, kept beside the adapters for the next consolidation (test_generic_cache.py)
    assert len(list((tmp_path / "generic-keys").glob("*.safetensors"))) == 1
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT path, rank, memory_id, method, status, status_reason, neutral_prompts, "
                                 "neutral_kl, neutral_next_token_unchanged FROM adapters").fetchone()
        roles = connection.execute(
            "SELECT adapter_patches.role FROM adapter_patches ORDER BY adapter_patches.run_id").fetchall()
        answer_rows = connection.execute("SELECT count(*) FROM memory_answer_patches WHERE memory_id = %s",
                                         (fact_id,)).fetchone()[0]
    assert row[:4] == (str(record.path), 2, fact_id, "down_projection")
    assert [role for (role,) in roles] == ["fit"] * 4 + ["held_out"] * 2  # the newest are held out
    assert answer_rows == 6
    # a random tiny model's answers never say the memory's words: the gate cannot accept what it cannot check
    assert row[4] == "rejected" and "no held-out question's answer used the memory" in row[5]

    # the specificity figures, recomputed independently: the adapter loaded from its directory by PEFT, on the
    # shipped neutral prompts rendered again
    from peft import PeftModel

    config = json.loads((record.path / "adapter_config.json").read_text())
    metadata = json.loads((record.path / "icldaemon.json").read_text())
    assert (metadata["refinements"], metadata["preservation"], metadata["focus"]) == (REFINEMENTS, PRESERVATION, FOCUS)
    assert not config.get("lora_bias") and all(name.endswith("mlp.down_proj") for name in config["target_modules"])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(record.path)).eval()
    kls, kept = [], []
    for ids in neutral_prompts(tiny.tokenizer):
        base, adapted = last_log_probs(tiny.model, ids), last_log_probs(peft_model, ids)
        kls.append(max(kl(base, adapted), 0.0))
        kept.append(int(base.argmax()) == int(adapted.argmax()))
    assert row[6] == len(kls)
    assert row[7] == pytest.approx(np.mean(kls), rel=1e-3, abs=1e-9)
    assert row[8] == pytest.approx(np.mean(kept))

    # nothing new: no second version; four new retrievals: version 2, and version 1 stays listed
    with pytest.raises(BadInputError, match=f"memory:{fact_id} has 0 new answer patches .* at least 4 are needed"):
        Consolidator(database_url, tiny, adapters_dir).run(ConsolidationRequest(memory_id=fact_id, min_patches=4))
    measure_questions(database_url, tiny, QUESTIONS[6:10], OTHERS[6:10])
    second = Consolidator(database_url, tiny, adapters_dir).run(ConsolidationRequest(memory_id=fact_id, min_patches=4))
    assert [(r.version, r.patch_count, r.held_out_count) for r in second] == [(2, 8, 2)]  # 10 retrievals, a quarter held out
    with psycopg.connect(database_url) as connection:
        assert [v for (v,) in connection.execute("SELECT version FROM adapters ORDER BY version")] == [1, 2]


def last_log_probs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum())


def test_the_quality_gate_names_every_figure_that_fails():
    level = AnswerFigures(examples=4, with_memory_rate=0.75, without_memory_rate=0.0, adapter_rate=0.25,
                          answer_kl_without=1.0, answer_kl_adapter=0.5, next_token_kl_share=0.5)
    neutral = Specificity(prompts=40, mean_kl=0.08, next_token_unchanged=0.85, continuation_unchanged=0.5)
    reason = QualityGate().verdict(level, neutral, Leak(examples=4, rate=0.5))
    assert "25% of the time with the adapter against 75% with the memory (33% < 50%)" in reason
    assert "next token kept 85% < 90%" in reason and "neutral KL 0.0800 > 0.05" in reason and "leak 50% > 25%" in reason
    good = Specificity(prompts=40, mean_kl=0.01, next_token_unchanged=1.0, continuation_unchanged=0.9)
    level.adapter_rate = 0.75
    assert QualityGate().verdict(level, good, Leak(examples=0, rate=float("nan"))) is None


def test_scheduled_scope_consolidates_every_due_memory_and_skips_the_rest(database_url, tiny, tmp_path):
    # on a schedule, nothing due is no error (scope all included)
    assert Consolidator(database_url, tiny, tmp_path).run(ConsolidationRequest(scope="all", min_patches=4),
                                                          raise_errors=False) == []
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    records = Consolidator(database_url, tiny, tmp_path).run(ConsolidationRequest(min_patches=4), raise_errors=False)
    # the fact was retrieved four times; every other memory once
    assert [record.scope_key for record in records] == [f"memory:{fact_id}"]
    session = Consolidator(database_url, tiny, tmp_path).run(ConsolidationRequest(scope="all", min_patches=4))
    assert [(record.scope_key, record.patch_count + record.held_out_count) for record in session] == [("all", 8)]


def test_patches_of_another_model_revision_are_not_mixed_in(database_url, tiny, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    with psycopg.connect(database_url) as connection:
        connection.execute("UPDATE memory_answer_patches SET model_revision = 'f00dfeedf00dfeed' WHERE memory_id = %s",
                           (fact_id,))
    with pytest.raises(BadInputError, match=f"memory:{fact_id} has no answer patches of model .*; it has 4 of .*f00dfeed"):
        Consolidator(database_url, tiny, tmp_path).run(ConsolidationRequest(memory_id=fact_id, min_patches=2))


def test_a_rank_above_the_pairs_to_fit_is_lowered_with_a_warning_naming_both(database_url, tiny, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:2], OTHERS[:2])
    with psycopg.connect(database_url) as connection:
        answers = [ids for (ids,) in connection.execute(
            "SELECT answer_ids FROM memory_answer_patches WHERE memory_id = %s ORDER BY run_id", (fact_id,))]
    pairs = len(answers[0])  # the older retrieval is fitted, one answer position per answer token; the newer held out
    assert pairs < 30 < tiny.model.config.hidden_size

    with structlog.testing.capture_logs() as logs:
        [record] = Consolidator(database_url, tiny, tmp_path).run(
            ConsolidationRequest(memory_id=fact_id, rank=30, min_patches=2))

    [warning] = [entry for entry in logs if entry["event"] == "rank_lowered"]
    assert (warning["log_level"], warning["requested_rank"], warning["rank"]) == ("warning", 30, pairs)
    assert warning["reason"] == f"only {pairs} (retrieval, answer position) pairs to fit, from 1 retrieval(s)"
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT rank FROM adapters WHERE id = %s", (record.id,)).fetchone() == (pairs,)


def test_nan_in_a_stored_patch_fails_the_group_and_lists_nothing(database_url, tiny, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    with psycopg.connect(database_url) as connection:
        run_id, raw = connection.execute("SELECT run_id, a_tilde FROM memory_answer_patches WHERE memory_id = %s "
                                         "ORDER BY run_id LIMIT 1", (fact_id,)).fetchone()
        values = np.frombuffer(raw, dtype="<f2").copy()
        values[5] = np.nan
        connection.execute("UPDATE memory_answer_patches SET a_tilde = %s WHERE run_id = %s AND memory_id = %s",
                           (values.tobytes(), run_id, fact_id))
    with pytest.raises(ConsolidationError, match=f"memory {fact_id} in run {run_id} \\(a_tilde\\) holds NaN"):
        Consolidator(database_url, tiny, tmp_path).run(ConsolidationRequest(memory_id=fact_id, min_patches=2))
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM adapters").fetchone()[0] == 0
    assert list(tmp_path.iterdir()) == []


def _limit_file_size():
    # a full disk, as the writer sees it: writes past 1 KiB fail with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # the tiny adapter is 3 KiB


def test_a_failed_write_leaves_no_directory_and_no_row(database_url, tiny, tiny_dir, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_dir),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path), "ICLD_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "icldaemon", "consolidate", "--memory-id", str(fact_id), "--min-patches", "2"]

    failed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_file_size)

    assert failed.returncode == 1, failed.stderr
    assert "cannot write the adapter directory" in failed.stderr and "File too large" in failed.stderr
    with psycopg.connect(database_url) as connection:
        assert connection.execute("SELECT count(*) FROM adapters").fetchone()[0] == 0
        assert connection.execute("SELECT count(*) FROM memory_patches WHERE consolidated_at IS NOT NULL"
                                  ).fetchone()[0] == 0
    scope_dir = tmp_path / "adapters"
    assert [path for path in scope_dir.rglob("*") if path.is_file()] == []

    # with room to write, the same command succeeds and lists the adapter
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"memory:{fact_id} v1 rejected (" in done.stdout and "fitted on 3 retrievals" in done.stdout
    listing = subprocess.run([sys.executable, "-m", "icldaemon", "adapters"], env=environment, capture_output=True,
                             text=True, timeout=300)
    assert f"memory:{fact_id}" in listing.stdout and "v1" not in listing.stderr


def greedy(model, ids: list[int], tokens: int, stop: int) -> list[int]:
    """An argmax loop over full forward passes: the test's own decoder."""
    generated = []
    with torch.no_grad():
        for _ in range(tokens):
            token = int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax())
            generated.append(token)
            if token == stop:
                break
    return generated


def test_generate_shows_the_adapter_beside_the_memory(database_url, tiny, tiny_dir, tmp_path):
    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    [record] = Consolidator(database_url, tiny, tmp_path / "adapters").run(
        ConsolidationRequest(memory_id=fact_id, min_patches=2))
    messages = [{"role": "user", "content": "What is my locker code?"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_MODEL": str(tiny_dir),
                   "ICLD_DEVICE": "cpu", "ICLD_DATA_DIR": str(tmp_path), "ICLD_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "icldaemon", "generate", "--adapter", str(record.id), "--messages-file",
               str(tmp_path / "chat.json"), "--max-new-tokens", "8"]

    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    from peft import PeftModel

    without_ids = build_prompt(tiny.tokenizer, messages=messages).input_ids
    with_ids = build_prompt(tiny.tokenizer, messages=messages,
                            memories=[Memory(FACT, "locker", fact_id)]).input_ids
    adapted = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(record.path)).eval()
    stop = tiny.tokenizer.eos_token_id
    expected = {
        "with the memory in context": greedy(tiny.model, with_ids, 8, stop),
        "without it": greedy(tiny.model, without_ids, 8, stop),
        "without it, with the adapter": greedy(adapted, without_ids, 8, stop),
    }
    for heading, ids in expected.items():
        text = tiny.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert f"{heading}:\n  {text}\n" in done.stdout + "\n", heading
    assert "memories: locker" in done.stdout

    missing = subprocess.run([*command[:5], "9999", *command[6:]], env=environment, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1 and "adapter 9999 does not exist" in missing.stderr


def answer_kl(model, with_model, with_ids: list[int], without_ids: list[int], answer_ids: list[int]) -> float:
    """Mean KL(with the memory || `model` without it) over the teacher-forced answer positions: the test's own."""
    def at_answer(m, prompt):
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([prompt + answer_ids[:-1]])).logits[0, len(prompt) - 1:]
        return torch.log_softmax(logits.double(), dim=-1)

    teacher, student = at_answer(with_model, with_ids), at_answer(model, without_ids)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_the_distillation_method_trains_the_baseline_on_the_same_retrievals(database_url, tiny, tmp_path):
    from peft import PeftModel

    from icldaemon.engine.distillation import LEARNING_RATE, STEPS

    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    with structlog.testing.capture_logs() as logs:
        [record] = Consolidator(database_url, tiny, tmp_path).run(
            ConsolidationRequest(memory_id=fact_id, rank=2, min_patches=4, method="distillation"))

    assert (record.method, record.patch_count, record.held_out_count) == ("distillation", 3, 1)
    steps = [entry["step"] for entry in logs if entry["event"] == "distillation_progress"]
    assert steps[-1] == STEPS and len(steps) in (10, 11) and steps == sorted(steps)
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT method, ridge, preservation, rank FROM adapters WHERE id = %s",
                                 (record.id,)).fetchone()
        fitted = connection.execute(
            "SELECT prompts.messages, answers.answer_ids, answers.run_id FROM adapter_patches "
            "JOIN memory_answer_patches AS answers USING (run_id, memory_id) "
            "JOIN measurement_runs ON measurement_runs.id = answers.run_id "
            "JOIN prompts ON prompts.id = measurement_runs.prompt_id "
            "WHERE adapter_patches.adapter_id = %s AND adapter_patches.role = 'fit' ORDER BY answers.run_id",
            (record.id,)).fetchall()
        others = {run_id: Memory(content=content, key=key, id=memory_id)
                  for run_id, memory_id, key, content in connection.execute(
                      "SELECT measurement_runs.id, memories.id, memories.key, memories.content FROM measurement_runs "
                      "JOIN memory_retrievals ON memory_retrievals.prompt_id = measurement_runs.prompt_id "
                      "JOIN memories ON memories.id = memory_retrievals.memory_id WHERE memories.id <> %s",
                      (fact_id,))}
    assert row == ("distillation", 0.0, None, 2)
    metadata = json.loads((record.path / "icldaemon.json").read_text())
    assert (metadata["method"], metadata["steps"], metadata["learning_rate"], metadata["refinements"],
            metadata["focus"]) == ("distillation", STEPS, LEARNING_RATE, None, None)

    # the adapter as PEFT loads it brings the model without the memory closer to the model with it on the
    # answers it was trained on (prompts rendered by the test from the stored messages and memories)
    adapted = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(record.path)).eval()
    fact = Memory(content=FACT, key="locker", id=fact_id)
    before, after = [], []
    for messages, answer_ids, run_id in fitted:
        other = others[run_id]
        with_ids = build_prompt(tiny.tokenizer, messages=messages, memories=[fact, other]).input_ids
        without_ids = build_prompt(tiny.tokenizer, messages=messages, memories=[other]).input_ids
        before.append(answer_kl(tiny.model, tiny.model, with_ids, without_ids, list(answer_ids)))
        after.append(answer_kl(adapted, tiny.model, with_ids, without_ids, list(answer_ids)))
    assert np.mean(after) < 0.5 * np.mean(before), (before, after)


def test_a_group_adapter_is_fitted_on_the_patches_of_removing_all_of_its_memories(database_url, tiny, tmp_path):
    from icldaemon.engine import answers
    from icldaemon.store import adapters as store
    from icldaemon.store import queue

    measure_questions(database_url, tiny, QUESTIONS[:5], OTHERS[:5])  # each prompt holds the fact and one other
    consolidator = Consolidator(database_url, tiny, tmp_path / "adapters")
    decode = lambda ids: tiny.tokenizer.decode(ids)  # noqa: E731

    with queue.connect(database_url) as connection:
        patches = store.answer_patches(connection, consolidator.key, scope="all", scope_key="all",
                                       num_layers=consolidator.num_layers, d_model=consolidator.d_model)
        keys, values, examples = consolidator._recomputed_targets(connection, patches[:4], consolidator.log)
    assert len(patches) == 10  # two memories a prompt
    for example in examples:  # every one of the prompt's memories is out, the rest of the prompt is in
        assert FACT in decode(example.with_ids) and FACT not in decode(example.without_ids)
        assert not any(other in decode(example.without_ids) for other in OTHERS)
        assert QUESTIONS[0] in decode(example.with_ids) or any(q in decode(example.without_ids) for q in QUESTIONS)
    # one row set per prompt (the first four patches are two prompts' two memories each)
    assert len(examples) == 2
    expected = [answers.answer_patch(tiny.model, e.with_ids, e.without_ids, e.answer_ids) for e in examples]
    for layer_idx in range(consolidator.num_layers):
        np.testing.assert_allclose(keys[layer_idx], np.concatenate([p.key[layer_idx] for p in expected]), atol=1e-6)
        np.testing.assert_allclose(values[layer_idx], np.concatenate([p.value[layer_idx] for p in expected]),
                                   atol=1e-6)
    assert max(p.max_abs_log_prob_error for p in expected) < 1e-4  # each target checked by its own patched run

    record = Consolidator(database_url, tiny, tmp_path / "adapters").run(
        ConsolidationRequest(scope="all", rank=2, min_patches=2))[0]
    metadata = json.loads((record.path / "icldaemon.json").read_text())
    assert metadata["target"] == "all of the group's memories removed"
    assert metadata["energy"] == 0.9 and min(metadata["retained_energy"]) >= 0.9 - 1e-9
    fit_runs = {run for run, _memory in metadata["fit_patches"]}
    held_runs = {run for run, _memory in metadata["held_out_patches"]}
    assert fit_runs and held_runs and not fit_runs & held_runs  # whole prompts on either side
    assert len(metadata["fit_patches"]) + len(metadata["held_out_patches"]) == 10


def test_a_memory_alone_target_is_the_patch_of_the_memory_alone_against_no_memory(database_url, tiny, tmp_path):
    from icldaemon.engine import answers
    from icldaemon.store import adapters as store
    from icldaemon.store import queue

    fact_id = measure_questions(database_url, tiny, QUESTIONS[:4], OTHERS[:4])
    consolidator = Consolidator(database_url, tiny, tmp_path / "adapters")
    decode = lambda ids: tiny.tokenizer.decode(ids)  # noqa: E731

    with queue.connect(database_url) as connection:
        patches = store.answer_patches(connection, consolidator.key, scope="memory", scope_key=f"memory:{fact_id}",
                                       num_layers=consolidator.num_layers, d_model=consolidator.d_model)
        keys, values, examples = consolidator._recomputed_targets(connection, patches, consolidator.log, alone=True)
    assert len(examples) == 4
    for example in examples:  # the fact alone against no memory: the other memory out of both
        assert FACT in decode(example.with_ids) and FACT not in decode(example.without_ids)
        assert not any(other in decode(example.with_ids) + decode(example.without_ids) for other in OTHERS)
    expected = [answers.answer_patch(tiny.model, e.with_ids, e.without_ids, e.answer_ids) for e in examples]
    np.testing.assert_allclose(values[0], np.concatenate([p.value[0] for p in expected]), atol=1e-6)

    record = consolidator.run(ConsolidationRequest(memory_id=fact_id, rank=2, min_patches=2,
                                                   memory_target="alone"))[0]
    assert json.loads((record.path / "icldaemon.json").read_text())["target"] == "the memory alone against none"
    with pytest.raises(BadInputError, match="memory_target 'nearby' is not one of in_context, alone"):
        ConsolidationRequest(memory_id=fact_id, memory_target="nearby")
