"""Tests of the silent holes an independent audit found in slaknet.sparse (issue 18), one or more per defect.

Expected values come from independent computations (sorting by hand, plain torch formulas, a run with the
re-masking pass as the reference for the parked path), never from the engine under test.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.sparse import SparseEngine

from test_sparse import Net, assert_masked, batch, train_step


def _fused(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)


# ------------------------------------------------------------------ 1. pruned and regrown in one update ----

@pytest.mark.parametrize("fused", [False, True], ids=["pass", "parked"])
def test_pruned_and_regrown_in_the_same_update_start_at_zero_weight_and_state(fused):
    torch.manual_seed(0)
    m = Net()
    opt = _fused(m) if fused else torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20, prune_rate=0.6,
                     prune_rate_decay="constant", attach=False)
    both_total = 0
    for step in range(6):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
        before = {}
        if e.update_due(e.step_count + 1):  # independent: the k smallest |w| among active weights
            for l in e.layers:
                w = l.param.detach().clone().reshape(-1)
                act = l.mask.reshape(-1).nonzero().squeeze(1)
                k = min(math.ceil(0.6 * act.numel()), act.numel() - 1)
                pruned = act[torch.argsort(w[act].abs())[:k]]
                before[l.name] = pruned
        e.after_step()
        for l in e.layers:
            if l.name not in before:
                continue
            both = before[l.name][l.mask.reshape(-1)[before[l.name]]]  # pruned, then regrown
            both_total += both.numel()
            st = opt.state[l.param]
            assert torch.count_nonzero(l.param.detach().reshape(-1)[both]) == 0, l.name
            assert torch.count_nonzero(st["exp_avg"].reshape(-1)[both]) == 0
            assert torch.count_nonzero(st["exp_avg_sq"].reshape(-1)[both]) == 0  # finite 0, not parked at inf
        assert_masked(e)
    assert both_total > 0  # the case occurred


# ------------------------------------------------------------------------------ 2. attach() checks ------

def test_attach_refuses_replaced_parameters_and_foreign_optimizers():
    torch.manual_seed(0)
    m = Net()
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    m.load_state_dict(Net().state_dict(), assign=True)  # new Parameter objects
    with pytest.raises(ConfigError, match="no longer a parameter.*build a new SparseEngine"):
        e.attach(torch.optim.SGD(m.parameters(), lr=0.1))
    m2 = Net()
    e2 = SparseEngine(m2, torch.optim.SGD(m2.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    m2.fc = nn.Linear(8 * 4 * 4, 5)  # a replaced head
    with pytest.raises(ConfigError, match="'fc.weight' is no longer a parameter"):
        e2.attach(torch.optim.SGD(m2.parameters(), lr=0.1))
    m3 = Net()
    e3 = SparseEngine(m3, torch.optim.SGD(m3.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        e3.attach(torch.optim.SGD(m3.fc.parameters(), lr=0.1))


# --------------------------------------------------------------------- 3. exact zeroing on every path ----

@pytest.mark.parametrize("layout", ["small", "non_contiguous", "bf16"])
def test_zeroing_fallback_clears_nan_inf_and_negative_zero(layout):
    from slaknet.sparse.engine import _any_nonzero_where, _zero_inactive_

    t = torch.randn(6, 7)
    mask = torch.rand(6, 7) < 0.5
    mask[0, :4] = False
    mask[1, 0] = True
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -2.0])
    t[1, 0] = -0.0
    if layout == "non_contiguous":
        t, mask = t.t(), mask.t()
        assert not t.is_contiguous()
    if layout == "bf16":
        t = t.to(torch.bfloat16)
    kept = t[mask].clone()
    _zero_inactive_(t, mask)
    gone = t[~mask]
    assert torch.count_nonzero(gone) == 0 and not torch.signbit(gone).any()  # +0.0 everywhere, no NaN
    itype = torch.int16 if t.dtype == torch.bfloat16 else torch.int32
    assert torch.equal(t[mask].view(itype), kept.view(itype))  # kept entries keep every bit (-0.0 too)
    u = torch.zeros(5)
    u[0], u[1] = float("nan"), float("inf")
    assert not _any_nonzero_where(u, torch.tensor([False, False, True, True, True]))


def test_inf_gradient_at_an_inactive_weight_of_a_small_layer_is_harmless_with_the_pass():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=100, total_steps=100)
    layer = e.layers[0]  # c1.weight: 162 entries, the fallback path
    pos = int((~layer.mask).reshape(-1).nonzero()[0])
    h = layer.param.register_hook(lambda g: g.reshape(-1).index_fill(0, torch.tensor([pos]), float("inf"))
                                  .view_as(g))
    train_step(m, opt, 0)
    h.remove()
    assert_masked(e)
    for step in range(1, 4):
        loss = train_step(m, opt, step)
        assert math.isfinite(float(loss.detach()))
        assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


# ------------------------------------------------------------ 4. non-finite gradient, parked layers ------

def _run_with_inf_grad(masking: str):
    torch.manual_seed(0)
    m = Net()
    opt = _fused(m)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30, masking=masking)
    layer = e.layers[1]  # c2.weight
    pos = int((~layer.mask).reshape(-1).nonzero()[3])
    losses = []
    for step in range(7):
        h = None
        if step == 1:
            h = layer.param.register_hook(
                lambda g: g.reshape(-1).index_fill(0, torch.tensor([pos]), float("inf")).view_as(g))
        losses.append(float(train_step(m, opt, step).detach()))
        if h is not None:
            h.remove()
    return m, e, losses


def test_parked_nan_from_an_inf_gradient_is_repaired_before_it_reaches_a_loss():
    m1, e1, l1 = _run_with_inf_grad("auto")
    m2, e2, l2 = _run_with_inf_grad("pass")
    assert e1.stats()["parked_layers"] == len(e1.layers) and e2.stats()["parked_layers"] == 0
    assert all(math.isfinite(v) for v in l1) and l1 == l2
    assert_masked(e1)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):  # weights and BN statistics
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------- 5. detach restores the state ----

def test_detach_gives_parked_weights_finite_state_so_they_train_again():
    torch.manual_seed(0)
    m = Net()
    opt = _fused(m)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=50, total_steps=100)
    for step in range(2):
        train_step(m, opt, step)
    assert e.stats()["parked_layers"] == 3
    inactive = {l.name: ~l.mask.clone() for l in e.layers}
    assert m._forward_hooks  # the forward guard of parked layers
    e.detach()
    assert not m._forward_hooks and not m._forward_pre_hooks  # detach leaves no hook on the model
    for l in e.layers:
        assert torch.isfinite(opt.state[l.param]["exp_avg_sq"]).all()
    for step in range(2, 4):
        train_step(m, opt, step)
    for l in e.layers:  # the engine is gone: formerly inactive weights now move like any other
        moved = torch.count_nonzero(l.param.detach()[inactive[l.name]])
        assert moved >= 0.9 * int(inactive[l.name].sum()), l.name  # (before the fix: 0 moved)


# ------------------------------------------------------------------------------- 7. EMA of regrown ------

def test_sync_ema_copies_the_model_into_regrown_positions_like_the_research_code():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30)
    e.apply_masks()
    d = 0.9
    ema = ModelEmaV3(m, decay=d)
    plain = ModelEmaV3(m, decay=d)  # masked only: what slaknet did before
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = e.masks()
    for step in range(10):
        train_step(m, opt, step)
        ema.update(m)
        e.sync_ema(ema)
        plain.update(m)
        e.apply_masks(plain.module)
        for n, p in m.named_parameters():  # the research code's rule, by hand
            w = p.detach()
            if n in masks:
                mk = masks[n].float()
                new = (ref[n] == 0).float() * mk
                ref[n] = (ref[n] * d + w * (1 - d)) * mk + new * d * w
            else:
                ref[n] = ref[n] * d + w * (1 - d)
    assert e.update_count == 3
    got = dict(ema.module.named_parameters())
    for n, r in ref.items():
        torch.testing.assert_close(got[n], r, rtol=1e-5, atol=1e-7)
    other = dict(plain.module.named_parameters())
    assert any(not torch.allclose(other[n], ref[n], rtol=1e-5, atol=1e-7) for n in masks)  # tells them apart


# ------------------------------------------------------------------------------ monitoring helper ------

def test_density_report_counts_sparse_large_kernels():
    from slaknet.layers import LargeKernelConv

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lk = LargeKernelConv(4, 13, 3)
            self.pw = nn.Conv2d(4, 64, 1)
            self.head = nn.Linear(64, 300)

    # ERK at 50 %: the two 13x3 / 3x13 strips (LoRA1, LoRA2) of the 4-channel kernel come out dense (the
    # audit's finding on SLaK-T), uniform makes both sparse; the small 3x3 kernel is not a large kernel
    erk = SparseEngine(M(), None, sparsity=0.5, sparse_init="ERK", total_steps=10).density_report()
    assert erk["large_kernel"] == {"sparse": 0, "dense": 2}
    assert erk["layers"]["lk.LoRA1.conv.weight"] == 1.0 and erk["layers"]["head.weight"] < 1.0
    uni = SparseEngine(M(), None, sparsity=0.5, sparse_init="uniform", total_steps=10).density_report()
    assert uni["large_kernel"] == {"sparse": 2, "dense": 0}
    assert uni["layers"]["lk.LoRA2.conv.weight"] == pytest.approx(0.5, abs=0.02)


def test_sync_ema_handles_channels_last_and_keeps_inactive_zero():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    m = Net().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20)
    e.apply_masks()
    ema = ModelEmaV3(m, decay=0.99)
    for step in range(5):
        train_step(m, opt, step)
        ema.update(m)
        e.sync_ema(ema)
    got = dict(ema.module.named_parameters())
    for l in e.layers:
        assert torch.count_nonzero(got[l.name][~l.mask]) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_zeroing_on_cuda_clears_nan_inf_and_negative_zero():
    from slaknet.sparse.engine import _any_nonfinite_where, _edit_bits_, _zero_inactive_

    t = torch.randn(1 << 18, device="cuda")
    mask = torch.rand(1 << 18, device="cuda") < 0.5
    mask[:4] = False
    t[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -1.0], device="cuda")
    kept = t[mask].clone()
    _zero_inactive_(t, mask)
    assert torch.count_nonzero(t[~mask]) == 0 and not torch.signbit(t[~mask]).any()
    assert torch.equal(t[mask].view(torch.int32), kept.view(torch.int32))
    v = torch.full((8,), float("nan"), device="cuda")
    keep = torch.zeros(8, dtype=torch.bool, device="cuda")
    _edit_bits_(v, keep, to_inf=keep.clone().fill_(True))
    assert torch.isinf(v).all()
    assert not _any_nonfinite_where(torch.zeros(8, device="cuda"), keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_any_nonfinite_where_is_exact_on_chunked_and_small_tensors(dtype):
    from slaknet.sparse.engine import _CHUNK, _any_nonfinite_where

    for n in (3 * _CHUNK + 5, 40):
        t = torch.randn(n).to(dtype) * 1e3
        where = torch.zeros(n, dtype=torch.bool)
        where[1::2] = True
        t[0::2] = float("nan")  # non-finite only where not asked
        t[2] = float("inf")
        assert not _any_nonfinite_where(t, where)
        for value in (float("inf"), -float("inf"), float("nan")):
            u = t.clone()
            u[n - 1 if (n - 1) % 2 else n - 2] = value  # the last chunk, at a position asked about
            assert _any_nonfinite_where(u, where), (n, dtype, value)
