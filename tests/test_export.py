"""Export round trips: every format against eager PyTorch (the training form, plain F.conv2d reference)."""
import json
import os

import numpy as np
import pytest
import torch

import slaknet
from slaknet.deploy import ExportVerificationError, export_model, load_exported, plain_dwconv, verify_export
from slaknet.errors import ConfigError, SlaknetError

from conftest import randomize_bn


def _perturbed(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A model whose reparameterization is non-trivial: random BN statistics and layer scales near 1
    (with the default layer scale of 1e-6 the blocks barely change the output and any bug would hide)."""
    torch.manual_seed(seed)
    model = slaknet.create_model(name, **kwargs)
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def pico():
    return _perturbed("slak_pico")


def _reference(model, x):
    """Eager training-form model with the plain F.conv2d backend: independent of the export path."""
    with torch.no_grad(), plain_dwconv():
        return model(x)


def _scaled_diff(out, ref):
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("fmt,form", [("onnx", "strips"), ("torchscript", "strips"),
                                      ("exported-program", "strips"), ("safetensors", "dense")])
def test_round_trip_dynamic_shapes(pico, tmp_path, fmt, form):
    path = str(tmp_path / f"pico.{fmt}.safetensors" if fmt == "safetensors" else tmp_path / f"pico.{fmt}")
    result = export_model(pico, path, fmt, reparameterize=form, input_size=(64, 64))
    assert result.passed and result.max_rel_diff <= 1e-4 and len(result.checks) == 3
    assert os.path.getsize(path) == result.file_bytes > 0
    if fmt == "onnx":
        _check_onnx_graph(path, pico, form)
    # run the artefact ourselves on shapes the export never saw: other batch and spatial size
    run = load_exported(path, fmt)
    g = torch.Generator().manual_seed(7)
    for shape in [(3, 3, 64, 64), (1, 3, 128, 96)]:
        x = torch.randn(*shape, generator=g)
        out, ref = run(x), _reference(pico, x)
        assert out.shape == ref.shape == (shape[0], 1000)
        assert _scaled_diff(out, ref) < 1e-4
        assert float(ref.abs().max()) > 0.1  # the comparison is not between near-zero outputs


def _check_onnx_graph(path, model, form):
    onnx = pytest.importorskip("onnx")
    per_block = {"strips": 2, "dense": 1}[form]
    m = onnx.load(path)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4 + per_block * sum(model.depths)  # stem + 3 downsamplers + large-kernel convs
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[2].dim_param and dims[3].dim_param  # dynamic N, H, W
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)  # standard operators only
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["slaknet"])["reparameterized"] == form


def test_onnx_graph_holds_plain_convs_of_the_chosen_form(pico, tmp_path):
    path = str(tmp_path / "dense.onnx")
    export_model(pico, path, "onnx", reparameterize="dense", input_size=(64, 64), verify=False)
    _check_onnx_graph(path, pico, "dense")  # (the strips form is checked in the round trip above)


def test_static_shapes_and_small_inputs(pico, tmp_path):
    # a spatial size too small to be dynamic (final map 1x1) falls back to a fixed size
    path = str(tmp_path / "static.pt2")
    result = export_model(pico, path, "exported-program", input_size=(3, 32, 32), dynamic_batch=False)
    assert not result.dynamic_spatial and result.input_shape == (2, 3, 32, 32) and result.passed
    run = load_exported(path, "exported-program")
    with pytest.raises(Exception):
        run(torch.randn(1, 3, 32, 32))  # the batch size is fixed too


def test_single_kernel_variant_exports_as_one_dense_kernel(tmp_path):
    model = _perturbed("slak_pico_k7")  # 7x7 kernels, no strips: "strips" falls back to the dense form
    result = export_model(model, str(tmp_path / "k7.ts"), "torchscript", input_size=(64, 64))
    assert result.reparameterize == "dense" and result.passed


def test_verification_fails_when_outputs_differ(pico, tmp_path):
    with pytest.raises(ExportVerificationError, match="tolerance"):
        export_model(pico, str(tmp_path / "x.ts"), "torchscript", input_size=(64, 64), tolerance=1e-12)
    # a wrong artefact is caught: a model with one changed weight
    other = _perturbed("slak_pico", seed=1)
    worst_abs, worst_rel, checks = verify_export(lambda x: _reference(other, x), pico, [(1, 3, 64, 64)])
    assert worst_rel > 1e-2 and len(checks) == 1


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = _perturbed("slak_pico").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, str(tmp_path / "m.safetensors"), "safetensors", input_size=(64, 64))
    assert model.training and model.stages[0][0].large_kernel.reparameterized is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_bad_arguments(pico, tmp_path):
    with pytest.raises(ConfigError, match="format"):
        export_model(pico, str(tmp_path / "a"), "tflite")
    with pytest.raises(ConfigError, match="safetensors"):
        export_model(pico, str(tmp_path / "a.bin"), "safetensors")
    with pytest.raises(ConfigError, match="reparameterize"):
        export_model(pico, str(tmp_path / "a.onnx"), "onnx", reparameterize="fold")
    assert not os.path.exists(tmp_path / "a.onnx")
    with pytest.raises(FileNotFoundError):
        load_exported(str(tmp_path / "missing.onnx"), "onnx")


def test_plain_dwconv_is_thread_local_and_restored(monkeypatch):
    import threading

    from slaknet.layers.dwconv import ENV_VAR, resolve_backend

    x, w = torch.randn(1, 4, 9, 9), torch.randn(4, 1, 5, 5)
    monkeypatch.setenv(ENV_VAR, "fast")
    seen = {}

    def other_thread() -> None:
        seen["other"] = resolve_backend(x, w, (2, 2))

    with plain_dwconv():
        assert resolve_backend(x, w, (2, 2)) == "plain"
        assert os.environ[ENV_VAR] == "fast"  # the process environment is not touched
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert resolve_backend(x, w, (2, 2), backend="gemm") == "gemm"  # an explicit argument still wins
    assert seen["other"] == "fast"  # other threads keep their backend
    assert resolve_backend(x, w, (2, 2)) == "fast"
    with pytest.raises(RuntimeError):
        with plain_dwconv():
            raise RuntimeError("boom")
    assert resolve_backend(x, w, (2, 2)) == "fast"


def test_cli_export_from_checkpoint(pico, tmp_path, capsys):
    from slaknet.cli import main

    ckpt = tmp_path / "pico.pth"
    torch.save({"model": pico.state_dict(), "epoch": 3}, ckpt)
    out = tmp_path / "pico.ts"
    rc = main(["export", "--model", "slak_pico", "--checkpoint", str(ckpt), "--format", "torchscript",
               "-o", str(out), "--input-size", "64", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["passed"] and res["max_rel_diff"] < 1e-4 and res["input_shape"] == [2, 3, 64, 64]
    # the exported file gives the checkpoint's outputs, not a freshly initialised model's
    ts = torch.jit.load(str(out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _scaled_diff(ts(x), _reference(pico, x)) < 1e-4
    meta = {}
    torch.jit.load(str(out), _extra_files=meta.setdefault("f", {"slaknet.json": ""}))
    assert json.loads(meta["f"]["slaknet.json"])["reparameterized"] == "strips"
    assert main(["export", "--model", "slak_pico", "--format", "safetensors", "--output-file", str(tmp_path / "x.bin")]) == 2


def test_backbone_export_returns_every_stage(pico, tmp_path):
    from slaknet.deploy.backbone import SLaKBackbone

    bb = SLaKBackbone(pico, out_indices=(1, 2, 3), norm_outputs=True).eval()
    with torch.no_grad():
        for i in range(4):
            getattr(bb, f"norm{i}").bias.uniform_(-1, 1)
    path = str(tmp_path / "bb.onnx")
    result = export_model(bb, path, "onnx", input_size=(64, 64))
    assert result.passed
    x = torch.randn(3, 3, 96, 64)
    outs = load_exported(path, "onnx")(x)
    with torch.no_grad(), plain_dwconv():
        refs = bb(x)
    assert [tuple(o.shape) for o in outs] == [(3, 64, 12, 8), (3, 128, 6, 4), (3, 256, 3, 2)]
    assert max(_scaled_diff(o, r) for o, r in zip(outs, refs)) < 1e-4


def test_cli_backbone_export_from_segmentation_checkpoint(pico, tmp_path, capsys):
    from slaknet.cli import main

    sd = {f"backbone.{k}": v for k, v in pico.state_dict().items() if not k.startswith(("head.", "norm."))}
    for i, c in enumerate([32, 64, 128, 256]):
        sd[f"backbone.norm{i}.weight"] = torch.rand(c) + 0.5
        sd[f"backbone.norm{i}.bias"] = torch.randn(c)
    ckpt = tmp_path / "seg.pth"
    torch.save({"state_dict": sd, "meta": {}}, ckpt)
    out = tmp_path / "bb.safetensors"
    assert main(["export", "--backbone", "--checkpoint", str(ckpt), "--format", "safetensors", "-o", str(out),
                 "--input-size", "64", "--out-indices", "0", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["passed"] and len(res["checks"]) == 3


@pytest.mark.slow
def test_slak_tiny_onnx_round_trip(tmp_path):
    """SLaK-T (kernels 51/49/47/13) through ONNX and onnxruntime, one small input size."""
    pytest.importorskip("onnxruntime")
    model = _perturbed("slak_tiny", seed=3)
    path = str(tmp_path / "slak_tiny.onnx")
    result = export_model(model, path, "onnx", input_size=(64, 64), dynamic_spatial=False)
    assert result.passed, result.summary()
    run = load_exported(path, "onnx")
    x = torch.randn(3, 3, 64, 64)
    out, ref = run(x), _reference(model, x)
    assert np.isfinite(out.numpy()).all() and float(ref.abs().max()) > 0.1
    assert _scaled_diff(out, ref) < 1e-4


def test_export_errors_are_one_line_slaknet_errors(pico, tmp_path, monkeypatch):
    import slaknet.deploy.export as ex

    def broken(*a, **k):
        raise RuntimeError("unsupported operator\nlong trace")

    monkeypatch.setattr(ex, "_export_torchscript", broken)
    with pytest.raises(SlaknetError, match="torchscript export failed: RuntimeError: unsupported operator$"):
        export_model(pico, str(tmp_path / "b.ts"), "torchscript", input_size=(64, 64))
    assert not os.path.exists(tmp_path / "b.ts") and os.listdir(tmp_path) == []


def test_registered_custom_format_is_exported_and_verified(pico, tmp_path):
    """Export formats are a registry: a user format (here: a pickled-free state dict via torch.save of
    tensors, reloaded into a fresh model) goes through the same reparameterize / write / verify steps."""
    from slaknet.deploy import ExportFormat, list_formats, register_format, unregister_format

    def save(model, sample, path, options):
        torch.save({"state": model.state_dict(), "meta": json.dumps(options.metadata, default=str)}, path)

    def load(path, model_name):
        obj = torch.load(path, weights_only=True)
        net = slaknet.create_model("slak_pico")
        net = slaknet.reparameterize_model(net, inplace=True)
        net.load_state_dict(obj["state"])
        net.eval().requires_grad_(False)
        return lambda x: net(x)

    register_format(ExportFormat("statedict", ".sd.pt", save, load, shape_generic=True))
    try:
        assert "statedict" in list_formats()
        result = export_model(pico, str(tmp_path / "m.sd.pt"), "statedict", input_size=(64, 64))
        assert result.passed and len(result.checks) == 3 and os.path.isfile(tmp_path / "m.sd.pt")
        with pytest.raises(ConfigError, match="already registered"):
            register_format(ExportFormat("statedict", ".x", save, load))
    finally:
        unregister_format("statedict")


def test_export_says_whether_the_input_size_is_fixed(pico, tmp_path):
    small = export_model(pico, str(tmp_path / "s.pt2"), "exported-program", input_size=(3, 32, 32))
    assert small.dynamic_batch and not small.dynamic_spatial
    assert "height x width fixed at 32x32" in small.summary() and "--input-size 64" in small.summary()
    big = export_model(pico, str(tmp_path / "b.pt2"), "exported-program", input_size=(3, 64, 64))
    assert big.dynamic_spatial and "any height / width that is a multiple of 32" in big.summary()
    assert "any batch" in big.input_text
