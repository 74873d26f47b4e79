"""The shipped examples and the README's commands agree with the memories the demo stores, ids included."""

import json
import re
from pathlib import Path

from icldaemon.demo import MEMORIES

ROOT = Path(__file__).resolve().parents[2]


def test_the_examples_memories_are_the_demos_with_the_ids_a_fresh_database_gives_them():
    examples = json.loads((ROOT / "examples" / "memories.json").read_text(encoding="utf-8"))

    # the demo upserts MEMORIES in order into an empty table: ids 1, 2, 3
    assert [(memory["id"], memory["key"], memory["content"]) for memory in examples] == [
        (index, key, content) for index, (key, content) in enumerate(MEMORIES.items(), start=1)]


def test_the_readmes_submit_example_queues_the_measure_examples_memories_in_its_order():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    examples = json.loads((ROOT / "examples" / "memories.json").read_text(encoding="utf-8"))

    submits = re.findall(r"icldaemon submit --messages-file examples/messages\.json --memory-ids ([\d,]+)", readme)
    assert submits == [",".join(str(memory["id"]) for memory in examples)]
    added = re.findall(r'icldaemon memories add --key ("[^"]+"|\S+) --content "([^"]+)"', readme)
    assert [(key.strip('"'), content) for key, content in added] == list(MEMORIES.items())
