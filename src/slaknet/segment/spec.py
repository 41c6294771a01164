"""The ``segmentation`` task's declaration: its options (the ``task`` section of its configuration), its
recipes and ``--recipe auto``. Torch-free (``slaknet segment train --help`` is built from it).

Defaults are the paper's ADE20K head and schedule (official SLaK / ConvNeXt mmseg configs); docs/segmentation.md
lists every option.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional

from slaknet.errors import ConfigError
from slaknet.settings import setting
from slaknet.train.tasks import Recipe, TaskSpec, register_spec

__all__ = ["SegmentationOptions", "SPEC", "BUILTIN_SEGMENTATION"]

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
    slide_stride: int = setting(341, "sliding-window stride at evaluation (images larger than --crop)", low=1)
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


def choose_recipe(data: Optional[str], given: Mapping[str, Any] = {}) -> str:
    """``--recipe auto``: seg_demo for the built-in data, else the paper's ade20k."""
    return "seg_demo" if data is None or str(data).startswith("builtin:") else "ade20k"


RECIPES = (
    Recipe("seg_demo", "the CPU demo on the built-in contours set", dict(
        data=dict(data=BUILTIN_SEGMENTATION, input_size=64, num_workers=0, train_samples=1200, val_samples=200),
        model=dict(drop_path=0.0, fit_kernels=True),
        optim=dict(epochs=6, batch_size=16, lr=2e-3, warmup_epochs=0.5),
        run=dict(threads="auto"),
        task=dict(decoder_channels=64, aux_channels=32, crop=None, schedule="cosine"))),
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
