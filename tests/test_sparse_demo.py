"""The demo and small recipes train SLaK's large kernels sparse (checked from the saved weights), the run header
and summary.json name the large-kernel, sparse-layer and whole-model densities, and a sparse run that leaves
every large kernel dense by default is refused. Tiny runs: slak_pico at 32 px, one optimizer step."""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import pytest
from safetensors.torch import load_file

from slaknet.cli import main as cli_main
from slaknet.errors import ConfigError
from slaknet.train.config import config_from_argv
from slaknet.train.trainer import Trainer

TINY = ["--train-samples", "64", "--val-samples", "32", "--input-size", "32", "-b", "16", "--epochs", "1",
        "-u", "2", "--max-steps", "1", "--progress", "false", "--tensorboard", "false", "--threads", "1"]
STRIPS = (".LoRA1.", ".LoRA2.", ".lkb_origin.")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _folder(root: str) -> None:
    """A small two-class image folder (chosen as the ``small`` recipe by ``--recipe auto``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, k in (("train", 16), ("val", 4)):
        for ci, c in enumerate(("cat", "dog")):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(k):
                arr = rng.integers(0, 100, (40, 44, 3), dtype=np.uint8) + 150 * ci
                Image.fromarray(arr.astype(np.uint8)).save(os.path.join(root, split, c, f"{i}.jpg"))


def _fit(argv) -> Trainer:
    tr = Trainer(config_from_argv(argv))
    tr.fit()
    return tr


def _zeros(path: str) -> Dict[str, Tuple[int, int]]:
    """``{name: (exact zeros, numel)}`` of every parameter tensor in a safetensors file (buffers left out)."""
    return {k: (int((v == 0).sum()), v.numel()) for k, v in load_file(path).items() if not k.endswith(BUFFERS)}


def _is_strip(name: str) -> bool:
    return name.endswith(".conv.weight") and any(s in name for s in STRIPS)


def _density(zeros: Dict[str, Tuple[int, int]], names) -> float:
    names = list(names)
    return 1 - sum(zeros[n][0] for n in names) / sum(zeros[n][1] for n in names)


@pytest.mark.parametrize("recipe", ["demo", "small"])
def test_recipe_makes_every_large_kernel_weight_sparse_in_the_saved_file(recipe, tmp_path):
    out = str(tmp_path / "run")
    argv = TINY + ["-o", out]
    if recipe == "small":
        _folder(str(tmp_path / "data"))
        argv += ["--data", str(tmp_path / "data"), "-j", "0", "-b", "8"]
    tr = _fit(argv)
    assert tr.cfg.recipe == recipe and tr.engine is not None
    reported = tr.engine.density_report()["layers"]  # the density the engine gave each layer
    zeros = _zeros(os.path.join(out, "model.safetensors"))
    strips = [n for n in zeros if _is_strip(n)]
    assert len(strips) == 10  # slak_pico: 5 blocks x (LoRA1, LoRA2)
    checked = strips + [n for n in zeros if ".small_conv.conv." in n and reported.get(n, 1.0) < 1.0]
    for name in checked:
        z, numel = zeros[name]
        assert reported[name] < 1.0, name
        assert z == round((1 - reported[name]) * numel) and z > 0, (name, z, numel, reported[name])


def test_header_and_summary_name_the_three_densities(tmp_path, capsys):
    out = str(tmp_path / "run")
    tr = _fit(TINY + ["-o", out])
    text = capsys.readouterr().out
    zeros = _zeros(os.path.join(out, "model.safetensors"))
    assert set(zeros) == {n for n, _ in tr.model.named_parameters()}
    mine = {"large_kernel_density": _density(zeros, (n for n in zeros if _is_strip(n))),
            "sparse_layers_density": _density(zeros, (n for n, _ in tr.engine.candidates)),
            "model_density": _density(zeros, zeros)}
    assert mine["large_kernel_density"] < 0.99 and mine["model_density"] < 0.7  # the demo is sparse, kernels too

    header = [line for line in text.splitlines() if line.strip().startswith("sparse layers:")]
    assert len(header) == 1 and "10 of 10 large-kernel weights" in header[0], header
    m = re.search(r"density \(non-zero fraction\): large-kernel weights ([\d.]+), sparse layers ([\d.]+), "
                  r"whole model ([\d.]+)", header[0])
    assert m, header[0]
    for key, shown in zip(mine, m.groups()):
        assert shown == f"{mine[key]:.3f}", (key, shown, mine[key])

    s = json.load(open(os.path.join(out, "summary.json")))
    for key, value in mine.items():
        assert s[key] == pytest.approx(value, abs=1e-9), key
    assert s["nonzero_params"] == sum(n - z for z, n in zeros.values())
    done = next(line for line in text.splitlines() if line.strip().startswith("params "))
    assert f"large-kernel weights {mine['large_kernel_density']:.3f}" in done
    assert f"whole model {mine['model_density']:.3f}" in done


def test_dense_large_kernels_by_default_are_refused_explicit_layers_respected(tmp_path, capsys):
    out = str(tmp_path / "erk")
    with pytest.raises(ConfigError, match=r"--sparse-init ERK at sparsity 0.4 leaves all 10 large-kernel weights "
                                          r"dense .*--sparse-init snip.*--sparse-layers large_kernel"):
        Trainer(config_from_argv(TINY + ["-o", out, "--sparse-init", "ERK", "--erk-power-scale", "1"])).fit()
    assert not os.path.exists(out)  # refused before the run folder is kept
    capsys.readouterr()
    assert cli_main(["train", *TINY, "-o", out, "--sparse-init", "ERK", "--erk-power-scale", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leaves all 10 large-kernel weights dense" in err
    # an explicit --sparse-layers (even the default value) is the user's choice
    tr = _fit(TINY + ["-o", out, "--sparse-init", "ERK", "--erk-power-scale", "1", "--sparse-layers", "all"])
    assert tr.engine.density_report()["large_kernel"] == {"sparse": 0, "dense": 10}
    header = [line for line in capsys.readouterr().out.splitlines() if "sparse layers:" in line]
    assert "0 of 10 large-kernel weights" in header[0] and "large-kernel weights 1.000" in header[0]


def test_registered_init_is_respected(tmp_path, capsys):
    from slaknet.sparse import InitRule, register_init
    from slaknet.sparse import init_rules as init_mod

    class StripsDense(InitRule):
        def counts(self, engine, density, batch, loss):
            return {n: p.numel() if any(s in n for s in STRIPS) else max(1, int(density * p.numel()))
                    for n, p in engine.candidates}

    register_init("strips_dense_test")(StripsDense)
    try:
        tr = _fit(TINY + ["-o", str(tmp_path / "r"), "--sparse-init", "strips_dense_test"])
    finally:
        init_mod._INIT.entries.pop("strips_dense_test", None)
    assert tr.engine.density_report()["large_kernel"] == {"sparse": 0, "dense": 10}
    header = [line for line in capsys.readouterr().out.splitlines() if "sparse layers:" in line]
    assert "0 of 10 large-kernel weights" in header[0] and "large-kernel weights 1.000" in header[0]


def test_summary_of_a_dense_run_has_the_model_density(tmp_path):
    out = str(tmp_path / "dense")
    _fit(TINY + ["-o", out, "--no-sparse"])
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["model_density"] == pytest.approx(s["nonzero_params"] / s["params"]) and "density" not in s


def test_header_says_why_auto_chose_the_recipe_and_the_erk_power_scale(tmp_path, capsys):
    """A folder run's header names the recipe auto chose, what it saw (images, classes, size) and its rule;
    the demo's mask initialisation is named with its power scale (plain "ERK" would be another rule)."""
    _folder(str(tmp_path / "data"))
    _fit(TINY + ["-o", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "-j", "0", "-b", "8"])
    text = capsys.readouterr().out
    # 2 classes x 16 training images of 40 x 44 px (the short side: 40)
    assert "recipe small for 32 training images, 2 classes, ~40 px (--recipe auto: imagenet for >= 100,000" in text
    assert "ERK power scale 0.3" in text
    _fit(TINY + ["-o", str(tmp_path / "run2"), "--data", str(tmp_path / "data"), "-j", "0", "-b", "8",
                 "--recipe", "demo"])
    assert "recipe demo as asked, for 32 training images" in capsys.readouterr().out
