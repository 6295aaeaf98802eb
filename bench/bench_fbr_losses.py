"""Forward+backward CPU time of FBR's FB + IF losses: vectorised vs a per-query loop.

    python bench/bench_fbr_losses.py [--batch 8] [--grid 32] [--dim 128] [--bank 50000] [--threads 1]

Inputs follow the paper preset at crop 512 (32x32 grid, 128-d heads, 256 negatives, a full
50,000-NROI bank) with pseudo labels and queries made from a random CAM exactly as in training.
The loop form is the natural per-query structure: for every query it gathers its prototype and
its 256 negatives, computes the 257 cosines and the cross-entropy, then averages per class.
Both forms use the same negatives (same generator seed) and are checked to agree before timing;
medians of interleaved runs are reported, so load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from wsss_core.methods.fbr_losses import (class_prototypes, fb_loss, host_pseudo_labels, if_loss,
                                          sample_bank_negatives,
                                          query_mask, sample_if_negatives)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cobra_losses import compare_forms  # noqa: E402  (same check and timing protocol)


def _per_query_loss(f, query, pseudo, protos, keys_of, tau) -> torch.Tensor:
    """(1/|C_b|) Σ_c mean_q CE_q with one small cosine/CE computation per query."""
    present = [c for c in pseudo.unique().tolist() if c > 0]
    sums = {c: f.new_zeros(()) for c in present}
    counts = {c: 0 for c in present}
    anchors = f.permute(0, 2, 3, 1)[query]  # one gather; indexing f per query would give
    for q, c in enumerate(pseudo[query].tolist()):  # each query a full-size gradient buffer
        anchor = anchors[q]
        cands = torch.cat([protos[c][None], keys_of(q)])
        logits = F.cosine_similarity(anchor[None], cands, dim=1, eps=1e-8) / tau
        sums[c] = sums[c] + torch.logsumexp(logits, 0) - logits[0]
        counts[c] += 1
    return sum(sums[c] / max(counts[c], 1) for c in present) / len(present)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--bank", type=int, default=50000)
    ap.add_argument("--n-neg", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="loop-form runs (vectorised: 10 per loop run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both forms")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    B, h, d, C = args.batch, args.grid, args.dim, args.classes
    labels = torch.zeros(B, C)
    for b in range(B):
        labels[b, torch.randperm(C, generator=g)[:2]] = 1
    cam = F.interpolate(torch.randn(B, C, h // 4, h // 4, generator=g), size=(h, h), mode="bilinear")
    scores, probs, pseudo = host_pseudo_labels(cam, labels, 0.10)
    query = query_mask(scores, probs, pseudo, "quantile", 0.4, 0.25)
    f = torch.rand(B, d, h, h, generator=g).requires_grad_(True)
    protos, _ = class_prototypes(f, scores, pseudo, max(1, h * h // 32))
    bank = torch.rand(args.bank, d, generator=g)
    n_q = int(query.sum())

    def vectorised() -> torch.Tensor:
        loss = (fb_loss(f, query, pseudo, protos, bank, args.n_neg, 0.5, torch.Generator().manual_seed(1))
                + if_loss(f, query, pseudo, protos, args.n_neg, 0.1, 0.5, torch.Generator().manual_seed(2)))
        loss.backward()
        return loss

    def loop() -> torch.Tensor:
        idx = sample_bank_negatives(n_q, bank.shape[0], args.n_neg, torch.Generator().manual_seed(1))
        pixels = sample_if_negatives(query, pseudo, protos, args.n_neg, 0.5, torch.Generator().manual_seed(2))
        flat = f.detach().permute(0, 2, 3, 1).reshape(-1, d)
        loss = (_per_query_loss(f, query, pseudo, protos, lambda q: bank[idx[q]], 0.5)
                + _per_query_loss(f, query, pseudo, protos, lambda q: flat[pixels[q]], 0.1))
        loss.backward()
        return loss

    compare_forms(vectorised, loop, args.repeats, 1e-4,
                  f"FB + IF forward+backward, CPU ({torch.get_num_threads()} threads), B={B}, "
                  f"grid {h}x{h}, d={d}, {n_q} queries, bank {args.bank}, {args.n_neg} negatives",
                  "per-query loop")


if __name__ == "__main__":
    main()
