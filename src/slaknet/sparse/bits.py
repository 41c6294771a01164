"""Exact, bit-level edits of float tensors under a bool mask (the engine's streaming passes).

Every edit here is exact whatever the old value is: an entry that is zeroed becomes +0.0 even if it was
NaN, +-inf or -0.0 (a float multiply by 0 would keep NaN and give NaN for inf, and -0.0 for negatives),
and a kept entry keeps every bit. Large contiguous CPU tensors are processed in chunks on same-width
integer views (PyTorch's float-times-bool multiply takes a slow mixed-type path on CPU); every other
tensor (small, non-contiguous, CUDA, ...) gets the same integer ops in one piece, or ``masked_fill_``
for a dtype without an integer twin.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

__all__ = ["INF_BITS", "CHUNK", "zero_inactive_", "edit_bits_", "any_nonzero_where", "any_nonfinite_where"]

# bit pattern of +inf and the same-width integer dtype, per floating dtype
INF_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
            torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00)}
CHUNK = 1 << 17  # elements per chunk of the streaming passes (their int copies stay in cache)


def _bit_chunks(t: torch.Tensor, *masks: torch.Tensor) -> Optional[Iterator[Tuple[torch.Tensor, ...]]]:
    """Yield (bits of t, int copy of each bool mask) chunk by chunk, or None where chunking does not apply.

    Only for contiguous CPU tensors big enough to be worth it (the int copies of the masks are converted
    chunk by chunk, so they stay in cache).
    """
    if (t.device.type != "cpu" or t.dtype not in INF_BITS or t.numel() < CHUNK or not t.is_contiguous()
            or not all(m.is_contiguous() for m in masks)):
        return None
    itype = INF_BITS[t.dtype][0]
    bits = t.view(-1).view(itype)
    flats = [m.view(-1) for m in masks]
    bufs = [torch.empty(CHUNK, dtype=itype) for _ in masks]

    def gen() -> Iterator[Tuple[torch.Tensor, ...]]:
        for s in range(0, bits.numel(), CHUNK):
            c = min(CHUNK, bits.numel() - s)
            yield (bits[s:s + c],) + tuple(b[:c].copy_(f[s:s + c]) for b, f in zip(bufs, flats))

    return gen()


def _whole(t: torch.Tensor, *masks: torch.Tensor) -> Iterator[Tuple[torch.Tensor, ...]]:
    """The unchunked path: t's integer view and int copies of the masks (any device, any strides)."""
    itype = INF_BITS[t.dtype][0]
    return iter([(t.view(itype),) + tuple(m.to(device=t.device, dtype=itype) for m in masks)])


def zero_inactive_(t: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: entries of ``t`` where the bool ``mask`` is False become +0.0; the others keep every bit.

    The re-masking pass after a step. Integer ``bits * keep`` (0/1) on the chunked CPU path, ``bits & -keep``
    elsewhere: both exact also over NaN / inf / -0.0 (unlike ``t * mask``).
    """
    if t.dtype not in INF_BITS:
        t.masked_fill_(~mask.to(t.device), 0)
        return
    chunks = _bit_chunks(t, mask)
    if chunks is None:
        for bits, keep in _whole(t, mask):
            bits.bitwise_and_(keep.neg_())
        return
    for bits, keep in chunks:
        bits.mul_(keep)


def edit_bits_(t: torch.Tensor, keep: torch.Tensor, to_inf: Optional[torch.Tensor] = None) -> None:
    """In place: entries of ``t`` where ``keep`` is False become +0.0, then entries where ``to_inf`` is True
    become +inf (bit patterns: AND with 0 / all-ones, OR with the bits of +inf)."""
    inf_bits = INF_BITS[t.dtype][1]
    masks = (keep,) if to_inf is None else (keep, to_inf)
    chunks = _bit_chunks(t, *masks) or _whole(t, *masks)
    for bits, k, *inf in chunks:
        bits.bitwise_and_(k.neg_())
        if inf:
            bits.bitwise_or_(inf[0].mul_(inf_bits))


def any_nonzero_where(t: torch.Tensor, where: torch.Tensor) -> bool:
    """Exactly: is any entry of ``t`` other than +-0.0 (NaN included) where the bool ``where`` is True?"""
    if t.dtype not in INF_BITS:
        return bool(torch.where(where.to(t.device), t, torch.zeros((), dtype=t.dtype, device=t.device)).ne(0).any())
    itype = INF_BITS[t.dtype][0]
    sign_off = torch.tensor(~(-1 << (8 * t.element_size() - 1)), dtype=itype, device=t.device)
    for bits, w in _bit_chunks(t, where) or _whole(t, where):
        if bool(w.neg_().bitwise_and_(bits).bitwise_and_(sign_off).any()):
            return True
    return False


def any_nonfinite_where(t: torch.Tensor, where: torch.Tensor) -> bool:
    """Exactly: is any entry of ``t`` NaN or +-inf where the bool ``where`` is True?"""
    if t.dtype not in INF_BITS:
        return bool((~torch.isfinite(t) & where.to(t.device)).any())
    itype, inf_bits = INF_BITS[t.dtype]
    exp = torch.tensor(inf_bits, dtype=itype, device=t.device)  # all exponent bits set <=> inf or NaN
    for bits, w in _bit_chunks(t, where) or _whole(t, where):
        if bool(w.neg_().bitwise_and_(bits).bitwise_and_(exp).eq_(exp).any()):
            return True
    return False
