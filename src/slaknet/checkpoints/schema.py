"""The names SLaK checkpoints use for the branches of a large-kernel layer (one place for all readers).

A large-kernel layer ``<block>.large_kernel`` stores, in its training form, ``LoRA1`` (M x N strip),
``LoRA2`` (N x M strip) and ``small_conv`` (N x N), or ``lkb_origin`` (M x M) and ``small_conv``; each is a
depthwise conv (``.conv.weight``) followed by a BatchNorm (``.bn.*``). The inference forms store
``lkb_strip1`` / ``lkb_strip2`` (two strips, BN folded, one bias) or ``lkb_reparam`` (one M x M kernel),
each a bare conv (``.weight``, ``.bias``). Older releases called the strips ``Decom1`` / ``Decom2``.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

__all__ = ["LARGE_KERNEL", "STRIP_MN", "STRIP_NM", "ORIGIN", "SMALL", "REPARAM_STRIP1", "REPARAM_STRIP2",
           "REPARAM_DENSE", "TRAIN_BRANCHES", "LARGE_BRANCHES", "INFER_BRANCHES", "ALL_BRANCHES", "RENAMED_KEYS",
           "branch_weight_key", "branch_bn_prefix", "split_branch_key", "rename_key"]

LARGE_KERNEL = "large_kernel"
STRIP_MN, STRIP_NM, ORIGIN, SMALL = "LoRA1", "LoRA2", "lkb_origin", "small_conv"
REPARAM_STRIP1, REPARAM_STRIP2, REPARAM_DENSE = "lkb_strip1", "lkb_strip2", "lkb_reparam"
TRAIN_BRANCHES = (STRIP_MN, STRIP_NM, ORIGIN, SMALL)  # conv + BN: ``<branch>.conv.weight``, ``<branch>.bn.*``
LARGE_BRANCHES = (STRIP_MN, STRIP_NM, ORIGIN)  # the large (sparse-trained) kernels of the training form
INFER_BRANCHES = (REPARAM_STRIP1, REPARAM_STRIP2, REPARAM_DENSE)  # bare convs: ``<branch>.weight``
ALL_BRANCHES = TRAIN_BRANCHES + INFER_BRANCHES
# Older releases used other names for the same tensors.
RENAMED_KEYS = ((f".{LARGE_KERNEL}.Decom1.", f".{LARGE_KERNEL}.{STRIP_MN}."),
                (f".{LARGE_KERNEL}.Decom2.", f".{LARGE_KERNEL}.{STRIP_NM}."))

_BRANCH_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<branch>" + "|".join(TRAIN_BRANCHES) + r")\.conv\.weight$"
                         r"|^(?P<iprefix>.+)\.(?P<ibranch>" + "|".join(INFER_BRANCHES) + r")\.weight$")


def branch_weight_key(layer: str, branch: str) -> str:
    """State-dict key of a branch's kernel, e.g. ``stages.0.0.large_kernel`` + ``LoRA1``."""
    return f"{layer}.{branch}.conv.weight" if branch in TRAIN_BRANCHES else f"{layer}.{branch}.weight"


def branch_bn_prefix(layer: str, branch: str) -> Optional[str]:
    """Key prefix of the BatchNorm after a training branch (None for inference branches, which have none)."""
    return f"{layer}.{branch}.bn" if branch in TRAIN_BRANCHES else None


def split_branch_key(key: str) -> Optional[Tuple[str, str]]:
    """``(layer prefix, branch)`` when ``key`` is a branch kernel, else None."""
    m = _BRANCH_KEY.match(key)
    if not m:
        return None
    return (m.group("prefix"), m.group("branch")) if m.group("prefix") else (m.group("iprefix"), m.group("ibranch"))


def rename_key(key: str) -> str:
    """The current name of a key written by an older release (``Decom1`` -> ``LoRA1``, ...)."""
    for old, new in RENAMED_KEYS:
        key = key.replace(old, new)
    return key
