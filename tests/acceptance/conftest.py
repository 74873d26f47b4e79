"""Acceptance fixtures: the tiny random model the daemons under test load from a directory."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from daemon_fixtures import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama with a byte-level tokenizer (512 positions), saved as a model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
