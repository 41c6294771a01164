"""timm's model-interface expectations (after timm's tests/test_models.py) on every registered SLaK.

The big 51x51 variants (S/B/L) run the same modules as slak_tiny at more depth and width; building one
costs seconds (up to 200M parameters), so they get the shape checks on the meta device only. slak_tiny is
the real-compute check of the 51x51 path; fx runs on the small variants (same modules).
"""
import functools

import pytest
import timm
import torch

import slaknet
from slaknet.models import MODEL_SPECS

ALL = slaknet.list_models()
BIG = {"slak_small", "slak_base", "slak_large"}
BIG_SKIP = "same modules as slak_tiny, only deeper and wider; too costly on 2 shared cores"


def _expected_channels(name):
    spec = MODEL_SPECS[name]
    return [int(d * spec.get("width_factor", 1.3)) for d in spec["dims"]]


@functools.lru_cache(maxsize=None)
def _eval_model(name):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5).eval()


def test_every_variant_listed():
    assert len(ALL) == 8 and set(ALL) == set(MODEL_SPECS) and BIG < set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    if name in BIG:
        pytest.skip(BIG_SKIP)
    model = _eval_model(name).train()
    try:
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing
    finally:
        model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL)
def test_features_only_matches_feature_info(name):
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = timm.create_model(name)
        feats = timm.create_model(name, features_only=True).eval()
        outs = feats(torch.empty(2, 3, 64, 96))
    channels = _expected_channels(name)
    reductions = [4, 8, 16, 32]
    assert [f["num_chs"] for f in model.feature_info] == channels
    assert [f["reduction"] for f in model.feature_info] == reductions
    assert feats.feature_info.channels() == channels and feats.feature_info.reduction() == reductions
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // r, 96 // r) for c, r in zip(channels, reductions)]


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_match_forward(name):
    if name in BIG:
        pytest.skip(BIG_SKIP)
    model = _eval_model(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == _expected_channels(name)
        torch.testing.assert_close(inter[-1], final, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), final)
        torch.testing.assert_close(model.forward_head(final), model(x))
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(only) == 2 and torch.equal(only[0], inter[2])


@pytest.mark.parametrize("name", ALL)
def test_fx_trace(name):
    if name in BIG or name == "slak_tiny":
        pytest.skip(BIG_SKIP.replace("slak_tiny", "slak_pico"))
    from timm.models import create_feature_extractor

    model = _eval_model(name)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        graph = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(graph(x), model(x))
        extractor = create_feature_extractor(model, return_nodes={"stages.1": "s1", "stages.3": "s3"})
        got = extractor(x)
        _, inter = model.forward_intermediates(x)
        torch.testing.assert_close(got["s1"], inter[1])
        torch.testing.assert_close(got["s3"], inter[3])


@pytest.mark.parametrize("name", ["slak_pico", "slak_pico_k7"])
def test_jit_trace(name):
    model = _eval_model(name)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.warns(FutureWarning):  # torch deprecates TorchScript
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(torch.randn(1, 3, 32, 32) * 0 + x), model(x))


def test_jit_script_unsupported():
    pytest.skip("torch.jit.script is not supported: slaknet's depthwise-conv dispatch "
                "(layers/dispatch.py) inspects torch.onnx/torch.compiler state with getattr and lambdas, "
                "which TorchScript cannot compile; torch.jit.trace and torch.fx work (tested above)")
