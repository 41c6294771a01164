"""The pointwise Linear on oneDNN's GEMM: exact against float64 F.linear, dispatch, fallbacks, model level."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import slaknet.layers.pointwise as lin
from slaknet.errors import ConfigError
from slaknet.layers import Linear, linear

needs_onednn = pytest.mark.skipif(lin.onednn_op() is None, reason="PyTorch built without oneDNN linear")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _check_against_float64(x_shape, cin, cout, bias=True, gelu=False):
    g = torch.Generator().manual_seed(cin * 7 + cout)
    x = torch.randn(*x_shape, cin, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True) if bias else None
    y = linear(x, w, b, gelu=gelu)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    yd = F.linear(xd, wd, bd)
    yd = F.gelu(yd) if gelu else yd
    yd.backward(gy.double())
    assert y.shape == yd.shape and y.dtype == torch.float32
    assert _rel(y, yd) < 1e-5
    assert _rel(x.grad, xd.grad) < 1e-5
    assert _rel(w.grad, wd.grad) < 1e-5
    if bias:
        assert _rel(b.grad, bd.grad) < 1e-5
    with torch.no_grad():  # the inference path (fused bias / GELU in the GEMM)
        assert _rel(linear(x.detach(), w.detach(), b.detach() if bias else None, gelu=gelu), yd.detach()) < 1e-5


@needs_onednn
@pytest.mark.parametrize("cin,cout", [(124, 496), (496, 124), (249, 996), (998, 3992), (3992, 998), (3, 5)])
def test_exact_vs_float64(cin, cout, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    x = torch.randn(2, 3, 4, cin)
    assert lin.linear_backend(x, torch.randn(cout, cin)) == "onednn"
    _check_against_float64((2, 7, 5), cin, cout)  # NHWC-like leading dims, odd map size


@needs_onednn
@pytest.mark.parametrize("gelu", [False, True])
def test_batch_one_no_bias_and_gelu(gelu, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    _check_against_float64((1,), 499, 1996, bias=False, gelu=gelu)
    _check_against_float64((64, 3), 249, 996, bias=True, gelu=gelu)


@needs_onednn
def test_fallbacks_run_f_linear(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    calls = []
    real = lin.onednn_nt
    monkeypatch.setattr(lin, "onednn_nt", lambda *a, **k: calls.append(1) or real(*a, **k))
    w, b = torch.randn(8, 6), torch.randn(8)
    x = torch.randn(5, 6)
    linear(x, w, b)
    assert calls  # the oneDNN path ran
    calls.clear()
    linear(torch.randn(6, 5).t(), w, b)  # non-contiguous input
    linear(x.double(), w.double(), b.double())  # fp64
    with torch.autocast("cpu", dtype=torch.float16):
        out = linear(x, w, b)
    assert out.dtype == torch.float16  # fp16 autocast behaves as with F.linear (bf16: tests/test_bf16.py)
    traced = torch.jit.trace(Linear(6, 8), x, check_trace=False)  # tracing sees the plain op
    assert not calls
    assert "aten::linear" in str(traced.graph)
    monkeypatch.setenv(lin.ENV_VAR, "plain")
    linear(x, w, b)
    assert not calls


def test_bad_backend_name_is_a_config_error(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "blas")
    with pytest.raises(ConfigError, match="SLAKNET_LINEAR"):
        linear(torch.randn(2, 3), torch.randn(4, 3))
    monkeypatch.delenv(lin.ENV_VAR)
    with pytest.raises(ConfigError, match="backend argument"):
        linear(torch.randn(2, 3), torch.randn(4, 3), backend="blas")


@needs_onednn
def test_backend_argument_beats_the_environment(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert lin.linear_backend(x, w) == "onednn"
    assert lin.linear_backend(x, w, backend="plain") == "plain"
    monkeypatch.setenv(lin.ENV_VAR, "plain")
    assert lin.linear_backend(x, w, backend="onednn") == "onednn"


@needs_onednn
def test_auto_choice_measured_once_and_logged(monkeypatch, caplog):
    monkeypatch.setenv(lin.ENV_VAR, "auto")
    monkeypatch.setattr(lin, "_auto_choice", None)
    with caplog.at_level("INFO", logger="slaknet.linear"):
        a = lin.linear_backend(torch.randn(2, 3), torch.randn(4, 3))
        b = lin.linear_backend(torch.randn(2, 3), torch.randn(4, 3))
    assert a == b and a in ("onednn", "plain")
    assert sum("linear on cpu" in r.message for r in caplog.records) == 1


def test_linear_module_is_an_nn_linear_and_hooks_are_not_bypassed(monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    m = Linear(6, 8)
    assert isinstance(m, nn.Linear) and set(m.state_dict()) == {"weight", "bias"}
    seen = []
    m.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = m.forward_act(x, nn.GELU())
    assert seen == [torch.Size([3, 8])]  # not fused: the hook ran on the pre-activation output
    torch.testing.assert_close(out, F.gelu(F.linear(x, m.weight, m.bias)), rtol=1e-5, atol=1e-6)
    other = Linear(6, 8)
    with torch.no_grad():  # the tanh approximation is never fused as exact GELU
        out = other.forward_act(x, nn.GELU(approximate="tanh"))
    torch.testing.assert_close(out, F.gelu(F.linear(x, other.weight, other.bias), approximate="tanh"))


@needs_onednn
def test_model_same_outputs_and_gradients_with_either_gemm(monkeypatch):
    import slaknet

    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=10, layer_scale_init_value=1.0)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 10, (2,))
    res = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for backend in ("plain", "onednn"):
        monkeypatch.setenv(lin.ENV_VAR, backend)
        model.load_state_dict(state)  # same BN statistics for both runs
        model.zero_grad()
        model.train()
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            res[backend] = (model(x), grads)
    out_p, g_p = res["plain"]
    out_a, g_a = res["onednn"]
    assert _rel(out_a, out_p.double()) < 1e-5
    for n in g_p:
        assert _rel(g_a[n], g_p[n].double()) < 1e-4, n


def test_fx_symbolic_trace_of_a_slak_model():
    """torch.fx tracing sees plain ops (F.conv2d / F.linear) and gives the same outputs."""
    import slaknet

    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=10, layer_scale_init_value=1.0).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = traced(x)
    assert _rel(out, ref.double()) < 1e-5
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert any("linear" in t for t in targets) and any("conv2d" in t for t in targets)


@needs_onednn
def test_training_gemm_is_chosen_per_shape_and_a_pin_overrides_it(tmp_path, monkeypatch):
    from slaknet.layers import autotune

    monkeypatch.setenv(lin.ENV_VAR, "auto")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv(autotune.ENV_BUDGET, "60")
    monkeypatch.setattr(lin, "_pinned_train", None)
    monkeypatch.setattr(lin, "_auto_choice", None)
    autotune.reset()
    try:
        shapes = [(2, 48, 8, 32), (3, 40, 32, 8)]  # (batch, rows per image, in, out)
        for n, rows, cin, cout in shapes:
            x = torch.randn(n, rows, cin, requires_grad=True)
            w = torch.randn(cout, cin, requires_grad=True)
            got = lin.linear_backend(x, w)
            d = autotune.lookup(lin.train_key(n * rows, cin, cout))
            assert d is not None and d.source == "timed" and got == d.choice in ("plain", "onednn")
        x, w = torch.randn(2, 48, 8, requires_grad=True), torch.randn(32, 8, requires_grad=True)
        other = "plain" if lin.linear_backend(x, w) == "onednn" else "onednn"
        autotune.pin({lin.train_key(96, 8, 32): other})  # a resumed run's recorded answer
        assert lin.linear_backend(x, w) == other
        lin.pin_auto_choice("plain")  # one GEMM for every shape (a run from before the per-shape answers)
        assert lin.linear_backend(x, w) == "plain" and lin.pinned_choice() == "plain"
        lin.pin_auto_choice(None)
        assert lin.linear_backend(x, w) == other
        with torch.no_grad():  # inference calls keep their own (per-machine) question
            assert lin.linear_backend(x, w) == lin.auto_choice("forward")
    finally:
        autotune.reset()
