"""The ``segmentation`` task's declaration: its options (the ``task`` section of its configuration), its
recipes and ``--recipe auto``. Torch-free (``slaknet segment train --help`` is built from it).

Recipes: ``seg_demo`` (the built-in data), ``seg_small`` (a small folder of small images on the CPU:
slak_pico, crop near the images' own size, epochs from the number of images) and ``ade20k`` (the paper's).

Defaults are the paper's ADE20K head and schedule (official SLaK / ConvNeXt mmseg configs); docs/segmentation.md
lists every option.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from slaknet.errors import ConfigError
from slaknet.settings import setting
from slaknet.train.tasks import Recipe, TaskSpec, register_spec

__all__ = ["SegmentationOptions", "SPEC", "BUILTIN_SEGMENTATION", "choose_recipe", "explain_recipe", "small_overrides"]

BUILTIN_SEGMENTATION = "builtin:contours"


@dataclasses.dataclass(frozen=True)
class SegmentationOptions:
    """The head, the crop and the schedule of a segmentation run."""

    arch: str = setting("upernet", "smp architecture around the SLaK encoder (upernet; fpn, deeplabv3plus, unet...)")
    decoder_channels: int = setting(512, "decoder width (paper UperNet: 512)", low=1)
    aux_weight: float = setting(0.4, "weight of the FCN auxiliary head on stage 3 (0 = no auxiliary head)", low=0.0)
    aux_channels: int = setting(256, "auxiliary head width", low=1)
    crop: Optional[int] = setting(512, "training crop of folder data and the evaluation window (null: the input size)",
                                  low=32)
    scale: List[float] = setting([0.5, 2.0], "random rescale range of folder data (low high, relative to a shorter "
                                             "side of --crop)", low=0.0, low_open=True)
    slide_stride: Optional[int] = setting(None, "sliding-window stride at evaluation (images larger than the crop; "
                                                "null: 2/3 of the crop)", low=1)
    reduce_zero_label: Optional[bool] = setting(None, "ignore mask label 0 and shift the others down by one "
                                                      "(ADE20K's reduce_zero_label); null: on for the ADE20K "
                                                      "layout (images/training + annotations/training), off "
                                                      "otherwise (0 is a class, e.g. background)")
    layer_decay: Optional[float] = setting(None, "stage-wise layer-wise lr decay rate (paper 0.9; null: off)", low=0.0,
                                           low_open=True, high=1.0)
    num_layers: int = setting(6, "layer groups of the decay rule", low=1)
    schedule: str = setting("cosine", "learning-rate schedule: poly (paper) or cosine", choices=("poly", "cosine"))
    poly_power: float = setting(1.0, "poly schedule power", low=0.0)
    warmup_ratio: float = setting(1e-6, "poly: the warm-up starts at lr x this", low=0.0)
    backbone_checkpoint: Optional[str] = setting(None, "SLaK classification checkpoint (official .pth or slaknet) "
                                                       "for the encoder", metavar="CKPT")

    def check(self) -> None:
        if len(self.scale) != 2 or not self.scale[0] <= self.scale[1]:
            raise ConfigError(f"--scale must be two values low high with 0 < low <= high, got {self.scale}")

    def check_config(self, cfg: Any) -> None:
        if cfg.model.finetune:
            raise ConfigError("--finetune: use --backbone-checkpoint CKPT for the encoder's classification weights")


# --recipe auto: folders of at least this many training pairs whose images are at least this large get the
# paper's ade20k recipe; smaller ones seg_small
BIG_PAIRS, BIG_SIDE = 1000, 256


def _facts(data: Optional[str]) -> Any:
    """:class:`slaknet.segment.folders.FolderFacts` of a folder ``data`` (None: built-in or not a folder)."""
    if data is None or str(data).startswith("builtin:") or str(data) == "contours":
        return None
    from slaknet.segment.folders import folder_facts

    return folder_facts(str(data))


def choose_recipe(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    """``--recipe auto``: seg_demo for the built-in data; for a folder, ade20k when it has at least
    ``BIG_PAIRS`` training pairs of images of at least ``BIG_SIDE`` px (short side, median of a sample),
    else seg_small; ade20k also for a folder it cannot read (the data error comes when the run starts)."""
    if data is None or str(data).startswith("builtin:") or str(data) == "contours":
        return "seg_demo"
    facts = _facts(data)
    if facts is None:
        return "ade20k"
    return "ade20k" if facts.pairs >= BIG_PAIRS and (facts.side or 0) >= BIG_SIDE else "seg_small"


def explain_recipe(data: Optional[str], recipe: str) -> str:
    """Why ``recipe`` for ``data`` (the run header): what ``--recipe auto`` saw and its rule."""
    facts = _facts(data)
    if facts is None:
        return ""
    auto = choose_recipe(data)
    rule = f"ade20k from {BIG_PAIRS} training pairs of >= {BIG_SIDE} px, else seg_small"
    if recipe == auto:
        return f"recipe {recipe} for {facts.describe()} (--recipe auto: {rule})"
    return f"recipe {recipe} as asked, for {facts.describe()} (--recipe auto would choose {auto}: {rule})"


def small_overrides(data: str) -> Dict[str, Any]:
    """seg_small's values that depend on the folder: crop = input size near the images' own short side
    (a multiple of 32, 32-256), epochs (~6000 images seen, 10-100), batch and data workers."""
    from slaknet.train.machine import cpu_cores

    facts = _facts(data)
    if facts is None:
        return {}
    out: Dict[str, Any] = {}
    if facts.side:
        side = min(256, max(32, int(round(facts.side / 32)) * 32))
        out.update(crop=side, input_size=side)
    n = max(facts.pairs, 1)
    out["epochs"] = int(min(100, max(10, round(6000 / n))))
    batch = 4
    while batch * 2 <= min(16, n // 10):  # >= 10 batches an epoch, powers of two up to 16
        batch *= 2
    out["batch_size"] = max(1, min(batch, n))
    out["num_workers"] = min(2, max(cpu_cores() - 1, 0))
    return out


RECIPES = (
    Recipe("seg_demo", "the CPU demo on the built-in contours set", dict(
        data=dict(data=BUILTIN_SEGMENTATION, input_size=64, num_workers=0, train_samples=1200, val_samples=200),
        model=dict(drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=6, batch_size=16, lr=2e-3, warmup_epochs=0.5),
        run=dict(threads="auto"),
        task=dict(decoder_channels=64, aux_channels=32, crop=None, schedule="cosine"))),
    Recipe("seg_small", "small image/mask folders on the CPU, sized from the data", dict(
        data=dict(input_size=64, num_workers=2),
        model=dict(model="slak_pico", drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=30, batch_size=8, lr=2e-3, warmup_epochs=1),
        run=dict(threads="auto"),
        task=dict(decoder_channels=64, aux_channels=32, crop=64, scale=[0.75, 1.5], schedule="cosine")),
        adapt=small_overrides),
    # official SLaK mmseg config: batch 16 = 4 per GPU x 4 GPUs there, 160k iterations
    Recipe("ade20k", "the paper's ADE20K UperNet recipe", dict(
        data=dict(input_size=512, num_workers=4),
        model=dict(model="slak_tiny", drop_path=0.4, layer_scale_init_value=1.0, width_factor=1.3,
                   kernel_size=[51, 49, 47, 13, 5], decompose=True),
        optim=dict(epochs=127, batch_size=4, update_freq=4, lr=1e-4, weight_decay=0.05, warmup_steps=1500,
                   warmup_epochs=0, min_lr=0.0),
        run=dict(sync_bn=True),
        task=dict(crop=512, scale=[0.5, 2.0], slide_stride=341, layer_decay=0.9, num_layers=6, schedule="poly",
                  poly_power=1.0, warmup_ratio=1e-6))),
)

SPEC = register_spec(TaskSpec(
    name="segmentation", options=SegmentationOptions, recipes=RECIPES, choose_recipe=choose_recipe,
    task_class="slaknet.segment.task:SegmentationTask", command="slaknet segment train",
    eval_command="slaknet segment eval", predict_command="slaknet segment predict",
    default_data=BUILTIN_SEGMENTATION, sections=("data", "model", "optim", "run", "sparse"),
    description="semantic segmentation: SLaK + UperNet"))
