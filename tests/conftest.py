"""Shared fixtures. Databases: one migrated template per pytest process, copied for each test."""

import os
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from icldaemon.store import migrate

TEST_DATABASE_URL_VARIABLE = "ICLD_TEST_DATABASE_URL"
DEFAULT_TEST_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _database_url(server_url: str, database: str) -> str:
    return make_url(server_url).set(database=database).render_as_string(hide_password=False)


def _create_database(server_url: str, database: str, template: str | None = None) -> None:
    statement = sql.SQL("CREATE DATABASE {database}").format(database=sql.Identifier(database))
    if template is not None:
        statement = sql.SQL("{statement} TEMPLATE {template}").format(
            statement=statement, template=sql.Identifier(template)
        )
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(statement)


def _drop_database(server_url: str, database: str) -> None:
    # WITH (FORCE): a test that leaked a connection must not leave its database behind.
    statement = sql.SQL("DROP DATABASE IF EXISTS {database} WITH (FORCE)").format(database=sql.Identifier(database))
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(statement)


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """The test server's maintenance database (admin rights), from ICLD_TEST_DATABASE_URL."""
    url = os.environ.get(TEST_DATABASE_URL_VARIABLE, DEFAULT_TEST_SERVER_URL)
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"the test PostgreSQL server is unreachable (set {TEST_DATABASE_URL_VARIABLE}): {exc}")
    return url


@pytest.fixture(scope="session")
def _template_database(pg_server_url: str) -> Iterator[str]:
    name = f"icld_test_template_{os.getpid()}"
    _drop_database(pg_server_url, name)
    _create_database(pg_server_url, name)
    try:
        migrate.upgrade(_database_url(pg_server_url, name))
        yield name
    finally:
        _drop_database(pg_server_url, name)


@pytest.fixture
def create_database(pg_server_url: str) -> Iterator[Callable[..., str]]:
    """create_database(template=None) -> URL of a new database, dropped after the test."""
    names: list[str] = []

    def create(template: str | None = None) -> str:
        name = f"icld_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        names.append(name)
        _create_database(pg_server_url, name, template=template)
        return _database_url(pg_server_url, name)

    yield create
    for name in names:
        _drop_database(pg_server_url, name)


@pytest.fixture
def empty_database_url(create_database: Callable[..., str]) -> str:
    """A new database with nothing in it."""
    return create_database()


@pytest.fixture
def database_url(create_database: Callable[..., str], _template_database: str) -> str:
    """A new database migrated to head (a copy of the session's template)."""
    return create_database(template=_template_database)


# --- a small tokenizer, no network and no model weights


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CORPUS = [
    "The user has a grey cat called Miso. The user's favourite colour is teal.",
    "Translate English to French: cheese => fromage, sea otter => loutre de mer.",
    "Relevant memories: What is the name of my cat? You are a helpful assistant.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of 300 tokens with a ChatML chat template, trained in memory."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(TINY_CORPUS * 5, vocab_size=300, min_frequency=1, show_progress=False,
                                special_tokens=["<|bos|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, bos_token="<|bos|>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
