"""The preservation term's generic keys on the bundled model: computed (cold), then read from the cache (warm).

    .venv/bin/python bench/bench_generic_keys.py

The shipped generic prompts as `icldaemon consolidate` renders them, the cache in a fresh temporary
directory (the data directory's own entry is left alone). Also the parameters' fingerprint alone, which
every call pays, and whether the warm keys equal the cold ones exactly. About 80 s on 2 CPU cores.
"""

import tempfile
import time
from pathlib import Path

import numpy as np

from icldaemon.data import load_generic
from icldaemon.engine import answers, generic_cache
from icldaemon.engine.loading import load_model
from icldaemon.engine.prompt import build_prompt
from icldaemon.settings import load_settings


def main() -> None:
    loaded = load_model(None, models_dir=load_settings().models_dir, device="cpu", dtype="float32")
    prompts = [build_prompt(loaded.tokenizer, messages=chat).input_ids for chat in load_generic()]
    stop = answers.stop_token_ids(loaded.model, loaded.tokenizer)
    started = time.perf_counter()
    generic_cache.parameters_fingerprint(loaded.model)
    print(f"parameters' fingerprint ({sum(p.numel() for p in loaded.model.parameters()):,} parameters): "
          f"{time.perf_counter() - started:.2f} s")
    with tempfile.TemporaryDirectory() as cache_dir:
        keys = {}
        for label in ("cold", "warm"):
            started = time.perf_counter()
            keys[label] = generic_cache.cached_generic_keys(loaded.model, prompts, Path(cache_dir),
                                                            answer_tokens=answers.ANSWER_TOKENS, stop_ids=stop)
            print(f"{label}: {time.perf_counter() - started:.2f} s for {len(prompts)} prompts' keys, "
                  f"{len(keys[label])} layers x {keys[label][0].shape}")
        same = all(np.array_equal(cold, warm) for cold, warm in zip(keys["cold"], keys["warm"], strict=True))
        print(f"warm keys equal the cold ones exactly: {same}")


if __name__ == "__main__":
    main()
