"""Atomic file writing: every file slaknet writes for later use appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional, Union

__all__ = ["atomic_path", "cache_dir", "ENV_CACHE_DIR"]

ENV_CACHE_DIR = "SLAKNET_CACHE_DIR"
_OFF = {"off", "none", "no", "0", "false", "disable", "disabled"}


def cache_dir() -> Optional[str]:
    """slaknet's per-user cache folder (autotune answers, ONNX exports, rendered built-in images):
    ``$SLAKNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/slaknet``, else ``~/.cache/slaknet``; None when
    ``SLAKNET_CACHE_DIR`` switches caching off (``off``, ``0``, ``none``, ...)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env is not None and env.strip():
        return None if env.strip().lower() in _OFF else os.path.expanduser(env.strip())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slaknet")


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
