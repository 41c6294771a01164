"""The architecture a SLaK state dict implies, read off its keys and tensor shapes.

Official files store neither kernel sizes nor width, and evaluating a checkpoint with the wrong kernel
settings silently fails in the research code; :func:`describe_state_dict` recovers depths, widths, kernel
sizes, the small kernel N, the decomposition, classes, input channels and the (reparameterized) form, so
a model that fits can be built and a mismatch described ("the file looks like X, the model is Y").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from slaknet.checkpoints.schema import (LARGE_KERNEL, ORIGIN, REPARAM_DENSE, REPARAM_STRIP1, SMALL, STRIP_MN,
                                        branch_weight_key)
from slaknet.errors import CheckpointError

__all__ = ["ArchSpec", "describe_state_dict"]


@dataclass
class ArchSpec:
    """The architecture a SLaK state dict implies (everything needed to build a model that fits it)."""

    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    kernel_sizes: Tuple[int, ...]
    small_kernel: Optional[int]
    decompose: bool
    num_classes: int
    in_chans: int
    layer_scale: bool = True
    reparameterized: Optional[str] = None  # None, "strips" or "dense"
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        form = "decomposed" if self.decompose else "undecomposed"
        if self.small_kernel is None:
            form = "single-kernel"
        rep = f", reparameterized ({self.reparameterized})" if self.reparameterized else ""
        return (f"{len(self.depths)} stages, depths {'/'.join(map(str, self.depths))}, widths "
                f"{'/'.join(map(str, self.widths))}, kernels {'/'.join(map(str, self.kernel_sizes))} "
                f"(N={self.small_kernel}, {form}{rep}), {self.num_classes} classes, {self.in_chans} input channels")

    def differences(self, other: "ArchSpec") -> List[str]:
        out = []
        for name in ("depths", "widths", "kernel_sizes", "small_kernel", "decompose", "num_classes",
                     "in_chans", "layer_scale", "reparameterized"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append(f"{name}: file {a} vs model {b}")
        return out


_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.")


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> ArchSpec:
    """Read the SLaK architecture off a state dict's keys and shapes."""
    stem = sd.get("downsample_layers.0.0.weight")
    if stem is None or stem.dim() != 4:
        sample = ", ".join(list(sd)[:5])
        raise CheckpointError(f"this does not look like a SLaK state dict (no downsample_layers.0.0.weight; "
                              f"first keys: {sample})")
    blocks: Dict[int, set] = {}
    for k in sd:
        m = _BLOCK_RE.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError("state dict has no contiguous stages.{i}.{j} blocks")
    depths = tuple(max(blocks[i]) + 1 for i in range(len(blocks)))
    # per stage: large kernel M, small kernel N (None for a single M x M kernel), decomposed or not
    widths, kernels, smalls, decomposed, reparam, single = [], [], set(), set(), set(), []
    for i in range(len(depths)):
        p = f"stages.{i}.0.{LARGE_KERNEL}"
        if branch_weight_key(p, STRIP_MN) in sd:
            m, n = sd[branch_weight_key(p, STRIP_MN)].shape[-2:]
            decomposed.add(True)
            smalls.add(int(n))
        elif branch_weight_key(p, REPARAM_STRIP1) in sd:
            m, n = sd[branch_weight_key(p, REPARAM_STRIP1)].shape[-2:]
            decomposed.add(True)
            smalls.add(int(n))
            reparam.add("strips")
        elif branch_weight_key(p, ORIGIN) in sd:
            m = sd[branch_weight_key(p, ORIGIN)].shape[-1]
            small = sd.get(branch_weight_key(p, SMALL))
            if small is not None:
                decomposed.add(False)
                smalls.add(int(small.shape[-1]))
            else:
                single.append((i, int(m)))
        elif branch_weight_key(p, REPARAM_DENSE) in sd:
            m = sd[branch_weight_key(p, REPARAM_DENSE)].shape[-1]
            reparam.add("dense")
        else:
            raise CheckpointError(f"stage {i} has no recognisable large-kernel weights under '{p}.'")
        kernels.append(int(m))
        widths.append(int(sd[f"stages.{i}.0.pwconv1.weight"].shape[1]))
    notes = []
    if len(smalls) > 1 or len(decomposed) > 1:
        raise CheckpointError(f"stages disagree on small kernel / decomposition: N={smalls}, decomposed={decomposed}")
    small_kernel = smalls.pop() if smalls else None
    # a stage whose M <= N has a single M x M kernel in any form; with M > N it would not
    bad = [f"stage {i} (M={m})" for i, m in single if small_kernel is not None and m > small_kernel]
    if bad:
        raise CheckpointError(f"{', '.join(bad)} has a single kernel although other stages use N={small_kernel}")
    if reparam == {"dense"}:
        notes.append("merged dense kernels: the original small kernel and decomposition cannot be recovered")
    head = sd.get("head.weight")
    return ArchSpec(
        depths=depths, widths=tuple(widths), kernel_sizes=tuple(kernels),
        small_kernel=small_kernel, decompose=decomposed.pop() if decomposed else False,
        num_classes=int(head.shape[0]) if head is not None else 0, in_chans=int(stem.shape[1]),
        layer_scale="stages.0.0.gamma" in sd, reparameterized=("strips" if "strips" in reparam else "dense") if reparam else None, notes=notes)
