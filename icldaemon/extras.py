"""Packages that only some uses need (pyproject.toml's extras), checked where they are used.

The service with a database URL and a model of its own needs none of them; the newcomer's path (the
embedded database, the bundled model, plots) needs all, and `./dev.sh` installs them
(`.[demo]`). A missing one is one line naming the extra that brings it.
"""

import importlib.util

from icldaemon.exceptions import ConfigurationError

EXTRAS = {  # module: (the extra that installs it, what needs it, what to do instead)
    "pgserver": ("embedded", "the embedded PostgreSQL server", "or set ICLD_DATABASE_URL to a server's URL"),
    "gguf": ("bundled", "the bundled default model (converted once from GGUF)", "or set ICLD_MODEL to a model"),
    "matplotlib": ("plot", "plotting", ""),
}


def require(module: str) -> None:
    """ConfigurationError naming the extra to install when `module` is not installed."""
    if importlib.util.find_spec(module) is not None:
        return
    extra, purpose, instead = EXTRAS[module]
    raise ConfigurationError(f"{purpose} needs the {module} package, which is not installed: pip install "
                             f"'icldaemon[{extra}]'" + (f", {instead}" if instead else ""))
