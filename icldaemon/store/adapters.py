"""Consolidation's reads and writes: groups due, their answer patches, adapter versions and their patches."""

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg.rows import dict_row

from icldaemon.exceptions import BadInputError, ConsolidationError
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import QUERIES
from icldaemon.store.queue import connection_url


@dataclass(frozen=True)
class GroupKey:
    """Which patches may be consolidated together: one model, weights revision and method version."""

    model: str
    model_revision: str | None
    method_version: int

    def parameters(self) -> dict:
        return {"model": self.model, "model_revision": self.model_revision, "method_version": self.method_version}


@dataclass
class StoredAnswerPatch:
    run_id: int
    memory_id: int
    prompt_id: int
    answer_ids: list[int]
    a_tilde: np.ndarray  # [num_layers, positions, d_model], float32 (stored as float16)
    value: np.ndarray  # [num_layers, positions, d_model]
    max_abs_log_prob_error: float | None


def due_groups(connection: psycopg.Connection, key: GroupKey, *, scope: str, scope_key: str | None,
               min_patches: int) -> list[tuple[str, int, int]]:
    """(scope_key, patches, new patches) of every group of the scope with at least `min_patches` new patches."""
    parameters = {**key.parameters(), "scope": scope, "scope_key": scope_key, "min_patches": min_patches}
    with translate_errors(connection_url(connection), "finding patches to consolidate"):
        rows = connection.execute(QUERIES["scope_groups"], parameters).fetchall()
        connection.commit()
    return [(row[0], row[1], row[2]) for row in rows]


def models_of_memory(connection: psycopg.Connection, memory_id: int) -> list[tuple[str, str | None, int]]:
    """(model, revision, patches) that one memory's answer patches were measured on."""
    with translate_errors(connection_url(connection), "counting patches"):
        rows = connection.execute(QUERIES["patch_models"], {"memory_id": memory_id}).fetchall()
        connection.commit()
    return [(row[0], row[1], row[2]) for row in rows]


def _decode(raw: bytes, shape: tuple[int, int, int], what: str) -> np.ndarray:
    expected = shape[0] * shape[1] * shape[2] * 2
    if len(raw) != expected:
        raise BadInputError(f"{what} has {len(raw)} bytes, expected {expected} (float16 {list(shape)})")
    values = np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise ConsolidationError(f"{what} holds NaN or inf; delete that patch or consolidate without it")
    return values


def answer_patches(connection: psycopg.Connection, key: GroupKey, *, scope: str, scope_key: str,
                   num_layers: int, d_model: int) -> list[StoredAnswerPatch]:
    """Every answer patch of one group, oldest run first; their shape is checked against the model's."""
    parameters = {**key.parameters(), "scope": scope, "scope_key": scope_key}
    with translate_errors(connection_url(connection), f"reading the patches of {scope_key}"):
        rows = connection.execute(QUERIES["scope_answer_patches"], parameters).fetchall()
        connection.commit()
    patches = []
    for run_id, memory_id, prompt_id, layers, width, answer_ids, a_tilde, value, error in rows:
        what = f"the answer patch of memory {memory_id} in run {run_id}"
        if (layers, width) != (num_layers, d_model):
            raise BadInputError(f"{what} has {layers} layers x {width}; the model has {num_layers} x {d_model}")
        shape = (layers, len(answer_ids), width)
        patches.append(StoredAnswerPatch(run_id, memory_id, prompt_id, list(answer_ids),
                                         _decode(a_tilde, shape, f"{what} (a_tilde)"),
                                         _decode(value, shape, f"{what} (value)"), error))
    return patches


def prompt_source(connection: psycopg.Connection, prompt_id: int) -> tuple[list | None, str | None]:
    """A prompt's chat messages or raw text, as it was measured."""
    with translate_errors(connection_url(connection), f"reading prompt {prompt_id}"):
        row = connection.execute(QUERIES["prompt_source"], {"prompt_id": prompt_id}).fetchone()
        connection.commit()
    if row is None:
        raise BadInputError(f"prompt {prompt_id} does not exist")
    return row[0], row[1]


def try_lock(connection: psycopg.Connection, model: str, scope_key: str) -> bool:
    """A session advisory lock on one model's group, so that two daemons never consolidate it at once."""
    with translate_errors(connection_url(connection), "locking a group"):
        locked = connection.execute(QUERIES["lock_scope"], {"model": model, "scope_key": scope_key}).fetchone()[0]
        connection.commit()
    return bool(locked)


def unlock(connection: psycopg.Connection, model: str, scope_key: str) -> None:
    with translate_errors(connection_url(connection), "unlocking a group"):
        if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            connection.rollback()
        connection.execute(QUERIES["unlock_scope"], {"model": model, "scope_key": scope_key})
        connection.commit()


def next_version(connection: psycopg.Connection, model: str, scope_key: str) -> tuple[int, set[str]]:
    """The next version number of the group, and the directories its listed versions use."""
    with translate_errors(connection_url(connection), f"numbering the next adapter of {scope_key}"):
        version = connection.execute(QUERIES["next_adapter_version"],
                                     {"model": model, "scope_key": scope_key}).fetchone()[0]
        listed = {row[0] for row in connection.execute(QUERIES["adapter_paths"],
                                                       {"model": model, "scope_key": scope_key})}
        connection.commit()
    return version, listed


def insert_adapter(connection: psycopg.Connection, row: dict, patches: dict[str, list[tuple[int, int]]]) -> int:
    """List one adapter version with the (run_id, memory_id) patches per role ('fit', 'held_out'); its id."""
    with translate_errors(connection_url(connection), f"listing the adapter of {row['scope_key']}"), \
            connection.transaction():
        adapter_id = connection.execute(QUERIES["insert_adapter"], row).fetchone()[0]
        with connection.cursor() as cursor:
            cursor.executemany(QUERIES["insert_adapter_patch"], [
                {"adapter_id": adapter_id, "run_id": run_id, "memory_id": memory_id, "role": role}
                for role, pairs in patches.items() for run_id, memory_id in pairs
            ])
        connection.execute(QUERIES["mark_patches_consolidated"], {"adapter_id": adapter_id})
    return adapter_id


def list_adapters(connection: psycopg.Connection, limit: int = 50) -> list[dict]:
    with translate_errors(connection_url(connection), "listing adapters"):
        with connection.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(QUERIES["list_adapters"], {"limit": limit}).fetchall()


def adapter(connection: psycopg.Connection, adapter_id: int) -> dict:
    """One adapter version with the memories it was fitted on; BadInputError when there is none."""
    with translate_errors(connection_url(connection), f"reading adapter {adapter_id}"):
        with connection.cursor(row_factory=dict_row) as cursor:
            row = cursor.execute(QUERIES["adapter_by_id"], {"adapter_id": adapter_id}).fetchone()
            if row is None:
                raise BadInputError(f"adapter {adapter_id} does not exist (see `icldaemon adapters`)")
            row["memories"] = cursor.execute(QUERIES["adapter_memories"], {"adapter_id": adapter_id}).fetchall()
        connection.commit()
    return row
