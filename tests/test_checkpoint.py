"""Official-checkpoint compatibility: exact keys, release formats, old names, inference, clear errors."""
import argparse
import collections
import os

import pytest
import torch

import slaknet
from slaknet.errors import CheckpointError
from slaknet.models import describe_state_dict, extract_state_dict, load_checkpoint

class NotAllowed:
    """Any class outside torch's weights-only allowlist stands for an arbitrary pickled object."""


OFFICIAL = {"slak_tiny": "SLaK_tiny", "slak_small": "SLaK_small", "slak_base": "SLaK_base"}


def official_state_dict(shapes, seed=0):
    """A state dict in the official layout built from the reference shapes file (random values)."""
    g = torch.Generator().manual_seed(seed)
    sd = collections.OrderedDict()
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_keys_and_shapes_equal_official(name, official_shapes):
    ref = official_shapes[OFFICIAL[name]]
    with torch.device("meta"):
        model = slaknet.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(ref)
    assert ours == ref


@pytest.mark.slow
def test_official_tiny_loads_strictly_in_every_release_format(tmp_path, official_shapes):
    sd = official_state_dict(official_shapes["SLaK_tiny"])
    ema = collections.OrderedDict((k, v + 1 if v.is_floating_point() else v) for k, v in sd.items())
    model = slaknet.create_model("slak_tiny")
    variants = {
        "raw.pth": sd,
        "model.pth": {"model": sd, "epoch": 3, "args": argparse.Namespace(kernel_size=[51, 49, 47, 13, 5])},
        "ddp.pth": {"state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items())},
        "ema_only.pth": {"state_dict_ema": ema},
    }
    for fname, obj in variants.items():
        torch.save(obj, tmp_path / fname)
        result = load_checkpoint(model, tmp_path / fname)
        assert result == {"missing_keys": [], "unexpected_keys": []}, fname
        expect = ema if fname == "ema_only.pth" else sd
        torch.testing.assert_close(model.state_dict()["head.weight"], expect["head.weight"], msg=fname)

    both = tmp_path / "both.pth"
    torch.save({"model": sd, "model_ema": ema}, both)
    load_checkpoint(model, both, use_ema=True)
    torch.testing.assert_close(model.state_dict()["stages.2.3.pwconv1.weight"], ema["stages.2.3.pwconv1.weight"])
    load_checkpoint(model, both, use_ema=False)
    torch.testing.assert_close(model.state_dict()["stages.2.3.pwconv1.weight"], sd["stages.2.3.pwconv1.weight"])
    with pytest.raises(CheckpointError, match="EMA"):
        load_checkpoint(model, tmp_path / "raw.pth", use_ema=True)

    # create_model(checkpoint=...) reads the architecture from the file and loads the same weights
    built = slaknet.create_model("slak_tiny", checkpoint=both, use_ema=True)
    assert built.kernel_sizes == (51, 49, 47, 13) and built.width_factor == 1.3
    torch.testing.assert_close(built.state_dict()["norm.weight"], ema["norm.weight"])


def _small_official_like(tmp_path, name="pico.pth", **overrides):
    model = slaknet.create_model("slak_pico", **overrides)
    sd = model.state_dict()
    path = tmp_path / name
    torch.save({"model": sd}, path)
    return model, sd, path


def test_old_key_names_accepted(tmp_path):
    model, sd, _ = _small_official_like(tmp_path)
    old = collections.OrderedDict((k.replace(".LoRA1.", ".Decom1.").replace(".LoRA2.", ".Decom2."), v)
                                  for k, v in sd.items())
    assert any(".Decom1." in k for k in old)
    path = tmp_path / "old.pth"
    torch.save({"model_ema": old}, path)
    fresh = slaknet.create_model("slak_pico")
    assert load_checkpoint(fresh, path)["missing_keys"] == []
    torch.testing.assert_close(fresh.stages[0][0].large_kernel.LoRA2.conv.weight, sd["stages.0.0.large_kernel.LoRA2.conv.weight"])


def test_undecomposed_lkb_origin_inferred(tmp_path):
    _, sd, path = _small_official_like(tmp_path, decompose=False, kernel_size=(15, 13, 11, 7))
    assert "stages.0.0.large_kernel.lkb_origin.conv.weight" in sd
    spec = describe_state_dict(sd)
    assert spec.kernel_sizes == (15, 13, 11, 7) and not spec.decompose and spec.small_kernel == 5
    model = slaknet.create_model("slak_pico", checkpoint=path)
    assert not model.decompose and model.kernel_sizes == (15, 13, 11, 7)


def test_kernel_size_mismatch_is_explained(tmp_path):
    """A 31x31-trained file must not silently load into 51x51 settings (0% accuracy in the research code)."""
    _, _, path = _small_official_like(tmp_path, kernel_size=(21, 19, 17, 13), num_classes=10)
    built = slaknet.create_model("slak_pico", checkpoint=path)  # infers kernels and classes
    assert built.kernel_sizes == (21, 19, 17, 13) and built.num_classes == 10
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(slaknet.create_model("slak_pico", num_classes=10), path)
    msg = str(err.value)
    assert "kernels 21/19/17/13" in msg and "kernels 31/29/27/13" in msg and "create_model" in msg
    assert len(msg.splitlines()) <= 5
    # an explicit override that contradicts the file is an error too, not a silent partial load
    with pytest.raises(CheckpointError, match="kernel_sizes"):
        slaknet.create_model("slak_pico", checkpoint=path, kernel_size=(31, 29, 27, 13))


def test_width_and_variant_inferred(tmp_path):
    _, _, path = _small_official_like(tmp_path, width_factor=1.3)
    model = slaknet.create_model("slak_pico", checkpoint=path)
    assert model.width_factor == 1.3 and model.dims == (41, 83, 166, 332)
    # a file of another variant is refused, naming what it looks like (never swapped in silently)
    nano = slaknet.create_model("slak_nano", kernel_size=(13, 11, 9, 7))
    torch.save(nano.state_dict(), tmp_path / "nano.pth")
    with pytest.raises(CheckpointError, match="does not fit --model slak_pico: it looks like slak_nano"):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "nano.pth")
    built = slaknet.create_model("slak_nano", checkpoint=tmp_path / "nano.pth")
    assert built.depths == (2, 2, 4, 2) and built.kernel_sizes == nano.kernel_sizes


def test_reparameterized_checkpoint_round_trip(tmp_path):
    model = slaknet.create_model("slak_pico").eval()
    x = torch.randn(1, 3, 64, 64)
    for merge in (False, True):
        fused = slaknet.reparameterize_model(model, merge_dense=merge)
        torch.save(fused.state_dict(), tmp_path / "fused.pth")
        loaded = slaknet.create_model("slak_pico", checkpoint=tmp_path / "fused.pth").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), fused(x))


def test_safetensors_and_bad_files(tmp_path):
    from safetensors.torch import save_file

    model, sd, _ = _small_official_like(tmp_path)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded = slaknet.create_model("slak_pico", checkpoint=tmp_path / "w.safetensors")
    torch.testing.assert_close(loaded.head.weight, model.head.weight)

    with pytest.raises(FileNotFoundError):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "junk.pth")
    torch.save({"model": sd, "evil": NotAllowed()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="never unpickles"):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "pickle.pth")
    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "other.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "notslak.pth")
    with pytest.raises(CheckpointError, match="does not look like a SLaK"):
        slaknet.create_model("slak_pico", checkpoint=tmp_path / "notslak.pth")
    assert extract_state_dict({"model": sd}, use_ema=False).keys() == sd.keys()


def test_single_kernel_and_mixed_stage_checkpoints(tmp_path):
    # small_kernel=None must survive the factory (timm.create_model drops None keywords; 0 means the same)
    twin = slaknet.create_model("slak_pico", kernel_size=(7, 7, 7, 7), small_kernel=None)
    assert all(lk.form == "single" for lk in twin.modules() if isinstance(lk, slaknet.layers.LargeKernelConv))
    import timm
    assert timm.create_model("slak_pico", small_kernel=0).stages[0][0].large_kernel.form == "single"
    torch.save(twin.state_dict(), tmp_path / "twin.pth")
    built = slaknet.create_model("slak_pico_k7", checkpoint=tmp_path / "twin.pth")  # its block kind: the 7x7 twin
    assert built.small_kernel is None and built.kernel_sizes == (7, 7, 7, 7)
    # stages with M <= N are single-kernel inside a decomposed model (kernels scaled down to small inputs)
    for decompose in (True, False):
        mixed = slaknet.create_model("slak_pico", kernel_size=(15, 7, 5, 3), decompose=decompose).eval()
        torch.save(mixed.state_dict(), tmp_path / "mixed.pth")
        again = slaknet.create_model("slak_pico", checkpoint=tmp_path / "mixed.pth")
        assert again.kernel_sizes == (15, 7, 5, 3) and again.decompose == decompose and again.small_kernel == 5
        fused = slaknet.reparameterize_model(mixed)
        torch.save(fused.state_dict(), tmp_path / "mixed_fused.pth")
        x = torch.randn(1, 3, 64, 64)
        loaded = slaknet.create_model("slak_pico", checkpoint=tmp_path / "mixed_fused.pth").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), fused(x))


def test_identical_tensors_give_identical_safetensors_files_with_the_umask_mode(tmp_path):
    """Two processes (hash-ordered headers differ between processes) write the same bytes; mode follows umask."""
    import hashlib
    import stat
    import subprocess
    import sys

    from conftest import subprocess_env

    script = ("import sys, torch\nfrom slaknet.checkpoints.writer import write_safetensors\n"
              "write_safetensors({'w': torch.arange(6.).view(2, 3), 'b': torch.ones(2)}, sys.argv[1],"
              " {'model': 'slak_pico', 'classes': '[\"a\", \"b\"]', 'input_size': 64, 'zeta': 'z'})\n")
    digests = set()
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=subprocess_env())
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        mask = os.umask(0)
        os.umask(mask)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as f:
        assert f.metadata()["input_size"] == "64" and torch.equal(f.get_tensor("w"), torch.arange(6.).view(2, 3))


def test_named_model_must_fit_the_file_and_pretrained_cfg_follows_it(tmp_path):
    from timm.data import resolve_data_config

    from slaknet.checkpoints.writer import write_safetensors

    pico = slaknet.create_model("slak_pico", num_classes=3, kernel_size=(15, 7, 7, 7))
    path = str(tmp_path / "pico.safetensors")
    write_safetensors(pico.state_dict(), path, {"model": "slak_pico", "input_size": 48, "classes": '["a", "b", "c"]',
                                                "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"})
    for wrong in ("slak_tiny", "slak_pico_k7"):  # other depths / widths; the same widths but 7x7 blocks
        with pytest.raises(CheckpointError, match=f"does not fit --model {wrong}: it looks like slak_pico"):
            slaknet.create_model(wrong, checkpoint=path)
    model = slaknet.create_model("slak_pico", checkpoint=path)
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 48, 48) and data["mean"] == (0.5, 0.5, 0.5) and data["std"] == (0.25,) * 3
    assert model.pretrained_cfg["num_classes"] == 3 and model.pretrained_cfg["label_names"] == ("a", "b", "c")
    k7 = slaknet.create_model("slak_pico_k7", num_classes=3)
    path7 = str(tmp_path / "k7.safetensors")
    write_safetensors(k7.state_dict(), path7, {"model": "slak_pico_k7"})
    assert slaknet.create_model("slak_pico_k7", checkpoint=path7).kernel_sizes == k7.kernel_sizes
    with pytest.raises(CheckpointError, match="it looks like slak_pico_k7"):
        slaknet.create_model("slak_pico", checkpoint=path7)
