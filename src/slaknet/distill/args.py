"""Command-line options of knowledge distillation, with the research code's flag names (no torch here).

The research repository (VITA-Group/SLaK, ``main_KD.py``) spells its options ``--distill_type``,
``--alpha``, ``--T``, ``--hard``, ``--lr_fd``, ``--FDLoss_type``, ``--target_Lnorm``, ``--feature_n``; they
are accepted as written, next to slaknet's kebab-case names (``--distill-type`` ...). Every option defaults
to ``None`` on the parser so a YAML ``--config`` can fill it; :func:`resolve_distill_config` then applies
the research code's defaults and validates, raising :class:`~slaknet.errors.ConfigError` (one line).

This module imports no torch, so building the CLI parser stays cheap.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from slaknet.errors import ConfigError

__all__ = ["add_distill_arguments", "add_teacher_arguments", "resolve_distill_config", "parse_distill_type",
           "DISTILL_DEFAULTS", "LOGIT_LOSS_NAMES", "FEATURE_LOSS_NAMES", "FD_LOSS_TYPES"]

# built-in names (losses.py registers the classes under the same names; extra registered names are
# accepted by ``slaknet.distill.losses.build_distill_loss``)
LOGIT_LOSS_NAMES: Tuple[str, ...] = ("KD", "NKD")
FEATURE_LOSS_NAMES: Tuple[str, ...] = ("FD",)
FD_LOSS_TYPES: Tuple[str, ...] = ("smoothL1", "MSE")

# research defaults (main_KD.py / engine_kd.py at VITA-Group/SLaK e06ad3e)
DISTILL_DEFAULTS: Dict[str, Any] = {
    "distill_type": "KD",      # --distill_type default 'KD'
    "distill_alpha": 0.1,      # --alpha 0.1: KD weight of the KL term
    "distill_T": 1.0,          # --T 1.0: KD temperature
    "distill_hard": False,     # --hard
    "nkd_T": 1.0,              # NKDLoss(temp=1.0): the research engine never passes --T to NKD
    "nkd_alpha": 1.0,          # NKDLoss(alpha=1.0)
    "lr_fd": 1.0,              # --lr_fd 1.0 (the README's NKD commands pass 3e-5, unused without FD)
    "fd_loss": "smoothL1",     # --FDLoss_type smoothL1 | MSE
    "fd_beta": 2.0,            # nn.SmoothL1Loss(beta=2.0)
    "target_lnorm": False,     # --target_Lnorm
    "feature_n": 1,            # --feature_n 1: last stage only
    "teacher_cache": None,
    "teacher_cache_dtype": "float32",
}


def _str2bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(v).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def _flag(g: Any, *names: str, dest: str, help: str) -> None:
    """``--x`` alone means true (like the research code's store_true), ``--x false`` is accepted too."""
    g.add_argument(*names, dest=dest, type=_str2bool, nargs="?", const=True, default=None, help=help)


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the distillation-loss and teacher-cache options (research names accepted as aliases)."""
    g = parser.add_argument_group("distillation loss")
    g.add_argument("--distill-type", "--distill_type", dest="distill_type", default=None, metavar="TYPE",
                   help="KD | NKD | FD | KD+FD | NKD+FD | None (research spellings such as NKDFD accepted; "
                        "default KD)")
    g.add_argument("--alpha", "--distill-alpha", "--distillation-alpha", dest="distill_alpha", type=float,
                   default=None, help="KD: weight of the T^2-scaled KL term, (1-alpha) goes to CE (default 0.1)")
    g.add_argument("--T", "--temperature", "--distillation-tau", dest="distill_T", type=float, default=None,
                   help="KD temperature (default 1.0; the research NKD ignores it, see --nkd-T)")
    _flag(g, "--hard", dest="distill_hard",
          help="KD: 0.5*CE(student, label) + 0.5*CE(student, teacher argmax) instead of KL")
    g.add_argument("--nkd-T", "--nkd_T", "--nkd-temperature", dest="nkd_T", type=float, default=None,
                   help="NKD temperature of the non-target term (default 1.0, what the research runs used)")
    g.add_argument("--nkd-alpha", "--nkd_alpha", dest="nkd_alpha", type=float, default=None,
                   help="NKD weight of the non-target term (default 1.0)")
    g.add_argument("--lr-fd", "--lr_fd", dest="lr_fd", type=float, default=None,
                   help="weight of the feature-distillation term (default 1.0)")
    g.add_argument("--fd-loss", "--FDLoss_type", dest="fd_loss", default=None, metavar="{smoothL1,MSE}",
                   help="feature loss: smoothL1 (beta --fd-beta) or MSE (default smoothL1)")
    g.add_argument("--fd-beta", "--fd_beta", dest="fd_beta", type=float, default=None,
                   help="smooth-L1 beta of the feature loss (default 2.0)")
    _flag(g, "--target-lnorm", "--target_Lnorm", dest="target_lnorm",
          help="LayerNorm (no affine, over C,H,W) of the teacher features before the feature loss")
    g.add_argument("--feature-n", "--feature_n", dest="feature_n", type=int, default=None,
                   help="number of distilled stages (only 1, the last stage, as in the research FD)")
    g = parser.add_argument_group("teacher output cache")
    g.add_argument("--teacher-cache", "--teacher_cache", dest="teacher_cache", default=None, metavar="DIR",
                   help="cache teacher outputs per image in DIR (only for fixed augmentation, no mixup)")
    g.add_argument("--teacher-cache-dtype", dest="teacher_cache_dtype", default=None,
                   choices=["float32", "float16"], help="storage dtype of cached outputs (default float32)")


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """Teacher selection (research: ``--model`` teacher, ``--resume`` its checkpoint, ``--model_s`` student).

    slaknet keeps ``--model`` for the trained (student) model, as in ``slaknet train``, so the teacher has
    its own flags; the lead wires them to the model loaders.
    """
    g = parser.add_argument_group("teacher")
    g.add_argument("--teacher", "--teacher-model", dest="teacher", default=None,
                   help="teacher architecture (slaknet or timm model name)")
    g.add_argument("--teacher-checkpoint", "--teacher_checkpoint", dest="teacher_checkpoint", default=None,
                   help="teacher weights (official .pth or slaknet checkpoint / safetensors)")
    _flag(g, "--teacher-reparam", dest="teacher_reparam",
          help="reparameterize the teacher (fuse branches and BN) before distilling, for speed")


def _split_token(token: str, names: Sequence[str]) -> Optional[list]:
    """Split a run-together token such as ``NKDFD`` into registered names (longest match first)."""
    if not token:
        return []
    for name in sorted(names, key=len, reverse=True):
        if token.upper().startswith(name.upper()):
            rest = _split_token(token[len(name):], names)
            if rest is not None:
                return [name] + rest
    return None


def parse_distill_type(value: Optional[str], logit_names: Sequence[str] = LOGIT_LOSS_NAMES,
                       feature_names: Sequence[str] = FEATURE_LOSS_NAMES) -> Tuple[Optional[str], Optional[str]]:
    """``"NKD+FD"`` -> ``("NKD", "FD")``; ``"None"`` -> ``(None, None)``; at most one of each kind.

    Separators ``+ _ - ,`` and spaces are allowed, and so are run-together research spellings (``KDFD``).
    """
    if value is None or str(value).strip().lower() in ("", "none"):
        return None, None
    names = list(logit_names) + list(feature_names)
    parts: list = []
    for token in re.split(r"[+_,\s-]+", str(value).strip()):
        split = _split_token(token, names)
        if split is None:
            raise ConfigError(f"unknown --distill-type {value!r}: use a combination of "
                              f"{', '.join(logit_names)} (logits) and {', '.join(feature_names)} (features), "
                              "or None")
        parts += split
    logit = [p for p in parts if p in logit_names]
    feat = [p for p in parts if p in feature_names]
    if len(logit) > 1 or len(feat) > 1:
        raise ConfigError(f"--distill-type {value!r} combines more than one logit loss or feature loss")
    return (logit[0] if logit else None), (feat[0] if feat else None)


def _get(src: Union[argparse.Namespace, Mapping[str, Any]], key: str) -> Any:
    return src.get(key) if isinstance(src, Mapping) else getattr(src, key, None)


def resolve_distill_config(src: Union[argparse.Namespace, Mapping[str, Any]],
                           logit_names: Sequence[str] = LOGIT_LOSS_NAMES,
                           feature_names: Sequence[str] = FEATURE_LOSS_NAMES) -> Dict[str, Any]:
    """The distillation options of ``src`` with research defaults filled in, validated.

    Returns a plain dict with the keys of :data:`DISTILL_DEFAULTS` plus ``logit_loss`` and
    ``feature_loss`` (the parsed ``distill_type``, names or ``None``). ``logit_names`` /
    ``feature_names``: the loss names to accept (the loss registry passes its own).
    """
    cfg = {k: (_get(src, k) if _get(src, k) is not None else v) for k, v in DISTILL_DEFAULTS.items()}
    cfg["logit_loss"], cfg["feature_loss"] = parse_distill_type(cfg["distill_type"], logit_names, feature_names)
    if not 0.0 <= float(cfg["distill_alpha"]) <= 1.0:
        raise ConfigError(f"--alpha must be in [0, 1], got {cfg['distill_alpha']}")
    for key, flag in (("distill_T", "--T"), ("nkd_T", "--nkd-T")):
        if not float(cfg[key]) > 0.0:
            raise ConfigError(f"{flag} (temperature) must be > 0, got {cfg[key]}")
    for key, flag in (("nkd_alpha", "--nkd-alpha"), ("lr_fd", "--lr-fd")):
        if not float(cfg[key]) >= 0.0:
            raise ConfigError(f"{flag} must be >= 0, got {cfg[key]}")
    if not float(cfg["fd_beta"]) > 0.0:
        raise ConfigError(f"--fd-beta must be > 0, got {cfg['fd_beta']}")
    fd = {t.lower(): t for t in FD_LOSS_TYPES}.get(str(cfg["fd_loss"]).lower())
    if fd is None:
        raise ConfigError(f"--fd-loss must be one of {', '.join(FD_LOSS_TYPES)}, got {cfg['fd_loss']!r}")
    cfg["fd_loss"] = fd
    if int(cfg["feature_n"]) != 1:
        raise ConfigError("--feature-n: only 1 (the last stage) is supported, as in the research FD loss")
    if cfg["distill_hard"] and cfg["logit_loss"] != "KD":
        raise ConfigError("--hard applies to --distill-type KD (or KD+FD) only")
    if cfg["feature_loss"] is None and cfg["target_lnorm"]:
        raise ConfigError("--target-lnorm needs feature distillation (--distill-type FD, KD+FD or NKD+FD)")
    return cfg
