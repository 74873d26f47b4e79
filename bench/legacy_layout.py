"""The log as schema revision 0006 stored it, kept only to measure the present layout against it.

Up to revision 0006, icl_dynamics_log was a table of one row per (run, layer, context token), the run's
columns repeated on every row and the six quantities as float8, written by one binary COPY. This module
is that writer's payload assembly as it was (icldaemon/store/writer.py before revision 0007), for a
database migrated to "0006"; nothing in the package uses it.
"""

import struct
from collections.abc import Iterator

import numpy as np
import psycopg

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.store.writer import clean_text

REVISION = "0006"  # the last schema revision with this layout
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


def dynamics_copy_chunks(
    dynamics: dict[str, np.ndarray], tokens, *, run_id: int, prompt_id: int | None, session_id=None,
    prompt_hash: str | None = None, model: str | None = None,
) -> Iterator[bytes]:
    """The binary COPY payload of every (layer, context token) row, layer-major, one layer a chunk; NaN as NULL."""
    num_layers, num_tokens = dynamics[DYNAMICS_NAMES[0]].shape
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


def copy_dynamics(connection: psycopg.Connection, chunks) -> None:
    with connection.cursor() as cursor, cursor.copy(COPY_STATEMENT) as copy:
        for chunk in chunks:
            copy.write(chunk)
