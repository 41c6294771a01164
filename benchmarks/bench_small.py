"""Small models at small batches: eager, reparameterized, torch.compile, onnxruntime and ``slaknet predict``'s path.

The model is the demo's (``slaknet train`` on the built-in data: ``slak_pico``, 64 px, kernels fitted to the
input, 2 classes; random weights: speed does not depend on them). Every arm runs in this process, one
round after another with the order alternating, for each batch size; each figure is the median over
rounds, printed in ms, as a speed ratio against the baseline (eager reparameterized, ``baseline / arm``:
above 1 is faster) and as a time ratio against onnxruntime fp32 (``arm / onnxruntime``: the issue's target
is ``slaknet predict``'s path within 1.5x). The CPU, the thread count and the load average before and
after are printed with the table.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_small.py                  # batch 1 and 8, 1 thread
    PYTHONPATH=src python benchmarks/bench_small.py --batches 1 --rounds 31 --no-compile

Arms:
* eager (as trained): the model before reparameterization, slaknet's default (``auto``) backends;
* eager reparameterized (baseline): two strips per large-kernel layer (``slaknet.reparameterize_model``);
* torch.compile: the reparameterized model under ``torch.compile`` (inductor; needs a C++ compiler; its
  compile time is printed; ``--no-compile`` skips it, a failure is reported and skipped);
* onnxruntime fp32: the ``slaknet export`` default file (strips, any batch / size), a bare
  ``InferenceSession.run`` on a numpy array;
* slaknet predict path: the runner ``slaknet predict --runtime auto`` builds
  (:func:`slaknet.deploy.runtime.inference_runner`: the cached export, tensor in, tensor out). ``predict``
  itself feeds one image at a time (batch 1); the batch-8 row calls the same runner on 8 images at once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch


def demo_model(layer_scale: float = 0.5) -> torch.nn.Module:
    """The model ``slaknet train`` builds for the demo (built-in data), eval mode, random weights with every
    block's layer scale set to ``layer_scale`` and random BatchNorm statistics (at the init value 1e-6 the
    blocks barely change the output, which would hide differences between the arms' results)."""
    import slaknet
    from slaknet.models.training import build_training_model

    cfg = slaknet.config(data="builtin:insideness")
    model = build_training_model(cfg.model, 2, cfg.data.input_size)[0].eval()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_int8 import _randomize  # the same random layer scales / BatchNorm statistics as the int8 bench

    _randomize(model, layer_scale)
    return model


def _sample(fn: Callable[[], object], min_s: float) -> float:
    """Seconds per call: ``fn`` repeated until ``min_s`` has passed (short calls are averaged)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n


def interleaved(arms: Dict[str, Callable[[], object]], rounds: int, min_s: float) -> Dict[str, float]:
    """Median seconds per call of each arm over ``rounds`` rounds, the order reversed every other round."""
    names = list(arms)
    for name in names:  # warm-up
        arms[name]()
        arms[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_sample(arms[name], min_s))
    return {n: statistics.median(v) for n, v in times.items()}


def _load() -> str:
    return "%.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else "n/a"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per batch size (median reported)")
    p.add_argument("--min-ms", type=float, default=20.0, help="a timing sample lasts at least this long")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile arm")
    args = p.parse_args(argv)

    import onnxruntime as ort

    import slaknet
    from slaknet.deploy import export_model
    from slaknet.deploy.runtime import inference_runner
    from slaknet.layers.autotune import cpu_model

    torch.set_num_threads(args.threads)
    load_before = _load()
    torch.manual_seed(0)
    model = demo_model()
    rep = slaknet.reparameterize_model(model)
    size = 64
    kernels = [m.kernel_size for m in model.modules() if type(m).__name__ == "LargeKernelConv"]
    print(f"demo model: slak_pico {size} px, 2 classes, large kernels {sorted(set(map(str, kernels)))}, random "
          "weights (layer scale 0.5, random BatchNorm statistics)")

    folder = tempfile.mkdtemp(prefix="bench-small-")
    onnx_path = os.path.join(folder, "slak_pico.onnx")
    t0 = time.perf_counter()
    export_model(model, onnx_path, "onnx", input_size=(size, size))  # the `slaknet export` defaults
    print(f"onnx export (slaknet export defaults: strips, any batch and size): {time.perf_counter() - t0:.1f} s")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    in_name = session.get_inputs()[0].name

    t0 = time.perf_counter()
    runner = inference_runner(model, torch.randn(1, 3, size, size), "auto")
    print(f"predict runner ({time.perf_counter() - t0:.1f} s): {runner.note}")

    compiled = None
    compile_note = "skipped (--no-compile)"
    if not args.no_compile:
        try:
            c = torch.compile(rep)
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in args.batches:  # compile every shape now, not inside the timing
                    c(torch.randn(b, 3, size, size))
            compiled, compile_note = c, f"compiled in {time.perf_counter() - t0:.1f} s (all batch sizes)"
        except Exception as exc:  # no compiler, an unsupported op...
            compile_note = f"failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
    print(f"torch.compile: {compile_note}")

    base, ort_name, predict_name = "eager reparameterized", "onnxruntime fp32", "slaknet predict path"
    verdicts = []
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size)
        xn = x.numpy()
        with torch.no_grad():
            ref = rep(x)
        arms: Dict[str, Callable[[], object]] = {"eager (as trained)": lambda: model(x), base: lambda: rep(x)}
        if compiled is not None:
            arms["torch.compile (reparameterized)"] = lambda: compiled(x)
        arms[ort_name] = lambda: session.run(None, {in_name: xn})
        arms[predict_name + (" (runtime %s)" % runner.runtime)] = lambda: runner(x)
        with torch.no_grad():
            outs = {n: f() for n, f in arms.items()}
            med = interleaved(arms, args.rounds, args.min_ms / 1e3)
        print(f"\nbatch {batch}, {args.threads} thread(s), median of {args.rounds} interleaved rounds:")
        print(f"| arm | ms | speed vs {base} | time / {ort_name} | max abs logit diff vs {base} |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, t in med.items():
            out = outs[name]
            out = torch.from_numpy(out[0]) if isinstance(out, list) else out
            diff = float((out.float() - ref).abs().max())
            print(f"| {name} | {t * 1e3:.2f} | {med[base] / t:.2f}x | {t / med[ort_name]:.2f}x | {diff:.1e} |")
        pred = next(n for n in med if n.startswith(predict_name))
        ratio = med[pred] / med[ort_name]
        verdicts.append(f"batch {batch}: {pred} = {ratio:.2f}x onnxruntime fp32's time -> "
                        f"{'within' if ratio <= 1.5 else 'NOT within'} 1.5x")
    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}, threads {args.threads}, load average {load_before} before, {_load()} after")
    print("target (issue): batch-1 inference within 1.5x of onnxruntime fp32 in the same process")
    for v in verdicts:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
