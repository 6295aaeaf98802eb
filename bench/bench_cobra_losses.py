"""Forward+backward CPU time of CoBra's SAP + CAP losses: vectorised vs a per-patch loop.

    python bench/bench_cobra_losses.py [--batch 8] [--grid 14] [--dim 256] [--threads 1] [--no-export]

Both forms run with the same torch thread count (default: torch's, i.e. every core; pass
--threads 1 for single-core numbers — the loop's many tiny ops pay OpenMP overhead with more
threads, so the ratio depends on it and both should be quoted). Reported: medians of
interleaved runs. It also prints CAM export throughput in images per second.

The loop form is the reference code's structure (loss_modules.py `cll_v1` / `cll_v2`): per
image and per query patch it gathers the embedding vectors of its positives and negatives and
builds the contrastive term from them. Both forms are checked to agree before timing.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from wsss_core.methods.cobra_losses import cap_loss, cnn_pseudo_labels, sap_loss


def _patch_term(e: torch.Tensor, p: int, pos: torch.Tensor, neg: torch.Tensor, tau: float,
                temperature_bug: bool) -> torch.Tensor:
    """Σ over positives of -log(exp(s_pq/τ) / (exp(s_pq/τ) + N_p)) for one query patch."""
    anchor = e[:, p]                         # [D]
    s_pos = anchor @ e[:, pos]               # gathers K⁺ vectors of D dims
    s_neg = anchor @ e[:, neg]               # gathers K⁻ vectors of D dims
    pos_exp = torch.exp(s_pos / tau)
    neg_sum = torch.exp(s_neg).sum() / tau if temperature_bug else torch.exp(s_neg / tau).sum()
    return -torch.log(pos_exp / (pos_exp + neg_sum)).sum()


def sap_loop(z_cnn, pseudo, e_vit, k_pos, k_neg, tau, temperature_bug) -> torch.Tensor:
    B, P = pseudo.shape
    z = z_cnn.detach().flatten(2)
    total = e_vit.new_zeros(())
    for b in range(B):
        e = F.normalize(e_vit[b].flatten(1), dim=0)
        for p in range(P):
            row = z[b, pseudo[b, p]]
            pos = row.topk(k_pos).indices
            neg = row.topk(k_neg, largest=False).indices
            total = total + _patch_term(e, p, pos, neg, tau, temperature_bug)
    return total / (B * P * k_pos)


def cap_loop(attn, e_cnn, k_pos, k_neg, tau) -> torch.Tensor:
    B = attn.shape[0]
    affinity = attn.detach().sum(1)[:, 1:, 1:]
    P = affinity.shape[-1]
    total = e_cnn.new_zeros(())
    for b in range(B):
        e = F.normalize(e_cnn[b].flatten(1), dim=0)
        for p in range(P):
            pos = affinity[b, p].topk(k_pos).indices
            neg = affinity[b, p].topk(k_neg, largest=False).indices
            total = total + _patch_term(e, p, pos, neg, tau, False)
    return total / (B * P * k_pos)


def _time_interleaved(fast, slow, repeats: int) -> tuple[float, float]:
    """Median seconds of one forward+backward of each form, measured alternately (10 fast runs
    per slow run) so that load from other processes hits both alike."""
    fast_times, slow_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        slow()
        slow_times.append(time.perf_counter() - t0)
        for _ in range(10):
            t0 = time.perf_counter()
            fast()
            fast_times.append(time.perf_counter() - t0)
    return statistics.median(fast_times), statistics.median(slow_times)


def compare_forms(vectorised, loop, repeats: int, rel_tol: float, what: str, loop_name: str) -> None:
    """Check that the two forms give the same loss, time them (`_time_interleaved`) and print
    `what` with the loss, then a row per form and the speed-up."""
    lv, ll = vectorised().item(), loop().item()
    if not math.isclose(lv, ll, rel_tol=rel_tol):
        raise SystemExit(f"vectorised {lv} != loop {ll}")
    t_vec, t_loop = _time_interleaved(vectorised, loop, repeats)
    width = max(len(loop_name), len("vectorised"))
    print(f"{what}; loss {lv:.6f} (both forms)")
    print(f"{'vectorised':>{width}}: {t_vec * 1e3:10.2f} ms")
    print(f"{loop_name:>{width}}: {t_loop * 1e3:10.2f} ms")
    print(f"{'speed-up':>{width}}: {t_loop / t_vec:10.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--top-bot-k", type=int, nargs=4, default=[20, 5, 5, 20])
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=5, help="loop-form runs (vectorised: 10 per loop run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both forms (default: torch's default, all cores)")
    ap.add_argument("--no-export", dest="export", action="store_false",
                    help="skip the CAM export throughput measurement")
    ap.add_argument("--export-images", type=int, default=5)
    ap.add_argument("--paper-export", action="store_true",
                    help="also time the paper preset's export on CPU (about 100 s per image)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    B, h, D, C = args.batch, args.grid, args.dim, args.classes
    P = h * h
    sap_pos, sap_neg, cap_pos, cap_neg = args.top_bot_k
    z_cnn = torch.randn(B, C + 1, h, h, generator=g)
    labels = (torch.rand(B, C, generator=g) < 0.15).float()
    labels[:, 0] = 1.0
    attn = torch.rand(B, args.layers, P + 1, P + 1, generator=g).softmax(-1)
    e_vit = torch.randn(B, D, h, h, generator=g, requires_grad=True)
    e_cnn = torch.randn(B, D, h, h, generator=g, requires_grad=True)
    pseudo = cnn_pseudo_labels(z_cnn, labels)

    def vectorised() -> torch.Tensor:
        loss = (sap_loss(z_cnn, pseudo, e_vit, sap_pos, sap_neg, args.tau, True)
                + cap_loss(attn, e_cnn, cap_pos, cap_neg, args.tau))
        loss.backward()
        return loss

    def loop() -> torch.Tensor:
        loss = (sap_loop(z_cnn, pseudo, e_vit, sap_pos, sap_neg, args.tau, True)
                + cap_loop(attn, e_cnn, cap_pos, cap_neg, args.tau))
        loss.backward()
        return loss

    compare_forms(vectorised, loop, args.repeats, 1e-5,
                  f"SAP+CAP forward+backward, CPU ({torch.get_num_threads()} threads), "
                  f"B={B}, P={P}, D={D}, top_bot_k={args.top_bot_k}", "per-patch loop")
    if args.export:
        export_throughput(args.export_images, args.paper_export)


def export_throughput(n_images: int, paper: bool) -> None:
    """CAM export (every map, all configured scales, each batched with its flip) in images per
    second, for the tiny and paper CoBra presets with random weights on a 375x500 image."""
    import copy
    from pathlib import Path

    from wsss_core.config import load_config, method_params, stage_params
    from wsss_core.methods import create_method
    from wsss_core.stages.export_cams import image_maps

    cfg = load_config(Path(__file__).resolve().parent.parent / "config.yaml")
    for dataset, size in (("toy", (84, 112)),) + ((("voc", (375, 500)),) if paper else ()):
        params = copy.deepcopy(method_params(cfg, dataset, "cobra"))
        for block in (params["model"]["cnn"], params["model"]["vit"]):
            block["pretrained"] = False
        train = stage_params(cfg, dataset, "cobra", "train_classifier")
        scales = stage_params(cfg, dataset, "cobra", "export_cams")["scales"]
        method = create_method(params, 21, train_params=train)
        method.eval()
        img = torch.randn(3, *size)
        scaled = [F.interpolate(img[None], scale_factor=s, mode="bicubic")[0] for s in scales]
        image_maps(method, scaled, size, [3, 12], torch.device("cpu"))  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_images):
            image_maps(method, scaled, size, [3, 12], torch.device("cpu"))
        dt = time.perf_counter() - t0
        print(f"export {params['preset']:>5} cobra ({params['model']['cnn']['backbone']} + "
              f"{params['model']['vit']['backbone']}, {len(scales)} scales x flip, {size[0]}x{size[1]}): "
              f"{n_images / dt:.2f} images/s")


if __name__ == "__main__":
    main()
