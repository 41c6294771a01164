"""Overhead of the sparse engine per training step, relative to the same step without it (one process).

What is timed (AdamW by default fused, forward + backward + optimizer step on random data):

* ``base``: a plain training step;
* ``engine``: the same step with the engine attached (its post-step hook re-applies the masks, or for
  layers parked in a fused Adam's state only checks that the state is still the one it prepared);
* ``mask``: the hook's work alone (``engine.after_step`` without an update), many repetitions, plus,
  for parked layers, the forward guard (buffer copy and output check, see docs/sparse.md);
* ``update``: one topology update (prune + regrow over all sparse layers), a few repetitions.

Base and engine steps are interleaved (A, B, A, B, ...) so machine load drifts hit both alike. The
per-step overhead averaged over ``u`` steps including the update step is reported two ways:

* ``paired``:   (median(engine - base) + update / u) / median(base)
* ``measured``: (mask + update / u) / median(base)        -- less noisy on a shared machine

On CPU every figure is given in process CPU time (``time.process_time``, robust to other processes on a
shared machine; one thread by default so idle OpenMP spinning does not count) and in wall-clock time.

``--full`` instead runs ``u`` steps per arm, interleaved in blocks of ``--block`` steps (the engine arm
performs its real update at its step ``u``), and reports (sum(engine) - sum(base)) / sum(base); slow on
CPU and, on a shared machine, noisier than the component figure.

Example: ``python benchmarks/bench_sparse_overhead.py --model slak_tiny --image-size 64 --batch-size 4``
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, List

import torch
import torch.nn.functional as F


OPTIMIZERS = {
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05),
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=0.05),
}


def parse_args(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="slak_tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per arm (interleaved mode)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("-u", "--update-frequency", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--sparse-init", default="ERK", choices=["uniform", "ERK", "snip"])
    p.add_argument("--growth", default="random", choices=["random", "gradient", "momentum"])
    p.add_argument("--optimizer", default="adamw-fused", choices=list(OPTIMIZERS),
                   help="adamw-fused (default; what `slaknet train` uses: the engine then needs no per-step "
                        "pass), adamw (torch's default for-loop implementation on CPU) or sgd (momentum 0.9)")
    p.add_argument("--masking", default="auto", choices=["auto", "pass"], help="engine masking mode")
    p.add_argument("--mask-reps", type=int, default=20)
    p.add_argument("--updates", type=int, default=3, help="timed topology updates")
    p.add_argument("--full", action="store_true", help="run u real steps per arm (slow on CPU)")
    p.add_argument("--block", type=int, default=10, help="--full: steps per arm between switches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--wall", action="store_true", help="on CPU, time wall-clock instead of process CPU time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # replaced by time.process_time on CPU unless --wall


def _timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    t = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - t


def main(argv: List[str] | None = None) -> int:
    args = parse_args(argv)
    global CLOCK
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        CLOCK = time.process_time if not args.wall else time.perf_counter
    import slaknet  # noqa: F401  (registers the models with timm)
    from slaknet.sparse import SparseEngine

    torch.manual_seed(0)
    model = slaknet.create_model(args.model).to(args.device)
    model.train()
    opt = OPTIMIZERS[args.optimizer](model.parameters())
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 1000, (args.batch_size,), device=args.device)
    total_steps = 10 * args.update_frequency

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    engine = SparseEngine(model, opt, sparsity=args.sparsity, sparse_init=args.sparse_init,
                          growth=args.growth, update_frequency=args.update_frequency,
                          total_steps=total_steps, snip_batch=(x, y), attach=False, masking=args.masking)
    engine.apply_masks()
    sparse_params = sum(layer.numel for layer in engine.layers)
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, device {args.device}, "
          f"threads {torch.get_num_threads()}; {len(engine.layers)} sparse layers "
          f"({sparse_params / 1e6:.1f}M weights), {len(engine.dense_layers)} dense; u={args.update_frequency}; "
          f"clock {CLOCK.__name__}",
          flush=True)
    def off() -> None:  # base arm: no hook, no forward guard; parked state stays (detach() would unpark)
        engine._remove_hook()
        for h in engine._guard or ():
            h.remove()
        engine._guard = None

    def on() -> None:
        engine.attach(opt)
        engine._install_guard()

    for _ in range(args.warmup):
        step()
    engine.attach(opt)
    for _ in range(args.warmup):
        step()
    engine.step_count = 0  # warm-up steps do not count towards the schedule
    parked = engine.stats()["parked_layers"]
    print(f"optimizer {args.optimizer}, masking {args.masking}: {parked} of {len(engine.layers)} sparse layers "
          f"held at zero by the optimizer state, {len(engine.layers) - parked} re-masked after every step",
          flush=True)

    res = {"clock": CLOCK.__name__, "model": args.model, "optimizer": args.optimizer, "masking": args.masking,
           "parked_layers": parked, "image_size": args.image_size, "batch_size": args.batch_size,
           "device": args.device, "u": args.update_frequency, "sparsity": args.sparsity,
           "growth": args.growth, "sparse_init": args.sparse_init}
    if args.full:
        base, eng = [], []
        block = max(1, args.block)
        while len(eng) < args.update_frequency:  # interleaved blocks: base x block, engine x block
            n = min(block, args.update_frequency - len(eng))
            off()
            base += [_timed(step, args.device) for _ in range(n)]
            on()
            eng += [_timed(step, args.device) for _ in range(n)]
        assert engine.update_count == 1, "the engine arm must include exactly one update step"
        res.update(base_total_s=sum(base), engine_total_s=sum(eng),
                   overhead_full=(sum(eng) - sum(base)) / sum(base))
        print(f"full: base {sum(base):.2f}s, engine {sum(eng):.2f}s over {args.update_frequency} steps "
              f"-> overhead {100 * res['overhead_full']:.2f}%")
    else:
        base: List[float] = []
        eng: List[float] = []
        for i in range(args.steps):
            off()
            base.append(_timed(step, args.device))
            on()
            eng.append(_timed(step, args.device))
            print(f"  step {i + 1}/{args.steps}: base {base[-1]:.3f}s engine {eng[-1]:.3f}s", flush=True)
        assert engine.update_count == 0 or args.steps >= args.update_frequency
        res.update(base_median_s=statistics.median(base), engine_median_s=statistics.median(eng),
                   paired_diff_median_s=statistics.median([b - a for a, b in zip(base, eng)]))

    # the hook's per-step work alone (no update), the forward guard of parked layers (buffer copy and an
    # output check), and one topology update
    off()
    saved = engine.step_count
    engine.config.fix = True  # after_step without triggering an update
    mask_t = statistics.median([_timed(engine.after_step, args.device) for _ in range(args.mask_reps)])
    guard_t = 0.0
    if engine.stats()["parked_layers"]:
        logits = torch.randn(args.batch_size, 1000, device=args.device)
        guard_t = statistics.median([_timed(lambda: (engine._snapshot_buffers(),
                                                     engine._guard_output(model, (x,), {}, logits)), args.device)
                                     for _ in range(args.mask_reps)])
    res["guard_s"] = guard_t
    mask_t += guard_t
    engine.config.fix = False
    engine.step_count = saved
    step()  # fresh gradients for gradient growth
    upd = [_timed(engine.update_topology, args.device) for _ in range(args.updates)]
    upd_t = statistics.median(upd)
    res.update(mask_s=mask_t, update_s=upd_t)
    base_ref = res.get("base_median_s") or res["base_total_s"] / args.update_frequency
    res["overhead_measured"] = (mask_t + upd_t / args.update_frequency) / base_ref
    print(f"per-step masking {1e3 * mask_t:.2f} ms (forward guard {1e3 * guard_t:.2f} ms), one update {1e3 * upd_t:.0f} ms, "
          f"base step {1e3 * base_ref:.0f} ms")
    if not args.full:
        res["overhead_paired"] = (res["paired_diff_median_s"] + upd_t / args.update_frequency) / base_ref
        print(f"overhead averaged over u={args.update_frequency} steps incl. the update step: "
              f"paired {100 * res['overhead_paired']:.2f}%, measured {100 * res['overhead_measured']:.2f}% "
              f"(target <= 3%)")
    else:
        print(f"overhead (measured components) {100 * res['overhead_measured']:.2f}% (target <= 3%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
