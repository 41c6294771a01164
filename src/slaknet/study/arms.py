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
           "kernel_ladder", "reference_arm", "paper_equivalent"]

PAPER_MAP = 56  # stage-1 feature map of a 224 px image with the stride-4 stem


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
    seeds: int = 4
    difficulty: float = 0.5
    d_min: float = 0.0625
    d_max: float = 0.43
    band: float = 0.05
    decoy: float = 0.5
    data_seed: int = 0
    sparsity: float = 0.4
    update_frequency: int = 20
    erf_images: int = 16
    equal_time: bool = True
    equal_time_arms: Tuple[str, ...] = ("mxm3", "mxm7", "dec7")
    small_kernel: int = 5

    @property
    def feature_map(self) -> int:
        return self.image_size // self.stem

    @property
    def graded(self) -> bool:
        """Whether each image draws its own distance window (the graded task) or all share one."""
        return self.band < self.d_max - self.d_min - 1e-9

    def band_edges(self) -> List[float]:
        """Distance bands (px) for per-band accuracy: the reach of each kernel of the ladder, so that every
        step up the ladder can see exactly one more band; ``[d_min, e1, ..., d_max]`` in pixels."""
        from slaknet.study.model import receptive_radius

        lo, hi = self.d_min * self.image_size, self.d_max * self.image_size
        reach = sorted({float(receptive_radius(k, self.depth, self.stem)) for k in kernel_ladder(self)})
        inner = [r for r in reach if lo + 1.0 < r < hi - 1.0]
        return [lo] + inner + [hi] if self.graded else [lo, hi]

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
                   batch_size=32, seeds=1, d_min=0.1, d_max=0.40, band=0.1, erf_images=2, update_frequency=1,
                   equal_time_arms=("mxm3", "mxm7")),
    # a quick look on a 2-core CPU: 2 seeds, fewer images and epochs
    "short": Budget("short", width=24, train_samples=3000, val_samples=600, epochs=5, seeds=2, erf_images=8,
                    update_frequency=10),
    # ~26 min on a 2-core CPU with two runs at a time (estimated from per-run times, docs/study.md)
    "default": Budget("default"),
    # GPU: larger images and two blocks at a 32 x 32 map, more data, epochs and seeds
    "large": Budget("large", image_size=128, stem=4, depth=2, width=48, train_samples=20000, val_samples=2000,
                    epochs=20, batch_size=128, seeds=4, d_min=0.0625, d_max=0.43, band=0.04, erf_images=32,
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
    series: str = ""          # "dense" or "decomposed": the kernel-size ladder it belongs to (else "")

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


def paper_equivalent(kernel: int, feature_map: int) -> float:
    """The kernel on the paper's 56 px stage-1 map that spans the same share of the map (3x3 on 16 -> 10.5)."""
    return kernel * PAPER_MAP / feature_map


def kernel_ladder(budget: Budget) -> List[int]:
    """Odd kernel sizes from 3 up to the 61-equivalent, in steps of about 1/8 of the map (step 2 on a
    16x16 map: 3, 5, ..., 17, i.e. about 10x10 to 61x61 at 224 px; each step adds one stem of reach),
    always including the 31-, 51- and 61-equivalents."""
    fmap = budget.feature_map
    step = 2 * max(1, round(fmap / 16))
    paper = {scaled_kernel(k, fmap, 3) for k in (31, 51, 61)}
    return sorted(set(range(3, max(paper) + 1, step)) | paper)


def reference_arm(budget: Budget) -> str:
    """The decomposed 51-equivalent (SLaK's kernel): the sparse arms' dense twin and the equal-time reference."""
    return f"dec{scaled_kernel(51, budget.feature_map, 3)}"


def build_arms(budget: Budget) -> List[Arm]:
    """All arms for ``budget`` (kernel sizes depend on its feature map), in run order.

    Two ladders of kernel sizes (:func:`kernel_ladder`) with BatchNorm on every branch: ``mxm<M>``, one
    dense M x M kernel (plus the N x N small kernel above N, the undecomposed RepLKNet form) and
    ``dec<M>``, SLaK's decomposition M x N + N x M + N x N (from M > N); then the sparse variants of the
    decomposed 51-equivalent.
    """
    fmap, n = budget.feature_map, budget.small_kernel
    names = {scaled_kernel(k, fmap, 3): f"{k}x{k} at 224 px" for k in (31, 51, 61)}
    arms: List[Arm] = []
    for m in kernel_ladder(budget):
        eq = names.get(m, f"~{paper_equivalent(m, fmap):.0f}x{paper_equivalent(m, fmap):.0f} at 224 px")
        small = n if m > n else None
        arms.append(Arm(f"mxm{m}", ("kernel",), m, small, decompose=False, series="dense", paper=eq,
                        description=f"dense {m}x{m}" + (f" + {n}x{n}" if small else "") + " (BN on each branch)"))
    for m in kernel_ladder(budget):
        if m <= n:
            continue
        eq = names.get(m, f"~{paper_equivalent(m, fmap):.0f}x{paper_equivalent(m, fmap):.0f} at 224 px")
        arms.append(Arm(f"dec{m}", ("kernel",), m, n, series="decomposed", paper=eq + ", decomposed",
                        description=f"decomposed {m}x{n}+{n}x{m}+{n}x{n} (BN on each branch)"))
    ref = reference_arm(budget)
    k51 = next(a.kernel_size for a in arms if a.name == ref)
    sp = f"{budget.sparsity:.0%} sparse"
    arms += [
        Arm("sparse", ("sparsity", "masks", "growth"), k51, n, sparse=True,
            paper="decomposed + sparse, same width", description=f"{ref} at {sp}, dynamic masks, random growth"),
        Arm("sparse_w13", ("sparsity",), k51, n, width_factor=1.3, sparse=True,
            paper="SLaK: sparse groups, expand more (1.3x)",
            description=f"{ref} at {sp} and 1.3x width (about the dense non-zeros)"),
        Arm("sparse_static", ("masks",), k51, n, sparse=True, fix=True, paper="static sparse (fixed masks)",
            description="sparse with masks fixed at initialisation"),
        Arm("sparse_grad", ("growth",), k51, n, sparse=True, growth="gradient", paper="gradient growth (RigL)",
            description="sparse with gradient-based regrowth instead of random"),
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
