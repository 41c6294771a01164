"""Distillation losses of "Are Large Kernels Better Teachers than Transformers for ConvNets?" (ICML 2023).

Names, formulas and defaults follow the research code (VITA-Group/SLaK ``engine_kd.py`` / ``main_KD.py``,
commit e06ad3e); the implementation is slaknet's own:

- ``KD`` (:class:`KDLoss`): ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean)
  ``+ (1 - alpha) * CE(s, y)``; ``hard=True``: ``0.5 * CE(s, y) + 0.5 * CE(s, argmax t)``.
- ``NKD`` (:class:`NKDLoss`), normalized KD (Yang et al., "Rethinking Knowledge Distillation via
  Cross-Entropy"): ``-(p_t[y] * log p_s[y])`` + ``-alpha * T^2 * sum_{k != y} q_t(k) log q_s(k)``.
- ``FD`` (:class:`FeatureDistillLoss`): last-stage feature matching, combinable with either.

:class:`DistillCriterion` combines a logit loss (or the trainer's plain criterion) with ``lr_fd * FD``
exactly as the research training step does; :func:`build_distill_loss` builds it from resolved options
(:func:`slaknet.distill.args.resolve_distill_config`). A new loss is a small class registered with
:func:`register_loss`.

All losses compute in at least float32 (fp16 / bf16 inputs are upcast), so fp16 / bf16 autocast cannot overflow the softmaxes,
and they use ``log_softmax`` rather than ``log(softmax)``, so a probability of 0 or 1 gives no inf / NaN.
Teacher inputs are detached.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Type, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slaknet.distill.args import FD_LOSS_TYPES, resolve_distill_config
from slaknet.errors import ConfigError

__all__ = ["LogitDistillLoss", "KDLoss", "NKDLoss", "FeatureDistillLoss", "DistillCriterion",
           "LOGIT_LOSSES", "FEATURE_LOSSES", "register_loss", "build_distill_loss", "hard_labels", "as_nchw"]

LOGIT_LOSSES: Dict[str, Type["LogitDistillLoss"]] = {}
FEATURE_LOSSES: Dict[str, Type["FeatureDistillLoss"]] = {}
_T = TypeVar("_T", bound=type)


def register_loss(name: str) -> Callable[[_T], _T]:
    """Class decorator: register a :class:`LogitDistillLoss` or :class:`FeatureDistillLoss` under ``name``.

    The name becomes valid in ``--distill-type`` (alone or combined, e.g. ``NAME+FD``) for
    :func:`build_distill_loss`; the class needs a ``from_config(cfg)`` classmethod.
    """
    def deco(cls: _T) -> _T:
        if issubclass(cls, LogitDistillLoss):
            table: Dict[str, Any] = LOGIT_LOSSES
        elif issubclass(cls, FeatureDistillLoss):
            table = FEATURE_LOSSES
        else:
            raise TypeError(f"{cls.__name__} is neither a LogitDistillLoss nor a FeatureDistillLoss")
        table[name] = cls
        cls.name = name
        return cls
    return deco


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices of ``target``: itself for (N,) labels, the argmax for (N, C) mixed / soft labels."""
    return target.argmax(dim=1) if target.dim() > 1 else target


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 to float32 (float32 and float64 stay as they are)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` for integer labels or (N, C) probabilities (mixup / cutmix targets)."""
    return F.cross_entropy(logits, target.float() if target.dim() > 1 else target)


class LogitDistillLoss(nn.Module):
    """Base of losses on logits: ``forward(student_logits, teacher_logits, target) -> scalar``.

    ``target`` is (N,) class indices or (N, C) probabilities (mixup / cutmix / label smoothing).
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LogitDistillLoss":
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_loss("KD")
class KDLoss(LogitDistillLoss):
    """Hinton KD as in the research ``loss_kd``: ``alpha*T^2*KL(p_t^T || p_s^T) + (1-alpha)*CE(s, y)``.

    KL is ``F.kl_div(..., reduction="batchmean")`` (sum over classes, mean over the batch); CE is plain
    ``F.cross_entropy`` on the given target (soft targets from mixup already carry label smoothing), as in
    the research code. ``hard=True`` replaces it with ``0.5*CE(s, y) + 0.5*CE(s, argmax t)`` (``--hard``).
    Defaults: ``alpha=0.1`` (``--alpha``), ``T=1.0`` (``--T``).
    """

    def __init__(self, alpha: float = 0.1, T: float = 1.0, hard: bool = False) -> None:
        super().__init__()
        self.alpha, self.T, self.hard = float(alpha), float(T), bool(hard)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "KDLoss":
        return cls(alpha=cfg["distill_alpha"], T=cfg["distill_T"], hard=cfg["distill_hard"])

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        s, t = _up(student_logits), _up(teacher_logits.detach())
        if self.hard:
            return 0.5 * _ce(s, target) + 0.5 * F.cross_entropy(s, t.argmax(dim=1))
        T = self.T
        # log_target keeps a teacher probability that underflows to 0 exact (no 0 * log 0)
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1),
                      reduction="batchmean", log_target=True)
        return kl * (T * T * self.alpha) + _ce(s, target) * (1.0 - self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, T={self.T}, hard={self.hard}"


@register_loss("NKD")
class NKDLoss(LogitDistillLoss):
    """Normalized KD: ``-mean_n p_t[y] log p_s[y]  -  alpha * T^2 * mean_n sum_{k!=y} q_t(k) log q_s(k)``.

    Details as in the research ``NKDLoss`` (engine_kd.py):

    - the target term uses temperature 1 (plain softmaxes), the teacher weight ``p_t[y]`` is detached;
    - ``q`` are softmaxes of the logits divided by ``T`` *renormalized over the non-target classes* (the
      research code subtracts 1000 from the target logit and divides by ``1 - q[y]``; here the softmax is
      taken over the C-1 non-target logits directly, which is the same distribution without the ~e^-1000/T
      residue);
    - the non-target sum runs over classes, then the batch mean; no extra normalization, no gamma;
    - with (N, C) mixed / soft targets the target class is their argmax.

    Defaults are the research constructor's ``temp=1.0, alpha=1.0``. Note: the research engine builds
    ``NKDLoss()`` with these defaults and never passes ``--T`` to it, so its published NKD runs (whose
    commands say ``--T 3.0``) used T = 1; slaknet keeps that default and exposes ``--nkd-T``. The research
    ``log(softmax)`` can give inf for a student target probability that underflows; ``log_softmax`` here
    does not.
    """

    def __init__(self, T: float = 1.0, alpha: float = 1.0) -> None:
        super().__init__()
        self.T, self.alpha = float(T), float(alpha)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "NKDLoss":
        return cls(T=cfg["nkd_T"], alpha=cfg["nkd_alpha"])

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        s, t = _up(student_logits), _up(teacher_logits.detach())
        n, c = s.shape
        label = hard_labels(target).long().view(n, 1)
        w_t = F.softmax(t, dim=1).gather(1, label)
        target_term = -(w_t * F.log_softmax(s, dim=1).gather(1, label)).mean()
        if c < 2:
            return target_term
        keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, label, False)
        s_nt, t_nt = s[keep].view(n, c - 1), t[keep].view(n, c - 1)
        q_t = F.softmax(t_nt / self.T, dim=1)
        cross = (q_t * F.log_softmax(s_nt / self.T, dim=1)).sum(dim=1).mean()
        return target_term - self.alpha * self.T ** 2 * cross

    def extra_repr(self) -> str:
        return f"T={self.T}, alpha={self.alpha}"


def as_nchw(x: torch.Tensor, layout: str = "NCHW") -> torch.Tensor:
    """Feature map ``x`` as (N, C, H, W) from ``NCHW``, ``NHWC`` (timm Swin) or ``NLC`` (square token grid)."""
    if layout == "NCHW" and x.dim() == 4:
        return x
    if layout == "NHWC" and x.dim() == 4:
        return x.permute(0, 3, 1, 2)
    if layout == "NLC" and x.dim() == 3:
        n, length, c = x.shape
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ConfigError(f"feature tokens: {length} is not a square grid (drop class tokens first)")
        return x.transpose(1, 2).reshape(n, c, side, side)
    raise ConfigError(f"feature layout {layout!r} does not fit a tensor of shape {tuple(x.shape)}")


class FeatureDistillLoss(nn.Module):
    """Feature distillation of the last stage (research ``--distill_type ...FD``).

    The student map (N, Cs, Hs, Ws) is projected to the teacher's channels by a learned 1x1 convolution
    when ``Cs != Ct`` (the research code's ``Conv1d(kernel_size=1)`` over flattened positions, the same
    map) and bilinearly resized to the teacher's (H, W) when they differ; the projection is applied at the
    smaller of the two resolutions (1x1 conv and bilinear resizing commute, bias included). The target is
    the detached teacher map, optionally LayerNorm-ed over (C, H, W) without affine (``target_lnorm``,
    ``--target_Lnorm``; the research engine builds these LayerNorms but never applies them, slaknet does).
    Loss: ``smooth_l1(beta=2.0)`` or ``mse``, mean over all elements, in float32 or wider.

    The projection's parameters belong to the optimizer and the checkpoint, like the student's.
    """

    name: ClassVar[str] = ""

    def __init__(self, student_channels: int, teacher_channels: int, loss_type: str = "smoothL1",
                 beta: float = 2.0, target_lnorm: bool = False) -> None:
        super().__init__()
        if loss_type not in FD_LOSS_TYPES:
            raise ConfigError(f"feature loss must be one of {', '.join(FD_LOSS_TYPES)}, got {loss_type!r}")
        self.student_channels, self.teacher_channels = int(student_channels), int(teacher_channels)
        self.loss_type, self.beta, self.target_lnorm = loss_type, float(beta), bool(target_lnorm)
        self.proj: Optional[nn.Conv2d] = (nn.Conv2d(self.student_channels, self.teacher_channels, 1)
                                          if self.student_channels != self.teacher_channels else None)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], student_channels: int = 0,
                    teacher_channels: int = 0) -> "FeatureDistillLoss":
        if student_channels <= 0 or teacher_channels <= 0:
            raise ConfigError("feature distillation needs the student's and teacher's last-stage channels")
        return cls(student_channels, teacher_channels, loss_type=cfg["fd_loss"], beta=cfg["fd_beta"],
                   target_lnorm=cfg["target_lnorm"])

    def align(self, student_features: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """The student map projected to the teacher's channels and resized to ``size`` (H, W)."""
        x = student_features
        if x.dim() != 4 or x.shape[1] != self.student_channels:
            raise ConfigError(f"student features {tuple(x.shape)}: expected (N, {self.student_channels}, H, W)")
        resize = tuple(x.shape[-2:]) != tuple(size)
        early = self.proj is not None and (not resize or x.shape[-2] * x.shape[-1] <= size[0] * size[1])
        if early:
            x = self.proj(x)
        if resize:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if self.proj is not None and not early:
            x = self.proj(x)
        return x

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        t = _up(teacher_features.detach())
        if t.dim() != 4 or t.shape[1] != self.teacher_channels:
            raise ConfigError(f"teacher features {tuple(t.shape)}: expected (N, {self.teacher_channels}, H, W)")
        s = _up(self.align(student_features, t.shape[-2:]))
        if self.target_lnorm:
            t = F.layer_norm(t, t.shape[1:])
        if self.loss_type == "MSE":
            return F.mse_loss(s, t)
        return F.smooth_l1_loss(s, t, beta=self.beta)

    def extra_repr(self) -> str:
        return (f"{self.student_channels}->{self.teacher_channels}, loss={self.loss_type}, beta={self.beta}, "
                f"target_lnorm={self.target_lnorm}")


register_loss("FD")(FeatureDistillLoss)


class DistillCriterion(nn.Module):
    """The research training step's loss: logit term (KD / NKD, or ``base_criterion``) ``+ lr_fd * FD``.

    ``logit_loss=None`` (``--distill_type None`` or ``FD``) uses ``base_criterion(student_logits, target)``
    (the trainer's CE / label-smoothing / soft-target CE). :meth:`terms` returns every part for logging.
    """

    def __init__(self, logit_loss: Optional[LogitDistillLoss] = None, base_criterion: Optional[nn.Module] = None,
                 feature_loss: Optional[FeatureDistillLoss] = None, lr_fd: float = 1.0) -> None:
        super().__init__()
        if logit_loss is None and base_criterion is None:
            raise ConfigError("a distillation criterion needs a logit loss or a base criterion")
        self.logit_loss, self.base_criterion, self.feature_loss = logit_loss, base_criterion, feature_loss
        self.lr_fd = float(lr_fd)

    @property
    def needs_teacher_logits(self) -> bool:
        return self.logit_loss is not None

    @property
    def needs_features(self) -> bool:
        return self.feature_loss is not None

    def terms(self, student_logits: torch.Tensor, target: torch.Tensor,
              teacher_logits: Optional[torch.Tensor] = None, student_features: Optional[torch.Tensor] = None,
              teacher_features: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``{"loss": total, "logit": KD/NKD or base term, "fd": feature term (if any)}``."""
        if self.logit_loss is not None:
            if teacher_logits is None:
                raise ConfigError(f"{self.logit_loss.name} needs the teacher's logits")
            logit = self.logit_loss(student_logits, teacher_logits, target)
        else:
            logit = self.base_criterion(student_logits, target)
        out = {"logit": logit, "loss": logit}
        if self.feature_loss is not None:
            if student_features is None or teacher_features is None:
                raise ConfigError("feature distillation needs student and teacher features")
            fd = self.feature_loss(student_features, teacher_features)
            out["fd"] = fd
            out["loss"] = logit + self.lr_fd * fd
        return out

    def forward(self, student_logits: torch.Tensor, target: torch.Tensor,
                teacher_logits: Optional[torch.Tensor] = None, student_features: Optional[torch.Tensor] = None,
                teacher_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.terms(student_logits, target, teacher_logits, student_features, teacher_features)["loss"]


def build_distill_loss(options: Any, base_criterion: Optional[nn.Module] = None, student_channels: int = 0,
                       teacher_channels: int = 0) -> DistillCriterion:
    """A :class:`DistillCriterion` from options (argparse namespace or dict, research names resolved).

    ``base_criterion`` is required for ``None`` and ``FD`` alone; ``student_channels`` /
    ``teacher_channels`` (last-stage channels) for any ``...FD`` type.
    """
    cfg = resolve_distill_config(options, tuple(LOGIT_LOSSES), tuple(FEATURE_LOSSES))
    logit_name, feat_name = cfg["logit_loss"], cfg["feature_loss"]
    if logit_name is None and base_criterion is None:
        raise ConfigError(f"--distill-type {cfg['distill_type']} needs the trainer's base criterion")
    logit = LOGIT_LOSSES[logit_name].from_config(cfg) if logit_name else None
    feat = (FEATURE_LOSSES[feat_name].from_config(cfg, student_channels=student_channels,
                                                  teacher_channels=teacher_channels) if feat_name else None)
    return DistillCriterion(logit, None if logit is not None else base_criterion, feat, lr_fd=cfg["lr_fd"])
