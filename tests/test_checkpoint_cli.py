"""Loading user checkpoints from the command line: fit checks, honest names, stored training facts."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import slaknet
from slaknet.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A slaknet-style training checkpoint of slak_pico (2 classes) trained at 32 px on the built-in data."""
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = slaknet.create_model("slak_pico", num_classes=2)
    path = folder / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": 1, "classes": ["outside", "inside"],
                "config": {"model": "slak_pico", "input_size": 32, "data": "builtin:insideness",
                           "val_samples": 8, "difficulty": 0.5, "data_seed": 0}}, path)
    return model, str(path)


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A model of no registered variant's widths (depths of slak_pico, widths 16/32/64/128)."""
    folder = tmp_path_factory.mktemp("custom")
    model = slaknet.create_model("slak_pico", dims=(16, 32, 64, 128), num_classes=3)
    torch.save(model.state_dict(), folder / "custom.pth")
    return str(folder / "custom.pth")


def _one_line_exit_2(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("cmd", ["info", "eval", "predict", "export"])
def test_explicit_model_that_does_not_fit_is_an_error(trained, capsys, tmp_path, cmd):
    """Before: "looks like slak_pico, not slak_nano: building that architecture" and exit 0."""
    _, path = trained
    argv = {"info": ["info", "slak_nano", "--checkpoint", path],
            "eval": ["eval", "--checkpoint", path, "--model", "slak_nano"],
            "predict": ["predict", "x.png", "--checkpoint", path, "--model", "slak_nano"],
            "export": ["export", "--checkpoint", path, "--model", "slak_nano", "--format", "safetensors",
                       "-o", str(tmp_path / "x.safetensors")]}[cmd]
    _one_line_exit_2(capsys, argv, "slak_nano", "slak_pico")


def test_checkpoint_that_does_not_load_is_one_line(tmp_path, capsys):
    torch.save({"model": {"stages.0.0.gamma": torch.zeros(3)}}, tmp_path / "bad.pth")
    for argv in (["info", "--checkpoint", str(tmp_path / "bad.pth")],
                 ["eval", "--checkpoint", str(tmp_path / "bad.pth"), "--data", "builtin:insideness"],
                 ["kernels", str(tmp_path / "nothere.pth"), "--output-dir", str(tmp_path / "k")]):
        _one_line_exit_2(capsys, argv)


def test_info_names_the_architecture_and_uses_the_training_size(trained, custom, capsys):
    """Before: a pico checkpoint was labelled slak_tiny and counted at 224 px."""
    _, path = trained
    assert main(["info", "--checkpoint", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "slak_pico" and out["input_size"] == 32 and out["counts"]["input_size"] == [32, 32]
    assert main(["info", "--checkpoint", custom]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("custom SLaK (depths 1/1/2/1, widths 16/32/64/128")


def test_eval_uses_stored_settings_and_names_the_model(trained, capsys):
    _, path = trained
    assert main(["eval", "--checkpoint", path, "--json", "--no-ema", "-j", "64", "-b", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "slak_pico" and res["input_size"] == 32 and res["images"] == 8
    # --ema is a plain switch: this file has no EMA weights, which is a one-line error
    _one_line_exit_2(capsys, ["eval", "--checkpoint", path, "--ema"], "EMA")


def test_predict_reports_bad_images_and_predicts_the_rest(trained, tmp_path, capsys):
    from PIL import Image

    good = [str(tmp_path / f"g{i}.png") for i in range(2)]
    for i, p in enumerate(good):
        Image.new("RGB", (40, 40), (50 * i, 100, 200)).save(p)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    _, path = trained
    rc = main(["predict", good[0], str(bad), good[1], "--checkpoint", path, "--json", "-k", "5"])
    captured = capsys.readouterr()
    assert rc == 2  # a user's unreadable file: exit 2, after the readable ones were predicted
    res = json.loads(captured.out)
    assert [r["image"] for r in res] == good
    assert all(len(r["top"]) == 2 and {t["label"] for t in r["top"]} == {"outside", "inside"} for r in res)
    assert "broken.png" in captured.err


def test_eval_and_predict_take_threads(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    _, path = trained
    assert main(["eval", "--checkpoint", path, "--threads", "1", "--json", "-j", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
    Image.new("RGB", (40, 40), (10, 100, 200)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--checkpoint", path, "--threads", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert calls == [1, 1]
    _one_line_exit_2(capsys, ["eval", "--checkpoint", path, "--threads", "0"], "--threads")


def test_model_safetensors_metadata_is_read(trained, tmp_path):
    from slaknet.checkpoints import read_training_info, write_safetensors

    model, _ = trained
    path = tmp_path / "model.safetensors"
    write_safetensors(model.state_dict(), path, {"model": "slak_pico", "input_size": "48", "classes": '["a", "b"]',
                                                  "mean": "[0.1, 0.2, 0.3]", "std": "[0.4, 0.5, 0.6]"})
    info = read_training_info(str(path))
    assert (info.model, info.input_size, info.classes) == ("slak_pico", 48, ["a", "b"])
    assert info.mean == (0.1, 0.2, 0.3) and info.std == (0.4, 0.5, 0.6)


def test_written_files_get_normal_permissions(tmp_path):
    """Before: files written through atomic_path were mode 0600 (tempfile's)."""
    from slaknet.io import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp, open(tmp, "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
