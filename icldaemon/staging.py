"""A directory written under a temporary sibling name and renamed into place, so that one found there is complete."""

import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(directory: Path, failed: Callable[[OSError], Exception]) -> Iterator[Path]:
    """Yields a temporary sibling of `directory` to write into, renamed onto `directory` when the block ends.

    On any failure the sibling is removed; an OSError (a full disk, a name taken meanwhile) is raised as
    `failed(error)`.
    """
    staging = directory.absolute().parent / f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield staging
        staging.rename(directory)  # onto nothing, or onto an empty directory
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise failed(exc) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
