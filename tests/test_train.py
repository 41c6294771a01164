"""slaknet train / eval / predict: recipe wiring, tiny end-to-end runs, exact resume after SIGKILL, NaN stop,
corrupt images, 2-process torchrun, YAML config and one-line errors. Everything runs on 32 px images."""
from __future__ import annotations

import json
import math
import logging
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import slaknet
from conftest import run_killed_at_step, run_torchrun
from slaknet.cli import main as cli_main
from slaknet.errors import CheckpointError, ConfigError
from slaknet.train.engine import (NonFiniteLossError, build_optimizer, build_scheduler, fit_kernel_sizes, train)
from slaknet.train.config import config_from_argv

@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


TINY = ["--train-samples", "64", "--val-samples", "32", "--input-size", "32", "-b", "16", "--epochs", "2",
        "-u", "2", "--progress", "false", "--tensorboard", "false"]


# ------------------------------------------------------------------------------------------- recipe ----
def test_official_flags_and_imagenet_recipe():
    cfg = config_from_argv(["--data_path", "/data/imagenet", "--data_set", "IMNET", "--model", "SLaK_tiny", "--bn", "True",
                            "--sparse", "--sparsity", "0.4", "--sparse_init", "snip", "--prune_rate", "0.3",
                            "--growth", "random", "-u", "100", "--width_factor", "1.3",
                            "--kernel_size", "51", "49", "47", "13", "5", "--Decom", "True", "--batch_size", "128",
                            "--update_freq", "4", "--model_ema", "true", "--drop_path", "0.1", "--epochs", "300"])
    assert cfg["recipe"] == "imagenet" and cfg["data"] == "/data/imagenet" and cfg["model"] == "slak_tiny"
    assert cfg["sparse"] is True and cfg["sparsity"] == 0.4 and cfg["sparse_init"] == "snip"
    assert cfg["prune_rate"] == 0.3 and cfg["growth"] == "random" and cfg["update_frequency"] == 100
    assert cfg["width_factor"] == 1.3 and cfg["kernel_size"] == [51, 49, 47, 13, 5] and cfg["decompose"] is True
    assert cfg["batch_size"] == 128 and cfg["update_freq"] == 4 and cfg["model_ema"] is True
    # the paper's recipe for everything not given
    assert (cfg["mixup"], cfg["cutmix"], cfg["smoothing"], cfg["reprob"]) == (0.8, 1.0, 0.1, 0.25)
    assert cfg["aa"] == "rand-m9-mstd0.5-inc1" and cfg["warmup_epochs"] == 20 and cfg["weight_decay"] == 0.05
    assert cfg["opt"] == "adamw" and cfg["model_ema_decay"] == 0.9999 and cfg["lr"] is None  # scaled later
    demo = config_from_argv([])
    assert demo["recipe"] == "demo" and demo["sparse"] is True and demo["model"] == "slak_pico"
    assert config_from_argv(["--no-sparse"])["sparse"] is False


def test_param_groups_no_decay_on_norms_biases_layer_scale():
    model = slaknet.create_model("slak_pico", num_classes=3)
    opt = build_optimizer(model, dict(opt="adamw", lr=1e-3, weight_decay=0.05, opt_eps=1e-8, momentum=0.9))
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    no_decay = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    # independent rule: 1-D tensors (norm weights/biases, conv/linear biases, layer scale gamma) get no decay
    expected_no = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert no_decay == expected_no and decay == set(names.values()) - expected_no
    assert any(n.endswith("gamma") for n in no_decay) and any(".bn." in n for n in no_decay)
    assert any(n.endswith("LoRA1.conv.weight") for n in decay) and "head.weight" in decay


def test_schedule_warmup_then_cosine():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=4e-3)
    sched = build_scheduler(opt, dict(lr=4e-3, min_lr=1e-6), total_steps=100, warmup=20)
    for t in (0, 5, 19, 20, 21, 60, 99, 100):
        sched.step_update(t)
        if t < 20:
            want = 1e-6 + t * (4e-3 - 1e-6) / 20
        else:
            want = 1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * (t - 20) / 80))
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), t


def test_fit_kernels_same_function():
    torch.manual_seed(0)
    big = slaknet.create_model("slak_pico", num_classes=2).eval()
    ks = fit_kernel_sizes(big.kernel_sizes, big.small_kernel, 32)
    assert ks == (15, 7, 7, 7)  # 8/4/2/1 maps; M stays > N=5
    small = slaknet.create_model("slak_pico", num_classes=2, kernel_size=ks).eval()
    sd = big.state_dict()
    for k, v in small.state_dict().items():
        w = sd[k]
        if w.shape != v.shape:  # centre crop of the larger kernel (taps beyond map-1 only see padding)
            dh, dw = (w.shape[-2] - v.shape[-2]) // 2, (w.shape[-1] - v.shape[-1]) // 2
            w = w[..., dh:dh + v.shape[-2], dw:dw + v.shape[-1]]
        v.copy_(w)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(small(x), big(x), rtol=1e-4, atol=1e-5)


def test_bn_recalibration_is_the_average_of_batch_statistics():
    from slaknet.train.engine import recalibrate_bn

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn).eval()
    data = [(torch.randn(3, 8, 8) * (1 + i % 3), 0) for i in range(12)]
    used = recalibrate_bn(model, data, batches=3, batch_size=4, device=torch.device("cpu"))
    assert used == 12 and not model.training and bn.momentum == 0.1
    with torch.no_grad():  # independent: per-batch mean / unbiased variance of the conv output, averaged
        outs = [conv(torch.stack([d[0] for d in data[i:i + 4]])) for i in (0, 4, 8)]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    vars_ = torch.stack([o.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, vars_, rtol=1e-5, atol=1e-6)


def test_yaml_config(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("epochs: 3\nbatch-size: 8\nkernel_size: [15, 7, 5, 5]\nsparse_init: snip\nmodel_ema: true\n")
    cfg = config_from_argv(["--config", str(p), "--epochs", "2"])
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 8 and cfg["kernel_size"] == [15, 7, 5, 5]
    assert cfg["sparse_init"] == "snip" and cfg["model_ema"] is True
    p.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epochz'"):
        config_from_argv(["--config", str(p)])


# ---------------------------------------------------------------------------------------- end to end ----
def test_builtin_train_then_eval_and_predict(tmp_path, capsys):
    out = str(tmp_path / "run")
    summary = train(config_from_argv(TINY + ["-o", out, "--tensorboard", "true"]))
    for f in ("model.safetensors", "checkpoint-last.pth", "checkpoint-best.pth", "curves.png", "summary.json",
              "config.yaml", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    lines = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in lines] == [0, 1] and lines[-1]["step"] == 8
    assert summary["density"] == pytest.approx(0.6, abs=0.01) and summary["steps"] == 8
    # final weights are really sparse: zero wherever the saved masks are off, 40% overall at sparsity 0.4
    from safetensors.torch import load_file

    sd = load_file(os.path.join(out, "model.safetensors"))
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert set(ck) >= {"model", "optimizer", "scheduler", "sparse", "rng", "config", "epoch", "step"}
    masks = ck["sparse"]["masks"]
    assert masks
    for name, m in masks.items():
        assert torch.all(sd[name][~m] == 0), name
    conv_linear = [n for n, v in sd.items() if v.ndim >= 2 and n.endswith("weight")]
    zeros = sum(int((sd[n] == 0).sum()) for n in conv_linear)
    total = sum(sd[n].numel() for n in conv_linear)
    assert zeros / total == pytest.approx(0.4, abs=0.01)

    # eval: the same held-out set gives the logged accuracy
    capsys.readouterr()
    rc = cli_main(["eval", "--checkpoint", os.path.join(out, "checkpoint-best.pth"), "--json", "-j", "0"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    best = max(r["val_top1"] for r in lines)
    assert res["images"] == 32 and res["top1"] == pytest.approx(best)
    rc = cli_main(["eval", "--checkpoint", os.path.join(out, "model.safetensors"), "--data", "builtin:insideness",
                   "--input-size", "32", "--val-samples", "32", "--reparam", "--json", "-j", "0"])
    assert rc == 0
    res2 = json.loads(capsys.readouterr().out)
    assert res2["top1"] == pytest.approx(lines[-1]["val_top1"])

    # predict on dumped PNGs: labels are the dataset's class names, probabilities from the model
    from slaknet.data import InsidenessDataset, dump_pngs

    ds = InsidenessDataset("val", 2, 32, 0.5, seed=0)
    pngs = dump_pngs(ds, str(tmp_path / "png"), 2)
    rc = cli_main(["predict", *pngs, "--checkpoint", os.path.join(out, "model.safetensors"), "--json", "-k", "2"])
    assert rc == 0
    pred = json.loads(capsys.readouterr().out)
    model = slaknet.create_model("slak_pico", checkpoint=os.path.join(out, "model.safetensors")).eval()
    for r, (x, _) in zip(pred, [ds[0], ds[1]]):
        assert {t["label"] for t in r["top"]} == {"inside", "outside"}
        with torch.no_grad():
            probs = model(((x - 0.5) / 0.5).unsqueeze(0)).softmax(-1)[0]
        assert r["top"][0]["index"] == int(probs.argmax())
        assert r["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-5)


def _image_folder(root, n_train=6, n_val=3, corrupt=True):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(("cat", "dog")):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 100, (40, 44, 3), dtype=np.uint8) + 150 * ci
                Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, split, c, f"{i}.jpg"))
    if corrupt:
        with open(os.path.join(root, "train", "cat", "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 truncated")


def test_image_folder_imagenet_recipe_with_corrupt_image(tmp_path, caplog):
    data = str(tmp_path / "data")
    _image_folder(data)
    out = str(tmp_path / "run")
    cfg = config_from_argv(["--data", data, "--recipe", "imagenet", "--model", "slak_pico", "--input-size", "32", "-b",
                            "4", "--epochs", "1", "--num-workers", "0", "--model-ema-eval", "--progress", "false", "--tensorboard", "false",
                            "-o", out, "--sparse", "-u", "1"])
    assert cfg["recipe"] == "imagenet" and cfg["mixup"] == 0.8 and cfg["model_ema"] is True
    with caplog.at_level(logging.WARNING, logger="slaknet.train"):
        summary = train(cfg)
    assert "broken.jpg" in caplog.text and "UserWarning" not in caplog.text  # one logged line
    assert summary["bad_images"] == 1 and summary["epochs_done"] == 1
    assert "final_ema_top1" in summary and os.path.isfile(os.path.join(out, "model_ema.safetensors"))
    assert cfg["lr"] is None and summary["lr"] == pytest.approx(4e-3 * 4 / 4096)  # linear scaling rule


def test_bf16_channels_last_clip_accumulation_gradient_growth(tmp_path):
    out = str(tmp_path / "run")
    s = train(config_from_argv(TINY + ["-o", out, "--amp", "--channels-last", "--clip-grad", "1.0",
                                       "--update-freq", "2", "--growth", "gradient"]))
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["config"]["precision"] == "amp" and s["steps"] == 4  # 2 x 4 batches / update-freq 2
    # -u 2 over 4 steps: one topology update (at step 2; none at the final step)
    assert ck["sparse"]["updates"] == 1 and ck["sparse"]["step"] == 4


# ------------------------------------------------------------------------------------ resume / faults ----
def _final_state(out):
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    return ck


def _reference_killed_resumed(tmp_path, args, kill_at_step):
    """Train ``args`` once uninterrupted (this process) and once SIGKILLed right after step ``kill_at_step``
    in a child process (the production loop has no kill switch) then ``--auto-resume``d: (reference final
    checkpoint, resumed final checkpoint, the checkpoint the killed run left)."""
    ref = str(tmp_path / "ref")
    train(config_from_argv(args + ["-o", ref]))
    out = str(tmp_path / "killed")
    proc = run_killed_at_step("from slaknet.train.config import config_from_argv\ncfg = config_from_argv(argv)",
                              [*args, "-o", out], step=kill_at_step)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    mid = _final_state(out)
    train(config_from_argv(args + ["-o", out, "--auto-resume"]))
    return _final_state(ref), _final_state(out), mid


def _assert_same_run(a, b):
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["sparse"]["masks"].keys() == b["sparse"]["masks"].keys()
    for k in a["sparse"]["masks"]:
        assert torch.equal(a["sparse"]["masks"][k], b["sparse"]["masks"][k]), k
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_auto_resume_is_exact(tmp_path, monkeypatch):
    # the reference runs in this process, the killed run in another: pin the 1x1 GEMM so both use the same
    # (where MKL and oneDNN are about as fast, two processes can time them differently)
    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")
    args = TINY + ["--epochs", "3", "--ckpt-every-steps", "2", "--seed", "3", "--threads", "1"]
    # killed in epoch 2 of 3 (4 steps / epoch), after the step-6 checkpoint
    a, b, mid = _reference_killed_resumed(tmp_path, args, kill_at_step=7)
    assert mid["step"] == 6 and mid["batch_in_epoch"] == 2 and mid["epoch"] == 1
    assert isinstance(mid["config"]["autotune"], dict)  # the timed backend choices a resume pins
    assert a["step"] == b["step"] == 12
    _assert_same_run(a, b)


@pytest.mark.slow
def test_bf16_sparse_run_keeps_masks_exact_and_resumes_bitwise_after_sigkill(tmp_path, monkeypatch):
    """bf16 autocast with dynamic sparsity: off-mask weights stay exactly zero, prune/regrow keeps every
    layer's count, and a run killed mid-epoch continues bit for bit (weights, masks, accuracy history)."""
    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")  # same GEMM in both processes (see the fp32 test above)
    args = TINY + ["--epochs", "2", "--ckpt-every-steps", "2", "--seed", "5", "--threads", "1",
                   "--precision", "bf16", "--growth", "gradient"]
    a, b, mid = _reference_killed_resumed(tmp_path, args, kill_at_step=5)
    assert mid["step"] == 4 and mid["config"]["precision"] == "bf16"
    assert a["step"] == b["step"] == 8 and a["sparse"]["updates"] == 3  # -u 2: at steps 2, 4, 6
    _assert_same_run(a, b)
    masks, moved = a["sparse"]["masks"], 0
    assert masks
    for k, m in masks.items():
        m, m_mid = m.bool(), mid["sparse"]["masks"][k].bool()
        w = a["model"][k]
        assert w.dtype == torch.float32 and torch.count_nonzero(w[~m]) == 0, k  # pruned weights exactly zero
        assert int(m.sum()) == int(m_mid.sum()), k  # regrowth = pruning, per layer
        moved += int((m != m_mid).sum())
    assert moved > 0  # the topology did change after the mid checkpoint


def test_resume_keeps_the_gemm_and_threads_the_run_started_on(tmp_path, monkeypatch):
    from slaknet.layers import autotune, pointwise

    monkeypatch.delenv("SLAKNET_LINEAR", raising=False)
    monkeypatch.setattr(pointwise, "_pinned_train", None)
    monkeypatch.setattr(pointwise, "_auto_choice", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle: --threads auto picks 2
    out = str(tmp_path / "run")
    train(config_from_argv(TINY + ["--epochs", "1", "-o", out]))
    cfg = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)["config"]
    gemms = {k: v for k, v in cfg["autotune"].items() if k.startswith("linear/train/")}
    assert cfg["linear_auto"] == "per-shape" and gemms and cfg["resolved_threads"] == 2
    autotune.pin({k: "plain" if v == "onednn" else "onednn" for k, v in gemms.items()})  # timed the other way
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 1.5, 1.5))  # busy now: auto alone would pick 1
    summary = train(config_from_argv(TINY + ["--epochs", "2", "-o", out, "--auto-resume"]))
    assert {k: autotune.answers()[k] for k in gemms} == gemms and summary["torch_threads"] == 2
    assert pointwise.pinned_choice() is None

    # a checkpoint from before the per-shape answers: its one GEMM is kept for every layer
    ckpt = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    ckpt["config"]["linear_auto"] = "onednn" if pointwise.onednn_op() is not None else "plain"
    ckpt["config"]["autotune"] = {}
    old = str(tmp_path / "old.pth")
    torch.save(ckpt, old)
    train(config_from_argv(TINY + ["--epochs", "3", "-o", str(tmp_path / "run2"), "--resume", old]))
    assert pointwise.pinned_choice() == ckpt["config"]["linear_auto"]
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    assert pointwise.linear_backend(x, w) == ckpt["config"]["linear_auto"]
    autotune.reset()  # no pinned answers for the tests after this one


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = nn.CrossEntropyLoss.forward

    def poisoned(self, x, y):
        calls["n"] += 1
        loss = orig(self, x, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3 .*checkpoint-last.pth"):
        train(config_from_argv(TINY + ["-o", out, "--ckpt-every-steps", "1"]))
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_one_line_errors(tmp_path, capsys):
    def err(argv):
        rc = cli_main(argv)
        e = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in e, e
        return e

    assert "data folder" in err(["train", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    (tmp_path / "flat").mkdir()
    assert "has no train/ folder" in err(["train", "--data", str(tmp_path / "flat"), "-o", str(tmp_path / "o")])
    assert "--epochs must be >= 1" in err(["train", "--epochs", "0"])
    d = str(tmp_path / "d")
    _image_folder(d, corrupt=False)
    os.makedirs(os.path.join(d, "train", "empty"))
    assert "holds no images" in err(["train", "--data", d, "-o", str(tmp_path / "o2")])
    assert "unknown model" in err(["train", "--model", "slak_pica", *TINY, "-o", str(tmp_path / "o3")])
    assert "does not exist" in err(["train", "--resume", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "o4")])
    bad = tmp_path / "bad.pth"
    torch.save({"weights": torch.zeros(2)}, bad)
    assert "not a slaknet training checkpoint" in err(["train", "--resume", str(bad), "-o", str(tmp_path / "o5")])
    assert "does not exist" in err(["eval", "--checkpoint", str(tmp_path / "x.pth"), "--data", d])
    with pytest.raises(SystemExit):
        cli_main(["train", "--Decom", "maybe"])


def test_resume_with_other_model_is_refused(tmp_path):
    out = str(tmp_path / "run")
    train(config_from_argv(TINY + ["-o", out, "--epochs", "1"]))
    with pytest.raises(CheckpointError, match="model was 'slak_pico'"):
        train(config_from_argv(TINY + ["-o", str(tmp_path / "b"), "--model", "slak_pico_k7",
                                       "--resume", os.path.join(out, "checkpoint-last.pth")]))


# ------------------------------------------------------------------------------------------ torchrun ----
@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    proc = run_torchrun(["train", *TINY, "--epochs", "1", "--sparse-init", "snip", "-o", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = open(os.path.join(out, "log.jsonl")).read().splitlines()
    assert len(lines) == 1  # rank 0 only
    rec = json.loads(lines[0])
    assert rec["step"] == 2  # 64 images / (16 x 2 processes) per epoch
    summ = json.load(open(os.path.join(out, "summary.json")))
    assert summ["density"] == pytest.approx(0.6, abs=0.01)
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["config"]["world_size"] == 2 and ck["config"]["effective_batch"] == 32
    assert proc.stdout.count("epoch 1/1:") == 1
