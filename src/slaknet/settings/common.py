"""Options that many commands share and that are not training settings: each declared once here.

A command adds the ones it takes with :func:`slaknet.settings.add_setting` (``add_setting(parser,
CommonOptions, "checkpoint", default=None, required=True)``), overriding the help text where its use
differs. Training settings that other commands also take (``--device``, ``--threads``, ``--output-dir``,
``--data``, ``--batch-size``, ``--input-size``...) are added from their own sections
(:mod:`slaknet.settings.sections`) the same way, so one idea has one flag name everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from slaknet.settings.fields import setting

__all__ = ["CommonOptions", "REPARAM_FORMS"]

REPARAM_FORMS = ("strips", "dense", "none")


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """Checkpoint, output file, export format and inference-form options shared by eval, predict, export,
    convert, info, the analysis commands and the eval / predict / export sub-commands of segment and detect."""

    checkpoint: Optional[str] = setting(None, "checkpoint file: an official release .pth, or slaknet's .pth / "
                                              ".safetensors (architecture read from the file)", metavar="CKPT")
    output_file: Optional[str] = setting(None, "file to write", short=("-o",), metavar="FILE")
    format: str = setting("onnx", "export format: onnx (needs pip install '.[export]' in the clone), torchscript, "
                                  "exported-program, safetensors, or a format added with "
                                  "slaknet.deploy.register_format", metavar="FORMAT")
    json: bool = setting(False, "print the result as JSON")
    reparam: str = setting("none", "inference form: strips (BatchNorms and the small kernel folded into two strips "
                                   "per layer), dense (one kernel per layer) or none (as trained)",
                           choices=REPARAM_FORMS)
    ema: Optional[bool] = setting(None, "take the EMA weights (--no-ema: the raw weights; default: the raw weights "
                                        "when the file has both)")
    runtime: str = setting("auto", "inference runtime: torch (eager PyTorch), onnxruntime (an ONNX export of the "
                                   "reparameterized model, made once per model and cached under $SLAKNET_CACHE_DIR, "
                                   "else ~/.cache/slaknet; checked against torch on the first image, torch is used "
                                   "when they differ), auto (on the CPU with onnxruntime installed: the faster of "
                                   "the two for this model, timed once per machine; else torch)",
                           choices=("auto", "torch", "onnxruntime"))
    budget: str = setting("default", "size of the run: tiny (a smoke test), short, default, large",
                          choices=("tiny", "short", "default", "large"))
    seeds: Optional[int] = setting(None, "seeds per arm (default: the budget's)", low=1)
