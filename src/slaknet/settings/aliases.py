"""The one alias table: other spellings of slaknet's options (the official SLaK / ConvNeXt ``main.py`` and the
research distillation code ``main_KD.py``), and older slaknet spellings.

Besides these, every flag is accepted with underscores for dashes (``--batch_size`` is ``--batch-size``,
``--distill_type`` is ``--distill-type``): the official scripts' spelling. YAML files, the keyword arguments
of :func:`slaknet.config` and checkpoints stored by earlier versions go through the same table.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["ALIASES", "VALUE_FLAGS", "REFUSED", "canonical_key"]

# other spelling (without leading dashes) -> option key
ALIASES: Dict[str, str] = {
    # official SLaK / ConvNeXt main.py
    "data_path": "data", "data-path": "data", "eval_data_path": "eval_data", "eval-data-path": "eval_data",
    "nb_classes": "num_classes", "img_size": "input_size", "img-size": "input_size",
    "Decom": "decompose", "decom": "decompose", "use_amp": "amp",
    "u": "update_frequency", "update_frequency": "update_frequency",
    # research distillation code (main_KD.py)
    "alpha": "distill_alpha", "distillation_alpha": "distill_alpha", "distillation-alpha": "distill_alpha",
    "T": "distill_T", "temperature": "distill_T", "distillation_tau": "distill_T", "distillation-tau": "distill_T",
    "nkd_temperature": "nkd_T", "nkd-temperature": "nkd_T", "FDLoss_type": "fd_loss", "target_Lnorm": "target_lnorm",
    "target-Lnorm": "target_lnorm", "teacher_model": "teacher", "teacher-model": "teacher",
    # earlier slaknet spellings
    "pretrained": "backbone_checkpoint", "out": "output_dir", "output": "output_dir",
    "reparameterize": "reparam", "size": "input_size",
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


def canonical_key(name: str) -> str:
    """The option key for a spelling (``--batch_size``, ``batch-size``, ``Decom`` ...), or the spelling with
    dashes as underscores when the table does not know it."""
    name = name.lstrip("-")
    if name in ALIASES:
        return ALIASES[name]
    return ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
