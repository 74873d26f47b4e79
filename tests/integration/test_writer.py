"""The result writer: rows equal the measurement (as float32), NaN as NULL, one transaction, no duplicates."""

import hashlib
import uuid

import numpy as np
import psycopg
import pytest

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.engine.result import Ablation, Measurement, SegmentAttribution, TokenInfo
from icldaemon.exceptions import DatabaseError
from icldaemon.store import queue, writer

NUM_LAYERS, D_MODEL = 3, 4


def ablation(seed: int) -> Ablation:
    rng = np.random.default_rng(seed)
    return Ablation(
        delta=rng.standard_normal((NUM_LAYERS, D_MODEL)).astype(np.float32),
        a_tilde=rng.standard_normal((NUM_LAYERS, D_MODEL)).astype(np.float32),
        bias_delta=rng.standard_normal((NUM_LAYERS, D_MODEL)).astype(np.float32),
        update_frobenius_norm=rng.random(NUM_LAYERS),
        kl=0.1 * seed, max_abs_logit_error=1e-5, patched_kl=1e-7,
    )


def measurement(memory_ids: list[int], texts=("a", "b\x00", "\ud800c", "d", "e", "f")) -> Measurement:
    rng = np.random.default_rng(0)
    tokens = [TokenInfo(index=i, position=i + 2, text=text, segment="context" if i < 2 else f"memory:{memory_ids[0]}",
                        memory_id=None if i < 2 else memory_ids[0]) for i, text in enumerate(texts)]
    dynamics = {name: rng.random((NUM_LAYERS, len(tokens))) for name in DYNAMICS_NAMES}
    dynamics["delta_norm"][:, 1] = np.nan  # a skipped prefix
    dynamics["implicit_learning_rate"][2, 3] = np.nan
    segments = [SegmentAttribution(label=f"memory:{memory_id}", kind="memory", start=2 + 2 * k, end=4 + 2 * k,
                                   memory_id=memory_id, key=None, ablation=ablation(k + 1))
                for k, memory_id in enumerate(memory_ids)]
    return Measurement(
        input_ids=list(range(10)), anchor_tokens=2, query_position=9, tokens=tokens, dynamics=dynamics,
        measured_prefixes=[1, 3, 4, 5, 6], context_ablation=ablation(7), segments=segments,
        model={"name": "tiny", "num_layers": NUM_LAYERS, "dtype": "float32", "device": "cpu", "family": "llama"},
        timings={"plain_forward_s": 0.01, "dynamics_s": 0.02, "measure_s": 0.05},
    )


@pytest.fixture
def held(database_url):
    with psycopg.connect(database_url) as connection:
        memory_ids = [connection.execute("INSERT INTO memories (content) VALUES ('m') RETURNING id").fetchone()[0]
                      for _ in range(2)]
        session_id = uuid.uuid4()
        connection.execute("INSERT INTO prompts (text, session_id) VALUES ('x', %s)", (session_id,))
    with queue.connect(database_url) as connection:
        claim = queue.claim(connection, "w1")
    return claim, memory_ids, session_id


def test_rows_match_the_measurement(database_url, held):
    claim, memory_ids, session_id = held
    result = measurement(memory_ids)

    with queue.connect(database_url) as connection:
        run_id = writer.write_measurement(connection, claim, result,
                                          writer.RunSource(claim.prompt_id, session_id=session_id, stride=1))
        rows = connection.execute(
            f"SELECT layer_idx, token_idx, token_position, token_text, segment, memory_id, run_id, prompt_id, "
            f"session_id, prompt_hash, model, {', '.join(DYNAMICS_NAMES)} FROM icl_dynamics_log "
            "ORDER BY layer_idx, token_idx").fetchall()
        run = connection.execute("SELECT prompt_id, model, num_layers, total_tokens, context_tokens, anchor_tokens, "
                                 "query_position, max_abs_logit_error, context_kl FROM measurement_runs").fetchone()
        effects = connection.execute("SELECT memory_id, segment, token_start, token_end, kl, update_frobenius_norm, "
                                     "bias_update_norm FROM memory_effects ORDER BY memory_id").fetchall()
        patches = connection.execute("SELECT memory_id, num_layers, d_model, delta, a_tilde, bias_delta "
                                     "FROM memory_patches ORDER BY memory_id").fetchall()
        status = connection.execute("SELECT status, worker_id FROM prompts").fetchone()

    assert status == ("done", None)
    assert run == (claim.prompt_id, "tiny", NUM_LAYERS, 10, 6, 2, 9, 1e-5, pytest.approx(0.7))
    assert len(rows) == NUM_LAYERS * len(result.tokens)
    expected_hash = writer.prompt_hash(result.input_ids)
    for row in rows:
        layer, token = row[0], row[1]
        info = result.tokens[token]
        assert row[2:11] == (info.position, writer.clean_text(info.text), info.segment, info.memory_id, run_id,
                             claim.prompt_id, session_id, expected_hash, "tiny")
        for name, value in zip(DYNAMICS_NAMES, row[11:]):
            expected = result.dynamics[name][layer, token]
            # stored as float32, what the measurement carries: the float64 value rounded once
            assert (value is None) if np.isnan(expected) else value == float(np.float32(expected)), (name, layer, token)
    assert rows[1][3] == "b\ufffd" and rows[2][3] == "\ufffdc"
    assert sum(row[11] is None for row in rows) == NUM_LAYERS
    for (memory_id, segment, start, end, kl, frobenius, bias), attribution in zip(effects, result.segments):
        assert (memory_id, segment, start, end) == (attribution.memory_id, attribution.label, attribution.start,
                                                    attribution.end)
        assert kl == attribution.ablation.kl
        assert frobenius == attribution.ablation.update_frobenius_norm.tolist()
        assert bias == pytest.approx(attribution.ablation.bias_update_norm.tolist(), rel=1e-6)
    for (memory_id, num_layers, d_model, *factors), attribution in zip(patches, result.segments):
        assert (num_layers, d_model) == (NUM_LAYERS, D_MODEL)
        for stored, original in zip(factors, (attribution.ablation.delta, attribution.ablation.a_tilde,
                                              attribution.ablation.bias_delta)):
            np.testing.assert_array_equal(np.frombuffer(stored, dtype="<f4").reshape(NUM_LAYERS, D_MODEL), original)


def test_a_second_complete_writes_nothing(database_url, held):
    claim, memory_ids, _ = held
    with queue.connect(database_url) as connection:
        assert writer.write_measurement(connection, claim, measurement(memory_ids), writer.RunSource(claim.prompt_id))
        assert writer.write_measurement(connection, claim, measurement(memory_ids),
                                        writer.RunSource(claim.prompt_id)) is None
        counts = connection.execute("SELECT (SELECT count(*) FROM measurement_runs), "
                                    "(SELECT count(*) FROM icl_dynamics_log), (SELECT count(*) FROM memory_effects), "
                                    "(SELECT count(*) FROM memory_patches)").fetchone()
    assert counts == (1, NUM_LAYERS * 6, 2, 2)


def test_a_lost_lease_writes_nothing(database_url, held):
    claim, memory_ids, _ = held
    with queue.connect(database_url) as connection:
        queue.release(connection, claim)
        assert writer.write_measurement(connection, claim, measurement(memory_ids),
                                        writer.RunSource(claim.prompt_id)) is None
        assert connection.execute("SELECT count(*) FROM measurement_runs").fetchone() == (0,)


def test_a_failed_write_leaves_nothing_and_the_prompt_held(database_url, held):
    claim, memory_ids, _ = held
    with queue.connect(database_url) as connection:
        with pytest.raises(DatabaseError, match="writing the results of prompt"):
            writer.write_measurement(connection, claim, measurement([memory_ids[0], 424242]),
                                     writer.RunSource(claim.prompt_id))
        counts = connection.execute("SELECT (SELECT count(*) FROM measurement_runs), "
                                    "(SELECT count(*) FROM icl_dynamics_log), (SELECT status FROM prompts)").fetchone()
    assert counts == (0, 0, "running")


def test_the_log_is_one_row_per_layer_and_one_per_run_and_the_view_unfolds_them(database_url, held):
    claim, memory_ids, session_id = held
    result = measurement(memory_ids)

    with queue.connect(database_url) as connection:
        run_id = writer.write_measurement(connection, claim, result,
                                          writer.RunSource(claim.prompt_id, session_id=session_id))
        layers = connection.execute(
            f"SELECT layer_idx, {', '.join(DYNAMICS_NAMES)} FROM icl_dynamics_layers WHERE run_id = %s "
            "ORDER BY layer_idx", (run_id,)).fetchall()
        tokens = connection.execute("SELECT token_position, token_text, segment, memory_id FROM icl_dynamics_tokens "
                                    "WHERE run_id = %s", (run_id,)).fetchall()
        prompt_hash = connection.execute("SELECT prompt_hash FROM measurement_runs WHERE id = %s",
                                         (run_id,)).fetchone()[0]

    assert [row[0] for row in layers] == list(range(NUM_LAYERS))
    for layer_idx, *arrays in layers:
        for name, stored in zip(DYNAMICS_NAMES, arrays):
            # real[] arrives as text, in the shortest digits that read back as the same float32
            found = [None if value is None else np.float32(value) for value in stored]
            expected = [None if np.isnan(value) else np.float32(value) for value in result.dynamics[name][layer_idx]]
            assert found == expected, (name, layer_idx)
    assert tokens == [([token.position for token in result.tokens],
                       [writer.clean_text(token.text) for token in result.tokens],
                       [token.segment for token in result.tokens], [token.memory_id for token in result.tokens])]
    assert prompt_hash == hashlib.sha256(np.asarray(result.input_ids, dtype="<i8").tobytes()).hexdigest()


def test_results_are_prepared_without_a_connection_and_written_later(database_url, held):
    claim, memory_ids, _ = held
    prepared = writer.prepare(measurement(memory_ids), writer.RunSource(claim.prompt_id))

    with queue.connect(database_url) as connection:
        run_id = writer.write(connection, claim, prepared)
        counts = connection.execute(
            "SELECT (SELECT count(*) FROM icl_dynamics_layers), (SELECT count(*) FROM icl_dynamics_tokens), "
            "(SELECT count(*) FROM icl_dynamics_log), (SELECT count(*) FROM memory_effects WHERE run_id = %s)",
            (run_id,)).fetchone()

    assert prepared.logged_values == NUM_LAYERS * 6
    assert counts == (NUM_LAYERS, 1, NUM_LAYERS * 6, 2)
