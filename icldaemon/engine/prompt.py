"""A tokenised prompt split into segments: anchor, context (labelled where it is a memory), query."""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from icldaemon.exceptions import BadInputError

MEMORIES_HEADER = "Relevant memories:\n"
MEMORY_TEMPLATE = "- {key}: {content}\n"  # one key-value line per memory
MEMORY_TEMPLATE_NO_KEY = "- {content}\n"


@dataclass(frozen=True)
class Memory:
    content: str
    key: str | None = None
    id: int | None = None

    @property
    def label(self) -> str:
        if self.id is not None:
            return f"memory:{self.id}"
        return f"memory:{self.key}" if self.key else "memory"


@dataclass(frozen=True)
class Segment:
    label: str  # "anchor", "context", "query", "memory:<id>" ...
    kind: str  # anchor | context | memory | query
    start: int  # token index, inclusive
    end: int  # token index, exclusive
    memory_id: int | None = None
    key: str | None = None

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class SegmentedPrompt:
    """Token ids and segments covering them in order: one anchor, context segments, one query."""

    input_ids: list[int]
    segments: list[Segment]
    token_texts: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.input_ids:
            raise BadInputError("the prompt is empty: it has 0 tokens")
        if not self.token_texts:
            self.token_texts = [""] * len(self.input_ids)
        expected = 0
        for segment in self.segments:
            if segment.start != expected or segment.end < segment.start:
                raise BadInputError(f"segment {segment.label} spans tokens {segment.start}..{segment.end}, "
                                    f"expected to start at {expected}")
            expected = segment.end
        if expected != len(self.input_ids):
            raise BadInputError(f"the segments cover {expected} of the prompt's {len(self.input_ids)} tokens")
        if self.segments[0].kind != "anchor" or self.segments[-1].kind != "query":
            raise BadInputError("a prompt's segments must begin with the anchor and end with the query")
        if self.anchor_tokens < 1:
            raise BadInputError("the anchor must hold at least one token (position 0 is an attention sink)")
        if self.query_tokens < 1:
            raise BadInputError("the query must hold at least one token")
        if self.context_tokens < 1:
            raise BadInputError(
                f"the prompt has no context tokens: {self.anchor_tokens} anchor and {self.query_tokens} query "
                f"tokens make up all {len(self.input_ids)}"
            )

    @property
    def anchor_tokens(self) -> int:
        return self.segments[0].end

    @property
    def query_position(self) -> int:
        return self.segments[-1].start

    @property
    def query_tokens(self) -> int:
        return len(self.input_ids) - self.query_position

    @property
    def context_tokens(self) -> int:
        return self.query_position - self.anchor_tokens

    @property
    def labelled_segments(self) -> list[Segment]:
        return [segment for segment in self.segments if segment.kind == "memory"]

    def without(self, labels: set[str]) -> list[int]:
        """The token ids with the labelled segments taken out and the rest closed up (docs/method.md §4)."""
        return [token_id for segment in self.segments if segment.label not in labels
                for token_id in self.input_ids[segment.start : segment.end]]

    def segment_of(self, token_index: int) -> Segment:
        for segment in self.segments:
            if segment.start <= token_index < segment.end:
                return segment
        raise IndexError(token_index)


def render_memories(memories: Sequence[Memory]) -> tuple[str, list[tuple[int, int]]]:
    """The memories block and each memory's character span inside it."""
    text, spans = MEMORIES_HEADER, []
    for memory in memories:
        if not memory.content or not memory.content.strip():
            raise BadInputError(f"{memory.label} is empty")
        line = (MEMORY_TEMPLATE if memory.key else MEMORY_TEMPLATE_NO_KEY).format(key=memory.key, content=memory.content)
        spans.append((len(text), len(text) + len(line)))
        text += line
    return text, spans


def _validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadInputError("messages must be a non-empty JSON list of {\"role\", \"content\"} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise BadInputError(f"message {index} is not a {{\"role\": str, \"content\": str}} object")
    return messages


def _starts_with_special_token(offsets: list[tuple[int, int]]) -> bool:
    """Whether the tokenizer put a special token (BOS) in front: its text span is empty."""
    return bool(offsets) and offsets[0][1] <= offsets[0][0]


def _end_of_first_word(text: str) -> int:
    """The character index just after the first whitespace-separated word of `text`."""
    match = re.match(r"\s*\S+", text)
    return match.end() if match else len(text)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    *,
    text: str | None = None,
    messages: list[dict] | None = None,
    memories: Sequence[Memory] = (),
    query_tokens: int = 1,
    max_tokens: int | None = None,
) -> SegmentedPrompt:
    """Render a raw prompt or a chat, with memories as labelled key-value lines, into segments.

    Memories go in front of a raw prompt, and into the system message of a chat (a new one if it has
    none). The anchor (docs/method.md §3) of a chat is the template's opening, everything before the
    first message's content; of a raw prompt, the tokenizer's BOS, put in front where the tokenizer
    defines one but does not add it, and the first word where it defines none. The query is the last
    `query_tokens` tokens.
    """
    if (text is None) == (messages is None):
        raise BadInputError("exactly one of text or messages must be given")
    memories = list(memories)
    memory_block, memory_spans = render_memories(memories) if memories else ("", [])
    if text is not None:
        if not text.strip():
            raise BadInputError("the prompt text is empty")
        rendered, context_start = memory_block + text, 0
        memory_offset = 0
    else:
        messages = [dict(message) for message in _validate_messages(messages)]
        if memory_block:
            if messages[0]["role"] == "system":
                messages[0]["content"] = memory_block + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": memory_block})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        first_content = next((message["content"] for message in messages if message["content"].strip()), None)
        if first_content is None:
            raise BadInputError(f"every one of the {len(messages)} messages is empty: there is nothing to measure")
        context_start = rendered.find(first_content)
        if context_start < 0:
            raise BadInputError("the chat template does not reproduce the first message's content")
        memory_offset = context_start if memory_block else 0
    if "\x00" in rendered:
        raise BadInputError("the prompt contains a NUL character")
    encoding = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=text is not None)
    input_ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    if not input_ids:
        raise BadInputError("the prompt is empty: it has 0 tokens")
    if text is not None and not _starts_with_special_token(offsets) and tokenizer.bos_token_id is not None:
        # a tokenizer that defines BOS but does not add it (SmolLM2, GPT-2): BOS is put in front as the anchor
        input_ids, offsets = [tokenizer.bos_token_id, *input_ids], [(0, 0), *offsets]
    if max_tokens is not None and len(input_ids) > max_tokens:
        raise BadInputError(f"the prompt has {len(input_ids)} tokens; the model's context is {max_tokens}")
    if query_tokens < 1:
        raise BadInputError(f"query_tokens must be at least 1, got {query_tokens}")

    def first_token_at(char: int) -> int:
        # The first token whose text starts at or after `char` (special tokens have empty spans at 0).
        for index, (start, end) in enumerate(offsets):
            if end > start and start >= char:
                return index
        return len(input_ids)

    anchor_end = first_token_at(context_start)
    if anchor_end == 0:
        # nothing in front of the context (a tokenizer without BOS, such as Qwen2's, or a chat template without
        # an opening): the first word is the anchor, so that measuring never starts inside a word
        anchor_end = first_token_at(_end_of_first_word(rendered))
    query_start = len(input_ids) - query_tokens
    if query_start <= anchor_end:
        raise BadInputError(
            f"the prompt has no context tokens: {len(input_ids)} tokens, {anchor_end} anchor, {query_tokens} query"
        )
    boundaries = []
    for memory, (start, end) in zip(memories, memory_spans):
        token_start, token_end = first_token_at(memory_offset + start), first_token_at(memory_offset + end)
        if token_end <= token_start or token_start < anchor_end or token_end > query_start:
            raise BadInputError(f"{memory.label} does not occur in the rendered prompt's context")
        boundaries.append((token_start, token_end, memory))
    segments = [Segment("anchor", "anchor", 0, anchor_end)]
    cursor = anchor_end
    for token_start, token_end, memory in boundaries:
        if token_start > cursor:
            segments.append(Segment("context", "context", cursor, token_start))
        segments.append(Segment(memory.label, "memory", token_start, token_end, memory.id, memory.key))
        cursor = token_end
    if query_start > cursor:
        segments.append(Segment("context", "context", cursor, query_start))
    segments.append(Segment("query", "query", query_start, len(input_ids)))
    token_texts = [tokenizer.decode([token_id]) for token_id in input_ids]
    return SegmentedPrompt(input_ids=input_ids, segments=segments, token_texts=token_texts)
