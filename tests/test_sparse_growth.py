"""Growth-criterion registry: a user criterion trains, ``before_clip`` replaces the trainer's name test."""
import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.errors import ConfigError
from slaknet.sparse import (GrowthCriterion, SparseConfig, SparseEngine, growth_names,
                            register_growth)
from slaknet.sparse import growth as growth_mod
from slaknet.sparse.density import add_one_each
from slaknet.sparse.kselect import MagnitudeScores


class LowestIndexGrowth(GrowthCriterion):
    """Regrows the lowest flat indices first (a criterion whose choice a test can compute by hand)."""

    def scores(self, engine, layer, step):
        return MagnitudeScores(torch.arange(layer.numel, 0, -1, dtype=torch.float32))


@pytest.fixture
def lowest_index():
    register_growth("lowest_index")(LowestIndexGrowth)
    try:
        yield "lowest_index"
    finally:
        growth_mod._REGISTRY.pop("lowest_index", None)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _expected_mask(weight, mask, rate):
    """Hand reference: prune the ceil(rate * active) smallest |w| among active, regrow as many at the
    lowest flat indices among the positions inactive after pruning."""
    w, m = weight.detach().reshape(-1), mask.reshape(-1).clone()
    active = int(m.sum())
    k = min(math.ceil(rate * active), active - 1)
    mag = torch.where(m, w.abs(), torch.full_like(w, float("inf")))
    m[torch.topk(mag, k, largest=False).indices] = False
    free = (~m).nonzero().squeeze(1)
    m[free[:k]] = True
    return m.view_as(mask)


def test_registered_criterion_trains_and_regrows_where_it_scores_highest(lowest_index):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = SparseEngine(model, opt, attach=False, sparsity=0.5, sparse_init="uniform", growth=lowest_index,
                       update_frequency=2, prune_rate=0.3, prune_rate_decay="constant")
    assert isinstance(eng.growth, LowestIndexGrowth)
    updates = 0
    for step in range(6):
        x, y = _batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        eng.before_clip(False)
        opt.step()
        before = {l.name: l.mask.clone() for l in eng.layers}
        weights = {l.name: (l.param.detach() * l.mask).clone() for l in eng.layers}  # after re-masking
        eng.after_step()
        if eng.update_count > updates:
            updates = eng.update_count
            for l in eng.layers:
                want = _expected_mask(weights[l.name], before[l.name], 0.3)
                assert torch.equal(l.mask, want), l.name
                assert int(l.mask.sum()) == int(before[l.name].sum())  # regrown as many as pruned
                assert torch.all(l.param.detach()[~l.mask] == 0)
    assert updates == 3


def test_registry_names_errors_and_cli_choices(lowest_index):
    assert growth_names()[:3] == ["random", "gradient", "momentum"]
    assert lowest_index in growth_names()
    SparseConfig(growth=lowest_index, total_steps=10).validate()
    with pytest.raises(ConfigError, match="already registered"):
        register_growth(lowest_index)(LowestIndexGrowth)
    register_growth(lowest_index, replace=True)(LowestIndexGrowth)
    with pytest.raises(ConfigError, match="growth must be one of"):
        SparseConfig(growth="no_such_growth", total_steps=10).validate()
    from slaknet.train.config import config_from_argv

    assert config_from_argv(["--sparse", "--growth", lowest_index]).sparse.growth == lowest_index


def _grads_after_backward(growth):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = SparseEngine(model, opt, sparsity=0.5, sparse_init="uniform", growth=growth, update_frequency=1,
                       prune_rate_decay="constant")
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    return eng, {l.name: l.param.grad.clone() for l in eng.layers}


@pytest.mark.parametrize("growth,clip,masked,stashed", [
    ("random", False, False, False), ("random", True, True, False),
    ("gradient", False, True, True), ("gradient", True, True, True),
    ("momentum", True, False, False),  # momentum growth: masking would erase its signal (documented no-op)
])
def test_before_clip_masks_only_when_clipping_or_the_criterion_needs_it(growth, clip, masked, stashed):
    eng, dense = _grads_after_backward(growth)
    eng.before_clip(clip)
    for l in eng.layers:
        want = dense[l.name] * l.mask if masked else dense[l.name]
        assert torch.equal(l.param.grad, want), l.name
        got = eng.dense_grad(l)
        assert (got is not None) == stashed
        if stashed:
            assert torch.equal(got, dense[l.name])


def test_add_one_each_hands_out_in_order_under_caps():
    counts = {"a": 2, "b": 5, "c": 0}
    left = add_one_each(["b", "a", "c"], counts, {"a": 3, "b": 5, "c": 1}, 2)
    assert (left, counts) == (0, {"a": 3, "b": 5, "c": 1})  # b is full: a and c get one each
    counts = {"a": 3, "b": 5}
    assert add_one_each(["a", "b"], counts, {"a": 3, "b": 5}, 4) == 4 and counts == {"a": 3, "b": 5}
