"""The one alias table: other spellings of slaknet's options (the official SLaK / ConvNeXt ``main.py`` and the
research distillation code ``main_KD.py``), and older slaknet spellings.

Besides these, every flag (and every spelling below) is accepted with underscores for dashes (``--batch_size``
is ``--batch-size``, ``--data_path`` is ``--data-path``): the official scripts' spelling. YAML files, the keyword arguments
of :func:`slaknet.config` and checkpoints stored by earlier versions go through the same table.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["ALIASES", "VALUE_FLAGS", "REFUSED", "canonical_key"]

# other spelling (the flag as typed) -> option key
ALIASES: Dict[str, str] = {
    # official SLaK / ConvNeXt main.py
    "--data-path": "data", "--eval-data-path": "eval_data", "--nb-classes": "num_classes",
    "--img-size": "input_size", "--Decom": "decompose", "--decom": "decompose", "--use-amp": "amp",
    "-u": "update_frequency",
    # research distillation code (main_KD.py)
    "--alpha": "distill_alpha", "--distillation-alpha": "distill_alpha", "--hard": "distill_hard",
    "--T": "distill_T", "--temperature": "distill_T", "--distillation-tau": "distill_T",
    "--nkd-temperature": "nkd_T", "--FDLoss-type": "fd_loss", "--target-Lnorm": "target_lnorm",
    "--teacher-model": "teacher",
    # earlier slaknet spellings
    "--pretrained": "backbone_checkpoint", "--out": "output_dir", "--output": "output_dir",
    "--reparameterize": "reparam", "--size": "input_size",
}

# flags that set an option to a fixed value
VALUE_FLAGS: Dict[str, Tuple[str, Any]] = {
    "no-sparse": ("sparse", False), "dense": ("sparse", False), "no-ema": ("ema", False),
}

# official flags that slaknet does not take: (the one value that is harmless, what to do instead)
REFUSED: Dict[str, Tuple[bool, str]] = {
    "bn": (True, "--bn False is not supported: slaknet's large-kernel branches always use BatchNorm"),
    "eval": (False, "--eval True: use `slaknet eval --checkpoint C --data DIR` to evaluate a checkpoint"),
}


_BY_NAME = {k.lstrip("-"): v for k, v in ALIASES.items()}


def canonical_key(name: str) -> str:
    """The option key for a spelling (``--batch_size``, ``batch-size``, ``Decom`` ...), or the spelling with
    dashes as underscores when the table does not know it."""
    name = name.lstrip("-")
    for spelling in (name, name.replace("_", "-"), name.replace("-", "_")):
        if spelling in _BY_NAME:
            return _BY_NAME[spelling]
    return name.replace("-", "_")
