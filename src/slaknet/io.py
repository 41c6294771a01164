"""Atomic file writing: every file slaknet writes for later use appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union

__all__ = ["atomic_path"]


def _default_mode() -> int:
    """0666 minus the process umask (what ``open(path, "w")`` would give), e.g. 0644."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The previous file at ``path`` stays intact until the new one is complete, so a crash (or SIGKILL)
    mid-write never leaves a truncated file; on an exception the temporary file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):
            # mkstemp makes 0600 (and some writers re-create the file): give it the usual umask mode
            os.chmod(tmp, _default_mode())
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
