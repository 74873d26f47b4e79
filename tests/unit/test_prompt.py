"""Rendering prompts and memories into segments, and refusing bad input."""

import copy

import pytest
from tokenizers import processors

from icldaemon.engine.prompt import Memory, Segment, SegmentedPrompt, build_prompt
from icldaemon.exceptions import BadInputError

MEMORIES = [Memory("The user has a grey cat called Miso.", "pet", 7), Memory("The user's favourite colour is teal.",
                                                                          "colour", 9)]
CHAT = [{"role": "user", "content": "What is the name of my cat?"}]


def decoded(tokenizer, prompt, segment):
    return tokenizer.decode(prompt.input_ids[segment.start : segment.end])


def test_memories_become_labelled_segments_holding_their_text(tiny_tokenizer):
    prompt = build_prompt(tiny_tokenizer, messages=CHAT, memories=MEMORIES)
    labelled = prompt.labelled_segments
    assert [(s.label, s.memory_id, s.key) for s in labelled] == [("memory:7", 7, "pet"), ("memory:9", 9, "colour")]
    for segment, memory in zip(labelled, MEMORIES):
        assert memory.content in decoded(tiny_tokenizer, prompt, segment)
    assert decoded(tiny_tokenizer, prompt, prompt.segments[0]) == "<|im_start|>system\n"
    assert prompt.query_tokens == 1 and prompt.query_position == len(prompt.input_ids) - 1
    # the whole prompt is the chat template's rendering, tokenised once
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Relevant memories:\n- pet: The user has a grey cat called Miso.\n"
          "- colour: The user's favourite colour is teal.\n"}, *CHAT], tokenize=False, add_generation_prompt=True)
    assert prompt.input_ids == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_memories_join_an_existing_system_message(tiny_tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, *CHAT]
    prompt = build_prompt(tiny_tokenizer, messages=chat, memories=MEMORIES[:1])
    text = tiny_tokenizer.decode(prompt.input_ids)
    assert text.count("<|im_start|>system") == 1 and "Miso.\nBe brief." in text


def test_raw_text_with_query_tokens(tiny_tokenizer):
    prompt = build_prompt(tiny_tokenizer, text="Translate English to French: cheese =>", query_tokens=3,
                          memories=MEMORIES[:1])
    assert prompt.query_tokens == 3
    assert prompt.anchor_tokens == 1
    assert prompt.segments[1].kind == "context" and prompt.segments[2].label == "memory:7"


TEXT = "Translate English to French: cheese =>"


def test_a_raw_prompt_is_anchored_on_bos_even_where_the_tokenizer_does_not_add_it(tiny_tokenizer):
    assert tiny_tokenizer(TEXT)["input_ids"][0] != tiny_tokenizer.bos_token_id  # BOS is defined, not added
    prompt = build_prompt(tiny_tokenizer, text=TEXT)
    assert prompt.input_ids == [tiny_tokenizer.bos_token_id, *tiny_tokenizer(TEXT, add_special_tokens=False)["input_ids"]]
    assert prompt.anchor_tokens == 1 and prompt.token_texts[0] == "<|bos|>"
    # the context starts at the prompt's first character: no word is cut
    assert tiny_tokenizer.decode(prompt.input_ids[1 : prompt.query_position]) + " =>" == TEXT


def test_a_tokenizer_that_adds_bos_gets_it_once(tiny_tokenizer):
    adds_bos = copy.deepcopy(tiny_tokenizer)
    adds_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tiny_tokenizer.bos_token_id)])
    prompt = build_prompt(adds_bos, text=TEXT)
    assert prompt.input_ids == build_prompt(tiny_tokenizer, text=TEXT).input_ids
    assert prompt.input_ids.count(tiny_tokenizer.bos_token_id) == 1 and prompt.anchor_tokens == 1


@pytest.mark.parametrize("text", [TEXT, "  Translate English to French: cheese =>"])
def test_without_bos_the_first_word_is_the_anchor(tiny_tokenizer, text):
    no_bos = copy.deepcopy(tiny_tokenizer)
    no_bos.bos_token = None
    prompt = build_prompt(no_bos, text=text)
    assert prompt.input_ids == no_bos(text)["input_ids"]
    first_word_end = text.index("Translate") + len("Translate")
    assert no_bos.decode(prompt.input_ids[: prompt.anchor_tokens]) == text[:first_word_end]
    assert no_bos.decode(prompt.input_ids[prompt.anchor_tokens : prompt.query_position]) + " =>" == text[first_word_end:]


def test_a_chat_is_anchored_on_its_template_opening_not_on_bos(tiny_tokenizer):
    prompt = build_prompt(tiny_tokenizer, messages=CHAT)
    assert tiny_tokenizer.bos_token_id not in prompt.input_ids
    assert decoded(tiny_tokenizer, prompt, prompt.segments[0]) == "<|im_start|>user\n"
    assert decoded(tiny_tokenizer, prompt, prompt.segments[1]).startswith("What is")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(), "exactly one of text or messages"),
        (dict(text="a", messages=CHAT), "exactly one of text or messages"),
        (dict(text="   "), "prompt text is empty"),
        (dict(messages=[]), "non-empty JSON list"),
        (dict(messages=[{"role": "user"}]), "message 0"),
        (dict(messages="hello"), "non-empty JSON list"),
        (dict(text="cat", memories=[Memory("  ", "k", 3)]), "memory:3 is empty"),
        (dict(text="a\x00b"), "NUL"),
        (dict(text="The user has a grey cat called Miso. " * 10, max_tokens=20), "the model's context is 20"),
        (dict(text="cat", query_tokens=0), "query_tokens must be at least 1"),
        (dict(text="cheese", query_tokens=50), "no context tokens"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_it(tiny_tokenizer, arguments, message):
    with pytest.raises(BadInputError, match=message):
        build_prompt(tiny_tokenizer, **arguments)


def test_segments_must_cover_the_prompt():
    with pytest.raises(BadInputError, match="cover 3 of the prompt's 4 tokens"):
        SegmentedPrompt([1, 2, 3, 4], [Segment("anchor", "anchor", 0, 1), Segment("context", "context", 1, 2),
                                       Segment("query", "query", 2, 3)])
    with pytest.raises(BadInputError, match="no context tokens"):
        SegmentedPrompt([1, 2], [Segment("anchor", "anchor", 0, 1), Segment("query", "query", 1, 2)])
    with pytest.raises(BadInputError, match="0 tokens"):
        SegmentedPrompt([], [])
