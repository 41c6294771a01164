"""Tests of slaknet.sparse: each guards against one defect of the research code or one promised feature.

Expected values come from independent computations (hand arithmetic, sorting, plain loops), never from
the engine under test.
"""
from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import CheckpointError, ConfigError
from slaknet.sparse import (SparseConfig, SparseEngine,
                            erk_densities, select_parameters, sparse_counts)


class Net(nn.Module):
    """Tiny conv + BN + linear net (channels 3 -> 6 -> 8, 8x8 input, 5 classes)."""

    def __init__(self, p_drop: float = 0.0) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.drop = nn.Dropout(p_drop)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


def batch(step: int, n: int = 4):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def train_step(model, opt, step, scaler=None, clip=None, autocast=False):
    x, y = batch(step)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss


def assert_masked(engine):
    for layer in engine.layers:
        assert layer.mask.dtype == torch.bool
        inactive = layer.param.detach()[~layer.mask]
        assert torch.count_nonzero(inactive) == 0, f"{layer.name}: {torch.count_nonzero(inactive)} pruned non-zeros"


# ------------------------------------------------------------------------------------------ init ---------

def test_uniform_exact_counts_and_bool_masks():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparsity=0.7, sparse_init="uniform", total_steps=10)
    assert not e.masks_applied
    m(batch(0)[0])  # masks reach the weights at the first forward
    assert e.masks_applied
    shapes = {"c1.weight": 6 * 3 * 9, "c2.weight": 8 * 6 * 9, "fc.weight": 5 * 128}
    assert [l.name for l in e.layers] == list(shapes)
    for layer in e.layers:
        assert layer.mask.dtype == torch.bool
        assert int(layer.mask.sum()) == round(0.3 * shapes[layer.name])
        # the weights really are zero where the mask is off, and (almost surely) non-zero where on
        assert torch.count_nonzero(layer.param[~layer.mask]) == 0
        assert torch.count_nonzero(layer.param[layer.mask]) == int(layer.mask.sum())


def test_erk_densities_hand_computed_with_dense_fallback():
    # Linear(2->4): raw=(4+2)/8=0.75; Linear(100->50): raw=(50+100)/5000=0.03. density 0.5, total 5008.
    # eps = 2504/(0.75*8 + 0.03*5000) = 16.05 -> 0.75*eps > 1 so the small layer is dense;
    # then eps = (2504-8)/150 = 16.64 and the big layer's density = 0.4992 (2496 kept).
    d = erk_densities({"a": (4, 2), "b": (50, 100)}, 0.5)
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx(2496 / 5000)

    m = nn.Sequential(nn.Linear(2, 4, bias=False), nn.Linear(4, 100, bias=False), nn.Linear(100, 50, bias=False))
    # raw: (4+2)/8=0.75, (100+4)/400=0.26, (50+100)/5000=0.03; total=8+400+5000=5408, target 2704
    # eps0 = 2704/(6+104+150)=10.4 -> layer0 dense (0.75*eps>1) ; eps1=(2704-8)/(104+150)=10.614 ->
    # layer1 0.26*10.614=2.76>1 dense ; eps2=(2704-408)/150=15.307 -> layer2 density 0.45920 (2296 kept)
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.5, sparse_init="ERK", fix=True)
    assert e.dense_layers == ["0.weight", "1.weight"]
    assert [l.name for l in e.layers] == ["2.weight"]
    assert int(e.layers[0].mask.sum()) == 2296
    stats = e.stats()
    dense = {r["name"]: r["dense"] for r in stats["layers"]}
    assert dense == {"0.weight": True, "1.weight": True, "2.weight": False}
    assert stats["active_params"] == 2704


def test_erk_power_scale_zero_is_uniform():
    d = erk_densities({"a": (4, 2), "b": (50, 100)}, 0.5, power_scale=0.0)
    assert d == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}


def test_erk_global_count_exact_and_logged_densities_saved():
    torch.manual_seed(0)
    m = Net()
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.6, total_steps=10)
    total = 162 + 432 + 640
    assert sum(int(l.mask.sum()) for l in e.layers) + sum(
        p.numel() for n, p in m.named_parameters() if n in e.dense_layers) == round(0.4 * total)
    sd = e.state_dict()
    assert set(sd["init_densities"]) == {"c1.weight", "c2.weight", "fc.weight"}


def test_snip_never_empties_a_layer_and_is_side_effect_free():
    torch.manual_seed(0)
    m = Net(p_drop=0.5)

    # c2's output is multiplied by 0 in this loss, so every c2 score is 0: topk would keep none of it
    def loss(model):
        x, y = batch(0, 8)
        h = F.relu(model.bn(model.c1(x)))
        z = model.c2(h) * 0.0 + h.sum(1, keepdim=True)  # 8 channels, none depending on c2's weight
        return F.cross_entropy(model.fc(model.drop(F.max_pool2d(z, 2).flatten(1))), y)

    rm_before = m.bn.running_mean.clone()
    rng_before = torch.get_rng_state()
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.95, sparse_init="snip",
                     snip_loss=loss, total_steps=10)
    counts = {l.name: int(l.mask.sum()) for l in e.layers}
    assert counts["c2.weight"] >= 1
    assert sum(counts.values()) + sum(p.numel() for n, p in m.named_parameters() if n in e.dense_layers) \
        == round(0.05 * (162 + 432 + 640))
    assert torch.equal(m.bn.running_mean, rm_before)  # BN stats restored
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched (exact resume)
    assert all(p.grad is None for p in m.parameters())  # .grad untouched


def test_snip_with_batch_uses_saliency():
    torch.manual_seed(0)
    m = Net()
    x, y = batch(0, 16)
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.5, sparse_init="snip",
                     snip_batch=(x, y), total_steps=10)
    # independent: global top-k of |w * g| per layer
    m2 = Net()
    torch.manual_seed(0)
    m2 = Net()
    F.cross_entropy(m2(x), y).backward()
    names = ["c1.weight", "c2.weight", "fc.weight"]
    params = dict(m2.named_parameters())
    scores = torch.cat([(params[n] * params[n].grad).abs().flatten() for n in names])
    k = round(0.5 * scores.numel())
    thr = scores.sort(descending=True).values[k - 1]
    expect = {n: int(((params[n] * params[n].grad).abs() >= thr).sum()) for n in names}
    got = {l.name: int(l.mask.sum()) for l in e.layers}
    got.update({n: params[n].numel() for n in e.dense_layers})
    for n in names:
        assert abs(got[n] - expect[n]) <= 1


def test_snip_without_data_waits_for_state():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparse_init="snip", total_steps=5)
    with pytest.raises(ConfigError, match="snip_batch"):
        m(batch(0)[0])  # no masks yet: refuse to train dense silently
    with pytest.raises(ConfigError, match="snip_batch"):
        e.after_step()
    # resume path: masks come from a saved state, no SNIP batch needed
    src = SparseEngine(Net(), None, sparse_init="uniform", sparsity=0.5, fix=True)
    e.load_state_dict(src.state_dict())
    train_step(m, opt, 0)
    assert_masked(e)
    e2 = SparseEngine(m, opt, sparse_init="snip", total_steps=5, state=src.state_dict())
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(e2.layers, src.layers))


# ----------------------------------------------------------------------------------- masking -------------

@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_zero_after_every_step_with_weight_decay_momentum_and_clipping(opt_name):
    torch.manual_seed(0)
    m = Net()
    if opt_name == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=12)
    for step in range(8):
        train_step(m, opt, step, clip=0.5)
        assert_masked(e)
    assert e.update_count == 2


def test_amp_bf16_autocast_gradscaler_stays_sparse_and_skipped_steps_not_counted():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20)
    train_step(m, opt, 0, scaler=scaler, autocast=True)
    assert_masked(e)
    assert e.step_count == 1
    # a step with inf gradients: the scaler skips it -> not counted, no update triggered
    x, y = batch(1)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(m(x), y) * float("inf")
    scaler.scale(loss).backward()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    scaler.step(opt)
    scaler.update()
    assert e.step_count == 1 and e.update_count == 0
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())
    train_step(m, opt, 2, scaler=scaler, autocast=True)
    assert e.step_count == 2 and e.update_count == 1
    for step in range(3, 7):
        train_step(m, opt, step, scaler=scaler, autocast=True)
        assert_masked(e)


def test_gradient_accumulation_counts_optimizer_steps():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30)
    accum = 4
    micro = 0
    for step in range(7):
        opt.zero_grad()
        for _ in range(accum):
            x, y = batch(micro)
            micro += 1
            (F.cross_entropy(m(x), y) / accum).backward()
        e.step()  # the convenience form: same as opt.step() with the hook attached
        assert_masked(e)
    assert micro == 28 and e.step_count == 7 and e.update_count == 2
    assert [h["step"] for h in e.history] == [3, 6]


def test_engine_step_without_attached_hook_and_with_scaler():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=10, attach=False)
    scaler = torch.amp.GradScaler("cpu")
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(m(x), y)).backward()
        e.step(scaler)
        scaler.update()
        assert_masked(e)
    assert e.step_count == 4 and e.update_count == 2 and e.skipped_steps == 0
    opt.zero_grad()
    x, y = batch(8)
    scaler.scale(F.cross_entropy(m(x), y) * float("inf")).backward()
    e.step(scaler)  # skipped by the scaler: seen, not counted
    scaler.update()
    assert e.step_count == 4 and e.skipped_steps == 1
    opt.zero_grad()
    F.cross_entropy(m(batch(9)[0]), batch(9)[1]).backward()
    opt.step()  # not attached: the engine does not see this step
    assert e.step_count == 4


# ------------------------------------------------------------------------------------ updates ------------

def cosine(step, total, r0=0.3, r1=0.005):
    return r1 + 0.5 * (r0 - r1) * (1 + math.cos(math.pi * step / total))


def test_update_exact_counts_magnitude_prune_and_cosine_rate():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=10, prune_rate=0.3)
    init_counts = {l.name: int(l.mask.sum()) for l in e.layers}
    for step in range(1, 9):
        old = {l.name: (l.mask.clone(), l.param.detach().clone()) for l in e.layers}
        # capture weights right after the optimizer step but before the update: run the step unattached
        e.detach()
        train_step(m, opt, step)
        old_w = {l.name: l.param.detach().clone() for l in e.layers}
        e.attach(opt)
        e.after_step()
        for l in e.layers:
            assert int(l.mask.sum()) == init_counts[l.name]  # exact count after every update
        if step % 2 == 0:
            rec = e.last_update
            assert rec["step"] == step
            assert rec["prune_rate"] == pytest.approx(cosine(step, 10))
            for r, l in zip(rec["layers"], e.layers):
                mask0 = old[l.name][0]
                k = math.ceil(cosine(step, 10) * init_counts[l.name])
                assert r["pruned"] == k and r["regrown"] == k
                # pruned = the k smallest |w| among the previously active (independent sort)
                w = old_w[l.name][mask0]
                kth = w.abs().sort().values[k - 1]
                removed = mask0 & ~l.mask
                assert bool((old_w[l.name][removed].abs() <= kth).all())
                # new and removed positions have weight exactly 0
                assert torch.count_nonzero(l.param[l.mask & ~mask0]) == 0
    assert e.update_count == 4


def test_gradient_growth_picks_largest_dense_gradients():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    e = SparseEngine(m, opt, sparsity=0.6, growth="gradient", update_frequency=1000,
                     prune_rate=0.2, prune_rate_decay="constant")
    train_step(m, opt, 0)
    masks0 = {l.name: l.mask.clone() for l in e.layers}
    w0 = {l.name: l.param.detach().clone() for l in e.layers}
    g0 = {l.name: l.param.grad.detach().clone() for l in e.layers}
    e.update_topology()
    for l in e.layers:
        m0 = masks0[l.name]
        k = math.ceil(0.2 * int(m0.sum()))
        # independent prune set: k smallest |w| among active
        act_idx = m0.flatten().nonzero().squeeze(1)
        order = w0[l.name].flatten()[act_idx].abs().argsort()
        pruned = torch.zeros_like(m0.flatten())
        pruned[act_idx[order[:k]]] = True
        kept = m0.flatten() & ~pruned
        cand = (~kept).nonzero().squeeze(1)
        order = g0[l.name].flatten()[cand].abs().argsort(descending=True)
        expect = kept.clone()
        expect[cand[order[:k]]] = True
        assert torch.equal(l.mask.flatten(), expect), l.name


def test_grown_weights_optimizer_state_zeroed_and_keep_policy_differs():
    def run(policy):
        torch.manual_seed(0)
        m = Net()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30, optimizer_state=policy)
        for step in range(2):
            train_step(m, opt, step)
        masks = {l.name: l.mask.clone() for l in e.layers}
        train_step(m, opt, 2)  # the update step
        assert e.update_count == 1
        out = []
        for l in e.layers:
            grown = l.mask & ~masks[l.name]
            pruned = masks[l.name] & ~l.mask
            st = opt.state[l.param]
            assert grown.any()
            out.append((st["exp_avg"][grown], st["exp_avg_sq"][grown], st["exp_avg"][pruned], l.param[grown]))
        return out

    for ea, eas, ep, w in run("zero"):
        assert torch.count_nonzero(ea) == 0 and torch.count_nonzero(eas) == 0 and torch.count_nonzero(ep) == 0
        assert torch.count_nonzero(w) == 0  # grown weights start at exactly zero
    kept = run("keep")
    assert any(torch.count_nonzero(eas) > 0 for _, eas, _, _ in kept)  # the test can tell the policies apart


def test_sgd_momentum_buffer_zeroed_for_grown():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=30)
    train_step(m, opt, 0)
    masks = {l.name: l.mask.clone() for l in e.layers}
    train_step(m, opt, 1)
    for l in e.layers:
        grown = l.mask & ~masks[l.name]
        assert torch.count_nonzero(opt.state[l.param]["momentum_buffer"][grown]) == 0


def test_momentum_growth_reads_state_before_zeroing_and_refuses_without_momentum():
    m = Net()
    with pytest.raises(ConfigError):
        SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), growth="momentum", total_steps=10)
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.6, growth="momentum", update_frequency=1000,
                     prune_rate=0.2, prune_rate_decay="constant")
    for s in range(2):
        train_step(m, opt, s)
    masks0 = {l.name: l.mask.clone() for l in e.layers}
    mom = {l.name: opt.state[l.param]["momentum_buffer"].clone() for l in e.layers}
    e.update_topology()
    for l in e.layers:
        grown = l.mask & ~masks0[l.name]
        k = int(grown.sum())
        assert k > 0
        # grown positions are among the inactive ones with the largest |momentum|
        inactive_scores = mom[l.name][~masks0[l.name]].abs()
        thr = inactive_scores.sort(descending=True).values[min(k, inactive_scores.numel()) - 1]
        assert bool((mom[l.name][grown].abs() >= thr).all())
        assert torch.count_nonzero(opt.state[l.param]["momentum_buffer"][grown]) == 0


def test_fixed_masks_never_change():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=1, fix=True)
    masks = {l.name: l.mask.clone() for l in e.layers}
    for s in range(4):
        train_step(m, opt, s)
        assert_masked(e)
    assert e.update_count == 0
    assert all(torch.equal(masks[l.name], l.mask) for l in e.layers)


@pytest.mark.parametrize("mode", ["magnitude", "momentum"])
def test_redistribution_keeps_global_count_and_capacity(mode):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.5, redistribution=mode, update_frequency=1, total_steps=20,
                     prune_rate=0.5, prune_rate_decay="constant")
    total = sum(int(l.mask.sum()) for l in e.layers)
    for s in range(4):
        train_step(m, opt, s)
        assert sum(int(l.mask.sum()) for l in e.layers) == total
        assert all(1 <= int(l.mask.sum()) <= l.numel for l in e.layers)
        assert_masked(e)
        rec = e.last_update
        assert rec["pruned"] == rec["regrown"]


def test_invalid_options_raise_config_error():
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for kw in [dict(sparsity=1.0), dict(growth="magic"), dict(sparse_init="erk"), dict(update_frequency=0),
               dict(redistribution="x"), dict(prune_rate=-0.1), dict(nonsense=1), dict(masking="lazy")]:
        with pytest.raises(ConfigError):
            SparseEngine(m, opt, total_steps=10, **kw)
    with pytest.raises(ConfigError, match="total_steps"):
        SparseEngine(m, opt)  # cosine schedule without a horizon
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        SparseEngine(m, other, total_steps=10)


# ------------------------------------------------------------------------------------ resume -------------

def _run(steps, resume_at=None, tmp_path=None, fused=False):
    torch.manual_seed(0)
    m = Net(p_drop=0.2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=steps, growth="random", seed=7)
    torch.manual_seed(123)
    for step in range(steps):
        if resume_at is not None and step == resume_at:
            buf = io.BytesIO()
            torch.save({"model": m.state_dict(), "opt": opt.state_dict(), "sparse": e.state_dict(),
                        "rng": torch.get_rng_state()}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=True)
            # a fresh process: different init, fresh engine (with different initial masks)
            torch.manual_seed(999)
            m = Net(p_drop=0.2)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
            e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=steps, growth="random", seed=7)
            m.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            e.load_state_dict(ck["sparse"])
            torch.set_rng_state(ck["rng"])
        m.train()
        train_step(m, opt, step)
    return m, e


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw_fused_parked"])
def test_resume_equals_uninterrupted_bitwise(fused):
    m1, e1 = _run(12, fused=fused)
    m2, e2 = _run(12, resume_at=5, fused=fused)  # between updates 3 and 6, just after regrown (zero) weights appeared
    assert e2.stats()["parked_layers"] == (len(e2.layers) if fused else 0)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n
    for l1, l2 in zip(e1.layers, e2.layers):
        assert torch.equal(l1.mask, l2.mask) and torch.equal(l1.ever_active, l2.ever_active)
    assert e1.step_count == e2.step_count == 12 and e1.update_count == e2.update_count == 3
    assert e1.history == e2.history


def test_resume_keeps_just_regrown_zero_weights():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=1, total_steps=10)
    train_step(m, opt, 0)  # update: regrown weights are active but exactly zero
    sd = e.state_dict()
    grown_zero = sum(int((l.mask & (l.param == 0)).sum()) for l in e.layers)
    assert grown_zero > 0
    # resume in the common order: load trained weights, build the engine, load its state
    m2 = Net()
    m2.load_state_dict(m.state_dict())
    e2 = SparseEngine(m2, torch.optim.SGD(m2.parameters(), lr=0.1), sparsity=0.5, update_frequency=1,
                      total_steps=10, seed=1)
    assert any(not torch.equal(a.mask, b.mask) for a, b in zip(e.layers, e2.layers))  # fresh masks differ
    e2.load_state_dict(sd)
    for a, b in zip(e.layers, e2.layers):
        assert torch.equal(a.mask, b.mask)  # masks are not inferred from zeros
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))  # no re-init over weights


def test_state_dict_weights_only_and_bool(tmp_path):
    torch.manual_seed(0)
    m = Net()
    e = SparseEngine(m, torch.optim.SGD(m.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    path = tmp_path / "s.pt"
    torch.save(e.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.bool for t in sd["masks"].values())
    bad = dict(sd, masks={"c1.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(CheckpointError):
        e.load_state_dict(bad)
    with pytest.raises(CheckpointError):
        e.load_state_dict({"nothing": 1})


# ---------------------------------------------------------------------------- selection / misc -----------

def test_large_kernel_only_and_filters():
    from slaknet.layers import LargeKernelConv

    class LKNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.lk = LargeKernelConv(4, 13, 3)
            self.lk2 = LargeKernelConv(4, 9, 3, decompose=False)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.lk2(self.lk(self.stem(x))).mean((2, 3)))

    m = LKNet()
    names = [n for n, _, _ in select_parameters(m, "large_kernel")]
    assert names == ["lk.LoRA1.conv.weight", "lk.LoRA2.conv.weight", "lk2.lkb_origin.conv.weight"]
    allnames = [n for n, _, _ in select_parameters(m, "all", exclude=["fc.*", "*small_conv*"])]
    assert allnames == ["stem.weight", "lk.LoRA1.conv.weight", "lk.LoRA2.conv.weight",
                        "lk2.lkb_origin.conv.weight"]
    only = [n for n, _, _ in select_parameters(m, "none", include=lambda n, mod, p: n.startswith("fc"))]
    assert only == ["fc.weight"]


def test_ema_copy_masking_and_counting():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20)
    ema = ModelEmaV3(m, decay=0.5)
    for s in range(5):
        train_step(m, opt, s)
        ema.update(m, step=s)
    # the EMA copy averages over topologies: pruned positions are not zero until masked
    nz_before = sparse_counts(ema.module)["params_nonzero"]
    e.apply_masks(ema.module)
    counts = sparse_counts(ema.module)
    assert counts["params_nonzero"] < nz_before
    ema_params = dict(ema.module.named_parameters())
    for l in e.layers:
        assert torch.count_nonzero(ema_params[l.name][~l.mask]) == 0
    # mask-based accounting of the EMA copy equals the engine's own figures
    dense_total = sum(p.numel() for p in m.parameters())
    by_mask = sparse_counts(ema.module, masks=e.masks())["params_nonzero"]
    other = sum(int(torch.count_nonzero(p)) for n, p in ema_params.items() if n not in e.masks())
    assert by_mask == other + e.stats()["active_params"] - sum(
        m.get_parameter(n).numel() for n in e.dense_layers) and by_mask < dense_total


def test_sparse_counts_macs_hand_computed():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(3 * 4 * 4, 2, bias=False))
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].weight[0] = 0.0  # 18 of 54 zero
        m[2].weight.fill_(1.0)
    c = sparse_counts(m, (2, 4, 4))
    assert c["params_dense"] == 54 + 96 and c["params_nonzero"] == 36 + 96
    assert c["macs_dense"] == 16 * 54 + 96 and c["macs_nonzero"] == 16 * 36 + 96
    mask = {"2.weight": torch.zeros(2, 48, dtype=torch.bool)}
    mask["2.weight"][0, :10] = True
    c = sparse_counts(m, (2, 4, 4), mask)
    assert c["params_nonzero"] == 36 + 10 and c["macs_nonzero"] == 16 * 36 + 10


def test_stats_json_and_summary():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=1, total_steps=10)
    train_step(m, opt, 0)
    s = json.loads(json.dumps(e.stats()))
    assert s["updates"] == 1 and s["density"] == pytest.approx(0.5, abs=1e-3)
    # ITOP: ever-active fraction > density after an update that regrew some pruned-never-active positions
    ever = sum(int(l.ever_active.sum()) for l in e.layers) / sum(l.numel for l in e.layers)
    assert s["itop_rate"] == pytest.approx(ever) and ever > s["density"]
    assert "ITOP" in e.summary()


def test_cli_flags_map_to_config():
    from slaknet.classify.task import ClassificationTask
    from slaknet.train.config import config_from_argv

    run = config_from_argv(["--data", "/data/x", "--recipe", "imagenet", "--sparse", "--sparsity", "0.3",
                            "--sparse-init", "snip", "--prune-rate", "0.5", "--growth", "gradient", "-u", "50",
                            "--redistribution", "magnitude", "--fix", "--sparse-masking", "pass", "--seed", "7"])
    assert isinstance(run.sparse, SparseConfig) and run.sparse.enabled
    cfg = ClassificationTask(run).sparse_config(None, total_steps=1000)
    assert isinstance(cfg, SparseConfig) and cfg.masking == "pass"
    assert (cfg.sparsity, cfg.sparse_init, cfg.prune_rate, cfg.growth, cfg.update_frequency,
            cfg.redistribution, cfg.fix, cfg.total_steps, cfg.seed) == (0.3, "snip", 0.5, "gradient", 50,
                                                                        "magnitude", True, 1000, 7)
    dense = config_from_argv(["--data", "/data/x", "--recipe", "imagenet"])
    assert ClassificationTask(dense).sparse_config(None, total_steps=10) is None


def test_fused_adamw_with_scaler_skip_not_counted():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=10)
    train_step(m, opt, 0, scaler=scaler)
    x, y = batch(1)
    opt.zero_grad()
    scaler.scale(F.cross_entropy(m(x), y) * float("inf")).backward()
    scaler.step(opt)  # fused optimizers are called and skip internally: the hook must see found_inf
    scaler.update()
    assert e.step_count == 1 and e.skipped_steps == 1 and e.update_count == 0
    train_step(m, opt, 2, scaler=scaler)
    assert e.step_count == 2 and e.update_count == 1
    assert_masked(e)


def test_mask_randomness_independent_of_global_rng():
    def run(noise):
        torch.manual_seed(0)
        m = Net()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        e = SparseEngine(m, opt, sparsity=0.5, update_frequency=1, total_steps=10, seed=3)
        for s in range(3):
            torch.rand(noise)  # ranks / processes consume the global RNG differently
            train_step(m, opt, s)
        return [l.mask.clone() for l in e.layers]

    assert all(torch.equal(a, b) for a, b in zip(run(1), run(17)))


def test_mask_gradients_stashes_dense_grads_for_gradient_growth_and_spares_momentum():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    e = SparseEngine(m, opt, sparsity=0.6, growth="gradient", update_frequency=2, total_steps=10)
    for step in range(2):
        x, y = batch(step)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        dense = {l.name: l.param.grad.clone() for l in e.layers}
        masks0 = {l.name: l.mask.clone() for l in e.layers}
        e.mask_gradients()  # e.g. before clipping
        for l in e.layers:
            assert torch.count_nonzero(l.param.grad[~l.mask]) == 0
        opt.step()
    assert e.update_count == 1
    # growth used the dense gradient, not the masked one (which is 0 on every candidate position)
    for l in e.layers:
        grown = l.mask & ~masks0[l.name]
        assert grown.any() and torch.count_nonzero(dense[l.name][grown]) == int(grown.sum())

    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    e = SparseEngine(m, opt, sparsity=0.6, growth="momentum", update_frequency=2, total_steps=10)
    x, y = batch(0)
    F.cross_entropy(m(x), y).backward()
    g = {l.name: l.param.grad.clone() for l in e.layers}
    e.mask_gradients()  # no-op with momentum growth
    assert all(torch.equal(g[l.name], l.param.grad) for l in e.layers)


@pytest.mark.parametrize("largest", [False, True])
def test_select_k_mask_matches_sort_on_large_tensors(largest):
    """The chunked, bracketed selection picks exactly the set a full argsort picks."""
    from slaknet.sparse import kselect
    from slaknet.sparse.kselect import MagnitudeScores, RandomScores, select_k_mask

    g = torch.Generator().manual_seed(0)
    n = 3 * kselect.CHUNK + 12_345  # several chunks and a ragged, non-multiple-of-8 tail
    values = torch.randn(n, generator=g)
    allowed = torch.rand(n, generator=g) < 0.6
    n_ok = int(allowed.sum())
    for k in (1, 1234, 600_000, n_ok - 3):
        sel = select_k_mask(MagnitudeScores(values), k, largest)
        ref = values.abs().argsort(descending=largest)[:k]
        assert int(sel.sum()) == k and bool(sel[ref].all())
        sel = select_k_mask(MagnitudeScores(values), k, largest, allowed=allowed, n_allowed=n_ok)
        masked = values.abs().masked_fill(~allowed, float("-inf") if largest else float("inf"))
        ref = masked.argsort(descending=largest)[:k]
        assert int(sel.sum()) == k and not bool((sel & ~allowed).any()) and bool(sel[ref].all())
    # random scores: exactly k among the allowed, the same set as a topk over the same numbers
    rs = RandomScores(n, seed=7, device=torch.device("cpu"))
    numbers = torch.cat([c.clone() for _, c in rs.chunks(kselect.CHUNK)])
    for k in (5, 400_000, n_ok // 2):
        sel = select_k_mask(rs, k, largest, allowed=allowed, n_allowed=n_ok)
        ref = numbers.masked_fill(~allowed, float("-inf") if largest else float("inf"))
        ref = ref.argsort(descending=largest)[:k]
        assert int(sel.sum()) == k and bool(sel[ref].all())
    # heavy ties (e.g. many just-regrown zero weights): exact count, and a valid k-smallest/largest set
    tied = torch.zeros(n)
    tied[: n // 2] = torch.rand(n // 2, generator=g) + 1.0
    sel = select_k_mask(MagnitudeScores(tied if not largest else -tied), 100_000, largest)
    assert int(sel.sum()) == 100_000
    assert bool((tied[sel] == 0).all()) if not largest else bool((tied[sel] > 0).all())


def test_sparse_nonzero_matches_nonzero():
    from slaknet.sparse.kselect import sparse_nonzero

    g = torch.Generator().manual_seed(1)
    for n, p in ((8 * 1000, 0.01), (8 * 1000, 0.9), (8 * 1000 + 5, 0.1), (0, 0.5)):
        b = torch.rand(n, generator=g) < p
        assert torch.equal(sparse_nonzero(b), b.nonzero().squeeze(1))


def test_channels_last_weights_and_state():
    torch.manual_seed(0)
    m = Net().to(memory_format=torch.channels_last)
    assert not m.c2.weight.is_contiguous()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20, sparse_init="uniform")
    counts = {l.name: l.count for l in e.layers}
    for s in range(6):
        masks = {l.name: l.mask.clone() for l in e.layers}
        x, y = batch(s)
        opt.zero_grad()
        F.cross_entropy(m(x.to(memory_format=torch.channels_last)), y).backward()
        opt.step()
        assert_masked(e)
        for l in e.layers:
            assert int(l.mask.sum()) == counts[l.name]
            if s % 2 == 1:
                grown = l.mask & ~masks[l.name]
                assert torch.count_nonzero(opt.state[l.param]["exp_avg"][grown]) == 0


def test_update_end_and_dense_threshold():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=1, total_steps=10, update_end=3,
                     sparse_init="ERK", dense_threshold=0.6)
    # ERK densities here: independent check that every layer at >= 0.6 is dense and the others not
    dens = erk_densities({n: tuple(p.shape) for n, p in m.named_parameters() if n.endswith("weight")
                          and p.dim() > 1}, 0.5)
    assert set(e.dense_layers) == {n for n in e.init_densities if e.init_densities[n] >= 0.6}
    assert e.dense_layers and all(abs(e.init_densities[n] - dens[n]) < 0.01 for n in dens)
    for s in range(6):
        train_step(m, opt, s)
    assert [h["step"] for h in e.history] == [1, 2]


def test_config_from_python_keywords_uses_field_defaults():
    import slaknet
    from slaknet.classify.task import ClassificationTask

    run = slaknet.config("classification", recipe="imagenet", data="/data/x", sparse=True, sparsity=0.5, seed=3)
    cfg = ClassificationTask(run).sparse_config(None, total_steps=100)
    assert (cfg.sparsity, cfg.update_frequency, cfg.growth, cfg.seed) == (0.5, 100, "random", 3)
    assert run.sparse.update_frequency == SparseConfig().update_frequency  # one default, on the field
    with pytest.raises(ConfigError, match="--growth"):
        slaknet.config("classification", sparse=True, growth="nope")


# ------------------------------------------------------------ parking (fused Adam: no per-step pass) -----

def test_edit_bits_is_exact_over_inf_and_nan():
    from slaknet.sparse.engine import _edit_bits_

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        v = torch.tensor([1.5, float("inf"), float("nan"), -0.0, 2.0, -3.0], dtype=dtype)
        keep = torch.tensor([True, False, False, True, False, True])
        to_inf = torch.tensor([False, False, True, False, False, False])
        _edit_bits_(v, keep, to_inf)
        expect = torch.tensor([1.5, 0.0, float("inf"), -0.0, 0.0, -3.0], dtype=dtype)
        assert torch.equal(v, expect) and torch.equal(torch.signbit(v), torch.signbit(expect)), dtype


@pytest.mark.parametrize("cls,amsgrad", [(torch.optim.AdamW, False), (torch.optim.AdamW, True),
                                         (torch.optim.Adam, False)])
def test_fused_adam_holds_inactive_weights_at_zero_without_any_pass(cls, amsgrad):
    torch.manual_seed(0)
    m = Net()
    opt = cls(m.parameters(), lr=1e-2, weight_decay=0.5, amsgrad=amsgrad, fused=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30)
    train_step(m, opt, 0)  # the optimizer state appears: the hook masks once and parks
    assert e.stats()["parked_layers"] == len(e.layers) > 0
    assert_masked(e)
    e._remove_hook()  # from here on nothing of the engine runs: the optimizer alone must keep the zeros
    for step in range(1, 4):
        train_step(m, opt, step, clip=0.5)
        assert_masked(e)
    e.attach(opt)
    for step in range(4, 12):  # updates at engine steps 3, 6, 9: newly pruned weights are held too
        masks = {l.name: l.mask.clone() for l in e.layers}
        train_step(m, opt, step, clip=0.5)
        assert_masked(e)
        for l in e.layers:
            for key in ("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",):
                v = opt.state[l.param][key]
                assert torch.isinf(v[~l.mask]).all() and torch.isfinite(v[l.mask]).all()
            grown = l.mask & ~masks[l.name]
            if grown.any():  # regrown: weight and moments restart from exactly zero ('zero' policy)
                assert torch.count_nonzero(l.param[grown]) == 0
                assert torch.count_nonzero(opt.state[l.param]["exp_avg"][grown]) == 0
    assert e.update_count == 3 and e.stats()["parked_layers"] == len(e.layers)


@pytest.mark.parametrize("growth", ["random", "momentum", "gradient"])
def test_parked_training_equals_re_masking_bitwise(growth):
    def run(masking):
        torch.manual_seed(0)
        m = Net()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        # a high prune rate: positions pruned and regrown in the same update occur (they must not stay parked)
        e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=20, growth=growth,
                         masking=masking, prune_rate=0.6, prune_rate_decay="constant")
        for step in range(9):
            train_step(m, opt, step, clip=1.0)
        return m, opt, e

    m1, o1, e1 = run("auto")
    m2, o2, e2 = run("pass")
    assert e1.stats()["parked_layers"] == len(e1.layers) and e2.stats()["parked_layers"] == 0
    assert e1.update_count == e2.update_count == 4
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2), n
    for l1, l2 in zip(e1.layers, e2.layers):
        assert torch.equal(l1.mask, l2.mask)
        s1, s2 = o1.state[l1.param], o2.state[l2.param]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])  # the first moment follows the dense gradient in both
        assert torch.equal(s1["exp_avg_sq"][l1.mask], s2["exp_avg_sq"][l2.mask])


def test_parking_only_where_exact_and_fast():
    def parked(make_opt, **kw):
        torch.manual_seed(0)
        m = Net()
        opt = make_opt(m.parameters())
        e = SparseEngine(m, opt, sparsity=0.5, update_frequency=2, total_steps=10, **kw)
        for step in range(3):
            train_step(m, opt, step)
            assert_masked(e)
        return e.stats()["parked_layers"]

    fused = lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True)  # noqa: E731
    assert parked(fused) == 3
    assert parked(fused, masking="pass") == 0
    assert parked(fused, optimizer_state="keep") == 0  # a regrown weight would keep its +inf forever
    assert parked(lambda ps: torch.optim.AdamW(ps, lr=1e-2)) == 0  # for-loop sqrt is slow on inf
    assert parked(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True)) == 0
    assert parked(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) == 0


@pytest.mark.parametrize("target", ["exp_avg_sq", "weight"])
def test_parked_state_or_weight_rewritten_in_place_is_caught_at_the_next_step(caplog, target):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30)
    train_step(m, opt, 0)
    assert e.stats()["parked_layers"] == 3
    layer = e.layers[0]
    with caplog.at_level("WARNING", logger="slaknet.sparse"):
        if target == "exp_avg_sq":
            opt.state[layer.param]["exp_avg_sq"].fill_(1.0)  # user code overwrites the state in place
        else:
            with torch.no_grad():
                layer.param.copy_(torch.randn_like(layer.param))  # e.g. load_state_dict of dense weights
        train_step(m, opt, 1)  # engine step 2: no update, yet the very next step re-masks the layer
    assert_masked(e)
    assert "written in place" in caplog.text
    assert e.update_count == 0 and e.stats()["parked_layers"] == 3  # parked again, with fresh +inf
    for step in range(2, 8):
        train_step(m, opt, step)
        assert_masked(e)


def test_parked_state_rewritten_behind_version_counters_is_caught_at_the_update(caplog):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, total_steps=30)
    train_step(m, opt, 0)
    layer = e.layers[0]
    opt.state[layer.param]["exp_avg_sq"].data.fill_(1.0)  # .data: no version-counter bump
    train_step(m, opt, 1)
    assert torch.count_nonzero(layer.param[~layer.mask]) > 0  # undetectable without a pass...
    with caplog.at_level("WARNING", logger="slaknet.sparse"):
        train_step(m, opt, 2)  # ...until the update, which checks parked layers
    assert "modified in place" in caplog.text
    assert e.update_count == 1 and e.stats()["parked_layers"] == 0
    for step in range(3, 8):
        train_step(m, opt, step)
        assert_masked(e)
    assert e.stats()["parked_layers"] == 0  # stays off for the rest of the run


def test_parked_fixed_masks_are_still_checked_every_u_steps(caplog):
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=3, fix=True)
    train_step(m, opt, 0)
    assert e.stats()["parked_layers"] == 3
    opt.state[e.layers[1].param]["exp_avg_sq"].data.zero_()
    with caplog.at_level("WARNING", logger="slaknet.sparse"):
        train_step(m, opt, 1)
        train_step(m, opt, 2)  # engine step 3: no update (fixed masks), but the check runs
    assert "modified in place" in caplog.text and e.update_count == 0
    assert_masked(e)
    assert e.stats()["parked_layers"] == 0


def test_parking_follows_replaced_optimizer_state_and_new_masks():
    torch.manual_seed(0)
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    e = SparseEngine(m, opt, sparsity=0.5, update_frequency=50, total_steps=100)
    for step in range(2):
        train_step(m, opt, step)
    # the optimizer's state is replaced by a dense run's (no +inf anywhere): the next step must re-mask
    dense = Net()
    dense.load_state_dict(m.state_dict())
    dopt = torch.optim.AdamW(dense.parameters(), lr=1e-2, fused=True)
    train_step(dense, dopt, 0)
    opt.load_state_dict(dopt.state_dict())
    train_step(m, opt, 2)
    assert_masked(e)
    assert e.stats()["parked_layers"] == 3
    # masks of another run loaded under the parked state: weights active now but parked before must not
    # stay frozen at +inf second moments
    other = SparseEngine(Net(), None, sparsity=0.5, total_steps=100, seed=5)
    e.load_state_dict(other.state_dict())
    train_step(m, opt, 3)
    assert_masked(e)
    for l in e.layers:
        v = opt.state[l.param]["exp_avg_sq"]
        assert torch.isfinite(v[l.mask]).all() and torch.isinf(v[~l.mask]).all()


def test_zero_inactive_pass_is_exact_on_chunked_and_fallback_paths():
    from slaknet.sparse.engine import _CHUNK, _zero_inactive_

    g = torch.Generator().manual_seed(0)
    n = 2 * _CHUNK + 12345  # several chunks and a ragged tail
    for dtype, shape, bit_path in ((torch.float32, (n,), True), (torch.float32, (7, 3), False),
                                   (torch.float64, (n,), True)):
        t = torch.randn(shape, generator=g).to(dtype)
        t.view(-1)[:4] = torch.tensor([float("inf"), float("nan"), -0.0, -1.0], dtype=dtype)
        mask = torch.rand(shape, generator=g) < 0.6
        mask.view(-1)[:4] = torch.tensor([True, True, True, False])
        kept = t[mask].clone()
        _zero_inactive_(t, mask)
        assert torch.count_nonzero(t[~mask]) == 0
        assert torch.equal(torch.isnan(t[mask]), torch.isnan(kept))
        assert torch.equal(t[mask].nan_to_num(0.0), kept.nan_to_num(0.0))
        if bit_path:  # kept entries keep every bit (also -0.0 and the NaN payload), the others are +0.0
            itype = torch.int32 if dtype == torch.float32 else torch.int64
            assert torch.equal(t.view(itype)[mask], kept.view(itype))
            assert torch.count_nonzero(t.view(itype)[~mask]) == 0


def test_any_nonzero_where_is_exact():
    from slaknet.sparse.engine import _CHUNK, _any_nonzero_where

    for n, dtype in ((3 * _CHUNK + 7, torch.float32), (3 * _CHUNK + 7, torch.bfloat16), (50, torch.float32)):
        t = torch.zeros(n, dtype=dtype)
        where = torch.zeros(n, dtype=torch.bool)
        where[1::2] = True
        t[0::2] = 5.0  # non-zeros only where not asked
        t[1] = -0.0
        assert not _any_nonzero_where(t, where)
        for value in (1e-40 if dtype == torch.float32 else 1e-30, float("nan"), -float("inf")):
            u = t.clone()
            u[n - 2 if (n - 2) % 2 else n - 1] = value  # the very last chunk, at a position asked about
            assert _any_nonzero_where(u, where), (n, dtype, value)
