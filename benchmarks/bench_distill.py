"""What a teacher costs per training step: student alone vs + teacher (eager / reparameterized / cached).

One process, same batch, interleaved repetitions (median of each arm), so the ratios are comparable even
on a busy machine. The student step is forward + KD loss + backward + AdamW step; the teacher arms add the
teacher's no-grad forward (eager: the training-time branches; reparameterized: one conv per block) or, for
the cache, a lookup of precomputed logits.

    python benchmarks/bench_distill.py                       # slak_pico -> slak_pico_k7, 64 px, batch 64
    python benchmarks/bench_distill.py --teacher slak_tiny --student slak_nano_k7 --size 224 --batch 8
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import slaknet
from slaknet.distill.losses import KDLoss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="slak_pico")
    p.add_argument("--student", default="slak_pico_k7")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher = slaknet.create_model(a.teacher, num_classes=a.classes).eval().requires_grad_(False)
    teacher_rep = slaknet.reparameterize_model(teacher).eval().requires_grad_(False)
    student = slaknet.create_model(a.student, num_classes=a.classes)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    loss_fn = KDLoss(alpha=0.5, T=2.0)
    x = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, a.classes, (a.batch,))
    cache = {i: torch.randn(a.classes) for i in range(a.batch)}

    def step(teacher_logits) -> None:
        t = teacher_logits()
        loss = loss_fn(student(x), t, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eager():
        with torch.no_grad():
            return teacher(x)

    def reparam():
        with torch.no_grad():
            return teacher_rep(x)

    arms = {"student alone (CE)": None, "+ teacher, eager": eager, "+ teacher, reparameterized": reparam,
            "+ teacher cache lookup": lambda: torch.stack([cache[i] for i in range(a.batch)])}
    times = {k: [] for k in arms}
    for k, f in arms.items():  # warm-up
        step(f or (lambda: torch.zeros(a.batch, a.classes)))
    for _ in range(a.reps):
        for k, f in arms.items():
            t0 = time.perf_counter()
            if f is None:
                loss = torch.nn.functional.cross_entropy(student(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                step(f)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["student alone (CE)"])
    print(f"teacher {a.teacher} -> student {a.student}, {a.size} px, batch {a.batch}, {a.threads} threads, "
          f"median of {a.reps}")
    print("| arm | step (ms) | vs student alone |\n|---|---|---|")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {1000 * m:.0f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
