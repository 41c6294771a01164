"""SLaK family: registration, shapes for every variant, architecture facts, features, reparameterization."""
import pytest
import timm
import torch
import torch.nn.functional as F

import slaknet
from conftest import randomize_bn
from slaknet.errors import ConfigError
from slaknet.models import MODEL_SPECS

ALL = list(MODEL_SPECS)
BIG = {"slak_small", "slak_base", "slak_large"}


def test_registered_in_timm():
    names = set(timm.list_models("slak_*"))
    assert set(ALL) <= names
    assert set(slaknet.list_models()) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_shapes_every_variant(name):
    model = timm.create_model(name, num_classes=7).eval()
    sizes = [64] if name in BIG else [32, 64, 97]
    with torch.no_grad():
        for s in sizes:
            x = torch.randn(2, 3, s, s + 32)
            feats = model.forward_features(x)
            assert feats.shape == (2, model.num_features, s // 32, (s + 32) // 32)
            assert model(x).shape == (2, 7)
    assert model.pretrained_cfg["classifier"] == "head"


def test_widths_and_defaults():
    m = slaknet.create_model("slak_tiny")
    assert m.dims == (124, 249, 499, 998) and m.depths == (3, 3, 9, 3)
    assert m.kernel_sizes == (51, 49, 47, 13) and m.small_kernel == 5 and m.decompose
    assert m.stages[0][0].gamma.detach().eq(1e-6).all()
    # official [*M, N] kernel list form
    m2 = slaknet.create_model("slak_pico", kernel_size=[13, 11, 9, 7, 3])
    assert m2.kernel_sizes == (13, 11, 9, 7) and m2.small_kernel == 3
    # trunc-normal(0.02) init, zero biases, head scale
    w = m.stages[2][0].pwconv1.weight
    assert abs(w.std().item() - 0.02) < 0.002  # trunc_normal_(std=.02) with [-2, 2] bounds, as in ConvNeXt
    assert m.stages[2][0].pwconv1.bias.abs().max() == 0
    h = slaknet.create_model("slak_pico", head_init_scale=0.0)
    assert h.head.weight.abs().max() == 0


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown argument"):
        slaknet.create_model("slak_pico", kernel_sizes=(3, 3, 3, 3))
    with pytest.raises(ConfigError, match="kernel_size"):
        slaknet.create_model("slak_pico", kernel_size=(31, 29))
    with pytest.raises(ConfigError, match="odd"):
        slaknet.create_model("slak_pico", kernel_size=(30, 29, 27, 13))
    with pytest.raises(ConfigError, match="did you mean"):
        slaknet.create_model("slak_tinny")
    with pytest.raises(ConfigError, match="checkpoint"):
        timm.create_model("slak_pico", pretrained=True)


def reference_block(block, x):
    """One SLaK block from its parameters with functional ops (eval mode, no drop path)."""
    lk = block.large_kernel
    y = 0
    for name in ("LoRA1", "LoRA2", "small_conv"):
        cb = getattr(lk, name)
        kh, kw = cb.conv.weight.shape[-2:]
        z = F.conv2d(x, cb.conv.weight, padding=(kh // 2, kw // 2), groups=x.shape[1])
        y = y + F.batch_norm(z, cb.bn.running_mean, cb.bn.running_var, cb.bn.weight, cb.bn.bias, False, 0.0, cb.bn.eps)
    y = y.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), block.norm.weight, block.norm.bias, 1e-6)
    y = F.linear(F.gelu(F.linear(y, block.pwconv1.weight, block.pwconv1.bias)), block.pwconv2.weight, block.pwconv2.bias)
    return x + (y * block.gamma).permute(0, 3, 1, 2)


def test_block_and_stem_match_functional_reference():
    m = slaknet.create_model("slak_pico", layer_scale_init_value=0.5).eval()
    randomize_bn(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = m.downsample_layers[0]
        s = F.conv2d(x, stem[0].weight, stem[0].bias, stride=4)
        s = F.layer_norm(s.permute(0, 2, 3, 1), (s.shape[1],), stem[1].weight, stem[1].bias, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(stem(x), s)
        torch.testing.assert_close(m.stages[0][0](s), reference_block(m.stages[0][0], s), rtol=1e-5, atol=1e-5)
        feats = m.forward_features(x)
        logits = F.linear(F.layer_norm(feats.mean((2, 3)), (feats.shape[1],), m.norm.weight, m.norm.bias, 1e-6),
                          m.head.weight, m.head.bias)
        torch.testing.assert_close(m(x), logits)


def test_features_only_and_intermediates():
    model = timm.create_model("slak_pico", features_only=True, out_indices=(0, 1, 2, 3))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 64, 128, 256]
    feats = model(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 24, 16), (1, 64, 12, 8), (1, 128, 6, 4), (1, 256, 3, 2)]
    part = timm.create_model("slak_nano", features_only=True, out_indices=(1, 2))
    assert part.feature_info.channels() == [96, 192]
    assert [f.shape[1] for f in part(torch.randn(1, 3, 64, 64))] == [96, 192]

    full = slaknet.create_model("slak_pico").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = full.forward_intermediates(x, indices=[1, 3])
        torch.testing.assert_close(final, full.forward_features(x))
        torch.testing.assert_close(inter[-1], final)
        assert len(full.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def _perturb(model, seed=0):
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
            elif "conv.weight" in name and "large_kernel" in name:  # sparse kernels, as after training
                p.mul_(torch.rand(p.shape, generator=g) < 0.6)


@pytest.mark.parametrize("merge_dense", [False, True])
@pytest.mark.parametrize("size", [224, 40])
def test_reparameterize_slak_tiny(size, merge_dense):
    torch.manual_seed(0)
    model = slaknet.create_model("slak_tiny").eval()
    _perturb(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref_feats = model.forward_features(x)
        ref = model(x)
        fused = slaknet.reparameterize_model(model, merge_dense=merge_dense)
        feats, out = fused.forward_features(x), fused(x)
    err_feats = ((feats - ref_feats).abs().max() / ref_feats.abs().max()).item()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"reparam size={size} merge_dense={merge_dense}: rel err features {err_feats:.2e}, logits {err:.2e}")
    assert err_feats < 1e-4 and err < 1e-4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    # the original is untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_timm_reparameterize_model_drives_layers():
    model = slaknet.create_model("slak_pico", layer_scale_init_value=1.0).eval()
    _perturb(model, 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        fused = timm.utils.reparameterize_model(model)
        torch.testing.assert_close(fused.forward_features(x), ref, rtol=1e-4, atol=1e-4)
    assert all(lk.reparameterized == "strips" for lk in fused.modules() if isinstance(lk, slaknet.layers.LargeKernelConv))


def test_drop_path_and_train_step():
    model = slaknet.create_model("slak_pico", drop_path_rate=0.2, num_classes=3)
    rates = [b.drop_path.drop_prob for s in model.stages for b in s if hasattr(b.drop_path, "drop_prob")]
    assert rates == pytest.approx([0.2 * i / 4 for i in range(1, 5)])
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 2]))
    loss.backward()
    assert model.stages[0][0].large_kernel.LoRA1.conv.weight.grad is not None


# --- timm model interface: grad checkpointing, layer decay, intermediates, pruning, keywords, recipes ----
def _grads(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)  # same drop-path draws in both arms (checkpointing restores the RNG on recompute)
    model(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", drop_path_rate=0.2, num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.stages[2][1].register_forward_pre_hook(lambda *a: calls.append(1))
    ref = _grads(model, x, 7)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    got = _grads(model, x, 7)
    assert len(calls) == 3  # + forward, then recomputed in backward: checkpointing really ran
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters()))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-9 * ref[n].abs().max().item(), msg=n)
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(x)
    assert len(calls) == 1  # eval: no checkpointing


def _expected_layer_id(name, depths):
    """Hand-derived layer index: stem 0, block b of stage s is 1 + blocks before s + b (its stage's
    downsampler goes with block 0); the final norm joins the last block (timm's MATCH_PREV_GROUP), the head
    comes last."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        s = int(parts[1])
        return 0 if s == 0 else 1 + sum(depths[:s])
    if parts[0] == "stages":
        s, b = int(parts[1]), int(parts[2])
        return 1 + sum(depths[:s]) + b
    return {"norm": sum(depths), "head": 1 + sum(depths)}[parts[0]]


def test_group_matcher_layer_decay():
    from timm.optim import create_optimizer_v2

    model = slaknet.create_model("slak_pico", num_classes=4)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.9)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    num_layers = sum(model.depths) + 2
    for name, p in model.named_parameters():
        want = 0.9 ** (num_layers - 1 - _expected_layer_id(name, model.depths))
        assert scale[id(p)] == pytest.approx(want), name
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1  # stem, one group per stage, the rest (norm, head)


def _manual_stages(model, x):
    outs = []
    for i in range(len(model.stages)):
        x = model.downsample_layers[i](x)
        for block in model.stages[i]:
            x = block(x)
        outs.append(x)
    return outs


def test_forward_intermediates_norm_and_head():
    model = slaknet.create_model("slak_pico", num_classes=6).eval()
    randomize_bn(model)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 3, 64, 96)
        ref = _manual_stages(model, x)
        final, inter = model.forward_intermediates(x)
        for a, b in zip(inter, ref):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(model.forward_head(final), model(x))
        normed = model.forward_intermediates(x, indices=[0, 3], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], ref[0])  # no per-stage norms: only the last is normalised
        last = ref[3]
        mu, var = last.mean(1, keepdim=True), last.var(1, unbiased=False, keepdim=True)
        want = (last - mu) / torch.sqrt(var + 1e-6) * model.norm.weight[:, None, None] + model.norm.bias[:, None, None]
        torch.testing.assert_close(normed[1], want, rtol=1e-5, atol=1e-5)
        early, got = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early, ref[1])
        torch.testing.assert_close(got[0], ref[1])
    with pytest.raises(ConfigError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers():
    x = torch.randn(1, 3, 64, 64)
    model = slaknet.create_model("slak_pico").eval()
    with torch.no_grad():
        ref = _manual_stages(model, x)
        kept = model.prune_intermediate_layers(indices=[0, 1])
        assert kept == [0, 1] and len(model.stages) == 2 and len(model.downsample_layers) == 2
        assert [f["num_chs"] for f in model.feature_info] == [32, 64] and model.num_features == 64
        assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.head, torch.nn.Identity)
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1], ref[1])
    keep = slaknet.create_model("slak_pico")
    keep.prune_intermediate_layers(indices=1, prune_norm=False)
    assert isinstance(keep.norm, torch.nn.LayerNorm) and keep.num_classes == 0 and len(keep.feature_info) == 4
    drop = slaknet.create_model("slak_pico")
    drop.prune_intermediate_layers(indices=1, prune_norm=True, prune_head=False)
    assert isinstance(drop.norm, torch.nn.Identity)


def test_builder_keywords():
    import inspect

    from slaknet.models.slak import BUILDER_KEYS, SLaK

    assert BUILDER_KEYS == set(inspect.signature(SLaK).parameters)  # the explicit list cannot drift
    with pytest.raises(ConfigError) as err:
        timm.create_model("slak_pico", depth=(1, 1, 1, 1))
    msg = str(err.value)
    assert "\n" not in msg and "depth" in msg and "valid: " in msg
    assert all(k in msg for k in BUILDER_KEYS)


def test_recipe_defaults_apart_from_architecture():
    from slaknet.models import RECIPE_DEFAULTS, recipe_defaults
    from slaknet.models.slak import BUILDER_KEYS
    from slaknet.models.training import recommended_drop_path

    assert set(RECIPE_DEFAULTS) == set(MODEL_SPECS)
    for spec in MODEL_SPECS.values():
        assert set(spec) <= BUILDER_KEYS
    # paper recipes: SLaK-T 0.1, S 0.4, B 0.5 (ConvNeXt / SLaK ImageNet commands)
    assert [recommended_drop_path(n) for n in ("slak_tiny", "slak_small", "slak_base", "slak_pico")] == [0.1, 0.4, 0.5, 0.0]
    assert recommended_drop_path("not_a_model") == 0.0
    recipe_defaults("slak_tiny")["drop_path"] = 9.0  # a copy
    assert recommended_drop_path("slak_tiny") == 0.1
    assert timm.create_model("slak_pico").pretrained_cfg["input_size"] == (3, 128, 128)
    assert timm.create_model("slak_tiny").pretrained_cfg["input_size"] == (3, 224, 224)


def test_layernorm2d_matches_reference():
    from timm.layers import LayerNorm2d as TimmLayerNorm2d

    from slaknet.layers import LayerNorm2d

    ln = LayerNorm2d(12)
    assert isinstance(ln, TimmLayerNorm2d) and set(ln.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 12, 5, 7) * 3 + 1
    y = ln(x)
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    want = (x - mu) / torch.sqrt(var + 1e-6) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (12,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)  # channels-last layout kept for speed
