"""CPU time of SSC's ASM target (superpixel means → max-norm → RAS erosion → T): vectorised vs a
per-superpixel loop, side by side in one run.

    python bench/bench_ssc_asm.py [--batch 6] [--classes 2] [--size 256] [--segments 64] [--threads 1]

The paper's setting: batch 6, 512 crops → ASM at 256x256, ≤ 64 superpixels (+ the padding id),
~1.5 present classes per VOC image. Loop forms, written from the formula:
  * spec loop: the ASM formula as written in docs/methods/ssc.md (the official code's work):
    every superpixel of every image, mean of all C masked class maps at once, then the
    present rows;
  * present-row loop: for each present (image, class) row and superpixel, a boolean mask, the
    masked mean and a masked write (the loop over the work the vectorised form does).
The vectorised form pools only the present rows with one scatter_add. All share the
normalisation and the erosion (a separable library min-pool), and are checked to agree before
timing. Lines: the whole target against each loop, and the pooling alone. Reported: medians
of interleaved runs and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wsss_core.methods.ssc_losses import asm_target, max_norm, superpixel_mean


def present_rows(up: torch.Tensor, seg: torch.Tensor, labels: torch.Tensor):
    """[P, 1, H, W] maps of the present (image, class) rows and their [P, H, W] superpixels."""
    image, cls = torch.nonzero(labels > 0, as_tuple=True)
    return up[image, cls][:, None], seg[image]


def pool_vectorised(rows: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    return superpixel_mean(rows, seg)


def pool_loop(rows: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per present row and superpixel: mask, masked mean, masked write."""
    pooled = torch.empty_like(rows)
    for p in range(rows.shape[0]):
        for s in seg[p].unique():
            where = seg[p] == s
            pooled[p, 0][where] = rows[p, 0][where].mean()
    return pooled


def target(pool, rows: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    return asm_target(max_norm(rows)[:, 0], max_norm(pool(rows, seg))[:, 0])


def target_spec_loop(up: torch.Tensor, seg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The ASM formula as written (and as the official code computes it): superpixel means of all C
    (masked) class maps, one superpixel of one image at a time, then the present rows."""
    masked = up * labels[:, :, None, None]
    pooled = torch.empty_like(masked)
    for b in range(up.shape[0]):
        for s in seg[b].unique():
            where = seg[b] == s
            pooled[b][:, where] = masked[b][:, where].mean(dim=1, keepdim=True)
    present = labels > 0
    return asm_target(max_norm(masked)[present], max_norm(pooled * labels[:, :, None, None])[present])


def median_time(fn, *args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--classes", type=int, default=2, help="present classes per image")
    p.add_argument("--size", type=int, default=256, help="side of the half-resolution maps")
    p.add_argument("--segments", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    num_classes = 20
    cams = torch.randn(a.batch, num_classes, a.size // 8, a.size // 8, generator=g)
    up = F.interpolate(cams, size=(a.size, a.size), mode="bilinear", align_corners=False)
    # blocky superpixels with a padding id, like an augmented crop
    cells = torch.randint(0, a.segments, (a.batch, a.size // 16, a.size // 16), generator=g)
    seg = cells.repeat_interleave(16, 1).repeat_interleave(16, 2)
    seg[:, :, -a.size // 8:] = 255
    labels = torch.zeros(a.batch, num_classes)
    for b in range(a.batch):
        labels[b, torch.randperm(num_classes, generator=g)[:a.classes]] = 1
    rows, segs = present_rows(up, seg, labels)
    fast = target(pool_vectorised, rows, segs)
    for slow in (target(pool_loop, rows, segs), target_spec_loop(up, seg, labels)):
        assert torch.allclose(fast, slow, atol=1e-5), "vectorised and loop targets disagree"
    cases = {
        "target, spec loop (all C)": (lambda: target(pool_vectorised, rows, segs),
                                      lambda: target_spec_loop(up, seg, labels)),
        "target, present-row loop": (lambda: target(pool_vectorised, rows, segs),
                                     lambda: target(pool_loop, rows, segs)),
        "pooling alone, rows loop": (lambda: pool_vectorised(rows, segs), lambda: pool_loop(rows, segs)),
    }
    print(f"batch {a.batch}, {a.classes} present classes/image ({rows.shape[0]} rows), "
          f"{a.size}x{a.size}, {a.segments} superpixels + padding, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':26s} {'vectorised':>12s} {'per-superpixel loop':>20s} {'ratio':>8s}")
    for name, (fast, slow) in cases.items():
        t_fast, t_slow = [], []
        for _ in range(a.repeats):  # interleaved, so load changes hit both alike
            t_fast.append(median_time(fast, repeats=1))
            t_slow.append(median_time(slow, repeats=1))
        f, s = statistics.median(t_fast), statistics.median(t_slow)
        print(f"{name:26s} {1e3 * f:9.2f} ms {1e3 * s:17.2f} ms {s / f:7.1f}x")


if __name__ == "__main__":
    main()
