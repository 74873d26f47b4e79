"""Writing one measurement's results, in the transaction that marks its prompt done.

The measurement is the engine's `Measurement` (plain numpy arrays and numbers; nothing here imports
torch). `prepare` turns it into what the database takes and needs no connection, so that the daemon
runs it on the thread that measures; `write` sends it in one transaction that marks the prompt done:
the run's row, one icl_dynamics_layers row per layer (the six quantities as float32 arrays over the
context tokens) in one binary COPY whose payload numpy assembles, the run's icl_dynamics_tokens row in
another, and the memories' rows. `write_measurement` does both. The tables and why they are arrays:
store/models.py `IclDynamicsLayers`.
"""

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.store import queue
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES

if TYPE_CHECKING:
    from icldaemon.engine.answers import AnswerPatch
    from icldaemon.engine.result import Measurement

LAYER_COLUMNS = ("run_id", "layer_idx", *DYNAMICS_NAMES)
TOKEN_COLUMNS = ("run_id", "token_position", "token_text", "segment", "memory_id")
LAYERS_COPY = f"COPY icl_dynamics_layers ({', '.join(LAYER_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
TOKENS_COPY = f"COPY icl_dynamics_tokens ({', '.join(TOKEN_COLUMNS)}) FROM STDIN (FORMAT BINARY)"

# PostgreSQL's binary COPY: a header, per row a field count and per field its length (-1: NULL) and bytes,
# a trailer. An array field: dimensions, a has-NULLs flag, the element type's OID, per dimension its
# length and lower bound (1), then per element its length (-1: NULL) and bytes, all big-endian.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_NULL = -1
_FLOAT4_OID, _INT4_OID, _INT8_OID, _TEXT_OID = 700, 23, 20, 25
_ARRAY_HEADER = struct.Struct(">iiiiii")  # field length, dimensions, has NULLs, element OID, length, lower bound
_EMPTY_ARRAY = struct.Struct(">iiii")  # field length, no dimensions, no NULLs, element OID
_LENGTH = struct.Struct(">i")
_FLOAT4_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">f4")])
_INT4_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">i4")])
_INT8_ELEMENTS = np.dtype([("length", ">i4"), ("value", ">i8")])
_RUN_ID_FIELD = struct.Struct(">hiq")  # a row's field count, then the run id's length and value
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class RunSource:
    """What the measurement itself does not know: which prompt it was, and how it was measured."""

    prompt_id: int
    session_id: object = None
    stride: int = 1


@dataclass
class PreparedResults:
    """One measurement ready to write: every row but the run id, which the database gives when it is written."""

    prompt_id: int
    run: dict  # measurement_runs' columns
    layer_rows: list[bytes]  # per layer, its binary COPY fields after the run id
    token_fields: bytes  # the icl_dynamics_tokens row's fields after the run id
    memory_effects: list[dict] = field(default_factory=list)
    memory_patches: list[dict] = field(default_factory=list)
    answer_patches: list[dict] = field(default_factory=list)
    logged_values: int = 0  # (layer, context token) entries: the rows of icl_dynamics_log

    def layers_payload(self, run_id: int) -> bytes:
        return _with_run_id(self.layer_rows, run_id, len(LAYER_COLUMNS))

    def tokens_payload(self, run_id: int) -> bytes:
        return _with_run_id([self.token_fields], run_id, len(TOKEN_COLUMNS))


def _with_run_id(rows: list[bytes], run_id: int, field_count: int) -> bytes:
    prefix = _RUN_ID_FIELD.pack(field_count, 8, run_id)
    parts = [_COPY_HEADER]
    for row in rows:
        parts.append(prefix)
        parts.append(row)
    parts.append(_COPY_TRAILER)
    return b"".join(parts)


def clean_text(text: str | None) -> str | None:
    """Text PostgreSQL accepts: NUL characters and unpaired surrogates (invalid Unicode) become U+FFFD."""
    if text is None:
        return None
    text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join(REPLACEMENT if 0xD800 <= ord(character) <= 0xDFFF else character for character in text)
    return text


def prompt_hash(input_ids) -> str:
    """sha256 of the token ids as little-endian int64: equal prompts under one tokenizer share it."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i8").tobytes()).hexdigest()


# --- array fields


def _fixed_width_array(elements: np.ndarray, missing: np.ndarray, element_oid: int) -> bytes:
    """One array field from [n] (length, value) records; the records where `missing` is set become NULL."""
    count = len(elements)
    if count == 0:
        return _EMPTY_ARRAY.pack(12, 0, 0, element_oid)
    if not missing.any():
        body = elements.tobytes()
        return _ARRAY_HEADER.pack(20 + len(body), 1, 0, element_oid, count, 1) + body
    elements = elements.copy()
    elements["length"][missing] = _NULL
    width = elements.dtype.itemsize
    keep = np.ones((count, width), dtype=bool)
    keep[missing, 4:] = False  # a NULL element is its length alone
    body = elements.view(np.uint8).reshape(count, width)[keep].tobytes()
    return _ARRAY_HEADER.pack(20 + len(body), 1, 1, element_oid, count, 1) + body


def _utf8(text: str) -> bytes:
    if "\x00" not in text:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            pass
    return clean_text(text).encode("utf-8")


def _text_array(texts: list[str | None]) -> bytes:
    if not texts:
        return _EMPTY_ARRAY.pack(12, 0, 0, _TEXT_OID)
    pack_length = _LENGTH.pack
    null = pack_length(_NULL)
    parts = []
    for text in texts:
        if text is None:
            parts.append(null)
        else:
            data = _utf8(text)
            parts.append(pack_length(len(data)))
            parts.append(data)
    body = b"".join(parts)
    has_null = int(any(text is None for text in texts))
    return _ARRAY_HEADER.pack(20 + len(body), 1, has_null, _TEXT_OID, len(texts), 1) + body


def layer_rows(dynamics: Mapping[str, np.ndarray]) -> list[bytes]:
    """Per layer, the binary COPY fields of its icl_dynamics_layers row after the run id: layer_idx, then
    each quantity as a float32 array over the context tokens, NaN (a skipped prefix) as NULL."""
    values = np.stack([np.asarray(dynamics[name], dtype=np.float32) for name in DYNAMICS_NAMES], axis=1)
    num_layers, num_quantities, num_tokens = values.shape  # [layer, quantity, token]
    missing = np.isnan(values)
    # A layer without NULLs is fixed-width: its fields as one block of big-endian words, filled at once.
    words = np.empty((num_layers, 2 + num_quantities * (6 + 2 * num_tokens)), dtype=">i4")
    words[:, 0] = 4
    words[:, 1] = np.arange(num_layers)
    arrays = words[:, 2:].reshape(num_layers, num_quantities, 6 + 2 * num_tokens)
    arrays[:, :, :6] = (20 + 8 * num_tokens, 1, 0, _FLOAT4_OID, num_tokens, 1)
    elements = arrays[:, :, 6:].reshape(num_layers, num_quantities, num_tokens, 2)
    elements[..., 0] = 4
    elements[..., 1] = values.astype(">f4").view(">i4")
    rows = []
    for layer_idx in range(num_layers):
        if num_tokens and not missing[layer_idx].any():
            rows.append(words[layer_idx].tobytes())
            continue
        fields = [struct.pack(">ii", 4, layer_idx)]
        for quantity in range(num_quantities):
            layer_elements = np.empty(num_tokens, dtype=_FLOAT4_ELEMENTS)
            layer_elements["length"] = 4
            layer_elements["value"] = values[layer_idx, quantity]
            fields.append(_fixed_width_array(layer_elements, missing[layer_idx, quantity], _FLOAT4_OID))
        rows.append(b"".join(fields))
    return rows


def token_fields(tokens) -> bytes:
    """The binary COPY fields of a run's icl_dynamics_tokens row after the run id: each token column an array."""
    count = len(tokens)
    positions = np.empty(count, dtype=_INT4_ELEMENTS)
    positions["length"] = 4
    positions["value"] = [token.position for token in tokens]
    memory_ids = np.empty(count, dtype=_INT8_ELEMENTS)
    memory_ids["length"] = 8
    no_memory = np.array([token.memory_id is None for token in tokens], dtype=bool)
    memory_ids["value"] = [0 if token.memory_id is None else token.memory_id for token in tokens]
    return b"".join([
        _fixed_width_array(positions, np.zeros(count, dtype=bool), _INT4_OID),
        _text_array([token.text for token in tokens]),
        _text_array([token.segment for token in tokens]),
        _fixed_width_array(memory_ids, no_memory, _INT8_OID),
    ])


# --- one measurement


def _float32_le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _float16_le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f2").tobytes()


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def prepare(
    measurement: "Measurement", source: RunSource, answer_patches: "Mapping[int, AnswerPatch] | None" = None,
) -> PreparedResults:
    """Everything `write` sends for one measurement, assembled without a connection."""
    timings, exactness, model = measurement.timings, measurement.exactness, measurement.model
    num_layers, num_tokens = measurement.dynamics[DYNAMICS_NAMES[0]].shape
    if len(measurement.tokens) != num_tokens:
        raise ValueError(f"{len(measurement.tokens)} tokens for dynamics over {num_tokens} context tokens")
    model_name = model.get("name") or "unknown"
    run = {
        "prompt_id": source.prompt_id,
        "model": model_name,
        "dtype": model.get("dtype"),
        "device": model.get("device"),
        "num_layers": num_layers,
        "total_tokens": len(measurement.input_ids),
        "context_tokens": num_tokens,
        "anchor_tokens": measurement.anchor_tokens,
        "query_position": measurement.query_position,
        "stride": source.stride,
        "plain_forward_s": timings.get("plain_forward_s"),
        "measure_s": timings.get("measure_s"),
        "max_abs_logit_error": _finite_or_none(exactness["max_abs_logit_error"]),
        "exactness_kl": _finite_or_none(exactness["kl"]),
        "context_kl": _finite_or_none(measurement.context_ablation.kl),
        "method_version": measurement.method_version,
        "prompt_hash": prompt_hash(measurement.input_ids),
    }
    memories = [segment for segment in measurement.segments if segment.memory_id is not None]
    return PreparedResults(
        prompt_id=source.prompt_id,
        run=run,
        layer_rows=layer_rows(measurement.dynamics),
        token_fields=token_fields(measurement.tokens),
        memory_effects=[
            {
                "memory_id": segment.memory_id, "segment": segment.label,
                "token_start": segment.start, "token_end": segment.end,
                "kl": _finite_or_none(segment.ablation.kl),
                "max_abs_logit_error": _finite_or_none(segment.ablation.max_abs_logit_error),
                "patched_kl": _finite_or_none(segment.ablation.patched_kl),
                "update_frobenius_norm": [float(v) for v in segment.ablation.update_frobenius_norm],
                "bias_update_norm": [float(v) for v in segment.ablation.bias_update_norm],
            }
            for segment in memories
        ],
        memory_patches=[
            {
                "memory_id": segment.memory_id, "model": model_name, "model_revision": model.get("revision"),
                "num_layers": segment.ablation.delta.shape[0], "d_model": segment.ablation.delta.shape[1],
                "delta": _float32_le(segment.ablation.delta),
                "a_tilde": _float32_le(segment.ablation.a_tilde),
                "bias_delta": _float32_le(segment.ablation.bias_delta),
            }
            for segment in memories
        ],
        answer_patches=[
            {
                "memory_id": memory_id, "model": model_name, "model_revision": model.get("revision"),
                "num_layers": patch.value.shape[0], "d_model": patch.value.shape[2],
                "answer_ids": [int(token_id) for token_id in patch.answer_ids],
                "a_tilde": _float16_le(patch.a_tilde), "value": _float16_le(patch.value),
                "max_abs_log_prob_error": _finite_or_none(patch.max_abs_log_prob_error),
            }
            for memory_id, patch in (answer_patches or {}).items()
        ],
        logged_values=num_layers * num_tokens,
    )


def write(connection: psycopg.Connection, claim: queue.Claim, prepared: PreparedResults) -> int | None:
    """Write the prepared results and mark the prompt done, in one transaction.

    Returns the measurement run's id, or None (and nothing written) when `claim` no longer holds the prompt.
    """
    with translate_errors(queue.connection_url(connection), f"writing the results of prompt {prepared.prompt_id}"):
        with connection.transaction():
            if not queue.complete(connection, claim):
                return None
            run_id = connection.execute(QUERIES["insert_measurement_run"], prepared.run).fetchone()[0]
            with connection.cursor() as cursor:
                with cursor.copy(LAYERS_COPY) as copy:
                    copy.write(prepared.layers_payload(run_id))
                with cursor.copy(TOKENS_COPY) as copy:
                    copy.write(prepared.tokens_payload(run_id))
                for query, rows in (("insert_memory_effect", prepared.memory_effects),
                                    ("insert_memory_patch", prepared.memory_patches),
                                    ("insert_memory_answer_patch", prepared.answer_patches)):
                    if rows:
                        cursor.executemany(QUERIES[query], [{"run_id": run_id, **row} for row in rows])
    return run_id


def write_measurement(
    connection: psycopg.Connection, claim: queue.Claim, measurement: "Measurement", source: RunSource,
    answer_patches: "Mapping[int, AnswerPatch] | None" = None,
) -> int | None:
    """Write the measurement's rows (and each memory's answer-position patch) and mark the prompt done, in
    one transaction.

    Returns the measurement run's id, or None (and nothing written) when `claim` no longer holds the prompt.
    """
    return write(connection, claim, prepare(measurement, source, answer_patches))
