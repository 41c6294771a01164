"""Run folders: one run per folder, resume into the checkpoint's own folder, no empty folders on failure.

* A new run refuses an existing, non-empty output folder (one line naming ``--resume``, ``--auto-resume``
  and ``--overwrite``); ``--overwrite`` deletes the old run's files first, so two runs' files never mix.
* ``--resume RUN/checkpoint-last.pth`` takes every setting from the checkpoint (options given explicitly
  override and are reported) and writes into ``RUN``.
* A run that fails before its first step removes the folder it created.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Dict, Optional

from slaknet.errors import CheckpointError, ConfigError

__all__ = ["CKPT_LAST", "CKPT_BEST", "RUN_FILES", "settings_from_checkpoint", "prepare_output_dir",
           "remove_created_dir", "resume_command"]

CKPT_LAST = "checkpoint-last.pth"
CKPT_BEST = "checkpoint-best.pth"
RUN_FILES = (CKPT_LAST, CKPT_BEST, "log.jsonl", "curves.png", "summary.json", "config.yaml", "model.safetensors",
             "model_ema.safetensors", "tb")
# settings a resume cannot change: they decide the architecture or the checkpoint's layout
_FIXED = ("model", "input_size", "sparse", "kernel_size", "width_factor", "decompose", "task")


def _show(v: Any) -> str:
    return repr(v)


def settings_from_checkpoint(path: str, spec: Any, given: Dict[str, Any], report: bool = True) -> Dict[str, Any]:
    """The run settings stored in a training checkpoint (flat option keys, plus ``recipe``), to be completed by
    the options in ``given``.

    Refuses (one-line CheckpointError) a checkpoint of another task, and ``given`` values that change a setting
    a resume cannot change; reports (stderr) the others that ``given`` overrides. Settings of the session
    (``--resume``, ``--overwrite``, ``--max-steps``...) are not restored. The output folder is the checkpoint's.
    """
    from slaknet.train import checkpoint as ckpt_io
    from slaknet.train.config import config_from_stored

    stored = dict(ckpt_io.load_training_checkpoint(path, lazy=True).get("config") or {})
    task = str(stored.get("task") or "classification")
    if task != spec.name:
        raise CheckpointError(f"resume: {path} is a checkpoint of a {task} run; `{spec.command}` trains "
                              f"{spec.name} (start a new --output-dir, or resume it with its own command)")
    base = config_from_stored(stored, spec)
    for k in ("resume", "auto_resume", "overwrite", "max_steps", "progress"):
        base.pop(k, None)
    base["output_dir"] = os.path.dirname(path) or "."
    notes = []
    for k, v in given.items():
        if k not in base or base[k] == v or k in ("output_dir", "resume"):
            continue
        if k in _FIXED and base[k] is not None:
            raise CheckpointError(f"resume: {k} was {_show(base[k])} in the checkpoint, now {_show(v)}; resume with "
                                  "the same settings (or start a new --output-dir)")
        notes.append(f"{k} {_show(base[k])} -> {_show(v)}")
    if notes and report:
        print(f"resume: settings from {path}, overridden on the command line: {', '.join(notes)}",
              file=sys.stderr, flush=True)
    base["recipe"] = stored.get("recipe")
    return base


def _entries(path: str) -> list:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def prepare_output_dir(out_dir: str, resuming: bool, overwrite: bool) -> bool:
    """Create or check the output folder; returns True when this call created it (so a failure can remove it)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output folder {out_dir!r} is a file")
    entries = _entries(out_dir)
    if entries and not resuming:
        if not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ConfigError(f"output folder {out_dir!r} is not empty ({shown}): continue that run with "
                              f"--resume {os.path.join(out_dir, CKPT_LAST)} or --auto-resume, replace it with "
                              "--overwrite, or choose another --output-dir")
        for name in entries:  # the old run's files; anything else in the folder is left alone
            if name in RUN_FILES or (name.startswith("checkpoint-") and name.endswith(".pth")):
                p = os.path.join(out_dir, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    return created


def remove_created_dir(out_dir: Optional[str], created: bool) -> None:
    """After a failure before training started: delete the folder this run created (and only that)."""
    if created and out_dir and os.path.isdir(out_dir):
        shutil.rmtree(out_dir, ignore_errors=True)


def resume_command(out_dir: str) -> str:
    """The exact command that continues the run in ``out_dir``."""
    import shlex

    return f"slaknet train --resume {shlex.quote(os.path.join(out_dir, CKPT_LAST))}"
