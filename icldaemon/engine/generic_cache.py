"""The preservation term's generic keys kept on disk, one file per model weights, generic prompts and sampling.

`answers.generic_keys` runs the shipped generic prompts and the model's greedy answers: 73 s of a 128 s
consolidation of the bundled model on 2 CPU cores. The file's name is a fingerprint of everything the keys
depend on: every parameter's and buffer's bytes, the model's config, attention implementation and device, the
torch and transformers versions, the prompts' token ids and `generic_keys`' own arguments. A file is used only
when the fingerprint stored in it is that one and its keys hash to the digest stored beside them; any other
file is recomputed and replaced, never used. Files are written under a temporary name and renamed into place.

Hand-written: joblib.Memory and diskcache (neither a dependency) key a call by pickling its arguments, for a
model its whole state, with no promise that two equal models pickle to equal bytes; here the key hashes the
weights' bytes themselves, and the entry is one safetensors file whose header carries the fingerprint.
"""

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn
from transformers import PreTrainedModel

from icldaemon.engine import answers
from icldaemon.engine.adapters import ArchitectureAdapter, adapter_for
from icldaemon.logs import get_logger

GENERIC_KEYS_DIR = "generic-keys"  # under the data directory
# bump when `generic_keys` gives other keys for the same model, prompts and arguments: older files are then unused
CACHE_FORMAT = 1
# files kept, the most recently written (the bundled model's keys are 30 x 1,536 x 1,536 float32, 283 MB)
CACHE_ENTRIES = 4
SUFFIX = ".safetensors"

log = get_logger()


class _Unusable(Exception):
    """A cache file that must not be used: the reason is its message."""


@torch.no_grad()
def parameters_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name, dtype, shape and bytes, in the model's order (a
    parameter shared by two modules, as tied embeddings are, is hashed once). 0.4 s for 135M float32 parameters."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def prompts_fingerprint(prompts: Sequence[Sequence[int]]) -> str:
    """SHA-256 of the prompts' token ids, in order."""
    return hashlib.sha256(json.dumps([[int(token) for token in ids] for ids in prompts]).encode()).hexdigest()


def cache_fingerprint(model: PreTrainedModel, prompts: Sequence[Sequence[int]], limit: int,
                      adapter: ArchitectureAdapter, answer_tokens: int, stop_ids: Sequence[int]) -> str:
    """SHA-256 of everything `answers.generic_keys(model, prompts, limit, adapter, ...)` depends on."""
    described = {
        "format": CACHE_FORMAT,
        "parameters": parameters_fingerprint(model),
        "config": model.config.to_json_string(use_diff=True),  # with transformers' version, without the path
        "attention": model.config._attn_implementation,
        "device": model.device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adapter": asdict(adapter),
        "prompts": prompts_fingerprint(prompts),
        "limit": limit,
        "answer_tokens": answer_tokens,
        "stop_ids": [int(token) for token in stop_ids],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _keys_digest(keys: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for layer_keys in keys:
        digest.update(f"{layer_keys.dtype}:{layer_keys.shape}\n".encode())
        digest.update(np.ascontiguousarray(layer_keys).data)
    return digest.hexdigest()


def _read(path: Path, fingerprint: str) -> list[np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as file:
            metadata = file.metadata() or {}
            if metadata.get("fingerprint") != fingerprint:
                raise _Unusable(f"its fingerprint {metadata.get('fingerprint')} is not {fingerprint}")
            keys = [file.get_tensor(f"keys.{layer_idx}") for layer_idx in range(int(metadata["layers"]))]
    except (SafetensorError, KeyError, ValueError) as exc:
        raise _Unusable(f"unreadable: {exc}") from exc
    if _keys_digest(keys) != metadata.get("keys_sha256"):
        raise _Unusable("its keys do not hash to the digest stored with them")
    return keys


def _write(path: Path, fingerprint: str, keys: Sequence[np.ndarray]) -> None:
    """Under a temporary name in the same directory, then renamed: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    keys = [np.ascontiguousarray(layer_keys) for layer_keys in keys]
    try:
        save_file({f"keys.{layer_idx}": layer_keys for layer_idx, layer_keys in enumerate(keys)}, str(staging),
                  metadata={"fingerprint": fingerprint, "layers": str(len(keys)), "keys_sha256": _keys_digest(keys)})
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _prune(cache_dir: Path) -> None:
    """Remove all but the `CACHE_ENTRIES` most recently written files (a reader that has one open still reads it)."""
    entries = []
    for path in cache_dir.glob(f"*{SUFFIX}"):
        try:
            entries.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:  # pruned by another process meanwhile
            continue
    for _, path in sorted(entries, reverse=True)[CACHE_ENTRIES:]:
        path.unlink(missing_ok=True)
        log.info("generic_keys_pruned", path=str(path))


def cached_generic_keys(model: PreTrainedModel, prompts: Sequence[Sequence[int]], cache_dir: Path,
                        limit: int = answers.GENERIC_POSITIONS, adapter: ArchitectureAdapter | None = None, *,
                        answer_tokens: int = 0, stop_ids: Sequence[int] = ()) -> list[np.ndarray]:
    """`answers.generic_keys`, read from `cache_dir` where an earlier call of the same fingerprint wrote them."""
    adapter = adapter or adapter_for(model)
    started = time.perf_counter()
    fingerprint = cache_fingerprint(model, prompts, limit, adapter, answer_tokens, stop_ids)
    fingerprint_seconds = round(time.perf_counter() - started, 3)
    path = Path(cache_dir) / f"{fingerprint}{SUFFIX}"
    if path.exists():
        try:
            keys = _read(path, fingerprint)
        except _Unusable as exc:
            log.warning("generic_keys_cache_invalid", path=str(path), reason=str(exc))
        else:
            log.info("generic_keys_loaded", path=str(path), layers=len(keys), rows=len(keys[0]),
                     fingerprint_seconds=fingerprint_seconds, seconds=round(time.perf_counter() - started, 3))
            return keys
    computing = time.perf_counter()
    keys = answers.generic_keys(model, prompts, limit, adapter, answer_tokens=answer_tokens, stop_ids=stop_ids)
    compute_seconds = round(time.perf_counter() - computing, 3)
    writing = time.perf_counter()
    try:
        _write(path, fingerprint, keys)
        _prune(path.parent)
    except (OSError, SafetensorError) as exc:  # a read-only or full disk (as safetensors' own error when it writes)
        log.warning("generic_keys_cache_not_written", path=str(path), error=str(exc))
        return keys
    log.info("generic_keys_cached", path=str(path), layers=len(keys), rows=len(keys[0]),
             fingerprint_seconds=fingerprint_seconds, compute_seconds=compute_seconds,
             write_seconds=round(time.perf_counter() - writing, 3))
    return keys
