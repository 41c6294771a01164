"""int8 inference (onnxruntime static quantization) vs fp32 / bf16 eager PyTorch and fp32 onnxruntime, one process.

Usage::

    PYTHONPATH=src python benchmarks/bench_int8.py --model slak_tiny --size 224 --batches 1 8 --reps 3
    PYTHONPATH=src python benchmarks/bench_int8.py --model slak_pico --size 64 --checkpoint RUN/checkpoint-best.pth

Arms (all on the reparameterized model, CPU, ``--threads`` threads for torch and onnxruntime, run
interleaved rep by rep, medians): ``fp32 eager`` (slaknet's default backends), ``bf16 eager``
(``torch.autocast("cpu", torch.bfloat16)``), ``ort fp32`` (the exported ONNX file), ``ort int8`` (QDQ,
per-channel weights, min/max calibration) and ``ort int8 (lk fp32)`` (large-kernel convs kept in fp32).
Also prints the top-1 agreement / max |logit diff| of each onnxruntime arm vs fp32 eager on held-out
images (the built-in data's val split) and the load average before and after. Without ``--checkpoint``
the weights are random; ``--layer-scale`` then sets every block's layer scale (default 0.5; the init value
1e-6 would make every block an identity and the agreement figures meaningless).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from slaknet.deploy.export import export_model
from slaknet.deploy.quantize import calibration_tensors, compare_outputs, onnx_runner, quantize_onnx
from slaknet.models import create_model
from slaknet.models.factory import model_from_checkpoint, reparameterize_model


def _cpu_flags() -> str:
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    want = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in want)


def _randomize(model: torch.nn.Module, layer_scale: float) -> None:
    """Non-trivial BatchNorm statistics and layer scales for a random-weight model."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(layer_scale)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_((torch.rand(c, generator=g) * 2 - 1) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)


def _print_table(args: argparse.Namespace, arms, times, agree, loads) -> None:
    """The markdown table: median time per arm and batch, ratio to fp32 eager, agreement figures."""
    print(f"{args.model} {args.size}px, {'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}, "
          f"threads {args.threads}, reps {args.reps}, torch {torch.__version__}; CPU: {_cpu_flags()}; "
          f"load avg before {loads[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print("| arm | " + " | ".join(f"batch {b}" for b in args.batches) + " | top-1 agreement vs fp32 eager | max abs logit diff |")
    print("| --- |" + " ---: |" * (len(args.batches) + 2))
    for arm in arms:
        cells = []
        for b in args.batches:
            t, t32 = statistics.median(times[(arm, b)]), statistics.median(times[("fp32 eager", b)])
            cells.append(f"{t * 1000:.1f} ms ({t32 / t:.2f}x)")
        a = agree.get(arm)
        extra = (f"{a['top1_agreement']:.1%} of {int(a['images'])} | {a['max_abs_diff']:.3g} (max abs logit "
                 f"{a['ref_max_abs']:.3g})") if a else "- | -"
        print(f"| {arm} | " + " | ".join(cells) + f" | {extra} |")



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (default 1: on a shared 2-core machine 2 threads swing 10-50x)")
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--check-images", type=int, default=256)
    p.add_argument("--layer-scale", type=float, default=0.5)
    p.add_argument("--arms", default="fp32 eager,bf16 eager,ort fp32,ort int8,ort int8 (lk fp32)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loads = os.getloadavg()
    if args.checkpoint:
        model, info, _ = model_from_checkpoint(args.checkpoint, args.model)
        mean, std = info.mean or (0.5,) * 3, info.std or (0.5,) * 3
    else:
        model = create_model(args.model).eval()
        _randomize(model, args.layer_scale)
        mean = std = (0.5,) * 3  # the built-in images in [-1, 1]
    deploy = reparameterize_model(model)
    cal, held = calibration_tensors("builtin", (args.size, args.size), mean, std, args.calibration_images,
                                    args.check_images)
    arms = args.arms.split(",")
    runners, agree = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        t0 = time.perf_counter()
        export_model(model, fp32, "onnx", input_size=(args.size, args.size))
        print(f"fp32 export {time.perf_counter() - t0:.1f}s", flush=True)
        for arm in arms:
            if arm == "fp32 eager":
                runners[arm] = lambda x: deploy(x)
            elif arm == "bf16 eager":
                def bf16(x):
                    with torch.autocast("cpu", torch.bfloat16):
                        return deploy(x)
                runners[arm] = bf16
            elif arm == "ort fp32":
                runners[arm] = onnx_runner(fp32, args.threads, spin=False)
            else:
                path = os.path.join(tmp, f"{len(runners)}.onnx")
                t0 = time.perf_counter()
                quantize_onnx(fp32, path, cal, exclude="large_kernel" if "lk fp32" in arm else "none")
                print(f"{arm}: quantized in {time.perf_counter() - t0:.1f}s, {os.path.getsize(path) / 2**20:.1f} MiB", flush=True)
                runners[arm] = onnx_runner(path, args.threads, spin=False)
        for arm, run in runners.items():
            if arm != "fp32 eager":
                with torch.no_grad():
                    agree[arm] = compare_outputs(lambda x: run(x).float(), deploy, held)
                print(f"{arm}: top-1 agreement {agree[arm]['top1_agreement']:.1%}", flush=True)
        times = {(arm, b): [] for arm in arms for b in args.batches}
        with torch.no_grad():
            for b in args.batches:
                x = torch.randn(b, 3, args.size, args.size)
                for run in runners.values():
                    run(x)  # warm-up
                for _ in range(args.reps):
                    for arm, run in runners.items():
                        t0 = time.perf_counter()
                        run(x)
                        times[(arm, b)].append(time.perf_counter() - t0)
                print(f"batch {b}: " + ", ".join(f"{a} {statistics.median(times[(a, b)]) * 1000:.1f} ms" for a in arms),
                      flush=True)
    _print_table(args, arms, times, agree, loads)

if __name__ == "__main__":
    main()
