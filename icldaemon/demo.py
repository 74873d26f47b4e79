"""The demo on the embedded defaults: an embedded database migrated, and example prompts measured.

Runs with no configuration: the embedded PostgreSQL in the data directory and the bundled model.
"""

import sys

from tqdm import tqdm

from icldaemon.engine.loading import load_model
from icldaemon.engine.measure import max_positions, measure
from icldaemon.engine.prompt import Memory, build_prompt
from icldaemon.exceptions import IcldaemonError
from icldaemon.logs import configure_logging, get_logger
from icldaemon.report import summary_lines
from icldaemon.settings import load_settings
from icldaemon.store.database import database_url
from icldaemon.store.migrate import current, upgrade

FEW_SHOT = (
    "Translate English to French.\n"
    "sea otter => loutre de mer\n"
    "cheese => fromage\n"
    "peppermint => menthe poivrée\n"
    "plush giraffe => girafe en peluche\n"
    "bread =>"
)
MEMORIES = [
    Memory(id=1, key="favourite colour", content="The user's favourite colour is teal."),
    Memory(id=2, key="pet", content="The user has a grey cat called Miso."),
    Memory(id=3, key="city", content="The user lives in Lisbon and cycles to work."),
]
CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Use what you remember about the user."},
    {"role": "user", "content": "What is the name of my cat?"},
]
EXAMPLES = {
    "few-shot translation (raw text)": dict(text=FEW_SHOT),
    "memory-augmented chat (3 retrieved memories)": dict(messages=CHAT, memories=MEMORIES),
}


def main() -> int:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    log = get_logger()
    try:
        with database_url(settings) as url:
            upgrade(url)
            print(f"database ready at schema revision {current(url)}")
        loaded = load_model(settings.model, models_dir=settings.models_dir, device=settings.device,
                            dtype=settings.dtype)
        for title, example in tqdm(EXAMPLES.items(), desc="measuring", unit="prompt", file=sys.stderr):
            prompt = build_prompt(loaded.tokenizer, max_tokens=max_positions(loaded.model), **example)
            measurement = measure(loaded.model, prompt, model_name=loaded.name)
            tqdm.write(f"\n=== {title}\n" + "\n".join(summary_lines(measurement)), file=sys.stdout)
    except IcldaemonError as exc:
        log.error("demo_failed", error=str(exc))
        print(f"icldaemon demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
