"""Learning a memory before anyone asks: questions about it queued as chats that retrieve it.

Consolidation fits a memory from its retrievals (consolidate.py); a memory that real traffic has not
asked about yet has none. `learn_memory` queues `count` questions about one memory, each a chat with the
demo's system message, retrieving it at rank 1 and, as a retriever would, up to two other memories of
its submitter at ranks 2-3 (the nearest ids; irrelevant to the question, so that the fit also sees the
memory where it is not used). They share one session, `uuid5(NAMESPACE, "learn:<memory id>")`, so that
a memory already learned is recognised. The daemon measures them like any prompt; `icldaemon learn
--consolidate` then fits the adapter.

The questions come from fixed templates over the memory's key, in four styles (direct, terse,
indirect, embedded in a task), never from the model's own paraphrases: templates are deterministic (the
same memory always gets the same questions, which tests can check), need no model loaded to submit, and
do not depend on how well a small model (the bundled one has 135M parameters) paraphrases; a paraphrase
could also repeat the content it was shown, handing the answer to the question. No question holds a word
of the content that is not in the key or common (the answer must come from the memory, not the
question): a template that would is skipped for that memory.

Works as any role that may call icl_submit. A submitter reads only the ids of memories, not their keys,
contents nor owners: it passes the key and content it stored, and the ids of its other memories, itself.
"""

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from icldaemon.exceptions import BadInputError
from icldaemon.logs import get_logger
from icldaemon.store import memories, queue

NAMESPACE = uuid.UUID("6f1c3e52-8a4b-5d0e-9c7a-2b1e4d5f6a70")  # of the learn sessions' uuid5 ids
QUESTIONS = 16  # questions queued per memory by default
NEIGHBOURS = 2  # other memories retrieved beside the learned one (ranks 2-3)
PRIORITY = -1  # below the default 0: traffic that someone waits for is measured first
SYSTEM = "You are a helpful assistant. Use what you remember about the user."  # the demo's (demo.py)

# (style, template) in the order they are used: the styles take turns, so that any four questions cover all
# four. {key} is the memory's key as stored, {Key} the same with a capital first letter.
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("direct", "What is my {key}?"),
    ("terse", "{Key}?"),
    ("indirect", "Remind me about my {key}."),
    ("task", "Write a short note that mentions my {key}."),
    ("direct", "Do you remember my {key}?"),
    ("terse", "My {key}?"),
    ("indirect", "I forgot my {key}. What was it again?"),
    ("task", "Write one sentence about my {key}."),
    ("direct", "Can you tell me my {key}?"),
    ("terse", "And my {key}?"),
    ("indirect", "Someone asked me about my {key}. What should I tell them?"),
    ("task", "Draft a message to a friend that mentions my {key}."),
    ("direct", "What did I tell you about my {key}?"),
    ("terse", "{Key}, please."),
    ("indirect", "I need my {key} for a form. What do I put down?"),
    ("task", "Describe my {key} in a few words."),
    ("direct", "Tell me my {key}."),
    ("terse", "What about my {key}?"),
    ("indirect", "Quick question about my {key}: what was it?"),
    ("task", "Make a calendar reminder that names my {key}."),
)
STYLES = ("direct", "terse", "indirect", "task")
# Words of a content that say nothing of its fact ("The user's ... is ..."): a question may hold them.
COMMON_WORDS = frozenset("""
    a an the and or but of to in on at for from with by as about into over
    i me my mine you your yours he him his she her hers it its we us our they them their theirs s
    user users is are was were be been being am has have had do does did will would can could should
    what which who whom whose when where why how that this these those there here
    not no yes very just also again all any some one few
""".split())

_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return {word.lower() for word in _WORD.findall(text)}


def session_id(memory_id: int) -> uuid.UUID:
    """The session of a memory's learn questions: the same for every `learn` of that memory."""
    return uuid.uuid5(NAMESPACE, f"learn:{memory_id}")


def distinctive_words(key: str, content: str) -> set[str]:
    """The content's words that neither its key nor COMMON_WORDS hold: what only the memory can tell."""
    return words(content) - words(key) - COMMON_WORDS


def questions_for(key: str, content: str, count: int) -> list[str]:
    """`count` distinct questions about the memory, from TEMPLATES in order, skipping any that would hold a
    distinctive word of its content."""
    if not 2 <= count <= len(TEMPLATES):
        raise BadInputError(f"the number of questions is {count}; it must be from 2 to {len(TEMPLATES)}, the "
                            "number of question templates")
    key = " ".join(key.split())
    if not key:
        raise BadInputError("the memory's key is empty or blank; its questions are written over the key")
    giveaway = distinctive_words(key, content)
    capitalised = key[0].upper() + key[1:]
    questions = [template.format(key=key, Key=capitalised) for _style, template in TEMPLATES]
    usable = [question for question in questions if not words(question) & giveaway]
    if len(usable) < count:
        raise BadInputError(f"memory {key!r}: {len(usable)} of the {len(TEMPLATES)} question templates avoid the "
                            f"words of its content ({', '.join(sorted(giveaway))}); {count} were asked for")
    return usable[:count]


def chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


@dataclass(frozen=True)
class MemoryToLearn:
    memory_id: int
    key: str
    content: str
    neighbour_ids: tuple[int, ...]  # other memories of its submitter, retrieved at ranks 2, 3, ...


def read_memory(connection: queue.Connection, memory_id: int) -> MemoryToLearn:
    """A memory's key and content and its NEIGHBOURS nearest memories of the same submitter."""
    row = memories.memory_to_learn(connection, memory_id, NEIGHBOURS)
    if row is None:
        raise BadInputError(f"memory {memory_id} does not exist")
    key, content, neighbour_ids = row
    if key is None or not key.strip():
        raise BadInputError(f"memory {memory_id} has no key; its questions are written over the key")
    return MemoryToLearn(memory_id, key, content, tuple(neighbour_ids))


def nearest(memory_id: int, other_ids: Sequence[int], limit: int = NEIGHBOURS) -> tuple[int, ...]:
    """The `limit` ids of `other_ids` nearest to `memory_id`, the lower first on a tie (as memory_to_learn)."""
    others = sorted({other for other in other_ids if other != memory_id},
                    key=lambda other: (abs(other - memory_id), other))
    return tuple(others[:limit])


def earlier_prompts(connection: queue.Connection, memory_id: int) -> int:
    """How many prompts the session user already queued in the memory's learn session."""
    return memories.own_session_prompts(connection, session_id(memory_id))


def learn_memory(
    url: str,
    memory_id: int,
    count: int = QUESTIONS,
    *,
    key: str | None = None,
    content: str | None = None,
    other_memory_ids: Sequence[int] = (),
    priority: int = PRIORITY,
) -> list[int]:
    """Queue `count` questions about memory `memory_id` in its learn session; returns the prompt ids.

    The memory's key, content and neighbours are read from the database, unless `key` and `content` are given
    (a submitter, which cannot read them): then its neighbours are the nearest of `other_memory_ids`. All of
    the questions are queued in one transaction, or none.
    """
    if (key is None) != (content is None):
        raise BadInputError("give both the memory's key and its content, or neither (they are then read from the "
                            "database)")
    with queue.connect(url) as connection:
        if key is None:
            memory = read_memory(connection, memory_id)
        else:
            memory = MemoryToLearn(memory_id, key, content, nearest(memory_id, other_memory_ids))
        questions = questions_for(memory.key, memory.content, count)
        session = session_id(memory_id)
        memory_ids = [memory_id, *memory.neighbour_ids]
        prompt_ids = queue.submit_all(connection, [
            dict(messages=chat(question), memory_ids=memory_ids, session_id=str(session), priority=priority)
            for question in questions])
    get_logger().info("learn_submitted", memory_id=memory_id, questions=len(prompt_ids), session_id=str(session),
                      neighbour_ids=list(memory.neighbour_ids))
    return prompt_ids


def unlearned_memories(connection: queue.Connection) -> list[int]:
    """The memories the session user may attach to its prompts whose learn session holds no prompt yet, by id."""
    sessions = {session_id(memory_id): memory_id for memory_id in memories.learnable_memories(connection)}
    learned = memories.sessions_with_prompts(connection, list(sessions))
    return [memory_id for session, memory_id in sessions.items() if session not in learned]


def learn_new_memories(url: str, count: int = QUESTIONS) -> dict[int, list[int]]:
    """Queue learn questions for every memory that has none yet (unlearned_memories): memory id -> prompt ids.

    A memory whose questions cannot be written (too few templates avoid its content's words) is logged as
    `learn_failed` and skipped; the others go on. A database error ends the round: the caller logs it.
    """
    with queue.connect(url) as connection:
        memory_ids = unlearned_memories(connection)
    log = get_logger()
    submitted = {}
    for memory_id in memory_ids:
        try:
            submitted[memory_id] = learn_memory(url, memory_id, count)
        except BadInputError as exc:
            log.warning("learn_failed", memory_id=memory_id, error=str(exc))
    return submitted
