"""The block's MLP half for inference (slaknet.layers.block_mlp): the chunked, fused path is exact against a
float64 reference (odd widths, chunk remainders, maps smaller than a chunk, no layer scale), runs only where
it applies (backend, grad, hooks, autocast, layout), and a whole SLaK model gives the same outputs with it."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import slaknet  # noqa: F401  (registers the models)
import slaknet.layers.pointwise as lin
from slaknet.layers import autotune, block_mlp
from tests.conftest import randomize_bn

needs_onednn = pytest.mark.skipif(lin.onednn_op() is None, reason="PyTorch built without oneDNN linear")
REL = 1e-5  # |got - ref| <= REL * max|ref|, fp32 against float64


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == ref.shape
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def _parts(c: int, seed: int, gamma: bool = True):
    g = torch.Generator().manual_seed(seed)
    norm, fc1, fc2 = nn.LayerNorm(c, eps=1e-6), lin.Linear(c, 4 * c), lin.Linear(4 * c, c)
    with torch.no_grad():
        for p in (*norm.parameters(), *fc1.parameters(), *fc2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5))
        norm.weight.add_(1.0)
    gam = (torch.rand(c, generator=g) + 0.1).requires_grad_() if gamma else None
    return norm, fc1, nn.GELU(), fc2, gam


def _reference(shortcut, y, norm, fc1, fc2, gamma) -> torch.Tensor:
    """shortcut + gamma * fc2(gelu(fc1(LN(y)))) in float64, written out from F.* (NCHW in and out)."""
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    t = F.layer_norm(d(y).permute(0, 2, 3, 1), norm.normalized_shape, d(norm.weight), d(norm.bias), norm.eps)
    t = F.linear(F.gelu(F.linear(t, d(fc1.weight), d(fc1.bias))), d(fc2.weight), d(fc2.bias))
    if gamma is not None:
        t = t * d(gamma)
    return d(shortcut) + t.permute(0, 3, 1, 2)


def _inputs(n, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    return s, y


@pytest.fixture()
def spy(monkeypatch):
    """Counts the calls of the fused path (the numbers are still computed by it)."""
    calls = []
    real = block_mlp.fused_residual_mlp

    def counting(*args, **kwargs):
        calls.append((tuple(args[1].shape), kwargs.get("rows")))
        return real(*args, **kwargs)
    monkeypatch.setattr(block_mlp, "fused_residual_mlp", counting)
    return calls


@needs_onednn
@pytest.mark.parametrize("c,rows,gamma", [(124, 100, True), (249, 257, True), (499, 64, False), (3, 7, True)])
def test_fused_matches_float64(c, rows, gamma):
    norm, fc1, act, fc2, gam = _parts(c, seed=c, gamma=gamma)
    s, y = _inputs(2, c, 9, 11, seed=c + 1)  # 198 pixels: chunks of `rows` with a remainder (or one chunk)
    s2d, y2d = s.permute(0, 2, 3, 1).reshape(-1, c), y.permute(0, 2, 3, 1).reshape(-1, c)
    with torch.no_grad():
        out = block_mlp.fused_residual_mlp(s2d, y2d, norm, fc1, fc2, gam, rows=rows)
    ref = _reference(s, y, norm, fc1, fc2, gam).permute(0, 2, 3, 1).reshape(-1, c)
    _close(out, ref)


@needs_onednn
@pytest.mark.parametrize("c,hw", [(124, (3, 5)), (998, (7, 7)), (249, (56, 56))])
def test_residual_mlp_forced_onednn_matches_float64(c, hw, spy, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    norm, fc1, act, fc2, gam = _parts(c, seed=c)
    s, y = _inputs(2 if c < 500 else 1, c, *hw, seed=c + 2)
    with torch.no_grad():
        out = block_mlp.residual_mlp(s, y, norm, fc1, act, fc2, gam)
    assert len(spy) == 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, _reference(s, y, norm, fc1, fc2, gam))


@needs_onednn
def test_chunk_rows_cover_large_maps():
    assert block_mlp.chunk_rows(496) == (1 << 20) // 496 and block_mlp.chunk_rows(1 << 20) == 256
    c = 124
    norm, fc1, act, fc2, gam = _parts(c, seed=5)
    s, y = _inputs(1, c, 75, 75, seed=6)  # 5,625 pixels, several chunks of 2,114 with a remainder
    s2d, y2d = s.permute(0, 2, 3, 1).reshape(-1, c), y.permute(0, 2, 3, 1).reshape(-1, c)
    with torch.no_grad():
        out = block_mlp.fused_residual_mlp(s2d, y2d, norm, fc1, fc2, gam)
    _close(out, _reference(s, y, norm, fc1, fc2, gam).permute(0, 2, 3, 1).reshape(-1, c))


def _unfused_cases():
    def plain_backend(mp, parts, s, y):
        mp.setenv(lin.ENV_VAR, "plain")

    def grad(mp, parts, s, y):
        torch.set_grad_enabled(True)

    def hook(mp, parts, s, y):
        parts[1].register_forward_hook(lambda m, i, o: None)

    def autocast(mp, parts, s, y):
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def nchw(mp, parts, s, y):
        return "nchw"

    def tanh_gelu(mp, parts, s, y):
        parts[2].approximate = "tanh"
    return [plain_backend, grad, hook, autocast, nchw, tanh_gelu]


@needs_onednn
@pytest.mark.parametrize("case", _unfused_cases(), ids=lambda f: f.__name__)
def test_unfused_where_the_fused_path_does_not_apply(case, spy, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "onednn")
    c = 124
    parts = list(_parts(c, seed=9))
    s, y = _inputs(1, c, 6, 6, seed=10)
    ctx = None
    with torch.no_grad():
        r = case(monkeypatch, parts, s, y)
        if r == "nchw":
            s, y = s.contiguous(), y.contiguous()
        else:
            ctx = r
        if ctx is not None:
            with ctx:
                out = block_mlp.residual_mlp(s, y, *parts)
        else:
            out = block_mlp.residual_mlp(s, y, *parts)
        torch.set_grad_enabled(False)
    assert spy == []
    if case.__name__ == "autocast":
        return  # bf16 numbers: tests/test_bf16.py
    norm, fc1, act, fc2, gam = parts
    ref = _reference(s, y, norm, fc1, fc2, gam)
    if act.approximate == "tanh":  # the unfused path honours the module's own GELU
        t = F.layer_norm(y.double().permute(0, 2, 3, 1), (c,), norm.weight.double(), norm.bias.double(), 1e-6)
        t = F.linear(F.gelu(F.linear(t, fc1.weight.double(), fc1.bias.double()), approximate="tanh"),
                     fc2.weight.double(), fc2.bias.double()) * gam.double()
        ref = s.double() + t.permute(0, 3, 1, 2)
    _close(out.detach(), ref)


@needs_onednn
def test_auto_times_once_per_shape_and_caches(tmp_path, spy, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "auto")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv(autotune.ENV_BUDGET, "60")
    autotune.reset()
    try:
        c = 124
        norm, fc1, act, fc2, gam = _parts(c, seed=11)
        s, y = _inputs(1, c, 8, 8, seed=12)
        key = block_mlp.auto_key(64, c, 4 * c)
        assert autotune.lookup(key) is None
        with torch.no_grad():
            a = block_mlp.residual_mlp(s, y, norm, fc1, act, fc2, gam)
            timed, before = autotune.stats().timed, len(spy)
            b = block_mlp.residual_mlp(s, y, norm, fc1, act, fc2, gam)
        d = autotune.lookup(key)
        assert d is not None and d.choice in ("plain", "fused") and timed >= 1  # 64 rows: one chunk, no 'whole'
        assert autotune.stats().timed == timed  # the second call asked no new question
        assert len(spy) - before == (1 if d.choice == "fused" else 0)  # and ran what was chosen
        ref = _reference(s, y, norm, fc1, fc2, gam)
        _close(a, ref)
        _close(b, ref)
        # a new process reads the answer from the file instead of timing again
        autotune.reset()
        with torch.no_grad():
            block_mlp.residual_mlp(s, y, norm, fc1, act, fc2, gam)
        assert autotune.stats().timed == 0 and autotune.lookup(key).choice == d.choice
    finally:
        autotune.reset()


@needs_onednn
def test_slak_model_same_outputs_with_and_without_the_fused_mlp(spy, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("slak_pico", num_classes=7).eval()
    randomize_bn(model)
    with torch.no_grad():  # non-trivial layer scale (it starts at 1e-6)
        for m in model.modules():
            if getattr(m, "gamma", None) is not None:
                m.gamma.uniform_(0.2, 1.0)
    x = torch.randn(2, 3, 72, 72)
    outs = {}
    for backend in ("plain", "onednn"):
        monkeypatch.setenv(lin.ENV_VAR, backend)
        with torch.no_grad():
            outs[backend] = model(x)
    assert spy, "the fused path never ran under SLAKNET_LINEAR=onednn"
    ref = model.double()(x.double())  # grad enabled + float64: the unfused path throughout
    _close(outs["onednn"], ref.detach(), rel=1e-4)
    _close(outs["plain"], ref.detach(), rel=1e-4)


@needs_onednn
@pytest.mark.parametrize("choice", ["plain", "fused", "whole"])
def test_each_auto_answer_runs_as_chosen_and_matches_float64(choice, spy, monkeypatch):
    monkeypatch.setenv(lin.ENV_VAR, "auto")
    autotune.reset()
    try:
        c = 124
        norm, fc1, act, fc2, gam = _parts(c, seed=13)
        s, y = _inputs(1, c, 50, 51, seed=14)  # 2,550 pixels: more than one chunk of 2,114
        autotune.pin({block_mlp.auto_key(2550, c, 4 * c): choice})
        with torch.no_grad():
            out = block_mlp.residual_mlp(s, y, norm, fc1, act, fc2, gam)
        assert spy == {"plain": [], "fused": [((2550, c), None)], "whole": [((2550, c), 2550)]}[choice]
        _close(out, _reference(s, y, norm, fc1, fc2, gam))
    finally:
        autotune.reset()
