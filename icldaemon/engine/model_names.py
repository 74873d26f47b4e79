"""How a model name is read: a directory, a path that does not exist, or a hub id asked about once.

Without torch, so that the command line can refuse a name it cannot load before the slow imports.
"""

import functools
from pathlib import Path

from icldaemon.exceptions import ModelLoadError
from icldaemon.logs import get_logger

HUB_TIMEOUT = 5.0  # seconds for the one request that asks the hub about a hub id before it is loaded
PATH_PREFIXES = (".", "/", "~")  # a model name starting so is a path, never a hub id


def is_path_name(name: str) -> bool:
    """Whether a model name that is not an existing directory is read as a path rather than a hub id ("org/name").

    A path starts with '.', '/' or '~', or has a path separator a hub id cannot have: a backslash, or more than
    one '/'.
    """
    return name.startswith(PATH_PREFIXES) or "\\" in name or name.count("/") > 1


@functools.cache
def hub_source(repo_id: str) -> bool:
    """Whether a hub id is loaded from the hub cache only (True) or from the hub (False); ModelLoadError says why not.

    The hub is asked once per process (the answer is kept), with a short timeout and no retries; unreachable, a
    cached copy is used. HF_HUB_OFFLINE uses the cache without asking.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    read_as = f"model {repo_id!r} was read as a hub id (it is not a directory here)"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelLoadError(f"model {repo_id!r} is not a directory here and not a valid hub id (\"org/name\": "
                             "letters, digits, '-', '_' and '.', at most 96 characters)") from None
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ModelLoadError(f"{read_as}; HF_HUB_OFFLINE is set and the hub cache {constants.HF_HUB_CACHE} "
                             "does not hold it")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT, retry_on_errors=False)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{read_as}; the hub {constants.ENDPOINT} has no such model (a private or gated one "
                             "needs HF_TOKEN with access to it)") from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"{read_as}; the hub {constants.ENDPOINT} answered {' '.join(str(exc).split())}") from exc
    except Exception as exc:  # the HTTP client's transport errors (refused, unresolved, timed out)
        if cached:
            get_logger().warning("hub_unreachable", model=repo_id, error=str(exc), using="the hub cache")
            return True
        raise ModelLoadError(f"{read_as}; the hub {constants.ENDPOINT} cannot be reached within {HUB_TIMEOUT:g} s "
                             f"({exc or type(exc).__name__}) and the hub cache does not hold it; give a model "
                             "directory, or download it where the hub can be reached") from exc
    return False


def model_source(name_or_path: str) -> tuple[Path | str, bool]:
    """(what to load from, whether only local files may be used) for a model name; ModelLoadError says why not.

    A name that is an existing directory, or reads as a path (`is_path_name`), is loaded from disk; any other
    name is a hub id, asked about once (`hub_source`).
    """
    path = Path(name_or_path).expanduser()
    if path.exists() or is_path_name(name_or_path):
        if not path.exists():
            raise ModelLoadError(f"model {name_or_path!r} was read as a path (a hub id is \"org/name\"), "
                                 f"and {path.absolute()} does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {name_or_path!r} is not a model directory (no config.json there)")
        return path, True
    return name_or_path, hub_source(name_or_path)
