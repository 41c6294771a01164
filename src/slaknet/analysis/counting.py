"""Sparse-aware parameter and multiply-add (MAC) counting.

Conventions (explained in the README):

* **params**: every parameter tensor element (BatchNorm/LayerNorm affine included, buffers excluded);
  **non-zero params** counts elements that are not exactly zero, so pruned (masked) weights drop out.
* **MACs**: multiply-adds of convolutions and linear layers only (norms, activations, pooling and the
  residual adds are ignored, as in fvcore and the papers' "FLOPs").

  - ``macs_dense``: every kernel tap at every output position, padding included (the common convention);
  - ``macs_inbounds``: only taps that read a real input pixel (zero padding is free), which is what an
    efficient implementation must compute; with large kernels on small maps the two differ a lot;
  - ``macs_nonzero``: in-bounds taps whose weight is non-zero (what a sparse kernel could skip to);
  - ``macs_nonzero_padded``: non-zero taps at every output position, padding included (the dense
    convention applied to the non-zero weights).

``sparsity=S`` answers "what would it be at S sparsity over all conv and linear weights" for a dense
model: each such weight tensor keeps ``round((1 - S) * numel)`` entries (uniform layer-wise density, the
paper's reporting convention; ERK/SNIP distribute them differently but keep the same total).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from slaknet.layers.dwconv import use_backend

__all__ = ["Counts", "count_model", "conv_tap_coverage", "human_count"]


def human_count(n: float) -> str:
    """A count in the unit that fits it (never ``0.00 G``): ``12.35 K``, ``65.00 M``, ``8.11 G``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)}"


@dataclass
class Counts:
    params: int
    params_nonzero: int
    macs_dense: int
    macs_inbounds: int
    macs_nonzero: int
    macs_nonzero_padded: int
    input_size: Tuple[int, int]
    sparsity: Optional[float] = None  # set when the non-zero figures are hypothetical (uniform sparsity)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


    def table(self) -> str:
        """Human-readable summary."""
        label = f"at {self.sparsity:.0%} sparsity (uniform over conv+linear)" if self.sparsity else "non-zero"
        rows = [
            ("parameters (dense)", human_count(self.params)),
            (f"parameters {label}", human_count(self.params_nonzero)),
            (f"MACs dense, padded taps @ {self.input_size[0]}x{self.input_size[1]}", human_count(self.macs_dense)),
            ("MACs dense, in-bounds taps", human_count(self.macs_inbounds)),
            (f"MACs {label}, padded taps", human_count(self.macs_nonzero_padded)),
            (f"MACs {label}, in-bounds", human_count(self.macs_nonzero)),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)


def _valid_count(out_len: int, in_len: int, k: int, stride: int, pad: int, dil: int) -> torch.Tensor:
    """For each kernel tap along one axis, how many output positions read an in-bounds input."""
    o = torch.arange(out_len).unsqueeze(1) * stride - pad
    idx = o + torch.arange(k).unsqueeze(0) * dil
    return ((idx >= 0) & (idx < in_len)).sum(0)


def conv_tap_coverage(conv: nn.Conv2d, in_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> torch.Tensor:
    """``[kh, kw]`` matrix: number of output positions at which each tap reads a real (unpadded) pixel."""
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        raise ValueError("string padding is not supported by the counter")
    rows = _valid_count(out_hw[0], in_hw[0], kh, conv.stride[0], conv.padding[0], conv.dilation[0])
    cols = _valid_count(out_hw[1], in_hw[1], kw, conv.stride[1], conv.padding[1], conv.dilation[1])
    return rows.unsqueeze(1) * cols.unsqueeze(0)


def _kept_mask(weight: torch.Tensor, density: Optional[float], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kept entries of a weight: its sparse ``mask`` if given, else a hypothetical pattern keeping
    ``round(density * numel)`` entries if ``density`` is given, else its non-zero entries."""
    if mask is not None:
        return mask.detach().to("cpu", torch.bool).view_as(weight)
    if density is None:
        return weight != 0
    keep = int(round(density * weight.numel()))
    flat = torch.zeros(weight.numel(), dtype=torch.bool)
    # which entries are kept does not change the parameter count, but does change in-bounds MACs a
    # little; spread them evenly (every k-th entry) so the estimate has no positional bias
    if keep > 0:
        flat[torch.linspace(0, weight.numel() - 1, keep).round().long()] = True
    return flat.view_as(weight)


@torch.no_grad()
def _count_parameters(model: nn.Module, density: Optional[float], masks: Mapping[str, torch.Tensor]
                      ) -> Tuple[int, int, Dict[int, torch.Tensor]]:
    """``(parameters, non-zero parameters, id(weight) -> mask)``: masked weights count their mask, conv/linear
    weights ``density`` of their entries when a hypothetical density is given, everything else its non-zeros."""
    params = params_nz = 0
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    mask_of: Dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters():
        params += p.numel()
        if name in masks:
            mask_of[id(p)] = masks[name]
            params_nz += int(masks[name].sum())
        elif density is not None and id(p) in weights:
            params_nz += int(round(density * p.numel()))
        else:
            params_nz += int((p != 0).sum())
    return params, params_nz, mask_of


def count_model(model: nn.Module, input_size: Union[int, Sequence[int]] = 224, in_chans: int = 3,
                sparsity: Optional[float] = None, masks: Optional[Mapping[str, torch.Tensor]] = None,
                example: Optional[torch.Tensor] = None) -> Counts:
    """Count parameters and MACs of ``model`` for one ``in_chans x H x W`` image (one forward, batch 1).

    Every ``nn.Conv2d`` / ``nn.Linear`` the forward pass calls is counted, in every form of a large-kernel
    layer (training branches, two reparameterized strips, one merged kernel). ``example``: run on this
    input instead (any shape the model takes; MACs then cover its whole batch).

    ``sparsity``: report non-zero figures as if every conv/linear weight had that sparsity (see module doc).
    ``masks``: parameter name -> bool mask (e.g. ``SparseEngine.masks()``); masked weights count their
    mask's active entries instead of their non-zeros.
    """
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = int(input_size[0]), int(input_size[1])
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    density = None if sparsity is None else 1.0 - sparsity

    masks = dict(masks or {})
    if masks and density is not None:
        raise ValueError("give either sparsity (hypothetical) or masks (actual), not both")
    params, params_nz, mask_of = _count_parameters(model, density, masks)
    macs = {"dense": 0, "inbounds": 0, "nonzero": 0, "nonzero_padded": 0}

    def conv_hook(mod: nn.Conv2d, inp, out) -> None:
        x = inp[0]
        cov = conv_tap_coverage(mod, tuple(x.shape[-2:]), tuple(out.shape[-2:])).to(torch.int64)
        out_pos = out.shape[-2] * out.shape[-1]
        n = x.shape[0]
        numel = mod.weight.numel()
        per_tap_all = torch.full_like(cov, mod.weight.shape[0] * mod.weight.shape[1])
        kept = _kept_mask(mod.weight.detach().cpu(), density, mask_of.get(id(mod.weight)))
        kept = kept.sum(dim=(0, 1)).to(torch.int64)
        macs["dense"] += n * out_pos * numel
        macs["inbounds"] += n * int((per_tap_all * cov).sum())
        macs["nonzero"] += n * int((kept * cov).sum())
        macs["nonzero_padded"] += n * out_pos * int(kept.sum())

    def linear_hook(mod: nn.Linear, inp, out) -> None:
        tokens = inp[0].numel() // mod.in_features
        macs["dense"] += tokens * mod.weight.numel()
        macs["inbounds"] += tokens * mod.weight.numel()
        kept = tokens * int(_kept_mask(mod.weight.detach().cpu(), density, mask_of.get(id(mod.weight))).sum())
        macs["nonzero"] += kept
        macs["nonzero_padded"] += kept

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        # shapes are all the hooks need: no gradients, and the plain depthwise kernel, so that counting never
        # makes `auto` time batch-1 training shapes (slaknet.layers.autotune)
        with torch.no_grad(), use_backend("plain"):
            model(example if example is not None else torch.zeros(1, in_chans, h, w, device=device, dtype=dtype))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return Counts(params=params, params_nonzero=params_nz, macs_dense=macs["dense"],
                  macs_inbounds=macs["inbounds"], macs_nonzero=macs["nonzero"],
                  macs_nonzero_padded=macs["nonzero_padded"], input_size=(h, w),
                  sparsity=sparsity)
