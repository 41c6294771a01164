"""Compact sparse checkpoints, conversion of official-layout files, and the dense-prediction backbone."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import slaknet
from slaknet.deploy import is_sparse_checkpoint, load_sparse_checkpoint, save_sparse_checkpoint
from slaknet.deploy.backbone import SimpleSegmentationHead, SLaKBackbone
from slaknet.deploy.convert import convert_checkpoint, load_converted_metadata
from slaknet.deploy.sparse_format import encode_tensor
from slaknet.errors import CheckpointError, ConfigError
from slaknet.sparse import SparseEngine

from conftest import randomize_bn


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes, up to the sign of zeros (masking by multiplication leaves -0.0 in pruned
    positions; the format restores dropped entries as +0.0, and -0.0 == 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
        return False
    if a.is_floating_point():
        a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 == +0.0
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture()
def sparse_pico():
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=10)
    randomize_bn(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = SparseEngine(model, opt, sparsity=0.4, total_steps=10)
    engine.apply_masks()
    return model, engine


# ------------------------------------------------------------------------------- sparse format ----------
def test_sparse_round_trip_is_exact_with_engine_masks(sparse_pico, tmp_path):
    model, engine = sparse_pico
    layer = engine.layers[3]
    with torch.no_grad():  # a kept weight that is exactly zero (as after regrowth) and a negative zero
        pos = layer.mask.view(-1).nonzero()[:2, 0]
        layer.param.view(-1)[pos[0]] = 0.0
        layer.param.view(-1)[pos[1]] = -0.0
    layer.ever_active.view(-1)[(~layer.mask).view(-1).nonzero()[0, 0]] = True  # once active, now pruned
    path = tmp_path / "pico.safetensors"
    report = save_sparse_checkpoint(path, model, engine=engine, metadata={"variant": "slak_pico"})
    assert is_sparse_checkpoint(path) and report.sparse_tensors == len(engine.layers)

    ckpt = load_sparse_checkpoint(path)
    own = model.state_dict()
    assert set(ckpt.state_dict) == set(own)
    for k, v in own.items():
        assert _bits_equal(ckpt.state_dict[k], v), k
    assert ckpt.mask_source == "engine" and set(ckpt.masks) == {l.name for l in engine.layers}
    for l in engine.layers:
        assert torch.equal(ckpt.masks[l.name], l.mask)  # masks as the engine had them, not the non-zeros
        assert torch.equal(ckpt.engine_state["ever_active"][l.name], l.ever_active)
    assert not torch.equal(ckpt.masks[layer.name], layer.param != 0)
    assert torch.signbit(ckpt.state_dict[layer.name].view(-1)[pos[1]])  # a kept -0.0 stays -0.0
    assert ckpt.metadata["variant"] == "slak_pico"

    # training resumes from the file: a fresh model + engine gets the same weights, masks and counters
    fresh = slaknet.create_model("slak_pico", num_classes=10)
    fresh.load_state_dict(ckpt.state_dict)
    eng2 = SparseEngine(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), sparsity=0.4, total_steps=10)
    eng2.load_state_dict(ckpt.engine_state)
    assert [torch.equal(a.mask, b.mask) for a, b in zip(eng2.layers, engine.layers)] == [True] * len(engine.layers)
    assert eng2.step_count == engine.step_count


def test_sparse_file_is_smaller_by_the_expected_amount(sparse_pico, tmp_path):
    model, engine = sparse_pico
    sd = model.state_dict()
    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dense_path))
    report = save_sparse_checkpoint(tmp_path / "sparse.safetensors", model, engine=engine)
    # independent estimate: kept values + one bit per entry for masked tensors, everything else dense
    masks = engine.masks()
    expected = sum(v.numel() * v.element_size() for k, v in sd.items() if k not in masks)
    expected += sum(int(m.sum()) * sd[k].element_size() + math.ceil(m.numel() / 8) for k, m in masks.items())
    assert report.file_bytes < os.path.getsize(dense_path)
    assert abs(report.file_bytes - expected) < 64 * 1024  # safetensors header and JSON metadata
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert report.density == pytest.approx(kept) and kept < 0.6  # ERK: the masked layers carry the sparsity
    assert report.ratio < 0.75


def test_indices_beat_bitmask_at_low_density_and_nonzero_masks():
    g = torch.Generator().manual_seed(0)
    very_sparse = torch.zeros(64, 64, 3, 3)
    idx = torch.randperm(very_sparse.numel(), generator=g)[:200]
    very_sparse.view(-1)[idx] = torch.randn(200, generator=g)
    enc = encode_tensor("w", very_sparse, very_sparse != 0)
    assert set(enc) == {"w.__values__", "w.__indices__"}
    assert enc["w.__indices__"].dtype == torch.uint16  # 36864 entries fit 16 bits
    half = torch.randn(100, 100, generator=g) * (torch.rand(100, 100, generator=g) > 0.5)
    enc = encode_tensor("h", half, half != 0)
    assert set(enc) == {"h.__values__", "h.__maskbits__"} and enc["h.__maskbits__"].numel() == 1250
    with pytest.raises(ConfigError, match="outside its mask"):
        encode_tensor("h", half, torch.zeros(100, 100, dtype=torch.bool))


def test_sparse_without_engine_uses_nonzero_pattern(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"a.weight": torch.randn(32, 16, 3, 3, generator=g), "b.weight": torch.randn(40, 50, generator=g),
          "a.bias": torch.randn(32, generator=g), "few.weight": torch.arange(40.0).reshape(4, 10)}
    sd["a.weight"][torch.rand(sd["a.weight"].shape, generator=g) < 0.97] = 0  # 3% dense -> indices
    sd["b.weight"][torch.rand(sd["b.weight"].shape, generator=g) < 0.4] = 0   # 60% dense -> bitmask
    path = tmp_path / "nz.safetensors"
    report = save_sparse_checkpoint(path, sd)
    assert report.index_tensors == 1 and report.bitmask_tensors == 1  # few.weight: 1 zero in 40, left dense
    ckpt = load_sparse_checkpoint(path)
    assert ckpt.mask_source == "nonzero" and set(ckpt.masks) == {"a.weight", "b.weight"}
    for k, v in sd.items():
        assert _bits_equal(ckpt.state_dict[k], v), k
    assert torch.equal(ckpt.masks["b.weight"], sd["b.weight"] != 0)


def test_sparse_checkpoint_loads_through_create_model(sparse_pico, tmp_path):
    model, engine = sparse_pico
    path = tmp_path / "m.safetensors"
    save_sparse_checkpoint(path, model, engine=engine)
    rebuilt = slaknet.create_model("slak_pico", checkpoint=path)  # architecture read from the decoded tensors
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


def test_sparse_errors(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert not is_sparse_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a slaknet compact sparse"):
        load_sparse_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        load_sparse_checkpoint(tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="not in the state dict"):
        save_sparse_checkpoint(tmp_path / "y.safetensors", {"w": torch.ones(2, 2)},
                               masks={"v": torch.ones(2, 2, dtype=torch.bool)})
    assert not (tmp_path / "y.safetensors").exists()


# ------------------------------------------------------------------------------------ convert -----------
def _official_file(model: torch.nn.Module, path, zero_fraction: float = 0.0, seed: int = 0) -> dict:
    """Save ``model``'s weights the way the official training script does (DDP prefix, old key names,
    EMA copy, optimizer state, argparse args)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        if zero_fraction and v.dim() >= 2:
            v[torch.rand(v.shape, generator=g) < zero_fraction] = 0
        sd["module." + k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2.")] = v
    ema = {k: v * 0.9 if v.is_floating_point() else v for k, v in sd.items()}
    args = argparse.Namespace(model="SLaK_tiny", kernel_size=[31, 29, 27, 13, 5], width_factor=1.0,
                              sparse=True, sparsity=zero_fraction, epochs=300, lr=4e-3, data_path="/data/imagenet")
    obj = {"model": sd, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 299,
           "args": args, "scaler": {"scale": 65536.0}}
    torch.save(obj, path)
    return obj


def test_convert_official_layout_file(tmp_path):
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico")
    randomize_bn(model)
    src = tmp_path / "SLaK_pico_checkpoint-299.pth"
    obj = _official_file(model, src, zero_fraction=0.4)
    dst = tmp_path / "converted.safetensors"
    result = convert_checkpoint(str(src), str(dst))
    assert result.format == "sparse" and result.weights == "model" and result.variant == "slak_pico"
    assert result.sparsity == pytest.approx(0.4, abs=0.02)
    assert result.file_bytes < 0.8 * result.source_bytes
    rebuilt = slaknet.create_model("slak_pico", checkpoint=dst)
    for k, v in obj["model"].items():
        key = k[len("module."):].replace(".Decom1.", ".LoRA1.").replace(".Decom2.", ".LoRA2.")
        assert torch.equal(rebuilt.state_dict()[key], v), key
    meta = load_converted_metadata(str(dst))
    src_meta = meta["source"]
    assert src_meta["file"] == src.name and src_meta["epoch"] == 299 and src_meta["weights"] == "model"
    assert len(src_meta["sha256"]) == 64 and src_meta["bytes"] == os.path.getsize(src)
    assert src_meta["training_args"]["kernel_size"] == [31, 29, 27, 13, 5]
    assert meta["kernel_sizes"] == [31, 29, 27, 13] and meta["small_kernel"] == 5

    # EMA weights, dense output, reparameterized, with class names
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"class{i}" for i in range(1000)))
    from slaknet.cli import main

    dst2 = tmp_path / "ema.safetensors"
    assert main(["convert", str(src), str(dst2), "--ema", "--format", "dense", "--reparam", "strips",
                 "--class-names", str(names)]) == 0
    ema_model = slaknet.create_model("slak_pico", checkpoint=dst2)
    ref = slaknet.create_model("slak_pico", checkpoint=src, use_ema=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ema_model(x), ref(x), atol=1e-4, rtol=1e-4)
    meta2 = load_converted_metadata(str(dst2))
    assert meta2["class_names"][7] == "class7" and meta2["source"]["weights"] == "model_ema"
    assert meta2["reparameterized"] == "strips" and not is_sparse_checkpoint(dst2)
    assert main(["convert", str(src), str(tmp_path / "x.pth")]) == 2  # must be .safetensors
    # converting a converted file keeps the class names and the original source
    dst3 = tmp_path / "again.safetensors"
    convert_checkpoint(str(dst2), str(dst3), fmt="sparse")
    meta3 = load_converted_metadata(str(dst3))
    assert meta3["class_names"] == meta2["class_names"] and meta3["source"]["previous"]["file"] == src.name


def test_convert_rejects_non_slak_files(tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 3, 1, 1)}}, src)
    with pytest.raises(CheckpointError, match="does not look like a SLaK"):
        convert_checkpoint(str(src), str(tmp_path / "o.safetensors"))


@pytest.mark.slow
def test_convert_official_slak_tiny_shapes_sparse(tmp_path, official_shapes):
    """An official-layout SLaK-T file (key list and shapes of the release) at 40% sparsity."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in official_shapes["SLaK_tiny"].items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            t = torch.randn(shape, generator=g) * 0.02
            if len(shape) >= 2:
                t[torch.rand(shape, generator=g) < 0.4] = 0
            sd[k] = t
    src = tmp_path / "SLaK_tiny_checkpoint.pth"
    torch.save({"model": sd, "epoch": 299}, src)
    result = convert_checkpoint(str(src), str(tmp_path / "t.safetensors"))
    assert result.variant == "slak_tiny" and result.format == "sparse"
    assert result.file_bytes / result.source_bytes < 0.68  # 60% of the values + 1/32 for the bit masks
    back = load_sparse_checkpoint(tmp_path / "t.safetensors").state_dict
    assert all(torch.equal(back[k], v) for k, v in sd.items())


# ----------------------------------------------------------------------------------- backbone -----------
@pytest.fixture(scope="module")
def pico_model():
    torch.manual_seed(0)
    m = slaknet.create_model("slak_pico")
    randomize_bn(m)
    return m.eval()


def test_timm_features_only():
    import timm

    torch.manual_seed(0)
    feat = timm.create_model("slak_pico", features_only=True, out_indices=(1, 2, 3)).eval()
    assert feat.feature_info.channels() == [64, 128, 256] and feat.feature_info.reduction() == [8, 16, 32]
    outs = feat(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]


def test_backbone_matches_manual_stage_by_stage_forward(pico_model):
    bb = SLaKBackbone(pico_model, norm_outputs=True).eval()
    with torch.no_grad():
        for i in range(4):  # non-trivial norms, so that applying them is visible
            getattr(bb, f"norm{i}").weight.uniform_(0.5, 1.5)
            getattr(bb, f"norm{i}").bias.uniform_(-1, 1)
        x = torch.randn(1, 3, 64, 64)
        outs = bb(x)
        h = x
        for i in range(4):
            h = pico_model.stages[i](pico_model.downsample_layers[i](h))
            n = getattr(bb, f"norm{i}")
            ref = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), n.weight, n.bias, 1e-6).permute(0, 3, 1, 2)
            assert torch.allclose(outs[i], ref, atol=1e-5)
    assert bb.out_channels == [32, 64, 128, 256] and bb.reductions == [4, 8, 16, 32]


def test_backbone_padding_policy(pico_model):
    bb = SLaKBackbone(pico_model, out_indices=(0, 3)).eval()
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        outs = bb(x)
        padded = torch.zeros(1, 3, 96, 128)
        padded[..., :70, :100] = x
        ref = bb.stages[3](bb.downsample_layers[3](bb.stages[2](bb.downsample_layers[2](bb.stages[1](
            bb.downsample_layers[1](bb.stages[0](bb.downsample_layers[0](padded))))))))
    assert [tuple(o.shape[-2:]) for o in outs] == [(24, 32), (3, 4)]  # ceil(70/4), ceil(100/4); /32
    assert torch.allclose(outs[1], ref, atol=1e-5)
    strict = SLaKBackbone(pico_model, pad_input="error")
    with pytest.raises(ConfigError, match="not a multiple of 32"):
        strict(x)
    with pytest.raises(ConfigError, match="out_indices"):
        SLaKBackbone(pico_model, out_indices=(2, 1))


def test_backbone_loads_official_segmentation_checkpoint(pico_model, tmp_path):
    """mmseg layout: {'meta': ..., 'state_dict': {'backbone.*', 'decode_head.*'}} with norm0..norm3."""
    g = torch.Generator().manual_seed(0)
    sd = {f"backbone.{k}": v for k, v in pico_model.state_dict().items() if not k.startswith(("head.", "norm."))}
    for i, c in enumerate([32, 64, 128, 256]):
        sd[f"backbone.norm{i}.weight"] = torch.rand(c, generator=g) + 0.5
        sd[f"backbone.norm{i}.bias"] = torch.randn(c, generator=g)
    sd["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1, generator=g)
    path = tmp_path / "upernet_slak_pico.pth"
    torch.save({"meta": {"epoch": 1}, "state_dict": sd}, path)
    bb = SLaKBackbone.from_checkpoint(str(path), out_indices=(1, 3)).eval()
    assert bb.norm_outputs and bb.out_indices == (1, 3)
    for k, v in bb.state_dict().items():
        assert torch.equal(v, sd["backbone." + k]), k
    # a classification checkpoint gives the plain backbone; norm/head are ignored
    cls_path = tmp_path / "cls.pth"
    torch.save({"model": pico_model.state_dict()}, cls_path)
    plain = SLaKBackbone.from_checkpoint(str(cls_path))
    assert not plain.norm_outputs and not any(k.startswith("norm") for k in plain.state_dict())


def test_backbone_names_match_official_segmentation_backbone(official_shapes):
    bb = SLaKBackbone("slak_tiny", norm_outputs=True)
    official = {k: tuple(v) for k, v in official_shapes["SLaK_tiny"].items() if not k.startswith(("head.", "norm."))}
    official.update({f"norm{i}.{p}": (c,) for i, c in enumerate([124, 249, 499, 998]) for p in ("weight", "bias")})
    ours = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
    assert ours == official


def test_segmentation_head_end_to_end(pico_model):
    bb = SLaKBackbone(slaknet.create_model("slak_pico"), norm_outputs=True)
    head = SimpleSegmentationHead(bb.out_channels, num_classes=5, channels=16)
    x = torch.randn(2, 3, 50, 75)
    logits = head(bb(x), x.shape[-2:])
    assert logits.shape == (2, 5, 50, 75)
    loss = F.cross_entropy(logits, torch.randint(0, 5, (2, 50, 75)))
    loss.backward()
    assert bb.stages[0][0].large_kernel.LoRA1.conv.weight.grad.abs().sum() > 0


def test_segmentation_models_pytorch_universal_encoder(pico_model):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from slaknet.deploy.backbone import backbone_state_dict

    torch.manual_seed(0)
    net = smp.Unet("tu-slak_pico", encoder_weights=None, classes=3, decoder_channels=(64, 32, 16, 8, 4)).eval()
    assert net.encoder.out_channels[-4:] == [32, 64, 128, 256]
    # official-style classification weights into the encoder (all 4 stages used at encoder_depth=5)
    result = net.encoder.model.model.load_state_dict(backbone_state_dict({"model": pico_model.state_dict()}),
                                                     strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        feats = net.encoder(x)
        ref = SLaKBackbone(pico_model)(x)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert torch.allclose(feats[-1], ref[-1], atol=1e-5)
