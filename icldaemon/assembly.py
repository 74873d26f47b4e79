"""A stored prompt and its retrieved memories, rendered into the model's segmented input.

Used by the worker (to measure a prompt) and by consolidation (to rebuild a measured prompt).
"""

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icldaemon.engine.adapters import max_positions
from icldaemon.engine.prompt import Memory, SegmentedPrompt, build_prompt
from icldaemon.exceptions import BadInputError
from icldaemon.store import queue, writer


def assemble_prompt(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    *,
    messages: list | None,
    text: str | None,
    retrievals: Sequence[queue.Retrieval],
) -> SegmentedPrompt:
    """The prompt rendered with its memories in rank order; BadInputError names what is wrong."""
    memories = []
    for retrieval in retrievals:
        if not retrieval.exists:
            raise BadInputError(f"memory {retrieval.memory_id} (rank {retrieval.rank}) does not exist")
        memories.append(Memory(content=retrieval.content, key=retrieval.key, id=retrieval.memory_id))
    if text is not None and messages is not None:
        raise BadInputError("exactly one of text or messages must be given")
    source = {"text": writer.clean_text(text)} if text is not None else {"messages": messages}
    if text is not None and source["text"] != text:
        raise BadInputError("the prompt text contains a NUL character or invalid Unicode")
    return build_prompt(tokenizer, memories=memories, max_tokens=max_positions(model), **source)
