"""Strategy registries of the sparse engine: initialisation, prune criterion and redistribution.

Each built-in is listed by its registry, a registered strategy is what the engine uses (expected masks and
counts are computed by hand or with plain torch, never with the engine), and unknown names are one-line
ConfigErrors naming the registered ones.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slaknet.sparse
from slaknet.errors import ConfigError
from slaknet.sparse import (GrowthCriterion, InitRule, PruneCriterion, Redistribution, ScoreRedistribution,
                            SparseConfig, SparseEngine, growth_names,
                            init_names, init_rule, prune_names, redistribution_names, register_growth, register_init,
                            register_prune, register_redistribution)
from slaknet.sparse import growth as growth_mod
from slaknet.sparse import init_rules as init_mod
from slaknet.sparse import prune as prune_mod
from slaknet.sparse import redistribution as redist_mod
from slaknet.sparse.kselect import MagnitudeScores

_REGISTRIES = {register_init: init_mod._INIT, register_prune: prune_mod._PRUNE,
               register_redistribution: redist_mod._REDISTRIBUTION, register_growth: growth_mod._GROWTH}


@pytest.fixture
def register():
    """``register(register_fn, name, cls)``: registers for this test only."""
    added = []

    def add(register_fn, name, cls):
        register_fn(name)(cls)
        added.append((_REGISTRIES[register_fn], name))
        return name

    yield add
    for registry, name in added:
        registry.entries.pop(name, None)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))  # sparse weights: 288 and 120 entries


def _batch(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _train(model, opt, eng, steps):
    """Plain loop for an engine built with ``attach=False``."""
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        eng.after_step()


class LowestIndexGrowth(GrowthCriterion):
    """Regrows the lowest flat indices first (so the pruned set can be read off the masks)."""

    def scores(self, engine, layer, step):
        return MagnitudeScores(torch.arange(layer.numel, 0, -1, dtype=torch.float32))


# ------------------------------------------------------------------------------------ registries ---------

def test_registries_list_the_built_ins_and_the_package_exports_them():
    assert init_names()[:3] == ["uniform", "ERK", "snip"]
    assert prune_names()[:1] == ["magnitude"]
    assert redistribution_names()[:3] == ["none", "magnitude", "momentum"]
    assert growth_names()[:3] == ["random", "gradient", "momentum"]
    for name in ("register_init", "init_names", "InitRule", "register_prune", "prune_names", "PruneCriterion",
                 "register_redistribution", "redistribution_names", "Redistribution", "ScoreRedistribution"):
        assert name in slaknet.sparse.__all__ and hasattr(slaknet.sparse, name)
    assert init_rule("snip").needs_batch and not init_rule("ERK").needs_batch
    fields = list(SparseConfig.__dataclass_fields__)
    assert fields[-1] == "prune" and SparseConfig().prune == "magnitude"


@pytest.mark.parametrize("field,names", [("sparse_init", init_names), ("prune", prune_names),
                                         ("redistribution", redistribution_names), ("growth", growth_names)])
def test_unknown_names_are_one_line_config_errors_naming_the_registered_ones(field, names):
    with pytest.raises(ConfigError) as exc:
        SparseConfig(total_steps=10, **{field: "no_such"}).validate()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{field} must be one of") and "'no_such'" in msg
    assert all(repr(n) in msg for n in names())
    with pytest.raises(ConfigError, match=f"{field} must be one of"):
        SparseEngine(_model(), None, total_steps=10, **{field: "no_such"})


def test_names_cannot_be_registered_twice_unless_replaced(register):
    class Same(InitRule):
        def counts(self, engine, density, batch, loss):
            return {n: 1 for n, _ in engine.candidates}

    name = register(register_init, "same_twice", Same)
    with pytest.raises(ConfigError, match="already registered"):
        register_init(name)(Same)
    register_init(name, replace=True)(Same)
    with pytest.raises(ConfigError, match="already registered"):
        register_prune("magnitude")(PruneCriterion)
    with pytest.raises(ConfigError, match="already registered"):
        register_redistribution("none")(Redistribution)


# -------------------------------------------------------------------------------- initialisation ---------

class QuarterInit(InitRule):
    """Every layer keeps a quarter of its weights, whatever the configured sparsity."""

    def counts(self, engine, density, batch, loss):
        return {n: p.numel() // 4 for n, p in engine.candidates}


def test_registered_init_gives_the_counts_and_the_masks_go_where_every_rule_puts_them(register):
    name = register(register_init, "quarter", QuarterInit)
    eng = SparseEngine(_model(), None, sparsity=0.4, sparse_init=name, total_steps=10)
    assert isinstance(eng.sparse_init, QuarterInit)
    assert {l.name: int(l.mask.sum()) for l in eng.layers} == {"0.weight": 72, "2.weight": 30}  # 288/4, 120/4
    assert eng.init_densities == {"0.weight": 0.25, "2.weight": 0.25}
    assert eng.state_dict()["config"]["sparse_init"] == name
    # placement is the engine's (seeded random positions): uniform at sparsity 0.75 keeps the same counts
    uni = SparseEngine(_model(), None, sparsity=0.75, sparse_init="uniform", total_steps=10)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(eng.layers, uni.layers))


def test_registered_init_needing_a_batch_gets_it_and_waits_without_one(register):
    seen = []

    class FirstLayerDense(InitRule):
        needs_batch = True

        def counts(self, engine, density, batch, loss):
            seen.append(batch)
            return {n: (p.numel() if i == 0 else 10) for i, (n, p) in enumerate(engine.candidates)}

    name = register(register_init, "first_dense", FirstLayerDense)
    x, y = _batch(0)
    eng = SparseEngine(_model(), None, sparse_init=name, snip_batch=(x, y), total_steps=10)
    assert seen[0][0] is x and eng.dense_layers == ["0.weight"] and int(eng.layers[0].mask.sum()) == 10
    model = _model()
    waiting = SparseEngine(model, None, sparse_init=name, total_steps=10)
    assert len(seen) == 1  # not called without data
    with pytest.raises(ConfigError, match=f"sparse_init='{name}' needs snip_batch"):
        model(x)
    waiting.load_state_dict(eng.state_dict())
    assert torch.equal(waiting.layers[0].mask, eng.layers[0].mask)


def test_init_counts_out_of_range_are_refused(register):
    class TooMany(InitRule):
        def counts(self, engine, density, batch, loss):
            return {n: p.numel() + 1 for n, p in engine.candidates}

    name = register(register_init, "too_many", TooMany)
    with pytest.raises(ConfigError, match="too_many.*0.weight"):
        SparseEngine(_model(), None, sparse_init=name, total_steps=10)


# ------------------------------------------------------------------------------------------ prune ---------

class TaylorPrune(PruneCriterion):
    """Prunes the smallest |w * dL/dw| (the last step's dense gradient)."""

    def scores(self, engine, layer, step):
        return MagnitudeScores(layer.param * layer.param.grad)


def _expected_after_prune(weight, grad, mask, rate, score):
    """Hand reference: prune the ceil(rate * active) lowest ``score(w, g)`` among active weights, regrow as
    many at the lowest flat indices among the positions inactive after pruning."""
    w, g, m = weight.reshape(-1), grad.reshape(-1), mask.reshape(-1).clone()
    active = int(m.sum())
    k = min(math.ceil(rate * active), active - 1)
    s = torch.where(m, score(w, g), torch.full_like(w, float("inf")))
    m[torch.topk(s, k, largest=False).indices] = False
    m[(~m).nonzero().squeeze(1)[:k]] = True
    return m.view_as(mask)


def test_registered_prune_criterion_prunes_the_lowest_scores(register):
    prune = register(register_prune, "taylor", TaylorPrune)
    growth = register(register_growth, "lowest_index_s", LowestIndexGrowth)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = SparseEngine(model, opt, attach=False, sparsity=0.5, sparse_init="uniform", prune=prune, growth=growth,
                       update_frequency=2, prune_rate=0.3, prune_rate_decay="constant", total_steps=10)
    assert isinstance(eng.prune, TaylorPrune)
    differs = []
    for step in range(6):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        due = eng.update_due(eng.step_count + 1)
        before = {l.name: (l.param.detach() * l.mask, l.param.grad.clone(), l.mask.clone()) for l in eng.layers}
        eng.after_step()
        if not due:
            continue
        for l in eng.layers:
            w, g, m = before[l.name]
            want = _expected_after_prune(w, g, m, 0.3, lambda w, g: (w * g).abs())
            assert torch.equal(l.mask, want), l.name
            differs.append(not torch.equal(want, _expected_after_prune(w, g, m, 0.3, lambda w, g: w.abs())))
    assert eng.update_count == 3 and len(differs) == 6
    assert any(differs)  # the criterion decided: magnitude pruning would have chosen other weights


def test_prune_and_redistribution_needing_momentum_check_the_optimizer(register):
    class MomentumPrune(PruneCriterion):
        needs_momentum = True

        def scores(self, engine, layer, step):
            return MagnitudeScores(layer.param)

    name = register(register_prune, "momentum_prune", MomentumPrune)
    model = _model()
    with pytest.raises(ConfigError, match="needs an optimizer with momentum"):
        SparseEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=name, total_steps=10)
    SparseEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), prune=name, total_steps=10)
    with pytest.raises(ConfigError, match="needs an optimizer with momentum"):
        SparseEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), redistribution="momentum", total_steps=10)


# --------------------------------------------------------------------------------- redistribution ---------

def _one_update(redistribution):
    """Uniform 0.5 over 288 + 120 weights (active 144 + 60), one update at prune rate 0.3: prunes
    ceil(43.2) = 44 and ceil(18) = 18, 62 in all."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = SparseEngine(model, opt, attach=False, sparsity=0.5, sparse_init="uniform", redistribution=redistribution,
                       update_frequency=1, prune_rate=0.3, prune_rate_decay="constant", total_steps=10)
    _train(model, opt, eng, 1)
    return eng


def test_registered_redistribution_sets_each_layers_regrowth(register):
    calls = []

    class AllToFirst(Redistribution):
        """The whole regrowth goes to the first layer (up to its free positions), the rest to the next."""

        def counts(self, engine, n_prune, pruned):
            calls.append(dict(n_prune))
            left, out = sum(n_prune.values()), {}
            for layer in engine.layers:
                free = layer.numel - (layer.count - n_prune[layer.name])
                out[layer.name] = min(left, free)
                left -= out[layer.name]
            return out

    eng = _one_update(register(register_redistribution, "all_to_first", AllToFirst))
    assert calls == [{"0.weight": 44, "2.weight": 18}]
    rec = {r["name"]: r for r in eng.last_update["layers"]}
    assert (rec["0.weight"]["regrown"], rec["2.weight"]["regrown"]) == (62, 0)
    assert {l.name: int(l.mask.sum()) for l in eng.layers} == {"0.weight": 144 - 44 + 62, "2.weight": 60 - 18}
    assert eng.last_update["pruned"] == eng.last_update["regrown"] == 62


def test_registered_score_redistribution_shares_by_its_scores(register):
    class Equal(ScoreRedistribution):
        def layer_score(self, engine, layer, kept):
            assert int(kept.sum()) == layer.count - {"0.weight": 44, "2.weight": 18}[layer.name]
            return 1.0

    eng = _one_update(register(register_redistribution, "equal", Equal))
    assert {l.name: int(l.mask.sum()) for l in eng.layers} == {"0.weight": 144 - 44 + 31, "2.weight": 60 - 18 + 31}


# ------------------------------------------------------------------------------------------- CLI ---------

def test_cli_accepts_registered_init_and_redistribution(register):
    init = register(register_init, "quarter_cli", QuarterInit)
    red = register(register_redistribution, "none_cli", redist_mod.NoRedistribution)
    from slaknet.train.config import config_from_argv

    cfg = config_from_argv(["--sparse", "--sparse-init", init, "--redistribution", red]).sparse
    assert (cfg.sparse_init, cfg.redistribution, cfg.prune) == (init, red, "magnitude")
    assert config_from_argv(["--prune", "magnitude"]).sparse.prune == "magnitude"
    with pytest.raises(ConfigError, match="--sparse-init must be one of"):
        config_from_argv(["--sparse", "--sparse-init", "erk"])
