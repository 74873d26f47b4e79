"""Consolidation: a group's stored rank-1 patches become a PEFT LoRA adapter version with measured fidelity.

A group is one memory ("memory:12"), one session ("session:<uuid>") or everything ("all") of the
loaded model and weights revision. When a group has at least `min_patches` patches that no adapter
of it has used, all its patches are split by age: the newest `held_out` share is kept out of the fit
and its queries measure the fidelity (DESIGN.md §1); the rest are fitted: directly (the steering patch,
for the query position) and layer by layer at every position (the LoRA adapter). The adapter directory is
written under a temporary name and renamed into place, then listed in `adapters` in one transaction
with the patches it used; a directory that is not listed there is never a finished adapter.
"""

import json
import math
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import psycopg
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from icldaemon.assembly import assemble_prompt
from icldaemon.engine.adapters import adapter_for
from icldaemon.engine.consolidation import (
    RIDGE,
    Fidelity,
    FidelityExample,
    PatchSet,
    export_lora,
    fit_sequential_static_patch,
    fit_static_patch,
    measure_fidelity,
    without_segments,
)
from icldaemon.engine.loading import LoadedModel
from icldaemon.engine.result import METHOD_VERSION
from icldaemon.exceptions import BadInputError, ConsolidationError, IcldaemonError
from icldaemon.logs import get_logger
from icldaemon.store import queue
from icldaemon.store.database import translate_errors
from icldaemon.store.queries import load_queries

SCOPES = ("memory", "session", "all")
RANK = 4  # rank of the LoRA adapter
MIN_PATCHES = 8  # new patches a group needs before a new adapter version is fitted
HELD_OUT = 0.25  # share of a group's patches (the newest) kept out of the fit to measure fidelity
INTERVAL_MINUTES = 60.0  # minutes between scheduled consolidations

QUERIES = load_queries()


class ConsolidationSettings(BaseSettings):
    """The scheduled consolidation (ICLD_CONSOLIDATE_...)."""

    model_config = SettingsConfigDict(env_prefix="ICLD_CONSOLIDATE_", env_file=None, extra="ignore")

    interval_minutes: float = Field(default=INTERVAL_MINUTES,
                                    description="Minutes between consolidations; 0 turns the job off.")
    cron: str | None = Field(default=None, description="A crontab expression (UTC) used instead of the interval, "
                                                       "for example '0 3 * * *'.")
    scope: Literal["memory", "session", "all"] = Field(default="memory", description="What one adapter covers.")
    rank: int = Field(default=RANK, ge=1, description="Rank of the LoRA adapters.")
    min_patches: int = Field(default=MIN_PATCHES, ge=2, description="New patches a group needs for a new version.")
    ridge: float = Field(default=RIDGE, ge=0, description="Ridge lambda as a share of the mean squared input norm.")
    held_out: float = Field(default=HELD_OUT, gt=0, lt=1, description="Share of patches held out for fidelity.")


@dataclass(frozen=True)
class ConsolidationRequest:
    scope: str = "memory"
    memory_id: int | None = None
    session_id: str | None = None
    rank: int = RANK
    min_patches: int = MIN_PATCHES
    ridge: float = RIDGE
    held_out: float = HELD_OUT

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise BadInputError(f"scope {self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.memory_id is not None and self.scope != "memory":
            raise BadInputError(f"--memory-id needs scope memory, not {self.scope}")
        if self.session_id is not None and self.scope != "session":
            raise BadInputError(f"--session-id needs scope session, not {self.scope}")
        if self.rank < 1:
            raise BadInputError(f"rank must be at least 1, got {self.rank}")
        if self.min_patches < 2:
            raise BadInputError(f"min_patches must be at least 2 (one to fit, one held out), got {self.min_patches}")
        if not 0 < self.held_out < 1:
            raise BadInputError(f"held_out must be between 0 and 1, got {self.held_out}")

    @classmethod
    def from_settings(cls, settings: ConsolidationSettings) -> "ConsolidationRequest":
        return cls(scope=settings.scope, rank=settings.rank, min_patches=settings.min_patches,
                   ridge=settings.ridge, held_out=settings.held_out)

    @property
    def scope_key(self) -> str | None:
        """The one group asked for, or None for every group of the scope."""
        if self.memory_id is not None:
            return f"memory:{self.memory_id}"
        if self.session_id is not None:
            return f"session:{uuid.UUID(str(self.session_id))}"
        return "all" if self.scope == "all" else None


@dataclass
class AdapterRecord:
    id: int
    scope_key: str
    version: int
    path: Path
    patch_count: int
    held_out_count: int
    fidelity: Fidelity | None


@dataclass
class _StoredPatch:
    run_id: int
    memory_id: int
    prompt_id: int
    delta: np.ndarray  # [num_layers, d_model]
    a_tilde: np.ndarray
    bias_delta: np.ndarray


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-") or "model"


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class Consolidator:
    """Fits and writes adapter versions for one loaded model against one database."""

    def __init__(self, url: str, loaded: LoadedModel, adapters_dir: Path):
        self.url, self.loaded, self.adapters_dir = url, loaded, Path(adapters_dir)
        self.adapter = adapter_for(loaded.model)
        self.num_layers = self.adapter.num_layers(loaded.model)
        self.d_model = loaded.model.config.hidden_size
        self.log = get_logger(model=loaded.name)

    def _model_parameters(self) -> dict:
        # patches of another method version describe other prompts: they never mix in one adapter
        return {"model": self.loaded.name, "model_revision": self.loaded.revision or None,
                "method_version": METHOD_VERSION}

    # --- which groups

    def groups(self, connection: psycopg.Connection, request: ConsolidationRequest) -> list[tuple[str, int, int]]:
        """(scope_key, patches, new patches) of every group due for a new version."""
        parameters = {**self._model_parameters(), "scope": request.scope, "scope_key": request.scope_key,
                      "min_patches": request.min_patches}
        with translate_errors(self.url, "finding patches to consolidate"):
            rows = connection.execute(QUERIES["scope_groups"], parameters).fetchall()
            connection.commit()
        if request.scope_key is not None and not rows:
            raise BadInputError(self._why_not_due(connection, request))
        return [(row[0], row[1], row[2]) for row in rows]

    def _why_not_due(self, connection: psycopg.Connection, request: ConsolidationRequest) -> str:
        parameters = {**self._model_parameters(), "scope": request.scope, "scope_key": request.scope_key,
                      "min_patches": 0}
        with translate_errors(self.url, "counting patches"):
            counted = connection.execute(QUERIES["scope_groups"], parameters).fetchone()
            others = (connection.execute(QUERIES["patch_models"], {"memory_id": request.memory_id}).fetchall()
                      if request.memory_id is not None else [])
            connection.commit()
        model = f"model {self.loaded.name} (weights {self.loaded.revision or 'unknown'})"
        if counted is None:
            elsewhere = [f"{patches} of {name} (weights {revision or 'unknown'})" for name, revision, patches in others]
            return (f"{request.scope_key} has no patches of {model}"
                    + (f"; it has {', '.join(elsewhere)}" if elsewhere else ""))
        return (f"{request.scope_key} has {counted[2]} new patches of {model} ({counted[1]} in all); at least "
                f"{request.min_patches} are needed (--min-patches)")

    # --- one group

    def _load_patches(self, connection: psycopg.Connection, request: ConsolidationRequest,
                      scope_key: str) -> list[_StoredPatch]:
        parameters = {**self._model_parameters(), "scope": request.scope, "scope_key": scope_key}
        with translate_errors(self.url, f"reading the patches of {scope_key}"):
            rows = connection.execute(QUERIES["scope_patches"], parameters).fetchall()
            connection.commit()
        patches = []
        for run_id, memory_id, prompt_id, num_layers, d_model, delta, a_tilde, bias_delta in rows:
            if (num_layers, d_model) != (self.num_layers, self.d_model):
                raise BadInputError(
                    f"the patch of memory {memory_id} in run {run_id} has {num_layers} layers x {d_model}; the model "
                    f"{self.loaded.name} has {self.num_layers} x {self.d_model}"
                )
            factors = []
            for name, raw in (("delta", delta), ("a_tilde", a_tilde), ("bias_delta", bias_delta)):
                if len(raw) != num_layers * d_model * 4:
                    raise BadInputError(f"the {name} of memory {memory_id} in run {run_id} has {len(raw)} bytes, "
                                        f"expected {num_layers * d_model * 4} (float32 [{num_layers}, {d_model}])")
                values = np.frombuffer(raw, dtype="<f4").reshape(num_layers, d_model)
                if not np.isfinite(values).all():
                    raise ConsolidationError(f"the stored {name} of memory {memory_id} in run {run_id} holds NaN or "
                                             "inf; delete that patch or consolidate without it")
                factors.append(values)
            patches.append(_StoredPatch(run_id, memory_id, prompt_id, *factors))
        return patches

    def _examples(self, connection: psycopg.Connection, held_out: list[_StoredPatch]) -> list[FidelityExample]:
        examples = []
        for patch in held_out:
            with translate_errors(self.url, f"reading prompt {patch.prompt_id}"):
                messages, text = connection.execute(QUERIES["prompt_source"], {"prompt_id": patch.prompt_id}).fetchone()
                connection.commit()
            retrievals = queue.retrievals(connection, patch.prompt_id)
            try:
                prompt = assemble_prompt(self.loaded.tokenizer, self.loaded.model, messages=messages, text=text,
                                         retrievals=retrievals)
            except BadInputError as exc:
                self.log.warning("fidelity_example_skipped", run_id=patch.run_id, error=str(exc))
                continue
            label = f"memory:{patch.memory_id}"
            if label not in {segment.label for segment in prompt.segments}:
                self.log.warning("fidelity_example_skipped", run_id=patch.run_id, error=f"{label} is not in the prompt")
                continue
            examples.append(FidelityExample(prompt.input_ids, without_segments(prompt, {label})))
        return examples

    def consolidate_group(self, connection: psycopg.Connection, request: ConsolidationRequest,
                          scope_key: str) -> AdapterRecord:
        patches = self._load_patches(connection, request, scope_key)
        count = len(patches)
        held_count = max(1, round(request.held_out * count))
        if count - held_count < 1:
            raise BadInputError(f"{scope_key} has {count} patch(es); at least 2 are needed (one to fit, one held out)")
        fit, held_out = patches[: count - held_count], patches[count - held_count :]
        log = self.log.bind(scope_key=scope_key, patches=count, held_out=held_count)
        log.info("consolidation_started")
        # At the query position the direct fit of the exact patches is the steering patch; the adapter,
        # which acts at every position, is fitted layer by layer on the fit queries rebuilt without the memory.
        steering = fit_static_patch(
            PatchSet(np.stack([p.delta for p in fit]), np.stack([p.a_tilde for p in fit]),
                     np.stack([p.bias_delta for p in fit])),
            rank=request.rank, ridge=request.ridge,
        )
        fit_examples = self._examples(connection, fit)
        static = (fit_sequential_static_patch(self.loaded.model, fit_examples, request.rank, request.ridge,
                                              self.adapter) if fit_examples else steering)
        log.info("adapter_fitted", fit_queries=len(fit_examples))
        examples = self._examples(connection, held_out)
        fidelity = None
        if examples:
            at_query = measure_fidelity(self.loaded.model, steering, examples, self.adapter)
            everywhere = measure_fidelity(self.loaded.model, static, examples, self.adapter)
            fidelity = Fidelity(
                examples=len(examples), kl_without=at_query.kl_without,
                kl_adapter_query=at_query.kl_adapter_query, kl_adapter_all=everywhere.kl_adapter_all,
                greedy_match_without=at_query.greedy_match_without, greedy_match_query=at_query.greedy_match_query,
                greedy_match_all=everywhere.greedy_match_all,
            )

        with translate_errors(self.url, f"numbering the next adapter of {scope_key}"):
            version = connection.execute(QUERIES["next_adapter_version"],
                                         {"model": self.loaded.name, "scope_key": scope_key}).fetchone()[0]
            listed = {row[0] for row in connection.execute(
                QUERIES["adapter_paths"], {"model": self.loaded.name, "scope_key": scope_key})}
            connection.commit()
        directory = self.adapters_dir / _slug(self.loaded.name) / _slug(scope_key) / f"v{version}"
        metadata = {
            "scope_key": scope_key, "version": version, "model": self.loaded.name,
            "model_revision": self.loaded.revision, "rank": static.rank, "ridge": request.ridge,
            "fit_patches": [[p.run_id, p.memory_id] for p in fit],
            "held_out_patches": [[p.run_id, p.memory_id] for p in held_out],
            "fidelity": asdict(fidelity) if fidelity else None,
        }
        self._write_directory(directory, listed, static, metadata)
        row = {
            "scope": request.scope, "scope_key": scope_key,
            "memory_id": fit[0].memory_id if request.scope == "memory" else None,
            "session_id": scope_key.removeprefix("session:") if request.scope == "session" else None,
            **self._model_parameters(), "version": version, "layers": list(range(static.num_layers)),
            "rank": static.rank, "ridge": request.ridge, "patch_count": len(fit), "held_out_count": len(held_out),
            "path": str(directory),
            "kl_without": _finite_or_none(fidelity and fidelity.kl_without),
            "kl_adapter_query": _finite_or_none(fidelity and fidelity.kl_adapter_query),
            "kl_adapter_all": _finite_or_none(fidelity and fidelity.kl_adapter_all),
            "recovered_query": _finite_or_none(fidelity and fidelity.recovered_query),
            "recovered_all": _finite_or_none(fidelity and fidelity.recovered_all),
            "greedy_match_query": _finite_or_none(fidelity and fidelity.greedy_match_query),
            "greedy_match_all": _finite_or_none(fidelity and fidelity.greedy_match_all),
        }
        try:
            with translate_errors(self.url, f"listing the adapter of {scope_key}"), connection.transaction():
                adapter_id = connection.execute(QUERIES["insert_adapter"], row).fetchone()[0]
                with connection.cursor() as cursor:
                    cursor.executemany(QUERIES["insert_adapter_patch"], [
                        {"adapter_id": adapter_id, "run_id": p.run_id, "memory_id": p.memory_id, "role": role}
                        for role, group in (("fit", fit), ("held_out", held_out)) for p in group
                    ])
                connection.execute(QUERIES["mark_patches_consolidated"], {"adapter_id": adapter_id})
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        log.info("adapter_written", adapter_id=adapter_id, version=version, path=str(directory), rank=static.rank,
                 recovered_query=row["recovered_query"], recovered_all=row["recovered_all"])
        return AdapterRecord(adapter_id, scope_key, version, directory, len(fit), len(held_out), fidelity)

    def _write_directory(self, directory: Path, listed: set[str], static, metadata: dict) -> None:
        """Write into a temporary sibling and rename it into place: a directory there is complete."""
        parent = directory.parent
        temporary = parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if directory.exists() and str(directory) not in listed:
                shutil.rmtree(directory)  # left by a run that stopped between the rename and the listing
            export_lora(self.loaded.model, static, temporary, base_model=self.loaded.name, metadata=metadata,
                        adapter=self.adapter)
            temporary.rename(directory)
        except OSError as exc:
            shutil.rmtree(temporary, ignore_errors=True)
            raise ConsolidationError(f"cannot write the adapter directory {directory}: {exc}") from exc
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    # --- every due group

    def run(self, request: ConsolidationRequest, *, raise_errors: bool = True) -> list[AdapterRecord]:
        """Consolidate every due group of the request; with raise_errors False a failing group is logged and skipped."""
        records = []
        with queue.connect(self.url) as connection:
            groups = self.groups(connection, request)
            self.log.info("consolidation_due", scope=request.scope, groups=len(groups))
            for scope_key, _patches, _new in groups:
                lock = {"model": self.loaded.name, "scope_key": scope_key}
                with translate_errors(self.url, "locking a group"):
                    locked = connection.execute(QUERIES["lock_scope"], lock).fetchone()[0]
                    connection.commit()
                if not locked:
                    self.log.info("consolidation_skipped", scope_key=scope_key, reason="another daemon holds it")
                    continue
                try:
                    records.append(self.consolidate_group(connection, request, scope_key))
                except IcldaemonError as exc:
                    if raise_errors:
                        raise
                    self.log.error("consolidation_failed", scope_key=scope_key, error=str(exc),
                                   error_type=type(exc).__name__)
                finally:
                    if connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        connection.rollback()
                    with translate_errors(self.url, "unlocking a group"):
                        connection.execute(QUERIES["unlock_scope"], lock)
                        connection.commit()
        return records


def list_adapters(connection: psycopg.Connection, limit: int = 50) -> list[dict]:
    from psycopg.rows import dict_row

    with translate_errors(queue.connection_url(connection), "listing adapters"):
        with connection.cursor(row_factory=dict_row) as cursor:
            return cursor.execute(QUERIES["list_adapters"], {"limit": limit}).fetchall()


def describe(record: AdapterRecord) -> str:
    fidelity = record.fidelity
    figures = ("no held-out query could be rebuilt" if fidelity is None else
               f"recovers {fidelity.recovered_query:.0%} of the context's effect at the query position, "
               f"{fidelity.recovered_all:.0%} as a LoRA adapter at every position; greedy token kept "
               f"{fidelity.greedy_match_all:.0%} (without it {fidelity.greedy_match_without:.0%})")
    return (f"{record.scope_key} v{record.version}: fitted on {record.patch_count} patches, checked on "
            f"{record.held_out_count} held out: {figures}\n  {record.path}")


def metadata_of(directory: Path) -> dict:
    return json.loads((directory / "icldaemon.json").read_text())
