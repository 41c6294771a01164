"""slaknet predict --runtime: onnxruntime gives torch's answers, its export is cached and rebuilt when corrupt,
and a missing onnxruntime or an unknown runtime is a one-line error (auto falls back to torch)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import slaknet
from slaknet.cli import main
from slaknet.errors import ConfigError

TOL = 1e-4  # probabilities: onnxruntime vs torch (observed differences ~1e-7)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random-weight slak_pico (2 classes, 32 px, built-in data) checkpoint and three PNGs."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("rt")
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=2)
    path = folder / "ck.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "classes": ["outside", "inside"],
                "config": {"model": "slak_pico", "input_size": 32, "data": "builtin:insideness"}}, path)
    pngs = []
    for i in range(3):
        pngs.append(str(folder / f"i{i}.png"))
        Image.new("RGB", (40, 40), (60 * i, 100, 200 - 50 * i)).save(pngs[-1])
    return str(path), pngs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder for this module's exports (each export costs seconds: the tests share them)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLAKNET_CACHE_DIR", str(folder))
        yield str(folder)


@pytest.fixture()
def exports(monkeypatch):
    """Counts the ONNX exports made (cache misses)."""
    from slaknet.deploy import export as export_mod

    calls = []
    real = export_mod.export_model
    monkeypatch.setattr(export_mod, "export_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _predict(capsys, path, pngs, runtime):
    assert main(["predict", *pngs, "--checkpoint", path, "--json", "--threads", "1", "--runtime", runtime]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "runtime" in line]
    assert len(notes) == 1, captured.err
    return json.loads(captured.out), notes[0]


def test_onnxruntime_gives_torch_top_k_and_probabilities(ckpt, cache, exports, capsys):
    path, pngs = ckpt
    ref, note = _predict(capsys, path, pngs, "torch")
    assert "runtime torch" in note and not exports
    for runtime in ("onnxruntime", "auto"):  # the second call finds the first one's export
        got, note = _predict(capsys, path, pngs, runtime)
        assert "runtime onnxruntime" in note and "max |diff|" in note, note
        assert cache in note
        for r, g in zip(ref, got):
            assert [t["index"] for t in g["top"]] == [t["index"] for t in r["top"]]
            for a, b in zip(g["top"], r["top"]):
                assert abs(a["prob"] - b["prob"]) <= TOL
    assert len(exports) <= 1 and "cached export" in note


def test_export_is_cached_and_a_corrupt_file_is_rebuilt(ckpt, cache, exports):
    from slaknet.deploy.runtime import inference_runner, model_fingerprint
    from slaknet.models.factory import model_from_checkpoint

    model = model_from_checkpoint(ckpt[0])[0].eval()
    x = torch.randn(1, 3, 32, 32)
    first = inference_runner(model, x, "onnxruntime")  # exported here or by the test above
    assert first.runtime == "onnxruntime" and os.path.dirname(first.path) == os.path.join(cache, "onnx")
    n = len(exports)
    second = inference_runner(model, x, "auto")
    assert second.path == first.path and len(exports) == n and "cached export" in second.note
    with torch.no_grad():
        assert second(torch.randn(4, 3, 32, 32)).shape == (4, 2)  # any batch
        assert torch.allclose(second(x), model(x), atol=TOL)
    # other weights or another input size name another file
    key = model_fingerprint(model, (3, 32, 32))
    assert model_fingerprint(model, (3, 64, 64)) != key
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert model_fingerprint(model, (3, 32, 32)) != key
    with torch.no_grad():
        model.head.bias.sub_(1.0)
    with open(first.path, "wb") as f:  # a truncated / corrupt cache file is ignored and rebuilt
        f.write(b"not an onnx file")
    third = inference_runner(model, x, "onnxruntime")
    assert third.runtime == "onnxruntime" and third.path == first.path and len(exports) == n + 1
    assert "did not load" in third.note
    with torch.no_grad():
        assert torch.allclose(third(x), model(x), atol=TOL)


def test_a_differing_session_falls_back_to_torch(monkeypatch):
    from slaknet.deploy import runtime

    monkeypatch.setattr(runtime, "onnxruntime_version", lambda: "test")
    monkeypatch.setattr(runtime, "cached_onnx", lambda model, shape, **k: runtime.CachedOnnx(
        "x.onnx", lambda x: model(x) + 0.5, False, 0.0))
    model = slaknet.create_model("slak_pico", num_classes=2).eval()
    x = torch.randn(1, 3, 32, 32)
    r = runtime.inference_runner(model, x, "auto")
    assert r.runtime == "torch" and "fell back from onnxruntime" in r.note and "tolerance" in r.note
    with torch.no_grad():
        assert torch.equal(r(x), model(x))
    monkeypatch.setattr(runtime, "cached_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no exporter")))
    r = runtime.inference_runner(model, x, "onnxruntime")
    assert r.runtime == "torch" and "RuntimeError: no exporter" in r.note


def test_auto_takes_torch_where_it_is_timed_faster(monkeypatch, exports):
    """auto times both on the first input (onnxruntime must win by 5%) and remembers the answer: a model
    for which torch won is not exported again."""
    import time

    from slaknet.deploy import runtime
    from slaknet.layers import autotune

    monkeypatch.setattr(runtime, "onnxruntime_version", lambda: "test")
    model = slaknet.create_model("slak_pico", dims=(16, 32, 64, 128), num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    q = runtime.runtime_question(model, tuple(x.shape))

    def slow(x):
        time.sleep(0.02)
        return model(x)

    monkeypatch.setattr(runtime, "cached_onnx", lambda m, shape, **k: runtime.CachedOnnx("x.onnx", slow, False, 0.0))
    monkeypatch.setenv("SLAKNET_AUTOTUNE_BUDGET", "30")
    try:
        r = runtime.inference_runner(model, x, "auto")
        assert r.runtime == "torch" and "timed now" in r.note, r.note
        assert runtime.inference_runner(model, x, "onnxruntime").runtime == "onnxruntime"  # as asked: not timed
        monkeypatch.setattr(runtime, "cached_onnx", lambda *a, **k: pytest.fail("exported although torch won"))
        r = runtime.inference_runner(model, x, "auto")
        assert r.runtime == "torch" and "timed earlier" in r.note, r.note
    finally:
        autotune.forget(q)
    assert not exports


def test_runtime_choice_without_onnxruntime_and_off_the_cpu(ckpt, capsys, monkeypatch):
    from slaknet.deploy.runtime import inference_runner

    path, pngs = ckpt
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    assert main(["predict", pngs[0], "--checkpoint", path, "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime" in err and "pip install" in err, err
    _, note = _predict(capsys, path, pngs[:1], "auto")
    assert "runtime torch (auto: onnxruntime is not installed" in note
    model = slaknet.create_model("slak_pico", num_classes=2).eval()
    x = torch.randn(1, 3, 32, 32)
    assert inference_runner(model, x, "auto", device=torch.device("cuda")).runtime == "torch"
    monkeypatch.delitem(sys.modules, "onnxruntime")
    pytest.importorskip("onnxruntime")
    with pytest.raises(ConfigError, match="CPU"):
        inference_runner(model, x, "onnxruntime", device=torch.device("cuda"))


def test_unknown_runtime_is_a_one_line_error(ckpt, capsys):
    path, pngs = ckpt
    with pytest.raises(SystemExit) as exc:
        main(["predict", pngs[0], "--checkpoint", path, "--runtime", "tensorrt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--runtime" in err and "tensorrt" in err, err
    from slaknet.deploy.runtime import inference_runner

    with pytest.raises(ConfigError, match="unknown runtime"):
        inference_runner(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), "tensorrt")
