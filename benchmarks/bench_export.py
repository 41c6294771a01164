"""Deployment benchmark: exported (onnxruntime) vs eager PyTorch speed, sparse checkpoint size, 1024 px memory.

All timings of one run come from the same process, interleaved round by round (the machine may be shared,
so each figure is the median over rounds), and are printed as ratios to eager PyTorch on the training form:

    python benchmarks/bench_export.py                        # SLaK-T, 224 px, batch 1: speed, size, memory
    python benchmarks/bench_export.py --only speed --batch 8 --rounds 5
    python benchmarks/bench_export.py --only size --sparsity 0.4
    python benchmarks/bench_export.py --only memory --memory-size 1024

* speed: eager (training form, slaknet's default depthwise backend), eager reparameterized (two strips,
  default and plain backends), and the ONNX export (two strips; ``--dense`` adds the dense-merged one) run
  by onnxruntime with the same number of threads.
* size: a randomly initialised model made sparse by ``SparseEngine`` (ERK, default ``--sparsity 0.4`` over
  all conv/linear weights), saved as a dense safetensors file, a ``torch.save`` state dict and the compact
  sparse format (with and without the engine state); ratios to the dense safetensors file.
* memory: peak resident memory added by one forward of the SLaK backbone (4 stage outputs) at
  ``--memory-size`` px, batch 1, in a fresh subprocess each: inference (no_grad, training form),
  inference reparameterized, and a forward with autograd (training mode: activations kept for backward).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

import slaknet


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_speed(args: argparse.Namespace) -> Dict[str, object]:
    from slaknet.deploy import export_model, load_exported, plain_dwconv

    model = slaknet.create_model(args.model).eval()
    size = args.size or model.pretrained_cfg["input_size"][-1]
    x = torch.randn(args.batch, 3, size, size)
    rep = slaknet.reparameterize_model(model)
    runners: Dict[str, Callable[[], object]] = {}

    def eager(m):
        def run():
            with torch.no_grad():
                return m(x)
        return run

    def eager_plain(m):
        def run():
            with torch.no_grad(), plain_dwconv():
                return m(x)
        return run

    runners["eager (training form)"] = eager(model)
    runners["eager reparam (strips)"] = eager(rep)
    runners["eager reparam (strips, plain conv)"] = eager_plain(rep)
    exports = {}
    with tempfile.TemporaryDirectory() as tmp:
        forms = ["strips"] + (["dense"] if args.dense else [])
        for form in forms:
            path = os.path.join(tmp, f"{form}.onnx")
            t0 = time.perf_counter()
            res = export_model(model, path, "onnx", reparameterize=form, input_size=(size, size),
                               dynamic_spatial=False)
            exports[form] = {"export_s": time.perf_counter() - t0, "max_abs_diff": res.max_abs_diff,
                             "max_scaled_diff": res.max_rel_diff}
            run = load_exported(path, "onnx")
            runners[f"onnxruntime ({form})"] = (lambda r: (lambda: r(x)))(run)
        for fn in runners.values():  # warm-up (first-call allocations, oneDNN / ORT kernel selection)
            fn()
        times: Dict[str, List[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                times[name].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["eager (training form)"]
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"\n## speed: {args.model}, batch {args.batch}, {size}x{size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds{load} ({os.cpu_count()} CPUs)")
    print("| runner | median s | img/s | speed vs eager |")
    print("|---|---|---|---|")
    for k, t in med.items():
        print(f"| {k} | {t:.4f} | {args.batch / t:.2f} | {base / t:.2f}x |")
    for form, e in exports.items():
        print(f"ONNX ({form}): exported+verified in {e['export_s']:.1f}s, max |diff| vs eager {e['max_abs_diff']:.2e} "
              f"(scaled {e['max_scaled_diff']:.2e})")
    return {"median_s": med, "exports": exports, "onnx_vs_eager": base / med["onnxruntime (strips)"]}


def bench_size(args: argparse.Namespace) -> Dict[str, object]:
    from safetensors.torch import save_file

    from slaknet.deploy import model_metadata, save_sparse_checkpoint
    from slaknet.sparse import SparseEngine

    torch.manual_seed(0)
    model = slaknet.create_model(args.model)
    engine = SparseEngine(model, None, sparsity=args.sparsity, fix=True)
    engine.apply_masks()
    out: Dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        dense = os.path.join(tmp, "dense.safetensors")
        save_file(sd, dense)
        pth = os.path.join(tmp, "dense.pth")
        torch.save(sd, pth)
        meta = model_metadata(model, sparsity_target=args.sparsity)
        plain = save_sparse_checkpoint(os.path.join(tmp, "sparse.safetensors"), model, metadata=meta)
        with_engine = save_sparse_checkpoint(os.path.join(tmp, "sparse_engine.safetensors"), model,
                                             engine=engine, metadata=meta)
        d = os.path.getsize(dense)
        sizes = {"dense safetensors": d, "torch.save state dict": os.path.getsize(pth),
                 "compact sparse (masks = non-zeros)": plain.file_bytes,
                 "compact sparse + engine state": with_engine.file_bytes}
    print(f"\n## size: {args.model} at {args.sparsity:.0%} sparsity (ERK over all conv/linear weights; "
          f"global density {engine.global_density():.3f}, density of the stored sparse tensors "
          f"{with_engine.density:.3f}; {with_engine.bitmask_tensors} bit masks, {with_engine.index_tensors} index lists)")
    print("| file | MiB | ratio to dense safetensors |")
    print("|---|---|---|")
    for k, v in sizes.items():
        print(f"| {k} | {v / 2**20:.1f} | {v / d:.3f} |")
    out["bytes"] = sizes
    out["ratio"] = with_engine.file_bytes / d
    return out


_MEMORY_CODE = r"""
import json, resource, sys, torch, slaknet
from slaknet.deploy.backbone import SLaKBackbone
name, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))
bb = SLaKBackbone(name)
if mode == "reparam":
    slaknet.reparameterize_model(bb, inplace=True)
bb.train(mode == "autograd")
x = torch.randn(1, 3, size, size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "autograd":
    outs = bb(x)
else:
    with torch.no_grad():
        outs = bb(x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
params = sum(p.numel() * p.element_size() for p in bb.parameters())
out_bytes = sum(o.numel() * o.element_size() for o in outs)
print(json.dumps({"peak_delta_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024,
                  "params_mib": params / 2**20, "outputs_mib": out_bytes / 2**20,
                  "shapes": [list(o.shape) for o in outs]}))
"""


def bench_memory(args: argparse.Namespace) -> Dict[str, object]:
    res = {}
    for mode in ("inference", "reparam", "autograd"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CODE, args.model, str(args.memory_size), mode,
                               str(torch.get_num_threads())], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"memory measurement ({mode}) failed")
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        res[mode]["seconds"] = time.perf_counter() - t0
    print(f"\n## memory: {args.model} backbone, batch 1, {args.memory_size}x{args.memory_size}, CPU float32 "
          f"(peak RSS added by one forward, fresh process each)")
    print("| forward | peak added MiB | process peak MiB | outputs MiB | weights MiB | wall s |")
    print("|---|---|---|---|---|---|")
    labels = {"inference": "no_grad, training form", "reparam": "no_grad, reparameterized (strips)",
              "autograd": "with autograd (train mode)"}
    for mode, r in res.items():
        print(f"| {labels[mode]} | {r['peak_delta_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['outputs_mib']:.0f} | "
              f"{r['params_mib']:.0f} | {r['seconds']:.1f} |")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--only", choices=["speed", "size", "memory"], default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="input size for speed (default: the model's)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--dense", action="store_true", help="also export and time the dense-merged ONNX")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--memory-size", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if args.only in (None, "speed"):
        results["speed"] = bench_speed(args)
    if args.only in (None, "size"):
        results["size"] = bench_size(args)
    if args.only in (None, "memory"):
        results["memory"] = bench_memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
