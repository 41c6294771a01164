"""The typed configuration (issue: one home for every setting): the Python API and the commands resolve to the
same configuration for every task and recipe, each command lists only its own recipes and options, and bad
input is a one-line error."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

import slaknet
from slaknet.cli import main as cli_main
from slaknet.errors import ConfigError
from slaknet.train.config import Config, command_keys, config_from_argv, config_from_stored, key_index
from slaknet.train.tasks import task_specs

# tasks whose command is generated from the configuration (the study runner configures its runs itself)
TRAINED = [s for s in task_specs().values() if s.name != "study"]
CASES = [(s.name, r) for s in TRAINED for r in s.recipe_names]


def _argv(spec):
    return spec.command.split()[1:]  # "slaknet segment train" -> ["segment", "train"]


def _flags(options):
    out = []
    for k, v in options.items():
        out.append("--" + k.replace("_", "-"))
        out += [str(x) for x in v] if isinstance(v, list) else [str(v)]
    return out


@pytest.mark.parametrize("task,recipe", CASES)
def test_python_api_and_command_line_give_the_same_configuration(task, recipe, capsys, tmp_path):
    spec = task_specs()[task]
    options = dict(epochs=2, batch_size=4, output_dir=str(tmp_path / "run"), seed=3, sparsity=0.3)
    if task == "distillation":
        options["teacher_checkpoint"] = "teacher.safetensors"
    cfg = slaknet.config(task, recipe=recipe, **options)
    assert isinstance(cfg, Config) and cfg.task_name == task and cfg.recipe == recipe
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.run.seed, cfg.sparse.sparsity) == (2, 4, 3, 0.3)
    argv = ["--recipe", recipe, *_flags(options)]
    assert config_from_argv(argv, task) == cfg
    assert cli_main([*_argv(spec), *argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed) == cfg.as_dict()
    # what --print-config writes, --config reads back to the same configuration
    path = tmp_path / "cfg.yaml"
    path.write_text(printed)
    assert slaknet.config(task, config=str(path)) == dataclasses.replace(cfg, config=str(path))


@pytest.mark.parametrize("spec", TRAINED, ids=lambda s: s.name)
def test_each_command_lists_only_its_own_recipes_and_options(spec, capsys):
    with pytest.raises(SystemExit):
        cli_main([*_argv(spec), "--help"])
    import re

    text = " ".join(capsys.readouterr().out.split())
    choices = re.search(r"--recipe \{([^}]*)\}", text).group(1).split(",")
    assert choices == ["auto", *spec.recipe_names]
    own = {"--" + k.replace("_", "-") for k in command_keys(spec)}
    for other in TRAINED:
        for key in set(command_keys(other)) - set(command_keys(spec)):
            assert f"--{key.replace('_', '-')} " not in text + " ", key
    assert all(flag in text for flag in own)


def test_keys_are_unique_and_each_default_is_declared_once():
    for spec in task_specs().values():
        index = key_index(spec)  # raises if two sections declare one key
        assert {"data", "model", "sparse", "sparsity", "lr", "output_dir"} <= set(index)
    # a default lives on its field: recipes only list what differs, and Python / CLI / YAML read it there
    from slaknet.sparse import SparseConfig

    assert slaknet.config("classification", recipe="imagenet", data="/x").sparse.sparsity == SparseConfig().sparsity


def test_typed_one_line_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--epochs needs an integer, got 'many'"):
        slaknet.config("classification", epochs="many")
    with pytest.raises(ConfigError, match="--crop is an option of `slaknet segment train`"):
        slaknet.config("classification", crop=128)
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        slaknet.config("classification", epoch=3)
    with pytest.raises(ConfigError, match="--lr must be >= 0"):
        slaknet.config("classification", lr=-1)
    bad = tmp_path / "bad.yaml"
    for text, message in (("epochz: 3\n", "unknown option 'epochz'"),
                          ("epochs: three\n", "--epochs needs an integer, got 'three'"),
                          ("optim:\n  lr: fast\n", "--lr needs a number"),
                          ("detector: fcos\n", "--detector is an option of `slaknet detect train`"),
                          ("task_name: detection\n", "it configures task 'detection'")):
        bad.write_text(text)
        assert cli_main(["train", "--config", str(bad), "--print-config"]) == 2, text
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (text, err)
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--anchor-sizes", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an option of `slaknet detect train`" in err


def test_official_and_older_spellings_from_one_table(tmp_path):
    cfg = config_from_argv(["--data_path", "/data/imagenet", "--nb_classes", "10", "--Decom", "True",
                            "--use_amp", "true", "-u", "50", "--batch_size", "8"])
    assert (cfg["data"], cfg["num_classes"], cfg["decompose"], cfg["precision"], cfg["update_frequency"],
            cfg["batch_size"]) == ("/data/imagenet", 10, True, "amp", 50, 8)
    assert slaknet.config("classification", data_path="/d", nb_classes=3)["num_classes"] == 3
    seg = config_from_argv(["--pretrained", "cls.pth"], "segmentation")
    assert seg.task.backbone_checkpoint == "cls.pth"
    y = tmp_path / "official.yaml"
    y.write_text("data_path: /d\nbatch_size: 16\nDecom: true\nbn: true\n")
    assert slaknet.config("classification", config=str(y))["batch_size"] == 16


def test_checkpoint_configs_of_earlier_versions_are_read(tmp_path):
    # the flat layout every earlier slaknet wrote: option keys, the plan's values, task options apart
    old = {"task": "segmentation", "recipe": "seg_demo", "model": "slak_pico", "sparse": True, "sparsity": 0.3,
           "sparse_layers": "all", "resolved_lr": 0.002, "batches_per_epoch": 7, "bn": None, "eval_only": None,
           "task_options": {"pretrained": "enc.pth", "crop": None, "decoder_channels": 64}}
    flat = config_from_stored(old)
    assert flat["backbone_checkpoint"] == "enc.pth" and flat["sparse"] is True and "resolved_lr" not in flat
    cfg = slaknet.config("segmentation", **flat)
    assert cfg.task.decoder_channels == 64 and cfg.sparse.enabled and cfg.sparse.sparsity == 0.3
    stored = cfg.to_stored()
    assert stored["task"] == "segmentation" and stored["task_options"]["decoder_channels"] == 64
    assert config_from_stored(stored) == {k: v for k, v in cfg.items()}


def test_replace_is_validated_and_nested_access_is_typed():
    cfg = slaknet.config("segmentation", recipe="seg_demo", epochs=1, output_dir="runs/x")
    assert cfg.sparse.sparsity == 0.4 and cfg.optim.lr == 2e-3 and cfg.task.decoder_channels == 64
    assert cfg.replace(epochs=3).optim.epochs == 3 and cfg.optim.epochs == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="--epochs must be >= 1"):
        cfg.replace(epochs=0)
    assert cfg["data"] == cfg.data.source == "builtin:contours" and cfg["model"] == cfg.model.name
