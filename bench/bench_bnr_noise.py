"""Forward+backward CPU time of BNR's noise logits z** = GAP(k·Ā*·M*) in three forms.

    python bench/bench_bnr_noise.py [--batch 8] [--grid 32] [--classes 21] [--threads 1]

* `column sums` (wsss_core.methods.bnr.noise_logits): GAP commutes with the product, so z** is
  M* times the column sums of Ā*: O(B·N²) for the sums and O(B·C·N) for the mat-vec;
* `two matmuls`: Ā*·M* [B, C, N] formed, then pooled: O(B·C·N²);
* `attention squared`: (k/L)·A*·A*·M with the N×N product formed: O(B·N³).
All three are checked to agree before timing. Reported: medians of interleaved runs and their
ratios to the column-sum form (grid 32 = a 512-pixel crop at stride 16, N = 1024).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from wsss_core.methods.bnr import noise_logits, refine_cam


def two_matmuls(attn_mean: torch.Tensor, refined: torch.Tensor, k: float) -> torch.Tensor:
    return (k * torch.bmm(refined, attn_mean[:, 1:, 1:].transpose(1, 2))).mean(-1)


def attention_squared(attn_sum: torch.Tensor, cam: torch.Tensor, k: float, blocks: int) -> torch.Tensor:
    a = attn_sum[:, 1:, 1:]
    return (k / blocks) * torch.bmm(cam, torch.bmm(a, a).transpose(1, 2)).mean(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.grid * a.grid
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(a.batch, n + 1, n + 1, generator=g), -1) * a.blocks
    cam = torch.randn(a.batch, a.classes, n, generator=g)

    def run(form: str) -> torch.Tensor:
        at = attn.clone().requires_grad_(True)
        m = cam.clone().requires_grad_(True)
        if form == "attention squared":
            z = attention_squared(at, m, 1.0, a.blocks)
        else:
            refined = refine_cam(at, m)
            z = noise_logits(at / a.blocks, refined) if form == "column sums" \
                else two_matmuls(at / a.blocks, refined, 1.0)
        z.sum().backward()
        return z.detach()

    forms = ("column sums", "two matmuls", "attention squared")
    ref = run(forms[0])
    for form in forms[1:]:
        torch.testing.assert_close(run(form), ref, rtol=1e-4, atol=1e-3)
    times = {f: [] for f in forms}
    for _ in range(a.repeats):
        for f in forms:
            t0 = time.perf_counter()
            run(f)
            times[f].append(time.perf_counter() - t0)
    base = statistics.median(times[forms[0]])
    print(f"B={a.batch} N={n} C={a.classes} threads={torch.get_num_threads()} "
          f"(M* = A*·M included in every form but the last)")
    for f in forms:
        med = statistics.median(times[f])
        print(f"  {f:18s} {med * 1e3:9.1f} ms  x{med / base:6.2f}")


if __name__ == "__main__":
    main()
