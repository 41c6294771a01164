"""auto's per-machine decisions: the cache file (round trip, stale / corrupt / unwritable), the backend
registries, and that no choice -- timed, cached or forced, built-in or registered -- changes results beyond
the float64 tolerances of tests/test_dwconv.py and tests/test_linear.py. No speed is asserted here."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import slaknet.layers.pointwise as lin
from slaknet.errors import ConfigError
from slaknet.layers import autotune, dwconv
from slaknet.layers.backends import (DWConvBackend, GemmBackend, dwconv_backends, gemm_backends,
                                     register_dwconv_backend, register_gemm_backend, unregister_dwconv_backend,
                                     unregister_gemm_backend)
from slaknet.layers.dwconv import auto_candidates, auto_key, depthwise_conv2d, resolve_backend
from slaknet.layers.dwconv_backends import fast_applies, plain_conv
from slaknet.layers.dwconv_impl import weight_grad_plain

REL = 1e-5  # |got - ref| <= REL * max|ref|, fp32 against float64 (as tests/test_dwconv.py, tests/test_linear.py)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private cache folder and a fresh decision state for the test (and again after it)."""
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV_BUDGET, raising=False)
    autotune.reset()
    yield tmp_path / "cache"
    autotune.reset()


def _calls(log, names=("plain", "fast")):
    """Candidates that only record that they ran (no work: the choice itself does not matter here)."""
    def make():
        return {n: (lambda n=n: log.append(n)) for n in names}
    return make


def _write(path, machine, decisions) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"schema": 1, "machine": machine, "decisions": decisions}, f)


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == ref.shape
    scale = ref.abs().max().item() or 1.0
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


# ----------------------------------------------------------------------------------------------- the file
def test_cache_round_trip(cache):
    log = []
    choice = autotune.decide("q/1", ["plain", "fast"], _calls(log))
    assert choice in ("plain", "fast") and log  # timed
    path = autotune.cache_path()
    assert path is not None and os.path.dirname(path) == str(cache)
    with open(path) as f:
        data = json.load(f)
    assert data["machine"] == autotune.machine_identity() and data["decisions"]["q/1"]["choice"] == choice
    assert {"cpu", "logical_cpus", "torch", "slaknet"} <= set(data["machine"])
    autotune.reset()  # a new process: the answer comes from the file, nothing is timed
    log.clear()
    assert autotune.decide("q/1", ["plain", "fast"], _calls(log)) == choice
    assert not log and autotune.stats().timed == 0 and autotune.stats().cached == 1
    assert autotune.lookup("q/1").source == "cache"


@pytest.mark.parametrize("field,value", [("torch", "0.0.1"), ("cpu", "Some Other CPU, GenuineIntel/6/85/4"),
                                         ("logical_cpus", 512), ("slaknet", "0.0.0")])
def test_stale_file_from_another_machine_or_torch_is_ignored_and_rewritten(cache, field, value):
    other = dict(autotune.machine_identity(), **{field: value})
    _write(autotune.cache_path(), other, {"q/2": {"choice": "fast"}})
    log = []
    autotune.decide("q/2", ["plain", "fast"], _calls(log))
    assert log, "the stale answer must not be used"
    with open(autotune.cache_path()) as f:
        data = json.load(f)
    assert data["machine"] == autotune.machine_identity() and "q/2" in data["decisions"]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"decisions": 3}', b"",
                                     b'{"schema": 1, "machine": "MACHINE", "decisions": {"q/3": {"choice": 7}}}'])
def test_corrupt_file_is_ignored_and_replaced(cache, content):
    path = autotune.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content.replace(b'"MACHINE"', json.dumps(autotune.machine_identity()).encode()))
    log = []
    choice = autotune.decide("q/3", ["plain", "fast"], _calls(log))
    assert log
    with open(path) as f:
        assert json.load(f)["decisions"]["q/3"]["choice"] == choice
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]  # atomic write, no debris


def test_unwritable_cache_folder_does_not_fail(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, str(blocker / "cache"))  # cannot be created, even by root
    autotune.reset()
    try:
        log = []
        first = autotune.decide("q/4", ["plain", "fast"], _calls(log))
        log.clear()
        assert autotune.decide("q/4", ["plain", "fast"], _calls(log)) == first and not log  # kept in memory
        torch.manual_seed(0)
        x, w = torch.randn(2, 16, 20, 20), torch.randn(16, 1, 5, 31)  # a real timed conv decision
        _close(depthwise_conv2d(x, w, None, (2, 15)), F.conv2d(x.double(), w.double(), None, 1, (2, 15), 1, 16))
    finally:
        autotune.reset()


def test_odd_entries_in_a_valid_file_do_not_fail(cache):
    _write(autotune.cache_path(), autotune.machine_identity(),
           {"q/6": {"choice": "fast", "median_ms": {"plain": "x", "fast": None}}, "q/7": "fast", "q/8": {}})
    log = []
    assert autotune.decide("q/6", ["plain", "fast"], _calls(log)) == "fast" and not log  # the choice is valid
    assert autotune.decide("q/6b", ["plain"], _calls(log)) == "plain"
    autotune.decide("q/7", ["plain", "fast"], _calls(log))
    assert log  # not a record: timed


def test_cache_off_and_budget_zero(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE_DIR, "off")
    monkeypatch.setenv(autotune.ENV_BUDGET, "0")  # never time: the fallback answers
    autotune.reset()
    try:
        assert autotune.cache_path() is None
        log = []
        assert autotune.decide("q/5", ["plain", "fast"], _calls(log), fallback="fast") == "fast"
        assert not log and autotune.lookup("q/5").source == "budget"
    finally:
        autotune.reset()


def test_forget_retimes(cache):
    log = []
    autotune.decide("dwconv/q", ["plain", "fast"], _calls(log))
    autotune.decide("linear/q", ["plain", "fast"], _calls(log))
    assert autotune.forget("dwconv/") == 1
    with open(autotune.cache_path()) as f:
        assert set(json.load(f)["decisions"]) == {"linear/q"}
    log.clear()
    autotune.decide("dwconv/q", ["plain", "fast"], _calls(log))
    assert log  # timed again


def test_timing_leaves_the_rng_and_the_callers_graph_alone(cache):
    torch.manual_seed(0)
    x = torch.randn(2, 24, 18, 18).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(24, 1, 29, 5, requires_grad=True)
    state = torch.get_rng_state()
    y = depthwise_conv2d(x, w, None, (14, 2))  # a training call: plain / fft / gemm are timed first
    assert autotune.stats().timed == 1 and torch.equal(torch.get_rng_state(), state)
    assert x.grad is None and w.grad is None
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


# ----------------------------------------------------------------------------------------------- results
# (channels, map, kernel): SLaK's odd channel counts, maps smaller than the kernel, both strip orientations
SHAPES = [(124, 14, (51, 5)), (124, 11, (5, 51)), (249, 9, (5, 49)), (249, 6, (47, 5)), (37, 40, (5, 5))]
DW_NAMES = [b.name for b in dwconv_backends()]
GEMM_NAMES = [b.name for b in gemm_backends() if b.available()]


def _seed_cache(key: str, choice: str) -> None:
    _write(autotune.cache_path(), autotune.machine_identity(), {key: {"choice": choice}})
    autotune.reset()


def _run_dwconv(name, x, w, b, pad, training):
    """``name`` through auto's cache where auto would consider it for this call, else forced."""
    if name in auto_candidates(x, w, pad, training):
        key = auto_key(x, w, pad, training)
        assert key is not None  # big enough to be timed: the cached answer is what runs
        _seed_cache(key, name)
        assert resolve_backend(x, w, pad, training=training) == name
        return depthwise_conv2d(x, w, b, pad)
    return depthwise_conv2d(x, w, b, pad, backend=name)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("c,hw,k", SHAPES)
@pytest.mark.parametrize("name", DW_NAMES)
def test_every_dwconv_backend_from_the_cache_matches_float64(cache, name, c, hw, k, layout):
    """Whatever the cache says (or is forced), outputs and gradients equal float64 F.conv2d within 1e-5."""
    torch.manual_seed(c + hw)
    x = torch.randn(2, c, hw, hw + 1)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, *k), torch.randn(c)
    pad = (k[0] // 2, k[1] // 2)
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = _run_dwconv(name, xg, wg, bg, pad, training=True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(gy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*leaves, 1, pad, 1, c)
    ref.backward(gy.double())
    _close(y, ref.detach())
    for got, want in zip((xg.grad, wg.grad, bg.grad), (t.grad for t in leaves)):
        _close(got, want)
    with torch.no_grad():  # inference: the forward alone
        _close(_run_dwconv(name, x, w, b, pad, training=False), ref.detach())


@pytest.mark.parametrize("cin,cout", [(124, 496), (249, 996), (996, 249), (3, 5)])
@pytest.mark.parametrize("name", GEMM_NAMES)
def test_every_gemm_backend_from_the_cache_matches_float64(cache, monkeypatch, name, cin, cout):
    monkeypatch.delenv(lin.ENV_VAR, raising=False)
    _write(autotune.cache_path(), autotune.machine_identity(),
           {lin.auto_key("train"): {"choice": name}, lin.auto_key("forward"): {"choice": name},
            lin.train_key(21, cin, cout): {"choice": name}})  # 3 x 7 rows: this layer's per-shape question
    autotune.reset()
    monkeypatch.setattr(lin, "_auto_choice", None)
    g = torch.Generator().manual_seed(cin)
    x = torch.randn(3, 7, cin, generator=g, requires_grad=True)
    w = torch.randn(cout, cin, generator=g, requires_grad=True)
    b = torch.randn(cout, generator=g, requires_grad=True)
    assert lin.linear_backend(x, w) == name and lin.auto_choice() == name
    y = lin.linear(x, w, b, gelu=True)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.gelu(F.linear(*leaves))
    ref.backward(gy.double())
    _close(y, ref.detach())
    for got, want in zip((x.grad, w.grad, b.grad), (t.grad for t in leaves)):
        _close(got, want)
    with torch.no_grad():
        _close(lin.linear(x, w, b, gelu=True), ref.detach())


def test_a_timed_auto_matches_float64(cache):
    """auto after real timings (whatever they pick on this machine): same values as float64."""
    torch.manual_seed(3)
    x, w = torch.randn(2, 249, 9, 9).requires_grad_(), torch.randn(249, 1, 5, 49).requires_grad_()
    y = depthwise_conv2d(x, w, None, (2, 24))
    assert autotune.stats().timed == 1
    y.square().sum().backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(xd, wd, None, 1, (2, 24), 1, 249)
    ref.square().sum().backward()
    _close(y, ref.detach())
    _close(x.grad, xd.grad)
    _close(w.grad, wd.grad)


# ----------------------------------------------------------------------------------------------- registry
@pytest.fixture()
def probe_conv():
    """A registered depthwise-conv backend that counts its calls and computes like plain."""
    calls = []

    def forward(x, weight, bias, padding):
        calls.append("forward")
        return plain_conv(x, weight, bias, padding)

    def wgrad(x, gy, weight, padding):
        calls.append("weight_grad")
        return weight_grad_plain(x, gy, weight, padding)

    register_dwconv_backend(DWConvBackend(name="probe", applies=fast_applies, forward=forward, weight_grad=wgrad))
    yield calls
    unregister_dwconv_backend("probe")


def test_custom_dwconv_backend_is_picked_when_forced(probe_conv, cache, monkeypatch):
    assert "probe" in dwconv.backend_names() and "probe" in dwconv.BACKENDS
    torch.manual_seed(4)
    x = torch.randn(2, 13, 7, 7, requires_grad=True)
    w = torch.randn(13, 1, 5, 15, requires_grad=True)
    ref = F.conv2d(x.detach().double(), w.detach().double(), None, 1, (2, 7), 1, 13)
    y = depthwise_conv2d(x, w, None, (2, 7), backend="probe")
    assert "DepthwiseConvFunction" in type(y.grad_fn).__name__
    y.sum().backward()
    assert probe_conv == ["forward", "weight_grad"]
    _close(y, ref)
    monkeypatch.setenv(dwconv.ENV_VAR, "probe")
    assert resolve_backend(x, w, (2, 7)) == "probe"
    monkeypatch.setenv(dwconv.ENV_VAR, "auto")
    with dwconv.use_backend("probe"):
        assert resolve_backend(x, w, (2, 7)) == "probe"
    assert resolve_backend(x, w, (1, 7), backend="probe") == "plain"  # does not apply: plain runs
    big = torch.randn(2, 64, 24, 24)
    wb = torch.randn(64, 1, 5, 31)
    _seed_cache(auto_key(big, wb, (2, 15), training=False), "probe")  # auto picks it from the cache too
    probe_conv.clear()
    with torch.no_grad():
        _close(depthwise_conv2d(big, wb, None, (2, 15)), F.conv2d(big.double(), wb.double(), None, 1, (2, 15), 1, 64))
    assert probe_conv == ["forward"]


def test_custom_gemm_backend_is_picked_when_forced(monkeypatch):
    calls = []

    def nt(a, b, bias, act):
        calls.append(act)
        y = F.linear(a, b, bias)
        return F.gelu(y) if act == "gelu" else y

    register_gemm_backend(GemmBackend(name="probe", nt=nt))
    try:
        assert "probe" in lin.backend_names()
        g = torch.Generator().manual_seed(5)
        x = torch.randn(4, 9, 249, generator=g, requires_grad=True)
        w = torch.randn(996, 249, generator=g, requires_grad=True)
        y = lin.linear(x, w, None, backend="probe")
        y.sum().backward()
        assert len(calls) == 3  # forward, input and weight gradient
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = F.linear(xd, wd)
        ref.sum().backward()
        _close(y, ref.detach())
        _close(x.grad, xd.grad)
        _close(w.grad, wd.grad)
        monkeypatch.setenv(lin.ENV_VAR, "probe")
        assert lin.linear_backend(x, w) == "probe"
    finally:
        unregister_gemm_backend("probe")


def test_registry_refuses_bad_records():
    with pytest.raises(ConfigError):
        register_dwconv_backend(DWConvBackend(name="plain", applies=fast_applies, forward=plain_conv, autograd=True))
    with pytest.raises(ConfigError):
        DWConvBackend(name="auto", applies=fast_applies, forward=plain_conv, autograd=True)
    with pytest.raises(ConfigError):
        DWConvBackend(name="nograd", applies=fast_applies, forward=plain_conv)  # no weight gradient
    with pytest.raises(ConfigError):
        unregister_dwconv_backend("plain")
    with pytest.raises(ConfigError):
        depthwise_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), None, (1, 1), backend="nonesuch")


# ----------------------------------------------------------------------------------------------- bench
def test_bench_reports_auto_vs_plain_and_retime_forgets(cache, capsys):
    import argparse

    from slaknet.bench import auto_report
    from slaknet.bench_cli import add_arguments, run

    log = []
    autotune.decide("dwconv/q", ["plain", "fast"], _calls(log))
    report, ratios = auto_report({"forward": {"plain": [2.0, 2.2, 2.1], "auto": [1.0, 1.1, 1.05]},
                                  "train step": {"plain": [1.0], "auto": [1.5]}})
    assert ratios == pytest.approx({"forward": 2.0, "train step": 1.0 / 1.5})
    assert "forward 2.000x" in report and "dwconv/q" in report and "--retime" in report  # train step: slower
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--retime", "--backends", "plain,warp"])
    assert args.retime
    with pytest.raises(ConfigError):  # arms are checked against the registry before anything is forgotten
        run(args)
    assert autotune.lookup("dwconv/q") is not None
    with pytest.raises(ConfigError):
        run(parser.parse_args(["--retime", "--batch", "0"]))


def test_pinned_answers_are_used_without_timing_and_recorded():
    from slaknet.layers import autotune

    key = "test-pin|question"

    def never():
        raise AssertionError("a pinned question must not be timed")

    autotune.pin({key: "gemm"})
    assert autotune.decide(key, ["plain", "gemm", "fft"], never) == "gemm"
    assert autotune.answers()[key] == "gemm" and autotune.decisions()[key].source == "pinned"
