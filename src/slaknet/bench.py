"""``slaknet bench``: time SLaK models / large-kernel branches with the fast depthwise operator vs plain PyTorch.

Every figure is a ratio against a baseline measured in the same process, alternating the arms run by run
(``SLAKNET_DWCONV`` is switched between runs) and taking medians, because the machine may be shared. Arms:

* ``official``: what the official SLaK code falls back to without its CUDA extension: every depthwise conv a
  plain ``nn.Conv2d`` and the official activation layout (its channels-first LayerNorm keeps every tensor
  NCHW-contiguous, the layout in which PyTorch's CPU kernels for the ``5 x M`` strips are slowest);
* ``plain``: plain ``nn.Conv2d`` convs and ``F.linear`` in slaknet's layout (its LayerNorm2d hands
  channels_last tensors on);
* ``auto`` (and every registered depthwise-conv backend: ``fast``, ``fft``, ``gemm``, ...): slaknet's
  depthwise operator with that backend, and its Linear on the GEMM ``SLAKNET_LINEAR`` says (default
  ``auto``, see :mod:`slaknet.layers.pointwise`).

It prints times, images/s, speedups and the fraction of the machine's peak on
*in-bounds* multiply-adds (taps that fall on zero padding are not counted), and optionally peak memory.
With ``auto`` and ``plain`` among the arms it also re-checks ``auto``'s cached per-machine choices
(:mod:`slaknet.layers.autotune`): the auto / plain ratio per workload, where each choice came from, what
timing them cost, and a hint to re-time (``--retime``: forget this machine's cached choices first, so the
run times and rewrites them) when ``auto`` came out slower than ``plain``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from slaknet.errors import ConfigError
from slaknet.io import atomic_path

ENV = "SLAKNET_DWCONV"
LINEAR_ENV = "SLAKNET_LINEAR"
OFFICIAL = "official"  # bench-only arm: plain convs in the official code's NCHW activation layout

# SLaK-T stage shapes at 224 (width factor 1.3): channels, map size, kernel, blocks
SLAK_T_STAGES = ((124, 56, 51, 3), (249, 28, 49, 3), (499, 14, 47, 9), (998, 7, 13, 3))


# ----------------------------------------------------------------------------------------------- counting
def count_inbounds_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``model`` on ``example`` that touch real (non-padding) input
    (:func:`slaknet.analysis.counting.count_model`: every conv and linear, every large-kernel form)."""
    from slaknet.analysis.counting import count_model

    return count_model(model, tuple(example.shape[-2:]), example=example).macs_inbounds


def measure_peak_gmacs(threads: int, size: int = 1536, reps: int = 5) -> float:
    """The machine's practical fp32 peak in G multiply-adds/s: the best rate of a large fp32 GEMM, taking
    the faster of MKL's sgemm (``torch.mm``) and oneDNN's (on AMD CPUs MKL reaches about half of oneDNN)."""
    from slaknet.layers.pointwise import linear

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    gemms = [lambda: torch.mm(a, b)]
    if torch.backends.mkldnn.is_available():  # oneDNN through slaknet's Linear (falls back to F.linear)
        gemms.append(lambda: linear(a, b, backend="onednn"))
    rates = []
    for gemm in gemms:
        gemm()
        for _ in range(reps):
            t0 = time.perf_counter()
            gemm()
            rates.append(size ** 3 / (time.perf_counter() - t0) / 1e9)
    return max(rates)  # peak: the best of the repeats (others are slowed by neighbours)


# ----------------------------------------------------------------------------------------------- workloads
class BranchStack(nn.Module):
    """SLaK-T's large-kernel layers alone (per stage: blocks x LargeKernelConv), fed by per-stage inputs."""

    def __init__(self, stages: Sequence[Tuple[int, int, int, int]], small_kernel: int = 5) -> None:
        super().__init__()
        from slaknet.layers import LargeKernelConv

        self.sizes = [s[1] for s in stages]
        self.stages = nn.ModuleList(
            nn.Sequential(*[LargeKernelConv(c, k, small_kernel) for _ in range(d)]) for c, _, k, d in stages)
        self.channels = [s[0] for s in stages]

    def make_inputs(self, batch: int) -> List[torch.Tensor]:
        return [torch.randn(batch, c, s, s) for c, s in zip(self.channels, self.sizes)]

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return sum(stage(x).float().mean() for stage, x in zip(self.stages, xs))  # type: ignore[return-value]


def _reparameterize(model: nn.Module) -> None:
    from slaknet.layers import LargeKernelConv

    for m in model.modules():
        if isinstance(m, LargeKernelConv):
            m.reparameterize()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _layernorm_channels_first(self, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of an NCHW tensor, computed on that layout as the official SLaK code does."""
    mean = x.mean(1, keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(1, keepdim=True)
    x = centred / torch.sqrt(var + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


@contextlib.contextmanager
def official_layout():
    """Inside: LayerNorm2d runs the official way, so every activation stays NCHW-contiguous (the same
    values as slaknet's LayerNorm2d up to rounding; only the memory layout and the speed differ)."""
    from slaknet.layers.norm import LayerNorm2d

    saved = LayerNorm2d.forward
    LayerNorm2d.forward = _layernorm_channels_first
    try:
        yield
    finally:
        LayerNorm2d.forward = saved


def arm_environment(arm: str) -> Dict[str, str]:
    """Environment of one arm: the depthwise conv backend and the 1x1 (Linear) GEMM backend."""
    if arm in (OFFICIAL, "plain"):
        return {ENV: "plain", LINEAR_ENV: "plain"}
    return {ENV: arm, LINEAR_ENV: os.environ.get(LINEAR_ENV, "auto")}


def _with_backend(backend: str, fn: Callable[[], None]) -> float:
    env = arm_environment(backend)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    layout = official_layout() if backend == OFFICIAL else contextlib.nullcontext()
    try:
        with layout:
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            return time.perf_counter() - t0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare(fns: Dict[str, Callable[[], None]], backends: Sequence[str], reps: int, warmup: int = 1,
            progress: bool = True) -> Dict[str, Dict[str, List[float]]]:
    """Time each workload under each backend, interleaving backends run by run (fair on a busy machine)."""
    from tqdm import tqdm

    times: Dict[str, Dict[str, List[float]]] = {w: {b: [] for b in backends} for w in fns}
    total = len(fns) * len(backends) * (reps + warmup)
    with tqdm(total=total, desc="bench", disable=not progress, leave=False) as bar:
        for name, fn in fns.items():
            for r in range(reps + warmup):
                for b in (backends if r % 2 == 0 else list(reversed(backends))):
                    dt = _with_backend(b, fn)
                    if r >= warmup:
                        times[name][b].append(dt)
                    bar.update(1)
    return times


def model_workloads(model: nn.Module, x, train_inputs: Callable[[], object], loss_fn: Callable,
                    channels_last: bool = False, amp: Optional[torch.dtype] = None
                    ) -> Tuple[Dict[str, Callable[[], None]], nn.Module]:
    """forward (eval, no grad), training step (forward+backward+AdamW) and reparameterized inference,
    optionally under autocast to ``amp`` (e.g. bfloat16)."""
    import copy

    device_type = x.device.type if torch.is_tensor(x) else x[0].device.type

    def autocast():
        return torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-4)
    infer_model = copy.deepcopy(model).eval()
    rep_model = copy.deepcopy(model).eval()
    _reparameterize(rep_model)
    if channels_last:
        for m in (train_model, infer_model, rep_model):
            m.to(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.no_grad(), autocast():
            infer_model(x)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(train_model(train_inputs()))
        loss.backward()
        opt.step()

    def reparam() -> None:
        with torch.no_grad(), autocast():
            rep_model(x)

    return {"forward": forward, "train step": train_step, "reparam inference": reparam}, rep_model


# ----------------------------------------------------------------------------------------------- reporting
def auto_report(times: Dict[str, Dict[str, List[float]]]) -> Tuple[str, Dict[str, float]]:
    """Lines saying how ``auto`` compares with ``plain`` per workload (same process, medians) and where its
    choices came from; and the ratios (plain time / auto time, > 1: auto faster)."""
    from slaknet.layers import autotune

    lines, ratios = [], {}
    for work, per in times.items():
        if "auto" in per and "plain" in per and per["auto"] and per["plain"]:
            ratios[work] = statistics.median(per["plain"]) / statistics.median(per["auto"])
    if ratios:
        lines.append("auto vs plain (plain time / auto time, same process): "
                     + ", ".join(f"{w} {r:.3f}x" for w, r in ratios.items()))
    st = autotune.stats()
    chosen = autotune.decisions()
    by_source: Dict[str, int] = {}
    for d in chosen.values():
        by_source[d.source] = by_source.get(d.source, 0) + 1
    lines.append(f"auto's choices: {len(chosen)} ({', '.join(f'{n} {k}' for k, n in sorted(by_source.items())) or 'none'}); "
                 f"timing cost in this process {st.seconds:.1f} s; cache {autotune.cache_path() or 'off'}")
    for key, d in sorted(chosen.items()):
        detail = ", ".join(f"{n} {1e3 * t:.2f} ms" for n, t in d.medians.items())
        lines.append(f"  {key}: {d.choice} ({d.source}{'; ' + detail if detail else ''})")
    slower = [w for w, r in ratios.items() if r < 1.0 / (1.0 + autotune.MARGIN)]
    if slower:
        lines.append(f"auto was more than {100 * autotune.MARGIN:.0f}% slower than plain on {', '.join(slower)}: "
                     "the cached choices may be stale or the machine busy; re-run with --retime to time them again")
    return "\n".join(lines), ratios


def format_table(times: Dict[str, Dict[str, List[float]]], backends: Sequence[str], batch: int,
                 macs_per_pass: Dict[str, float], peak_gmacs: float) -> str:
    """Median times, images/s, speedup vs the first backend and % of peak per workload."""
    base = backends[0]
    lines = [f"| workload | backend | median s | img/s | speedup vs {base} | % of peak |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for work, per in times.items():
        t_base = statistics.median(per[base])
        for b in backends:
            t = statistics.median(per[b])
            pct = 100.0 * macs_per_pass[work] / t / 1e9 / peak_gmacs if peak_gmacs else float("nan")
            lines.append(f"| {work} | {b} | {t:.4f} | {batch / t:.2f} | {t_base / t:.2f}x | {pct:.0f}% |")
    return "\n".join(lines)


def _peak_memory_subprocess(args: argparse.Namespace, backend: str) -> float:
    """Peak RSS increase (MiB) over two training steps (sampled every ~1 ms), in a fresh process."""
    layout = "b.official_layout()" if backend == OFFICIAL else "contextlib.nullcontext()"
    code = (
        "import contextlib, torch, slaknet.bench as b;"
        f"torch.set_num_threads({args.threads});"
        f"ctx = {layout}; ctx.__enter__();"
        f"print(b._train_memory({args.model!r}, {args.batch}, {args.size}, {bool(args.channels_last)}))"
    )
    env = dict(os.environ, **arm_environment(backend))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _train_memory(model_name: str, batch: int, size: int, channels_last: bool) -> float:
    model, x, inputs, loss_fn = _build(model_name, batch, size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # torch ops release the GIL, so this thread sees the peak within ~1 ms
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(inputs())).backward()
            opt.step()
    finally:
        done.set()
        th.join()
    return (max(peak[0], rss()) - before) / 2 ** 20


def _build(name: str, batch: int, size: int, device: str = "cpu"):
    torch.manual_seed(0)
    if name == "branches":
        model: nn.Module = BranchStack(SLAK_T_STAGES).to(device)
        xs = [x.to(device) for x in model.make_inputs(batch)]  # type: ignore[operator]
        return model, xs, (lambda: xs), (lambda out: out)
    import slaknet

    try:
        model = slaknet.create_model(name)
    except Exception as exc:  # unknown names are user errors
        raise ConfigError(f"cannot build model {name!r}: {exc}") from exc
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    target = torch.randint(0, 1000, (batch,), device=device) % max(1, getattr(model, "num_classes", 1000))
    ce = nn.CrossEntropyLoss()
    return model, x, (lambda: x), (lambda out: ce(out, target))


def run_bench(model_name: str, batch: int, size: int, reps: int, threads: int,
              backends: Sequence[str] = ("plain", "auto"), channels_last: bool = False,
              workloads: Optional[Sequence[str]] = None, peak_gmacs: Optional[float] = None,
              progress: bool = True, device: str = "cpu", amp: Optional[torch.dtype] = None) -> Dict[str, object]:
    """Benchmark one model (or ``branches``) and return times, MACs and the formatted table."""
    torch.set_num_threads(threads)
    tuned = False
    if device == "cpu":  # the allocator as `slaknet train` / `eval` set it (no page faults on freed activations)
        from slaknet.train.machine import keep_freed_memory

        tuned = keep_freed_memory()
    peak = peak_gmacs or (measure_peak_gmacs(threads) if device == "cpu" else 0.0)
    model, x, inputs, loss_fn = _build(model_name, batch, size, device)
    fns, rep_model = model_workloads(model, x, inputs, loss_fn, channels_last, amp)
    if workloads:
        fns = {k: v for k, v in fns.items() if k in workloads}
    fwd_macs = count_inbounds_macs(model.eval(), x) if model_name != "branches" else _branch_macs(model, x)
    rep_macs = count_inbounds_macs(rep_model, x) if model_name != "branches" else _branch_macs(rep_model, x)
    macs = {"forward": fwd_macs, "train step": 3 * fwd_macs, "reparam inference": rep_macs}
    times = compare(fns, list(backends), reps, progress=progress)
    table = format_table(times, list(backends), batch, macs, peak)
    return {"model": model_name, "batch": batch, "size": size, "threads": threads, "peak_gmacs": peak,
            "macs_per_pass": macs, "times": times, "table": table, "allocator_tuned": tuned}


def _branch_macs(model: nn.Module, xs) -> int:
    total = 0
    for stage, x in zip(model.stages, xs):  # type: ignore[attr-defined]
        total += count_inbounds_macs(stage, x)
    return total


# ----------------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.size < 32 or args.reps < 1 or args.threads < 1:
        raise ConfigError("--batch, --reps and --threads must be >= 1 and --size >= 32")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    from slaknet.layers import autotune
    from slaknet.layers.dwconv import backend_names

    bad = [b for b in backends if b not in backend_names() and b != OFFICIAL]
    if bad or len(backends) < 1:
        raise ConfigError(f"unknown backend(s) {bad}; choose from {', '.join((OFFICIAL, *backend_names()))}")
    if getattr(args, "retime", False):
        n = autotune.forget()
        print(f"--retime: forgot {n} cached choice(s) of this machine ({autotune.cache_path() or 'cache off'})")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    res = run_bench(args.model, args.batch, args.size, args.reps, args.threads, backends,
                    args.channels_last, [w.strip() for w in args.workloads.split(",")], args.peak_gmacs,
                    device=args.device, amp=amp)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    precision = "fp32" if args.amp == "none" else f"{args.amp} autocast"
    print(f"\n{args.model} {args.size}x{args.size} batch {args.batch} {precision} on {dev}, {args.threads} threads, "
          f"torch {torch.__version__}, peak {res['peak_gmacs']:.1f} GMAC/s (best fp32 GEMM), in-bounds GMAC per "
          f"forward {res['macs_per_pass']['forward'] / 1e9:.2f}, channels_last={bool(args.channels_last)}"
          + (", glibc allocator keeps freed memory (as in training; SLAKNET_MALLOC=default: untouched)"
             if res["allocator_tuned"] else ""))
    print(res["table"])
    report, ratios = auto_report(res["times"])  # type: ignore[arg-type]
    print(report)
    res["auto_vs_plain"] = ratios
    st = autotune.stats()
    res["autotune"] = {"timing_s": st.seconds, "timed": st.timed, "cached": st.cached, "budget": st.budget,
                       "cache": autotune.cache_path(),
                       "choices": {k: d.choice for k, d in autotune.decisions().items()}}
    if args.memory and args.model != "branches":
        mem = {b: _peak_memory_subprocess(args, b) for b in backends}
        print("peak training RSS increase (MiB): " + ", ".join(f"{b} {v:.0f}" for b, v in mem.items()))
        res["train_peak_rss_mib"] = mem
    if args.json:
        with atomic_path(args.json) as tmp, open(tmp, "w") as f:
            json.dump({k: v for k, v in res.items()}, f, indent=1)
    return 0
