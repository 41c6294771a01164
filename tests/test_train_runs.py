"""Run management of ``slaknet train`` as a user meets it: resume, output folders, Ctrl-C, counts, messages,
recipes (issue 17). Tiny runs: slak_pico at 32 px, 64 images."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import yaml
import torch

from conftest import subprocess_env
from slaknet.cli import main as cli_main
from slaknet.errors import CheckpointError, ConfigError
from slaknet.train.engine import train
from slaknet.train.config import config_from_argv

TINY = ["--train-samples", "64", "--val-samples", "32", "--input-size", "32", "-b", "16", "--epochs", "2",
        "-u", "2", "--progress", "false", "--tensorboard", "false", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _env():
    return subprocess_env()


def _log(out):
    return [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]


# ----------------------------------------------------------------------------------------------- resume ----
def test_resume_restores_settings_and_run_folder(tmp_path, capsys):
    out = str(tmp_path / "run")
    train(config_from_argv(TINY + ["--epochs", "1", "-o", out, "--seed", "5"]))
    capsys.readouterr()
    ck = os.path.join(out, "checkpoint-last.pth")
    cfg = config_from_argv(["--resume", ck, "--epochs", "2"])  # nothing else repeated
    err = capsys.readouterr().err
    assert cfg.output_dir == out and cfg.train_samples == 64 and cfg.input_size == 32 and cfg.seed == 5
    assert cfg.batch_size == 16 and cfg.update_frequency == 2 and cfg.epochs == 2
    assert "overridden on the command line: epochs 1 -> 2" in err
    train(cfg)
    assert [r["epoch"] for r in _log(out)] == [0, 1]  # one run's log, continued in its own folder


def test_mid_epoch_resume_reports_the_whole_epochs_loss(tmp_path, capsys):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "cut")
    train(config_from_argv(TINY + ["-o", ref]))
    train(config_from_argv(TINY + ["-o", out, "--max-steps", "2"]))  # stops after batch 2 of epoch 1's 4
    done = capsys.readouterr().out
    assert "stopped by --max-steps 2 at step 2, epoch 1/2" in done and "no evaluation yet" in done
    train(config_from_argv(["--resume", os.path.join(out, "checkpoint-last.pth")]))
    assert "continuing at epoch 1/2, batch 2/4 (step 2)" in capsys.readouterr().out
    a, b = _log(ref), _log(out)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # over all 4 batches, not the last 2
    assert a[-1]["val_top1"] == b[-1]["val_top1"]


# ------------------------------------------------------------------------------------------ run folders ----
def test_existing_run_folder_is_refused_then_overwritten(tmp_path):
    out = str(tmp_path / "run")
    train(config_from_argv(TINY + ["--epochs", "1", "-o", out]))
    with pytest.raises(ConfigError, match=r"not empty .*--resume .*checkpoint-last.pth or --auto-resume.*--overwrite"):
        train(config_from_argv(TINY + ["--max-steps", "1", "-o", out]))
    assert [r["epoch"] for r in _log(out)] == [0]
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    train(config_from_argv(TINY + ["--max-steps", "1", "-o", out, "--overwrite"]))
    names = set(os.listdir(out))
    assert "log.jsonl" not in names and "checkpoint-best.pth" not in names and "curves.png" not in names
    assert {"checkpoint-last.pth", "notes.txt", "model.safetensors"} <= names


def test_failed_run_leaves_no_folder(tmp_path, capsys):
    d = tmp_path / "d"
    for split in ("train", "val"):
        os.makedirs(d / split / "empty")
    out = tmp_path / "o"
    assert cli_main(["train", "--data", str(d), "-o", str(out)]) == 2
    assert "holds no images" in capsys.readouterr().err and not out.exists()


# -------------------------------------------------------------------------------------------- Ctrl-C ----
def test_sigint_writes_checkpoint_and_prints_resume_command(tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--epochs", "200", "-o", out]
    proc = subprocess.Popen([sys.executable, "-m", "slaknet", "train", *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until training runs (the first epoch's line)
            if line.startswith("epoch 1/200"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert f"resume with: slaknet train --resume {os.path.join(out, 'checkpoint-last.pth')}" in err
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    done_epochs = len(_log(out))
    assert ck["step"] >= 4 and ck["epoch"] * 4 + ck["batch_in_epoch"] == ck["step"] and ck["epoch"] >= done_epochs


# ------------------------------------------------------------------------------------ counts, metadata ----
def _folder(root, side=40, n=6, corrupt=True):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, k in (("train", n), ("val", 3)):
        for ci, c in enumerate(("cat", "dog")):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(k):
                arr = rng.integers(0, 100, (side, side + 4, 3), dtype=np.uint8) + 150 * ci
                Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, split, c, f"{i}.jpg"))
    if corrupt:
        with open(os.path.join(root, "train", "cat", "broken.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 truncated")


def test_corrupt_file_counted_once_over_epochs_and_stored(tmp_path, capsys, caplog):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    _folder(data)
    with caplog.at_level(logging.WARNING, logger="slaknet.train"):
        s = train(config_from_argv(["--data", data, "--input-size", "32", "-b", "4", "--epochs", "3", "-j", "0",
                                    "--progress", "false", "--tensorboard", "false", "-o", out]))
    assert "broken.jpg" in caplog.text and "UserWarning" not in caplog.text  # one logged line
    assert s["bad_images"] == 1 and s["bad_files"] == [os.path.join(data, "train", "cat", "broken.jpg")]
    assert [r["bad_images"] for r in _log(out)] == [1, 1, 1]
    assert "skipped 1 unreadable file" in capsys.readouterr().out
    ck = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert ck["bad_files"] == s["bad_files"]
    # what eval / predict / info need: input size, class names, normalisation (checkpoint and safetensors)
    assert ck["config"]["input_size"] == 32 and ck["classes"] == ["cat", "dog"]
    assert ck["config"]["mean"] == pytest.approx([0.485, 0.456, 0.406]) and len(ck["config"]["std"]) == 3
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["input_size"] == "32" and json.loads(md["classes"]) == ["cat", "dog"]
    assert json.loads(md["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(md["std"]) == pytest.approx([0.229, 0.224, 0.225])


# ---------------------------------------------------------------------------------------------- messages ----
def test_header_and_epoch_lines(tmp_path, capsys):
    train(config_from_argv(TINY + ["--epochs", "1", "-o", str(tmp_path / "r")]))
    out = capsys.readouterr().out
    assert "kernels 15 7 7 7, small kernel N=5" in out and "[15, 7, 7, 7, 5]" not in out
    assert "sparsity 0.40 (u=2" in out and "density," not in out.splitlines()[1]
    assert "(1 thread)" in out and "recipe demo: input 32 px" in out and "0 data workers" in out
    assert "top-5" not in out and "val top-1" in out  # 2 classes: top-1 only


def test_plain_progress_lines_without_a_terminal(tmp_path):
    args = [a for a in TINY if a not in ("--progress", "false")] + ["--epochs", "1", "-o", str(tmp_path / "r")]
    # a cache folder of its own: the built-in images are not on disk yet, so the first epoch renders them
    env = dict(_env(), SLAKNET_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "slaknet", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 1/1: batch 1/4" in proc.stderr and "first epoch also renders" in proc.stderr


def test_flag_errors(capsys):
    with pytest.raises(ConfigError, match="--threads must be a positive integer"):
        config_from_argv(["--threads", "0"])
    with pytest.raises(SystemExit):
        cli_main(["train", "--epoch", "2"])  # no abbreviation of --epochs
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown task 'segmentation-xyz'"):
        import slaknet

        slaknet.config("segmentation-xyz")


def test_update_frequency_help_names_the_demo_value(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    assert "recipes: demo 25, small 25" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------------------------- recipes ----
def test_auto_recipe_fits_a_small_folder(tmp_path, capsys):
    from slaknet.train.machine import cpu_cores

    data = str(tmp_path / "data")
    _folder(data, side=40, corrupt=False)
    cfg = config_from_argv(["--data", data])
    assert cfg.recipe == "small" and cfg.input_size == 32 and cfg.sparse.enabled is True
    assert cfg.mixup == 0 and cfg.cutmix == 0 and cfg.aa is None and cfg.epochs <= 100
    assert cfg.num_workers <= cpu_cores() and cfg.batch_size <= 12
    assert config_from_argv(["--data", data, "--recipe", "imagenet"]).input_size == 224


def test_auto_recipe_imagenet_only_for_big_folders_of_big_images(monkeypatch, tmp_path):
    from slaknet.classify import spec as recipes

    monkeypatch.setattr(recipes, "inspect_folder", lambda root, sample=8: recipes.FolderInfo(1_281_167, 1000, 375))
    assert recipes.choose_recipe(str(tmp_path)) == "imagenet"
    monkeypatch.setattr(recipes, "inspect_folder", lambda root, sample=8: recipes.FolderInfo(1_800, 10, 32))
    assert recipes.choose_recipe(str(tmp_path)) == "small"
    assert recipes.choose_recipe("builtin:insideness") == "demo"


def test_workers_never_exceed_cores(monkeypatch):
    from slaknet.train import machine

    monkeypatch.setattr(machine, "cpu_cores", lambda: 2)
    assert machine.cap_workers(8) == 2 and machine.cap_workers(0) == 0


# values of the official SLaK README commands (ImageNet-1K, 300 epochs, lr 4e-3, EMA evaluated)
PAPER = {
    "slak_t": dict(model="slak_tiny", update_frequency=2000, prune_rate=0.5, drop_path=0.1, batch_size=128, gpus=4),
    "slak_s": dict(model="slak_small", update_frequency=100, prune_rate=0.3, drop_path=0.4, batch_size=64, gpus=8),
    "slak_b": dict(model="slak_base", update_frequency=100, prune_rate=0.3, drop_path=0.5, batch_size=32, gpus=16),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_recipes_resolve_to_the_official_commands(name, capsys):
    want = dict(PAPER[name])
    gpus = want.pop("gpus")
    assert cli_main(["train", "--recipe", name, "--data", "/data/imagenet", "--print-config"]) == 0
    printed = capsys.readouterr().out
    cfg = config_from_argv(["--recipe", name, "--data", "/data/imagenet"])
    assert cfg.as_dict() == yaml.safe_load(printed)  # --print-config shows the resolved tree
    for k, v in want.items():
        assert cfg[k] == v, k
    assert cfg["sparse"] is True and cfg["sparsity"] == 0.4 and cfg["sparse_init"] == "snip"
    assert cfg["growth"] == "random" and cfg["width_factor"] == 1.3 and cfg["decompose"] is True
    assert cfg["kernel_size"] == [51, 49, 47, 13, 5] and cfg["epochs"] == 300 and cfg["lr"] == 4e-3
    assert cfg["model_ema"] is True and cfg["model_ema_eval"] is True and cfg["update_freq"] == 8
    assert cfg["batch_size"] * gpus * cfg["update_freq"] == 4096  # the effective batch lr 4e-3 is meant for


def test_every_train_flag_is_a_typed_config_field():
    from slaknet.classify.cli import add_arguments
    from slaknet.classify.spec import SPEC
    from slaknet.settings import SettingsParser
    from slaknet.train.config import command_keys

    p = SettingsParser()
    add_arguments(p)
    cli_only = {"help", "dump_samples", "dump_count", "print_config", "config", "recipe", "refused_bn", "refused_eval"}
    dests = {a.dest for a in p._actions} - cli_only
    assert dests == set(command_keys(SPEC)), dests ^ set(command_keys(SPEC))
    cfg = config_from_argv([])
    with pytest.raises(Exception):
        cfg.epochs = 3  # frozen: never edited after validation
    assert cfg.replace(epochs=3).epochs == 3 and cfg.epochs == 6
    with pytest.raises(ConfigError, match="--epochs must be >= 1"):
        cfg.replace(epochs=0)


def test_training_order_is_a_function_of_seed_and_epoch():
    from slaknet.train.samplers import SkipSampler, train_sampler

    for world in (1, 2):
        for rank in range(world):
            s = train_sampler(range(10), seed=3, rank=rank, world=world)
            s.set_epoch(4)
            g = torch.Generator()
            g.manual_seed(3 * 1_000_003 + 4)  # independent: the permutation, padded by wrap-around, strided
            order = torch.randperm(10, generator=g).tolist()
            per = -(-10 // world)
            order = (order * 2)[:per * world]
            assert list(s) == order[rank::world]
            assert list(SkipSampler(s, 2)) == order[rank::world][2:]


def test_header_says_how_many_large_kernel_weights_are_sparse(tmp_path, capsys):
    # slak_pico has 1+1+2+1 = 5 blocks, each with two strip weights (LoRA1, LoRA2): 10 large-kernel weights
    for extra, expected in (([], "10 of 10 large-kernel weights"),
                            (["--sparse-layers", "large_kernel"], "10 of 10 large-kernel weights"),
                            (["--sparse-init", "ERK", "--erk-power-scale", "1", "--sparse-layers", "all"],
                             "0 of 10 large-kernel weights")):
        out = str(tmp_path / ("run" + "_".join(extra)))
        train(config_from_argv(TINY + ["--max-steps", "1", "-o", out] + extra))
        header = [line for line in capsys.readouterr().out.splitlines() if "sparse layers:" in line]
        assert len(header) == 1 and expected in header[0], header


# ------------------------------------------------------------------------------------ exact resume ----
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_resume_mid_epoch_with_data_workers_is_exact(tmp_path, monkeypatch, workers):
    """Random crops / flips made in worker processes, a SIGKILL mid-epoch, --auto-resume: the same weights."""
    from conftest import run_killed_at_step

    monkeypatch.setenv("SLAKNET_LINEAR", "onednn")  # the two processes must use the same 1x1 GEMM
    data = str(tmp_path / "data")
    _folder(data, side=40, n=8, corrupt=False)
    args = ["--data", data, "--recipe", "small", "--input-size", "32", "-b", "4", "--epochs", "2", "-j",
            str(workers), "--ckpt-every-steps", "1", "--seed", "2", "--threads", "1", "--progress", "false",
            "--tensorboard", "false", "--no-sparse"]
    ref = str(tmp_path / "ref")
    train(config_from_argv(args + ["-o", ref]))
    out = str(tmp_path / "killed")
    proc = run_killed_at_step("from slaknet.train.config import config_from_argv\ncfg = config_from_argv(argv)",
                              [*args, "-o", out], step=5)  # 4 steps an epoch: killed in the second epoch
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    mid = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert mid["epoch"] == 1 and mid["batch_in_epoch"] == 1
    train(config_from_argv(args + ["-o", out, "--auto-resume"]))
    a = torch.load(os.path.join(ref, "checkpoint-last.pth"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoint-last.pth"), weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["val_top1"] for h in a["history"]] == [h["val_top1"] for h in b["history"]]


def test_auto_resume_of_a_finished_run_changes_nothing_and_other_tasks_are_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    args = TINY + ["--epochs", "1", "--max-steps", "1000", "-o", out]
    first = train(config_from_argv(args))
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in ("checkpoint-last.pth", "summary.json",
                                                                  "model.safetensors", "log.jsonl")}
    capsys.readouterr()
    again = train(config_from_argv(args + ["--auto-resume"]))
    err = capsys.readouterr().err
    assert "is finished (1/1 epochs): nothing to do" in err and again["already_finished"] is True
    assert again["final_top1"] == first["final_top1"]
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in before} == before
    with pytest.raises(CheckpointError, match="checkpoint of a classification run, not distillation"):
        train(config_from_argv(args + ["--auto-resume", "--teacher-checkpoint", os.path.join(out, "model.safetensors")],
                               "distillation"))


def test_too_small_input_and_single_class_folders_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="--input-size 16 is smaller than slak_pico's total stride 32"):
        config_from_argv(["--input-size", "16", "-o", str(out)])
    assert cli_main(["train", "--input-size", "24", "-o", str(out)]) == 2
    assert "total stride 32" in capsys.readouterr().err and not out.exists()
    data = str(tmp_path / "one")
    _folder(data, side=40, n=4, corrupt=False)
    import shutil

    for split in ("train", "val"):
        shutil.rmtree(os.path.join(data, split, "dog"))
    assert cli_main(["train", "--data", data, "--input-size", "32", "-b", "2", "-j", "0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has 1 class ('cat'): classification needs at least 2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # the folder made for the run is removed again


def test_user_mistakes_are_one_line_with_the_fix_named(tmp_path, capsys):
    from slaknet.checkpoints.reader import read_checkpoint

    assert cli_main(["train", "--data", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r")]) == 2
    assert "data folder" in capsys.readouterr().err and not (tmp_path / "r").exists()
    good = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(3)}}, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="damaged or not a PyTorch checkpoint .*copy or download it again"):
        read_checkpoint(str(tmp_path / "cut.pth"))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    out = str(tmp_path / "run")
    train(config_from_argv(TINY + ["--epochs", "1", "--max-steps", "1", "-o", out]))
    from slaknet.data import InsidenessDataset, dump_pngs

    dump_pngs(InsidenessDataset("val", 1, 32), str(tmp_path / "imgs"), 1)
    png = next((tmp_path / "imgs").glob("*.png"))
    capsys.readouterr()
    rc = cli_main(["predict", str(tmp_path / "bad.jpg"), str(png), "--checkpoint", os.path.join(out, "model.safetensors")])
    captured = capsys.readouterr()
    assert rc == 2 and str(png) in captured.out and "could not be read" in captured.err  # the good one is done
