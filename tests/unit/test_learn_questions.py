"""`learn`'s questions about a memory: templates over its key, in four styles, none giving its content away."""

import re
import uuid

import pytest

from icldaemon.data import load_bank, load_facts
from icldaemon.exceptions import BadInputError
from icldaemon.learn import STYLES, TEMPLATES, nearest, questions_for, session_id

FACTS = load_bank() + load_facts()  # 80 keys and contents of many kinds, each with its answer strings


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def normalised(question: str) -> str:
    return re.sub(r"\W+", " ", question).strip().lower()


TEMPLATE_WORDS = set().union(*(words(template.replace("{Key}", "").replace("{key}", ""))
                               for _style, template in TEMPLATES))


@pytest.mark.parametrize("count", [2, 4, 16, len(TEMPLATES)])
def test_count_distinct_questions_and_the_same_every_time(count):
    questions = questions_for("favourite colour", "The user's favourite colour is chartreuse.", count)

    assert len(questions) == count
    assert len({normalised(question) for question in questions}) == count
    assert questions == questions_for("favourite colour", "The user's favourite colour is chartreuse.", count)


def test_any_four_consecutive_templates_cover_the_four_styles():
    assert set(STYLES) == {style for style, _template in TEMPLATES}
    for start in range(0, len(TEMPLATES) - 3, 4):
        assert {style for style, _template in TEMPLATES[start:start + 4]} == set(STYLES)
    questions = questions_for("pet", "The user has a grey cat called Miso.", 4)
    assert questions == ["What is my pet?", "Pet?", "Remind me about my pet.",
                         "Write a short note that mentions my pet."]


@pytest.mark.parametrize("fact", FACTS, ids=lambda fact: fact.key)
def test_no_question_says_the_answer_or_a_word_of_the_content_beyond_its_key(fact):
    questions = questions_for(fact.key, fact.content, 16)

    for question in questions:
        assert not fact.said_in(question), question
        assert fact.key in question or fact.key.capitalize() in question, question
        # every word is the template's or the key's: nothing of the content leaks in
        assert words(question) <= TEMPLATE_WORDS | words(fact.key), question


def test_a_template_that_would_hold_a_word_of_the_content_is_skipped():
    # "note", "short", "friend", "sentence" and "form" are words of templates; here they are the fact
    content = "The user keeps a short note for a friend: one sentence, on a form."
    questions = questions_for("errand", content, 16)

    assert len(questions) == 16
    said = words(content) - words("errand") - {"the", "user", "a", "for", "on", "one"}
    assert all(not words(question) & said for question in questions), questions
    assert "Write a short note that mentions my errand." not in questions


def test_too_few_usable_templates_are_refused_naming_both_numbers():
    content = "The user keeps a short note for a friend: one sentence, on a form."
    usable = len(questions_for("errand", content, 16))
    available = sum(1 for _style, template in TEMPLATES
                    if not words(template.format(key="errand", Key="Errand")) & {"note", "short", "friend",
                                                                                   "sentence", "form", "keeps"})
    assert usable == 16 and available < len(TEMPLATES)

    with pytest.raises(BadInputError, match=rf"{available} of the {len(TEMPLATES)} question templates .* 20 were "
                                            "asked for"):
        questions_for("errand", content, 20)


@pytest.mark.parametrize("count", [-1, 0, 1, len(TEMPLATES) + 1, 100])
def test_a_count_below_2_or_above_the_templates_is_refused_naming_the_limit(count):
    with pytest.raises(BadInputError, match=rf"questions is {count}; it must be from 2 to {len(TEMPLATES)}"):
        questions_for("pet", "The user has a grey cat called Miso.", count)


def test_a_blank_key_is_refused():
    with pytest.raises(BadInputError, match="key is empty or blank"):
        questions_for("  ", "The user has a grey cat called Miso.", 4)


def test_the_learn_session_is_one_per_memory_and_stable():
    assert session_id(7) == session_id(7) != session_id(8)
    assert session_id(7).version == 5 and isinstance(session_id(7), uuid.UUID)


def test_the_neighbours_are_the_nearest_ids_lower_first_on_a_tie():
    assert nearest(10, [1, 9, 11, 12, 10]) == (9, 11)
    assert nearest(10, [30, 12, 8]) == (8, 12)
    assert nearest(10, [10]) == ()
