"""An adapter merged into its base model's weights: a plain transformers checkpoint that loads without PEFT.

Without torch at import, so that the command line can refuse a target directory before the slow imports.
"""

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from icldaemon.exceptions import BadInputError
from icldaemon.staging import staged_directory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ADAPTER_CONFIG_FILE = "adapter_config.json"


def check_merge_target(out_dir: Path, what: str = "the merged checkpoint's directory") -> None:
    """Refuse a target that holds anything, is a file, or whose parent directory does not exist; `what` names it."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            raise BadInputError(f"{what} {out_dir} exists and is not empty; give a new or empty directory")
    elif out_dir.exists():
        raise BadInputError(f"{what} {out_dir} exists and is not a directory")
    elif not out_dir.absolute().parent.is_dir():
        raise BadInputError(f"{what} {out_dir}: the directory {out_dir.absolute().parent} does not exist")


def check_adapter_dir(adapter_dir: Path) -> None:
    if not (Path(adapter_dir) / ADAPTER_CONFIG_FILE).is_file():
        raise BadInputError(f"the adapter directory {adapter_dir} holds no {ADAPTER_CONFIG_FILE} (moved or deleted?)")


def _bias_without_a_base_bias(adapted) -> list[str]:
    """The adapted layers whose LoRA carries a bias (lora_bias) that the base layer has nowhere to take."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in adapted.named_modules()
            if isinstance(module, LoraLayer) and any(module.lora_bias.values())
            and getattr(module.get_base_layer(), "bias", None) is None]


def merge_adapter(model: "PreTrainedModel", adapter_dir: Path, out_dir: Path,
                  tokenizer: "PreTrainedTokenizerBase") -> Path:
    """Write `model` with the PEFT LoRA adapter of `adapter_dir` merged into its weights, and `tokenizer`, into
    `out_dir` (safetensors, config, generation config, tokenizer); returns `out_dir`.

    `model` itself is changed: its adapted layers hold the merged weights afterwards (load it again to use it
    without the adapter). The checkpoint is written into a temporary sibling of `out_dir` and renamed into place,
    so a failed merge leaves nothing there; `out_dir` must not exist or be empty.
    """
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    check_adapter_dir(adapter_dir)
    check_merge_target(out_dir)
    with warnings.catch_warnings():
        # versions before the down-projection form carry lora_bias on layers without a bias: named below
        warnings.filterwarnings("ignore", message=".*lora_bias.*")
        try:
            adapted = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as exc:  # another architecture's modules or shapes
            raise BadInputError(f"the adapter {adapter_dir} does not fit the model: {exc}") from exc
    unmergeable = _bias_without_a_base_bias(adapted)
    if unmergeable:
        adapted.unload()  # the LoRA layers taken out again, the model's own weights untouched
        raise BadInputError(
            f"the adapter {adapter_dir} carries a LoRA bias (lora_bias) on {len(unmergeable)} layers that have no "
            f"bias ({unmergeable[0]}, ...): a plain checkpoint of this architecture has nowhere to put it; load it "
            "with PEFT instead (versions of method gate_up_bias, written before schema revision 0006, are so)")
    try:
        merged = adapted.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # PEFT's safe_merge: NaN in the merged weights
        raise BadInputError(f"the adapter {adapter_dir} cannot be merged: {exc}") from exc

    def failed(exc: OSError) -> BadInputError:
        return BadInputError(f"cannot write the merged checkpoint into {out_dir}: {exc}")

    # the rename fails if anything appeared at out_dir meanwhile
    with staged_directory(out_dir, failed) as staging:
        merged.save_pretrained(staging)  # safetensors: transformers 5 writes no other format
        tokenizer.save_pretrained(staging)
    return out_dir
