"""The shipped memory bank: 64 facts about the user, of many kinds, split into dev and held-out test facts."""

import re
from collections import Counter

import pytest

from icldaemon.data import BANK_SPLITS, BANK_STYLES, BankFact, load_bank, load_facts
from icldaemon.exceptions import BadInputError

BANK = load_bank()
TUNED_FACTS = load_facts()
QUESTIONS_PER_STYLE = {"direct": 10, "terse": 2, "indirect": 2, "task": 2}


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_there_are_64_facts_with_unique_keys_split_32_and_32():
    assert len(BANK) == 64
    assert all(isinstance(fact, BankFact) for fact in BANK)
    keys = [fact.key for fact in BANK]
    assert len(set(keys)) == len(keys)
    assert Counter(fact.split for fact in BANK) == {"dev": 32, "test": 32}


def test_there_are_at_least_12_kinds_each_balanced_across_the_splits():
    per_kind = Counter(fact.kind for fact in BANK)
    assert len(per_kind) >= 12
    for kind, count in per_kind.items():
        in_dev = sum(1 for fact in BANK if fact.kind == kind and fact.split == "dev")
        assert count >= 2, kind
        assert in_dev == count - in_dev, (kind, in_dev, count)


@pytest.mark.parametrize("fact", BANK, ids=lambda fact: fact.key)
def test_a_fact_has_one_sentence_about_the_user_naming_its_first_answer(fact):
    assert fact.key.strip() and fact.kind.strip()
    assert fact.content.startswith("The user") and fact.content.endswith(".")
    assert fact.answer and all(answer.strip() for answer in fact.answer)
    assert len({answer.lower() for answer in fact.answer}) == len(fact.answer)
    assert fact.answer[0].lower() in fact.content.lower()
    assert fact.said_in(fact.content)
    assert fact.split in BANK_SPLITS


@pytest.mark.parametrize("fact", BANK, ids=lambda fact: fact.key)
def test_a_fact_has_distinct_questions_in_each_style(fact):
    assert tuple(fact.questions) == BANK_STYLES
    for style, count in QUESTIONS_PER_STYLE.items():
        assert len(fact.questions[style]) == count, style
        assert all(question.strip() for question in fact.questions[style])
    every_question = [question for style in BANK_STYLES for question in fact.questions[style]]
    normalised = {re.sub(r"\W+", " ", question).strip().lower() for question in every_question}
    assert len(normalised) == len(every_question), "questions are distinct, not only in punctuation or case"


@pytest.mark.parametrize("fact", BANK, ids=lambda fact: fact.key)
def test_no_question_contains_its_own_answer_nor_names_another_facts(fact):
    for style in BANK_STYLES:
        for question in fact.questions[style]:
            assert not any(answer.lower() in question.lower() for answer in fact.answer), question
            for other in BANK + TUNED_FACTS:
                assert not other.said_in(question), (other.key, question)


def test_answers_are_distinct_across_facts_and_from_the_tuned_facts():
    first_words = [words(fact.answer[0]) for fact in BANK]
    for index, fact in enumerate(BANK):
        for other_index, other in enumerate(BANK):
            if other_index != index:
                assert not first_words[index] & first_words[other_index], (fact.key, other.key)
                assert not any(other.said_in(answer) for answer in fact.answer), (fact.key, other.key)
        for tuned in TUNED_FACTS:
            assert not {answer.lower() for answer in fact.answer} & {answer.lower() for answer in tuned.answer}
            assert not any(tuned.said_in(answer) for answer in fact.answer), (fact.key, tuned.key)
            assert not any(fact.said_in(answer) for answer in tuned.answer), (fact.key, tuned.key)


@pytest.mark.parametrize("fact", BANK, ids=lambda fact: fact.key)
def test_a_facts_memory_names_no_other_fact(fact):
    for other in BANK + TUNED_FACTS:
        if other is not fact:
            assert not other.said_in(fact.content), other.key


def test_the_split_filter_keeps_file_order_and_partitions_the_bank():
    dev, test = load_bank("dev"), load_bank("test")
    assert all(fact.split == "dev" for fact in dev) and all(fact.split == "test" for fact in test)
    assert [fact.key for fact in dev] == [fact.key for fact in BANK if fact.split == "dev"]
    assert {fact.key for fact in dev} | {fact.key for fact in test} == {fact.key for fact in BANK}
    assert not {fact.key for fact in dev} & {fact.key for fact in test}


@pytest.mark.parametrize("split", ["train", "DEV", ""])
def test_an_unknown_split_is_refused_by_name(split):
    with pytest.raises(BadInputError, match=re.escape(repr(split))):
        load_bank(split)
