"""Shipped evaluation data for memory consolidation.

`facts.json` holds facts about one fictional user, each with the memory as a store would hold it, the
answer strings that show a generated reply names it, and 20 paraphrased questions whose answer it is.
`neutral.json` holds chats that are about none of the facts: an adapter should leave them alone, and
is checked on them. `generic.json` holds other such chats, none of them in `neutral.json`: the fit's
preservation term keeps the model's outputs on them, so the check on `neutral.json` is out of sample.
`bank.json` holds 64 other facts about the same user, of 16 kinds, each with questions in four styles (direct,
terse, indirect, task) and a split: adapters are tuned on "dev" and judged on "test", facts and phrasings never tuned
on. None of its answers is one of `facts.json`'s.
`python -m icldaemon.data.screen` reproduces how often the bundled model names each fact with and
without its memory in the prompt.
"""

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from icldaemon.exceptions import BadInputError

__all__ = ["BANK_SPLITS", "BANK_STYLES", "BankFact", "Fact", "load_bank", "load_facts", "load_generic", "load_neutral"]

BANK_SPLITS = ("dev", "test")
BANK_STYLES = ("direct", "terse", "indirect", "task")  # plain, clipped, asked sideways, embedded in a task


@dataclass(frozen=True)
class Fact:
    key: str  # the memory's key, e.g. "pet"
    content: str  # the memory as a store holds it: one sentence
    answer: tuple[str, ...]  # any of these found in a reply means the reply names the fact
    questions: tuple[str, ...]  # paraphrased user questions whose answer is this fact

    def said_in(self, text: str) -> bool:
        """Whether `text` contains one of the answer strings, case-insensitively, as whole words.

        "Ines" is not found in "lines", nor "9 August" in "19 August".
        """
        return _answer_pattern(self.answer).search(text) is not None


@cache
def _answer_pattern(answers: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(answer) for answer in sorted(answers, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _read(name: str):
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))


def load_facts() -> list[Fact]:
    """The facts about the fictional user, in file order."""
    return [
        Fact(key=item["key"], content=item["content"], answer=tuple(item["answer"]),
             questions=tuple(item["questions"]))
        for item in _read("facts.json")
    ]


@dataclass(frozen=True)
class BankFact:
    key: str  # the memory's key, e.g. "sister"
    content: str  # the memory as a store holds it: one sentence
    kind: str  # what sort of fact, e.g. "relative" or "password"
    answer: tuple[str, ...]  # any of these found in a reply names the fact; the distinctive one first
    split: str  # "dev" (may be tuned on) or "test" (held out)
    questions: dict[str, tuple[str, ...]]  # style (one of BANK_STYLES) -> user questions whose answer is this fact

    def said_in(self, text: str) -> bool:
        """Whether `text` contains one of the answer strings, case-insensitively, as whole words."""
        return _answer_pattern(self.answer).search(text) is not None


def load_bank(split: str | None = None) -> list[BankFact]:
    """The memory-bank facts in file order, all of them or only those of `split` ("dev" or "test")."""
    if split is not None and split not in BANK_SPLITS:
        raise BadInputError(f"bank split {split!r} is not one of {', '.join(map(repr, BANK_SPLITS))}")
    facts = [
        BankFact(key=item["key"], content=item["content"], kind=item["kind"], answer=tuple(item["answer"]),
                 split=item["split"],
                 questions={style: tuple(item["questions"][style]) for style in BANK_STYLES})
        for item in _read("bank.json")
    ]
    return facts if split is None else [fact for fact in facts if fact.split == split]


def _chats(items: list[dict]) -> list[list[dict]]:
    return [[dict(message) for message in item["messages"]] for item in items]


def load_neutral() -> list[list[dict]]:
    """The neutral prompts that adapters are checked on, each a chat (a list of {"role", "content"} messages)."""
    return _chats(_read("neutral.json"))


def load_generic(path: Path | str | None = None) -> list[list[dict]]:
    """The generic prompts of the fit's preservation term (none of them a neutral prompt), each a chat.

    `path`: another file in the same shape (the benchmark's `--generic`) instead of the shipped one.
    """
    return _chats(_read("generic.json") if path is None else json.loads(Path(path).read_text(encoding="utf-8")))
