"""``slaknet distill`` as a task of the shared trainer (issue 15): teacher -> student runs, resume, errors.

Tiny runs: a slak_pico teacher trained for a few steps at 32 px, a slak_pico_k7 student.
"""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F

from slaknet.cli import main as cli_main
from slaknet.errors import CheckpointError, ConfigError
from slaknet.train.engine import train
from slaknet.train.config import config_from_argv

TINY = ["--train-samples", "64", "--val-samples", "32", "--input-size", "32", "-b", "16", "--epochs", "1",
        "--progress", "false", "--tensorboard", "false", "--threads", "1", "--no-sparse"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "t")
    torch.set_num_threads(1)
    train(config_from_argv(TINY + ["--model", "slak_pico", "-o", out]))
    return os.path.join(out, "model.safetensors")


def distill_cfg(argv):
    return config_from_argv(argv, "distillation")


def _student(teacher, out, *extra):
    return TINY + ["--model", "slak_pico_k7", "--teacher-checkpoint", teacher, "-o", out, *extra]


def _log(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


def test_distilled_student_is_a_normal_model_for_eval_predict_export(teacher_ckpt, tmp_path, capsys):
    out = str(tmp_path / "s")
    train(distill_cfg(_student(teacher_ckpt, out, "--distill-type", "KD", "--alpha", "0.5", "--T", "2")))
    header = capsys.readouterr().out
    assert "distilling from teacher slak_pico" in header and "loss KD (alpha 0.5, T 2)" in header
    weights = os.path.join(out, "model.safetensors")
    assert cli_main(["eval", "--checkpoint", weights, "--data", "builtin:insideness", "--val-samples", "16",
                     "--input-size", "32"]) == 0
    assert "top-1" in capsys.readouterr().out
    from slaknet.data import InsidenessDataset, dump_pngs

    pngs = dump_pngs(InsidenessDataset("val", 2, 32, cache=False), str(tmp_path / "png"), 2)
    assert cli_main(["predict", *pngs, "--checkpoint", weights]) == 0
    text = capsys.readouterr().out
    assert all(os.path.basename(p) in text for p in pngs) and ("inside" in text or "outside" in text)
    onnx = str(tmp_path / "s.onnx")
    assert cli_main(["export", "--checkpoint", weights, "--format", "onnx", "-o", onnx, "--input-size", "32"]) == 0
    assert os.path.getsize(onnx) > 0
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert not any(k.startswith("teacher") for k in keys)  # only the student is saved
    assert meta.get("distilled_from", "").startswith("slak_pico")


def test_kd_loss_in_the_run_equals_an_independent_computation(teacher_ckpt, tmp_path):
    """The first step's logged loss is alpha*T^2*KL + (1-alpha)*CE computed here from the two models."""
    from slaknet.distill.task import DistillTask
    from slaknet.train.trainer import Callback, Trainer

    cfg = distill_cfg(_student(teacher_ckpt, str(tmp_path / "s"), "--distill-type", "KD", "--alpha", "0.3",
                               "--T", "3", "--max-steps", "1"))
    seen = {}

    class Spy(Callback):
        def on_train_start(self, tr):
            original = tr.task.training_loss

            def training_loss(trainer, model, x, y):
                if "expected" not in seen:
                    with torch.no_grad():
                        s, t = model(x), tr.task.teacher(x)
                    kl = F.kl_div(F.log_softmax(s / 3, 1), F.softmax(t / 3, 1), reduction="batchmean")
                    seen["expected"] = float(0.3 * 9 * kl + 0.7 * F.cross_entropy(s, y))
                return original(trainer, model, x, y)

            tr.task.training_loss = training_loss

        def on_step_end(self, tr, loss):
            seen["loss"] = loss

    tr = Trainer(cfg, callbacks=[Spy()])
    assert isinstance(tr.task, DistillTask)
    tr.fit()
    assert seen["loss"] == pytest.approx(seen["expected"], rel=1e-4)
    assert not tr.task.teacher.training and not any(p.requires_grad for p in tr.task.teacher.parameters())


def test_teacher_sees_the_same_mixed_batch(teacher_ckpt, tmp_path):
    from slaknet.train.trainer import Trainer

    cfg = distill_cfg(_student(teacher_ckpt, str(tmp_path / "s"), "--mixup", "0.8", "--max-steps", "2"))
    tr = Trainer(cfg)
    inputs = {"student": [], "teacher": []}
    orig = tr.task.build_model

    def build_model(trainer, n):
        model, res = orig(trainer, n)
        model.register_forward_pre_hook(lambda m, a: inputs["student"].append(a[0].clone()))
        tr.task.teacher.register_forward_pre_hook(lambda m, a: inputs["teacher"].append(a[0].clone()))
        return model, res

    tr.task.build_model = build_model
    tr.fit()
    train_inputs = inputs["student"][:2]  # later student forwards are evaluations
    assert len(inputs["teacher"]) == 2
    for s, t in zip(train_inputs, inputs["teacher"]):
        assert torch.equal(s, t)
    raw = tr.task.move_batch(tr, next(iter(tr.task.train_batches(tr, 0, 0))))[0]
    assert not torch.equal(raw, inputs["teacher"][0])  # mixup did change the batch


def test_sigkill_then_resume_equals_uninterrupted_with_feature_projection(teacher_ckpt, tmp_path, monkeypatch):
    import signal

    from conftest import run_killed_at_step

    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")  # same 1x1 GEMM in this process and the child (inherited)
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    args = ["--distill-type", "KD+FD", "--lr-fd", "0.5", "--epochs", "2", "--width-factor", "0.5",
            "--ckpt-every-steps", "2"]
    train(distill_cfg(_student(teacher_ckpt, ref, *args)))
    build = ("from slaknet.train.config import config_from_argv\ncfg = config_from_argv(argv, 'distillation')")
    proc = run_killed_at_step(build, _student(teacher_ckpt, cut, *args), step=3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = torch.load(os.path.join(cut, "checkpoint-last.pth"), map_location="cpu", weights_only=True)
    assert ck["step"] == 2
    proj = ck["task_modules"]["feature_projection"]
    assert any(tuple(v.shape[:2]) == (256, 128) for v in proj.values())  # the student's 128 -> teacher's 256
    train(distill_cfg(["--resume", os.path.join(cut, "checkpoint-last.pth")]))
    a, b = _log(ref), _log(cut)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    fa = torch.load(os.path.join(ref, "checkpoint-last.pth"), weights_only=True)["task_modules"]
    fb = torch.load(os.path.join(cut, "checkpoint-last.pth"), weights_only=True)["task_modules"]
    for k, v in fa["feature_projection"].items():
        assert torch.equal(v, fb["feature_projection"][k]), k


@pytest.mark.slow
def test_torchrun_two_processes_with_teacher_cache(teacher_ckpt, tmp_path):
    from conftest import run_torchrun

    out, cache = str(tmp_path / "ddp"), str(tmp_path / "cache")
    proc = run_torchrun(["distill", *_student(teacher_ckpt, out, "--teacher-cache", cache, "--distill-type", "KD+FD",
                                              "--width-factor", "0.5")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("running the teacher once") == 1  # rank 0 built it, rank 1 waited and opened it
    rec = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert len(rec) == 1 and rec[0]["step"] == 2  # 64 images / (16 x 2 processes)
    assert json.load(open(os.path.join(cache, "meta.json")))["feature_shape"][0] == 256


def test_resume_with_another_teacher_is_refused(teacher_ckpt, tmp_path):
    cut = str(tmp_path / "cut")
    train(distill_cfg(_student(teacher_ckpt, cut, "--max-steps", "1")))
    other = str(tmp_path / "t2")
    train(config_from_argv(TINY + ["--model", "slak_pico", "-o", other, "--seed", "3", "--max-steps", "1"]))
    with pytest.raises(CheckpointError, match="another teacher"):
        train(distill_cfg(["--resume", os.path.join(cut, "checkpoint-last.pth"), "--teacher-checkpoint",
                           os.path.join(other, "model.safetensors")]))


def test_teacher_checkpoint_that_does_not_fit_is_one_line(teacher_ckpt, tmp_path, capsys):
    code = cli_main(["distill", *_student(teacher_ckpt, str(tmp_path / "s")), "--teacher", "slak_nano"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("slaknet distill: error:") and len(err.splitlines()) == 1
    assert "slak_nano" in err
    code = cli_main(["distill", *_student(str(tmp_path / "missing.pth"), str(tmp_path / "s2"))])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_timm_student_and_bad_options(teacher_ckpt, tmp_path):
    out = str(tmp_path / "r")
    s = train(distill_cfg(TINY + ["--model", "resnet10t", "--teacher-checkpoint", teacher_ckpt, "-o", out,
                                  "--distill-type", "NKD+FD", "--max-steps", "2", "--precision", "bf16"]))
    # (a non-finite loss under bf16 autocast would have stopped the run with NonFiniteLossError)
    assert s["steps"] == 2
    from safetensors.torch import load_file

    assert "conv1.0.weight" in load_file(os.path.join(out, "model.safetensors"))  # timm's resnet10t keys
    assert s["final_top1"] is None  # stopped by --max-steps before the first evaluation
    with pytest.raises(ConfigError, match="alpha"):
        distill_cfg(_student(teacher_ckpt, str(tmp_path / "x"), "--alpha", "2"))
    with pytest.raises(ConfigError, match="unknown --distill-type"):
        distill_cfg(_student(teacher_ckpt, str(tmp_path / "y"), "--distill-type", "XYZ"))


def test_demo_tiny_budget_writes_the_table(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli_main(["distill", "--budget", "tiny", "-o", out, "--threads", "1", "--progress", "false"]) == 0
    text = open(os.path.join(out, "results.md")).read()
    assert "student 7x7, alone" in text and "student 7x7, distilled" in text and "teacher slak_pico" in text
    res = json.load(open(os.path.join(out, "results.json")))
    assert len(res["alone"]) == len(res["distilled"]) == 1
    capsys.readouterr()
    assert cli_main(["distill", "--budget", "tiny", "-o", out, "--threads", "1"]) == 0  # finished runs reused
    assert "== distill demo" not in capsys.readouterr().out


def test_teacher_cache_built_once_matches_the_teacher_and_is_reused(teacher_ckpt, tmp_path, capsys):
    from slaknet.distill.teacher import load_teacher
    from slaknet.classify.task import build_datasets

    cache_dir = str(tmp_path / "cache")
    args = ["--teacher-cache", cache_dir, "--distill-type", "KD", "--alpha", "0.5"]
    train(distill_cfg(_student(teacher_ckpt, str(tmp_path / "a"), *args)))
    assert "running the teacher once over 64 training images" in capsys.readouterr().err
    train(distill_cfg(_student(teacher_ckpt, str(tmp_path / "b"), *args)))
    assert "running the teacher once" not in capsys.readouterr().err
    assert [r["train_loss"] for r in _log(str(tmp_path / "a"))] == [r["train_loss"] for r in _log(str(tmp_path / "b"))]
    # the cached logits are the teacher's on the fixed (unaugmented) training images
    from slaknet.distill.cache import TeacherCache
    import glob

    cfg = distill_cfg(_student(teacher_ckpt, str(tmp_path / "c"), *args))
    ds = build_datasets(cfg, fixed_train_transform=True).train
    teacher, _ = load_teacher(None, teacher_ckpt, 2)
    x = torch.stack([ds[i][0] for i in (0, 5, 63)])
    with torch.no_grad():
        ref = teacher(x)
    meta = json.load(open(os.path.join(cache_dir, "meta.json")))
    cache = TeacherCache(cache_dir, meta)
    assert glob.glob(os.path.join(cache_dir, "logits-*.npy"))
    torch.testing.assert_close(cache.get([0, 5, 63])[0], ref, rtol=1e-4, atol=1e-5)


def test_teacher_cache_refuses_mixup(teacher_ckpt, tmp_path, capsys):
    code = cli_main(["distill", *_student(teacher_ckpt, str(tmp_path / "s")), "--teacher-cache",
                     str(tmp_path / "c"), "--mixup", "0.8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mixup" in err and len(err.splitlines()) == 1


def test_yaml_config_holds_distillation_options_and_research_names(tmp_path):
    f = tmp_path / "kd.yaml"
    f.write_text("distill_type: NKDFD\nlr_fd: 3.0e-5\nT: 3.0\nepochs: 4\nteacher_checkpoint: t.pth\n")
    cfg = distill_cfg(["--config", str(f), "--alpha", "0.2"])
    o = cfg.task
    assert cfg.task_name == "distillation" and cfg.optim.epochs == 4
    assert o.distill_type == "NKDFD" and o.lr_fd == 3e-5 and o.distill_T == 3.0
    assert o.distill_alpha == 0.2 and o.teacher_checkpoint == "t.pth"
