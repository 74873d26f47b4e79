"""The shipped consolidation data: facts about one user, neutral prompts to check on, generic prompts to fit with."""

import json
import re

import pytest

from icldaemon.data import Fact, load_facts, load_generic, load_neutral

FACTS = load_facts()
NEUTRAL = load_neutral()
GENERIC = load_generic()


def test_there_are_enough_facts_with_unique_keys():
    assert len(FACTS) >= 8
    keys = [fact.key for fact in FACTS]
    assert len(set(keys)) == len(keys)
    assert all(isinstance(fact, Fact) for fact in FACTS)


@pytest.mark.parametrize("fact", FACTS, ids=lambda fact: fact.key)
def test_a_fact_has_one_sentence_answers_it_names_and_twenty_distinct_questions(fact):
    assert fact.key.strip() and fact.content.strip()
    assert fact.answer and all(answer.strip() for answer in fact.answer)
    assert fact.said_in(fact.content), "the memory itself names the fact"
    assert len(fact.questions) == 20
    normalised = {re.sub(r"\W+", " ", question).strip().lower() for question in fact.questions}
    assert len(normalised) == 20, "questions are distinct, not only in punctuation or case"
    assert all(question.strip() for question in fact.questions)


@pytest.mark.parametrize("fact", FACTS, ids=lambda fact: fact.key)
def test_no_question_gives_away_its_own_or_another_facts_answer(fact):
    for other in FACTS:
        for question in fact.questions:
            assert not other.said_in(question), (fact.key, other.key, question)


@pytest.mark.parametrize("fact", FACTS, ids=lambda fact: fact.key)
def test_a_facts_memory_names_no_other_fact(fact):
    for other in FACTS:
        if other is not fact:
            assert not other.said_in(fact.content), (fact.key, other.key)


@pytest.mark.parametrize("chats", [NEUTRAL, GENERIC], ids=["neutral", "generic"])
def test_there_are_enough_neutral_and_generic_prompts_and_they_are_chats(chats):
    assert len(chats) >= 30
    for messages in chats:
        assert messages and all(set(message) == {"role", "content"} for message in messages)
        assert messages[-1]["role"] == "user" and messages[-1]["content"].strip()
    assert len({messages[-1]["content"] for messages in chats}) == len(chats)


def test_the_checks_are_out_of_sample_no_neutral_prompt_is_a_generic_one():
    def normalised(messages):
        return tuple(re.sub(r"\W+", " ", message["content"]).strip().lower() for message in messages)

    assert not {normalised(messages) for messages in NEUTRAL} & {normalised(messages) for messages in GENERIC}


@pytest.mark.parametrize("chats", [NEUTRAL, GENERIC], ids=["neutral", "generic"])
def test_no_neutral_or_generic_prompt_names_a_fact(chats):
    for messages in chats:
        for message in messages:
            lowered = message["content"].lower()
            for fact in FACTS:
                assert not fact.said_in(message["content"]), (fact.key, message["content"])
                # not even inside a longer word ("Ines" in "lines" is not said_in, but it is avoided too)
                assert not any(answer.lower() in lowered for answer in fact.answer if len(answer) > 4), (
                    fact.key, message["content"])


def test_load_generic_reads_another_file_of_the_same_shape(tmp_path):
    chats = [{"kind": "chat", "messages": [{"role": "user", "content": "Hello there."}]},
             {"kind": "code", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Reverse a list in Python."}]}]
    path = tmp_path / "generic.json"
    path.write_text(json.dumps(chats), encoding="utf-8")
    assert load_generic(path) == [chat["messages"] for chat in chats]
    assert load_generic(str(path)) == load_generic(path)


def fact(key: str) -> Fact:
    return next(fact for fact in FACTS if fact.key == key)


@pytest.mark.parametrize(("key", "text", "said"), [
    ("pet", "The user's cat is called Miso.", True),
    ("pet", "your cat is MISO!", True),
    ("pet", "Your cat's name is Luna.", False),
    ("pet", "Misoshiru is a soup.", False),
    ("colleague", "Your colleague is Ines.", True),
    ("colleague", "Read the lines below.", False),
    ("birthday", "Your birthday is on March 14th.", True),
    ("birthday", "It is the 14th of March.", True),
    ("birthday", "Your birthday is 14 May.", False),
    ("anniversary", "It is on 9 August.", True),
    ("anniversary", "It is on 19 August.", False),
    ("gym locker code", "The code is 4719.", True),
    ("gym locker code", "The code is 47190.", False),
    ("gym locker code", "The code is 8362.", False),
    ("flight", "You are on flight ba2417.", True),
    ("flight", "You are on flight BA 2471.", False),
])
def test_said_in_finds_an_answer_case_insensitively_as_whole_words(key, text, said):
    assert fact(key).said_in(text) is said


def test_said_in_is_false_on_an_empty_reply():
    assert not any(fact.said_in("") for fact in FACTS)
