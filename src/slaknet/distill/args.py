"""What the distillation options mean together: the ``--distill-type`` grammar (``KD``, ``NKD+FD``, the research
spelling ``NKDFD``...) and the cross-option rules (:func:`resolve_distill_config`).

The options themselves are declared once, in :class:`slaknet.distill.spec.DistillationOptions`; the research
code's flag names (``--alpha``, ``--T``, ``--FDLoss_type``...) are in the alias table of
:mod:`slaknet.settings.aliases`. No torch here.
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from slaknet.errors import ConfigError

__all__ = ["resolve_distill_config", "parse_distill_type", "LOGIT_LOSS_NAMES", "FEATURE_LOSS_NAMES", "FD_LOSS_TYPES"]

# built-in names (losses.py registers the classes under the same names; extra registered names are
# accepted by ``slaknet.distill.losses.build_distill_loss``)
LOGIT_LOSS_NAMES: Tuple[str, ...] = ("KD", "NKD")
FEATURE_LOSS_NAMES: Tuple[str, ...] = ("FD",)
FD_LOSS_TYPES: Tuple[str, ...] = ("smoothL1", "MSE")


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

    Returns a plain dict with the fields of :class:`~slaknet.distill.spec.DistillationOptions` plus ``logit_loss`` and
    ``feature_loss`` (the parsed ``distill_type``, names or ``None``). ``logit_names`` /
    ``feature_names``: the loss names to accept (the loss registry passes its own).
    """
    from slaknet.distill.spec import DistillationOptions
    from slaknet.settings import field_infos

    defaults = {i.name: i.default for i in field_infos(DistillationOptions)}
    cfg = {k: (_get(src, k) if _get(src, k) is not None else v) for k, v in defaults.items()}
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
