"""The study's ablation arms and budgets.

Every arm is the same :class:`slaknet.study.model.StudyNet` (same depth, width, stem, norms, head, data,
optimizer and seeds); arms differ only in the depthwise kernel module, the width factor and the sparse
engine's settings. Large kernels are *scaled to the feature map*: the paper's 31 / 51 / 61 kernels on the
56 x 56 stage-1 map of a 224 px image become ``round_odd(M / 56 * map)`` here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

from slaknet.errors import ConfigError

__all__ = ["Arm", "Budget", "BUDGETS", "ARMS", "get_budget", "select_arms", "build_arms", "scaled_kernel",
           "REFERENCE_ARM"]

PAPER_MAP = 56  # stage-1 feature map of a 224 px image with the stride-4 stem
REFERENCE_ARM = "lk51"  # its mean training time is the equal-time budget of the controls


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything that sets a study's size (see docs/study.md for the reasoning behind each default)."""

    name: str
    image_size: int = 64
    stem: int = 4
    depth: int = 1
    width: int = 32
    train_samples: int = 4000
    val_samples: int = 1000
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    seeds: int = 2
    difficulty: float = 0.5
    d_min: float = 0.36
    d_max: float = 0.44
    decoy: float = 0.5
    data_seed: int = 0
    sparsity: float = 0.4
    update_frequency: int = 20
    erf_images: int = 16
    equal_time: bool = True
    equal_time_arms: Tuple[str, ...] = ("k3_bn", "k7_bn", "lk_small")
    small_kernel: int = 5

    @property
    def feature_map(self) -> int:
        return self.image_size // self.stem

    def run_id(self) -> str:
        """Hash of every field that changes what a single run computes (not the seed count or whether
        equal-time controls are planned): runs are only reused under the same id."""
        import hashlib
        import json

        d = self.as_dict()
        for k in ("seeds", "equal_time", "equal_time_arms"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["equal_time_arms"] = list(self.equal_time_arms)
        return d


BUDGETS: Dict[str, Budget] = {
    # tests and smoke runs: seconds, numbers meaningless
    "tiny": Budget("tiny", image_size=32, stem=4, width=8, train_samples=64, val_samples=32, epochs=1,
                   batch_size=32, seeds=1, d_min=0.25, d_max=0.40, erf_images=2, update_frequency=1),
    # ~10-15 min on a shared 2-core CPU: 2 seeds, few epochs
    "short": Budget("short", width=24, train_samples=3000, val_samples=600, epochs=5, seeds=2, erf_images=8,
                    update_frequency=10),
    # ~15 min on an idle 2-core CPU (13.5 min measured; 30-45 min under load)
    "default": Budget("default", seeds=3),
    # GPU: larger images and two blocks at a 32 x 32 map, more data, epochs and seeds
    "large": Budget("large", image_size=128, stem=4, depth=2, width=48, train_samples=20000, val_samples=2000,
                    epochs=20, batch_size=128, seeds=3, d_min=0.32, d_max=0.42, erf_images=32,
                    update_frequency=50, small_kernel=5),
}


def get_budget(name: str, **overrides: Any) -> Budget:
    """A named budget with optional field overrides (``None`` values are ignored)."""
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    fields = {f.name for f in dataclasses.fields(Budget)}
    kw = {k: v for k, v in overrides.items() if v is not None}
    bad = sorted(set(kw) - fields)
    if bad:
        raise ConfigError(f"unknown budget field(s) {bad}")
    b = dataclasses.replace(BUDGETS[name], **kw)
    if b.image_size % b.stem:
        raise ConfigError(f"image size {b.image_size} is not a multiple of the stem {b.stem}")
    if b.seeds < 1 or b.epochs < 1 or b.train_samples < b.batch_size:
        raise ConfigError("need seeds >= 1, epochs >= 1 and at least one batch of training samples")
    return b


@dataclasses.dataclass(frozen=True)
class Arm:
    """One ablation arm: a kernel module, a width and (optionally) sparse-training settings."""

    name: str
    groups: Tuple[str, ...]
    kernel_size: int
    small_kernel: Optional[int] = None
    decompose: bool = True
    width_factor: float = 1.0
    sparse: bool = False
    fix: bool = False
    growth: str = "random"
    paper: str = ""           # what it stands for in the paper
    description: str = ""

    def model_kwargs(self) -> Dict[str, Any]:
        return dict(kernel_size=self.kernel_size, small_kernel=self.small_kernel, decompose=self.decompose,
                    width_factor=self.width_factor)

    @property
    def module(self) -> str:
        """Short text of the kernel module, e.g. ``15x5+5x15+5x5`` or ``7x7``."""
        m, n = self.kernel_size, self.small_kernel
        if n is None or n >= m:
            return f"{m}x{m}"
        if self.decompose:
            return f"{m}x{n}+{n}x{m}+{n}x{n}"
        return f"{m}x{m}+{n}x{n}"


def scaled_kernel(paper_kernel: int, feature_map: int, floor: int = 1) -> int:
    """The paper's kernel on a 56 px map scaled to ``feature_map`` and rounded to the nearest odd size."""
    k = paper_kernel / PAPER_MAP * feature_map
    odd = int(2 * round((k - 1) / 2) + 1)
    return max(odd, floor)


def build_arms(budget: Budget) -> List[Arm]:
    """All arms for ``budget`` (kernel sizes depend on its feature map), in run order."""
    fmap, n = budget.feature_map, budget.small_kernel
    k31, k51, k61 = (scaled_kernel(k, fmap, n + 2) for k in (31, 51, 61))
    arms = [
        Arm("k3_bn", ("kernel",), 3, None, paper="ConvNeXt-style small kernel",
            description="one 3x3 depthwise conv + BN per block"),
        Arm("k7_bn", ("kernel",), 7, None, paper="ConvNeXt 7x7",
            description="one 7x7 depthwise conv + BN per block"),
        Arm("lk_small", ("kernel",), 7, n, paper="SLaK module, small kernels only",
            description=f"the SLaK module (three BN branches) with only small kernels: 7x{n}+{n}x7+{n}x{n}"),
        Arm("lk31", ("kernel",), k31, n, paper="31x31 at 224 px (decomposed)",
            description=f"decomposed {k31}x{n}+{n}x{k31}+{n}x{n}, the 31-equivalent"),
        Arm("lk51", ("kernel", "sparsity"), k51, n, paper="51x51 at 224 px (decomposed, SLaK)",
            description=f"decomposed {k51}x{n}+{n}x{k51}+{n}x{n}, the 51-equivalent (dense)"),
        Arm("lk61", ("kernel",), k61, n, paper="61x61 at 224 px (decomposed)",
            description=f"decomposed {k61}x{n}+{n}x{k61}+{n}x{n}, the 61-equivalent"),
        Arm("lk51_mxm", ("kernel",), k51, n, decompose=False, paper="51x51 dense, undecomposed (RepLKNet-style)",
            description=f"undecomposed {k51}x{k51}+{n}x{n}"),
        Arm("lk51_sparse", ("sparsity", "masks", "growth"), k51, n, sparse=True,
            paper="decomposed + sparse, same width", description=f"lk51 at {budget.sparsity:.0%} sparsity, "
            "dynamic masks, random growth"),
        Arm("lk51_sparse_w13", ("sparsity",), k51, n, width_factor=1.3, sparse=True,
            paper="SLaK: sparse groups, expand more (1.3x)",
            description=f"lk51 at {budget.sparsity:.0%} sparsity and 1.3x width (about the dense non-zeros)"),
        Arm("lk51_sparse_static", ("masks",), k51, n, sparse=True, fix=True, paper="static sparse (fixed masks)",
            description="lk51_sparse with masks fixed at initialisation"),
        Arm("lk51_sparse_grad", ("growth",), k51, n, sparse=True, growth="gradient", paper="gradient growth (RigL)",
            description="lk51_sparse with gradient-based regrowth instead of random"),
    ]
    return arms


ARMS: Tuple[str, ...] = tuple(a.name for a in build_arms(BUDGETS["default"]))


def select_arms(budget: Budget, names: Optional[Sequence[str]] = None) -> List[Arm]:
    """The arms named (all when ``names`` is empty), in run order; unknown names are a ConfigError."""
    arms = build_arms(budget)
    if not names:
        return arms
    known = {a.name: a for a in arms}
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown arm(s) {bad}; available: {', '.join(known)}")
    wanted = set(names)
    return [a for a in arms if a.name in wanted]
