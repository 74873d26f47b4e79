"""`icldaemon plot RUN_ID`: the run read back from the database equals a fresh measurement, and is drawn to a PNG."""

import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import psycopg
import pytest
from analytics_fixtures import load_tiny
from daemon_fixtures import MAX_POSITIONS

from icldaemon.columns import DYNAMICS_NAMES
from icldaemon.engine.measure import measure
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.plots import DPI, FIGURE_SIZE, plot_run, segment_boundaries
from icldaemon.service import Service
from icldaemon.store.runs import load_run
from icldaemon.worker import Worker

MEMORY = "The user has a grey cat called Miso."
CHAT = [{"role": "user", "content": "What is my cat called?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("models"))


def measured_run(url: str, tiny) -> tuple[int, int]:
    with psycopg.connect(url) as connection:
        memory_id = connection.execute("INSERT INTO memories (key, content) VALUES ('pet', %s) RETURNING id",
                                       (MEMORY,)).fetchone()[0]
        connection.execute("SELECT icl_submit(%s::jsonb, ARRAY[%s]::bigint[])",
                           (psycopg.types.json.Jsonb(CHAT), memory_id))
    Service(Worker(url, tiny, worker_id="plot")).run_once()
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT id FROM measurement_runs").fetchone()[0], memory_id


def test_a_run_read_back_equals_the_engines_measurement_of_its_prompt(database_url, tiny):
    run_id, memory_id = measured_run(database_url, tiny)
    prompt = build_prompt(tiny.tokenizer, messages=CHAT, memories=[Memory(MEMORY, "pet", memory_id)],
                          max_tokens=MAX_POSITIONS)
    reference = measure(tiny.model, prompt, model_name=tiny.name)

    with psycopg.connect(database_url) as connection:
        run = load_run(connection, run_id)

    assert run.num_layers == 2 and run.model == tiny.name
    assert [(token.index, token.text, token.segment) for token in run.tokens] == [
        (token.index, token.text, token.segment) for token in reference.tokens]
    # the memory's segment, in prompt positions: it starts and ends a segment among the context tokens
    (memory,) = reference.segments
    assert segment_boundaries(run.tokens) == [memory.start - reference.anchor_tokens,
                                              memory.end - reference.anchor_tokens]
    for name in DYNAMICS_NAMES:
        np.testing.assert_allclose(run.dynamics[name], reference.dynamics[name], rtol=1e-5, err_msg=name)


def test_plot_command_writes_the_png_and_names_a_missing_run(database_url, tiny, tmp_path):
    run_id, _ = measured_run(database_url, tiny)
    environment = {**os.environ, "ICLD_DATABASE_URL": database_url, "ICLD_DATA_DIR": str(tmp_path),
                   "ICLD_LOG_FORMAT": "json"}
    out = tmp_path / "run.png"

    drawn = subprocess.run([sys.executable, "-m", "icldaemon", "plot", str(run_id), "--out", str(out), "--layers", "0,1"],
                           env=environment, capture_output=True, text=True, timeout=120)
    missing = subprocess.run([sys.executable, "-m", "icldaemon", "plot", str(run_id + 1000)],
                             env=environment, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.strip() == f"wrote {out}"
    image = matplotlib.image.imread(out)  # [height, width, RGBA]
    assert image.shape[:2] == (FIGURE_SIZE[1] * DPI, FIGURE_SIZE[0] * DPI)
    assert image[..., :3].std() > 0.1  # not a blank page
    assert missing.returncode == 1
    assert f"measurement run {run_id + 1000} does not exist" in missing.stderr


def test_layers_that_do_not_exist_are_refused_by_name(database_url, tiny, tmp_path):
    run_id, _ = measured_run(database_url, tiny)
    with psycopg.connect(database_url) as connection:
        run = load_run(connection, run_id)

    with pytest.raises(Exception, match=r"layers \[2\] do not exist; the model has layers 0 to 1"):
        plot_run(run, tmp_path / "never.png", layers=[0, 2])
