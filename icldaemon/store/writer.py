"""Writing one measurement's results, in the transaction that marks its prompt done.

The measurement is the engine's `Measurement` (plain numpy arrays and numbers; nothing here imports
torch). icl_dynamics_log rows go through one binary COPY whose payload is assembled with numpy: the
per-row numbers as fixed-width big-endian fields, the per-token text once per token.
"""

import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from icldaemon.store import queue
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_queries

if TYPE_CHECKING:
    from icldaemon.engine.answers import AnswerPatch
    from icldaemon.engine.result import Measurement

DYNAMICS_NAMES = (
    "delta_norm",
    "update_frobenius_norm",
    "marginal_update_norm",
    "cumulative_update_norm",
    "implicit_learning_rate",
    "bias_update_norm",
)
PER_TOKEN_COLUMNS = ("token_idx", "token_position", "token_text", "segment", "memory_id")
PER_RUN_COLUMNS = ("run_id", "prompt_id", "session_id", "prompt_hash", "model")
COPY_COLUMNS = ("layer_idx", *DYNAMICS_NAMES, *PER_TOKEN_COLUMNS, *PER_RUN_COLUMNS)
COPY_STATEMENT = f"COPY icl_dynamics_log ({', '.join(COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)"

_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)
_FIXED_FIELDS = np.dtype(
    [("field_count", ">i2"), ("layer_length", ">i4"), ("layer_idx", ">i4")]
    + [field for name in DYNAMICS_NAMES for field in ((f"{name}_length", ">i4"), (name, ">f8"))]
)
_VALUE_BYTES = 8  # float8
REPLACEMENT = "\ufffd"

QUERIES = load_queries()


@dataclass(frozen=True)
class RunSource:
    """What the measurement itself does not know: which prompt it was, and how it was measured."""

    prompt_id: int
    session_id: object = None
    stride: int = 1


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


def _text_field(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = clean_text(value).encode("utf-8")
    return struct.pack(">i", len(data)) + data


def _int_field(value: int | None, fmt: str) -> bytes:
    if value is None:
        return _NULL
    return struct.pack(">i" + fmt, struct.calcsize(">" + fmt), value)


def _uuid_field(value) -> bytes:
    if value is None:
        return _NULL
    return struct.pack(">i", 16) + value.bytes


def prompt_hash(input_ids) -> str:
    """sha256 of the token ids as little-endian int64: equal prompts under one tokenizer share it."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i8").tobytes()).hexdigest()


def dynamics_copy_payload(dynamics: dict[str, np.ndarray], tokens, **run) -> bytes:
    """The whole binary COPY payload at once (see dynamics_copy_chunks)."""
    return b"".join(dynamics_copy_chunks(dynamics, tokens, **run))


def dynamics_copy_chunks(
    dynamics: dict[str, np.ndarray],
    tokens,
    *,
    run_id: int,
    prompt_id: int | None,
    session_id=None,
    prompt_hash: str | None = None,
    model: str | None = None,
) -> Iterator[bytes]:
    """The binary COPY payload of every (layer, context token) row, layer-major, one layer a chunk.

    NaN becomes NULL. In chunks, so that the server stores one layer while the next is assembled.
    """
    num_layers, num_tokens = dynamics[DYNAMICS_NAMES[0]].shape
    if len(tokens) != num_tokens:
        raise ValueError(f"{len(tokens)} tokens for dynamics over {num_tokens} context tokens")
    rows = num_layers * num_tokens
    fixed = np.empty(rows, dtype=_FIXED_FIELDS)
    fixed["field_count"] = len(COPY_COLUMNS)
    fixed["layer_length"] = 4
    fixed["layer_idx"] = np.repeat(np.arange(num_layers, dtype=np.int32), num_tokens)
    keep = np.ones((rows, _FIXED_FIELDS.itemsize), dtype=bool)
    for name in DYNAMICS_NAMES:
        values = np.asarray(dynamics[name], dtype=np.float64).reshape(rows)  # [num_layers * num_tokens]
        missing = np.isnan(values)
        fixed[name] = np.where(missing, 0.0, values)
        fixed[f"{name}_length"] = np.where(missing, -1, _VALUE_BYTES)
        offset = _FIXED_FIELDS.fields[name][1]
        keep[missing, offset:offset + _VALUE_BYTES] = False
    fixed_bytes = fixed.view(np.uint8).reshape(rows, _FIXED_FIELDS.itemsize)
    kept = fixed_bytes[keep].tobytes()
    ends = np.cumsum(keep.sum(axis=1)).tolist()

    per_token = [
        _int_field(token.index, "i") + _int_field(token.position, "i") + _text_field(token.text)
        + _text_field(token.segment) + _int_field(token.memory_id, "q")
        for token in tokens
    ]
    per_run = (_int_field(run_id, "q") + _int_field(prompt_id, "q") + _uuid_field(session_id)
               + _text_field(prompt_hash) + _text_field(model))
    yield _COPY_HEADER
    start = 0
    row = 0
    for _layer in range(num_layers):
        parts = []
        for token_part in per_token:
            end = ends[row]
            parts.append(kept[start:end])
            parts.append(token_part)
            parts.append(per_run)
            start = end
            row += 1
        yield b"".join(parts)
    yield _COPY_TRAILER


def copy_dynamics(connection: psycopg.Connection, payload: bytes | Iterable[bytes]) -> None:
    chunks = [payload] if isinstance(payload, bytes) else payload
    with connection.cursor() as cursor, cursor.copy(COPY_STATEMENT) as copy:
        for chunk in chunks:
            copy.write(chunk)


def _float32_le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _float16_le(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f2").tobytes()


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def write_measurement(
    connection: psycopg.Connection, claim: queue.Claim, measurement: "Measurement", source: RunSource,
    answer_patches: "Mapping[int, AnswerPatch] | None" = None,
) -> int | None:
    """Write the measurement's rows (and each memory's answer-position patch) and mark the prompt done, in
    one transaction.

    Returns the measurement run's id, or None (and nothing written) when `claim` no longer holds the prompt.
    """
    timings, exactness, model = measurement.timings, measurement.exactness, measurement.model
    num_layers = measurement.num_layers
    run = {
        "prompt_id": source.prompt_id,
        "model": model.get("name") or "unknown",
        "dtype": model.get("dtype"),
        "device": model.get("device"),
        "num_layers": num_layers,
        "total_tokens": len(measurement.input_ids),
        "context_tokens": len(measurement.tokens),
        "anchor_tokens": measurement.anchor_tokens,
        "query_position": measurement.query_position,
        "stride": source.stride,
        "plain_forward_s": timings.get("plain_forward_s"),
        "measure_s": timings.get("measure_s"),
        "max_abs_logit_error": _finite_or_none(exactness["max_abs_logit_error"]),
        "exactness_kl": _finite_or_none(exactness["kl"]),
        "context_kl": _finite_or_none(measurement.context_ablation.kl),
        "method_version": measurement.method_version,
    }
    with translate_errors(queue.connection_url(connection), f"writing the results of prompt {source.prompt_id}"):
        with connection.transaction():
            if not queue.complete(connection, claim):
                return None
            run_id = connection.execute(QUERIES["insert_measurement_run"], run).fetchone()[0]
            payload = dynamics_copy_chunks(
                measurement.dynamics, measurement.tokens, run_id=run_id, prompt_id=source.prompt_id,
                session_id=source.session_id, prompt_hash=prompt_hash(measurement.input_ids), model=run["model"],
            )
            copy_dynamics(connection, payload)
            memories = [segment for segment in measurement.segments if segment.memory_id is not None]
            if memories:
                with connection.cursor() as cursor:
                    cursor.executemany(QUERIES["insert_memory_effect"], [
                        {
                            "run_id": run_id, "memory_id": segment.memory_id, "segment": segment.label,
                            "token_start": segment.start, "token_end": segment.end,
                            "kl": _finite_or_none(segment.ablation.kl),
                            "max_abs_logit_error": _finite_or_none(segment.ablation.max_abs_logit_error),
                            "patched_kl": _finite_or_none(segment.ablation.patched_kl),
                            "update_frobenius_norm": [float(v) for v in segment.ablation.update_frobenius_norm],
                            "bias_update_norm": [float(v) for v in segment.ablation.bias_update_norm],
                        }
                        for segment in memories
                    ])
                    cursor.executemany(QUERIES["insert_memory_patch"], [
                        {
                            "run_id": run_id, "memory_id": segment.memory_id, "model": run["model"],
                            "model_revision": model.get("revision"),
                            "num_layers": segment.ablation.delta.shape[0],
                            "d_model": segment.ablation.delta.shape[1],
                            "delta": _float32_le(segment.ablation.delta),
                            "a_tilde": _float32_le(segment.ablation.a_tilde),
                            "bias_delta": _float32_le(segment.ablation.bias_delta),
                        }
                        for segment in memories
                    ])
            if answer_patches:
                with connection.cursor() as cursor:
                    cursor.executemany(QUERIES["insert_memory_answer_patch"], [
                        {
                            "run_id": run_id, "memory_id": memory_id, "model": run["model"],
                            "model_revision": model.get("revision"),
                            "num_layers": patch.value.shape[0], "d_model": patch.value.shape[2],
                            "answer_ids": [int(token_id) for token_id in patch.answer_ids],
                            "a_tilde": _float16_le(patch.a_tilde), "value": _float16_le(patch.value),
                            "max_abs_log_prob_error": _finite_or_none(patch.max_abs_log_prob_error),
                        }
                        for memory_id, patch in answer_patches.items()
                    ])
    return run_id
