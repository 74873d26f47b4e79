"""Model loading: safetensors only (a pickled checkpoint is refused), and a fingerprint of every weight's bytes."""

import json

import pytest
import torch
import transformers
from daemon_fixtures import save_tiny_model

from icldaemon.engine.loading import FINGERPRINT_CACHE, load_model
from icldaemon.exceptions import ModelLoadError


def test_a_pickled_checkpoint_is_refused_with_what_to_do(tmp_path):
    directory = save_tiny_model(tmp_path / "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    pickled = tmp_path / "pickled"  # the same model as a pickled state dict, as older checkpoints ship
    pickled.mkdir()
    for path in directory.iterdir():
        if path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))

    with pytest.raises(ModelLoadError, match="safetensors files only"):
        load_model(str(pickled), models_dir=tmp_path / "models", device="cpu")


def test_the_fingerprint_sees_a_change_anywhere_in_the_weights_and_is_cached(tmp_path):
    models = tmp_path / "models"
    base = save_tiny_model(tmp_path / "base")
    tuned = save_tiny_model(tmp_path / "tuned")
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned)
    with torch.no_grad():  # one value far from the start of its tensor, as a narrow fine-tune would change
        model.model.layers[1].mlp.down_proj.weight[-1, -1] += 1e-3
    model.save_pretrained(tuned)

    first, again = (load_model(str(base), models_dir=models, device="cpu").revision for _ in range(2))
    other = load_model(str(tuned), models_dir=models, device="cpu").revision

    assert first == again and first != other
    cache = json.loads((models / FINGERPRINT_CACHE).read_text())
    assert {str((base / "model.safetensors").resolve()), str((tuned / "model.safetensors").resolve())} <= set(cache)
