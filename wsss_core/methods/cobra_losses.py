"""CoBra training losses (docs/methods/cobra.md "Losses"), vectorised over batch and patches.

Conventions: logit maps are [B, ch, h, w]; `labels` are the [B, C] 0/1 image labels of the
foreground classes; when a map has C+1 channels, channel 0 is background. Positions are the
h*w grid cells flattened row-major (P = h*w).

SAP and CAP use a numerically stable form: from the Gram matrix G = eᵀe ([B, P, P], one
matmul) the cosine s_pq = G_pq / (‖e_p‖ ‖e_q‖) of each needed pair is gathered as a scalar, and
the per-positive term is
    t = -log(exp(s_pos/τ) / (exp(s_pos/τ) + N)) = softplus(log N - s_pos/τ),
    log N = logsumexp(s_neg/τ)          (correct temperature)
    log N = logsumexp(s_neg) - log τ    ([OFFICIAL] SAP bug: negatives without temperature, x 1/τ)
so only scalars are gathered from S, never the embedding vectors of each neighbour.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from ..precision import float32
from .common import foreground_logits as _foreground_logits
from .common import multilabel_soft_margin  # noqa: F401  (re-exported: the loss predates the kit)

PseudoLabelMode = Literal["official", "neginf"]


def _upsample(z: torch.Tensor, out_size: tuple[int, int] | int) -> torch.Tensor:
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    return F.interpolate(z, size=size, mode="bilinear", align_corners=True)


def l1_intercam(z_cnn: torch.Tensor, z_vit: torch.Tensor,
                out_size: tuple[int, int] | int) -> torch.Tensor:
    """[OFFICIAL] interCAM1: mean |U(Z_c) - U(Z_v)| over batch, all channels (background and
    absent classes included) and pixels; U = bilinear resize to `out_size` (the crop size) with
    align_corners=True, applied to the raw logit maps."""
    return (_upsample(z_cnn, out_size) - _upsample(z_vit, out_size)).abs().mean()


def l1_positive_term(z_cnn: torch.Tensor, z_vit: torch.Tensor, labels: torch.Tensor,
                     out_size: tuple[int, int] | int) -> torch.Tensor:
    """The paper's positive-class term (REPO interCAM2, computed there but not used; switch
    `l1_positive_term`, off by default): per image the mean |U(Z_c) - U(Z_v)| over its present
    foreground classes and pixels, then the mean over the batch (an image without a present
    class contributes 0)."""
    num_classes = labels.shape[1]
    diff = (_upsample(z_cnn, out_size) - _upsample(z_vit, out_size)).abs()
    per_class = _foreground_logits(diff, num_classes).flatten(2).mean(dim=2)  # [B, C]
    present = labels.to(per_class.dtype)
    per_image = (per_class * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)
    return per_image.mean()


@torch.no_grad()
def cnn_pseudo_labels(z_cnn: torch.Tensor, labels: torch.Tensor,
                      mode: PseudoLabelMode = "official") -> torch.Tensor:
    """Per-position pseudo class ℓ [B, P] (int64, 0 = background) from the CNN logits
    [B, C+1, h, w] (docs/methods/cobra.md "Losses"): argmax over channels of Z_c masked by m = [1,
    y].

    official: absent classes are multiplied by 0 and keep logit 0, so they win where every
    present and background logit is negative (ties: first index, torch.argmax's rule);
    neginf: absent classes are set to -inf, so ℓ ∈ {0} ∪ present classes.
    """
    if z_cnn.shape[1] != labels.shape[1] + 1:
        raise ValueError("cnn_pseudo_labels needs a background channel 0 (C+1 channels)")
    z = z_cnn.detach().flatten(2)  # [B, C+1, P]
    keep = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).to(torch.bool)[:, :, None]
    if mode == "official":
        masked = z * keep.to(z.dtype)
    elif mode == "neginf":
        masked = z.masked_fill(~keep, float("-inf"))
    else:
        raise ValueError(f"pseudo_label_mask: {mode!r} is not one of official, neginf")
    return masked.argmax(dim=1)


class _Gram(torch.autograd.Function):
    """G = eᵀe for e [B, D, P]; backward uses the symmetry, e (Ḡ + Ḡᵀ): one batched matmul
    instead of the two autograd would run."""

    @staticmethod
    def forward(ctx, e: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(e)
        return e.transpose(1, 2) @ e

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (e,) = ctx.saved_tensors
        # a backward called inside an autocast region would run this matmul in low precision
        with torch.autocast(e.device.type, enabled=False):
            return e @ (grad + grad.transpose(1, 2)).to(e.dtype)


@float32
def _contrastive(embedding: torch.Tensor, pos_idx: torch.Tensor, neg_idx: torch.Tensor,
                 tau: float, temperature_bug: bool = False) -> torch.Tensor:
    """Mean over [B, P, K⁺] of softplus(log N - s_pos/τ), always in fp32 (Gram matrix, norms,
    cosines, log-sum-exp): under bf16/fp16 autocast a cosine near 1 divided by τ = 0.1 would
    lose the differences the loss is made of (wsss_core/precision.py).

    embedding [B, D, h, w]; indices [B, P, K] name positions q for each query p. The cosine
    s_pq = G_pq / (n_p n_q) with G = eᵀe ([B, P, P], one matmul) and n_p = max(‖e_p‖, 1e-12)
    (PyTorch `normalize`); only the needed entries of G are gathered and divided.
    """
    e = embedding.flatten(2)  # [B, D, P]
    gram = _Gram.apply(e)
    # clamp before sqrt: max(‖e‖, 1e-12) without an infinite sqrt gradient at a zero vector
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()  # [B, P]
    k_pos = pos_idx.shape[2]
    idx = torch.cat([pos_idx, neg_idx], dim=2)  # [B, P, K⁺ + K⁻]
    B, P, K = idx.shape
    norm_q = norms.gather(1, idx.reshape(B, P * K)).reshape(B, P, K)
    sim = gram.gather(2, idx) / (norms.unsqueeze(2) * norm_q)
    s_pos, s_neg = sim[:, :, :k_pos], sim[:, :, k_pos:]
    if temperature_bug:
        log_neg = torch.logsumexp(s_neg, dim=2) - math.log(tau)
    else:
        log_neg = torch.logsumexp(s_neg / tau, dim=2)
    return F.softplus(log_neg.unsqueeze(2) - s_pos / tau).mean()


def sap_loss(z_cnn: torch.Tensor, pseudo: torch.Tensor, e_vit: torch.Tensor, k_pos: int,
             k_neg: int, tau: float, temperature_bug: bool = True) -> torch.Tensor:
    """SAP loss (docs/methods/cobra.md "Losses", REPO `cll_v1`): CNN class knowledge → ViT
    projection.

    z_cnn [B, C+1, h, w] raw CNN logits (no gradient taken), pseudo [B, P] from
    `cnn_pseudo_labels`, e_vit [B, D, h, w] ViT projection. For query p, positives/negatives
    are the k_pos largest / k_neg smallest positions of the CNN map of p's pseudo class (the
    row only depends on the class, so top-k runs once per class). `temperature_bug=True` is the
    [OFFICIAL] misplaced temperature, False the [FIX].
    """
    B, P = pseudo.shape
    rows = z_cnn.detach().flatten(2)  # [B, C+1, P]; row of class c = Z_c[b, c, :]
    if rows.shape[2] != P or e_vit.shape[2] * e_vit.shape[3] != P:
        raise ValueError("CNN logits, pseudo labels and ViT projection must share the patch grid")
    pos_by_class = rows.topk(k_pos, dim=2, largest=True).indices   # [B, C+1, K⁺]
    neg_by_class = rows.topk(k_neg, dim=2, largest=False).indices  # [B, C+1, K⁻]
    pos_idx = pos_by_class.gather(1, pseudo[:, :, None].expand(B, P, k_pos))
    neg_idx = neg_by_class.gather(1, pseudo[:, :, None].expand(B, P, k_neg))
    return _contrastive(e_vit, pos_idx, neg_idx, tau, temperature_bug)


def cap_loss(attn: torch.Tensor, e_cnn: torch.Tensor, k_pos: int, k_neg: int,
             tau: float) -> torch.Tensor:
    """CAP loss (docs/methods/cobra.md "Losses", REPO `cll_v2`): ViT patch affinity → CNN
    projection.

    attn [B, L, T, T] head-averaged attention per layer (T = 1 + P, class token first; no
    gradient taken), e_cnn [B, D, h, w] CNN projection. Affinity = Σ_l A[:, l, 1:, 1:]; for
    query patch p the positives/negatives are its k_pos largest / k_neg smallest keys.
    """
    affinity = attn.detach().sum(dim=1)[:, 1:, 1:]  # [B, P, P]
    if affinity.shape[-1] != e_cnn.shape[2] * e_cnn.shape[3]:
        raise ValueError(f"attention has {affinity.shape[-1]} patches, CNN projection "
                         f"{e_cnn.shape[2]}x{e_cnn.shape[3]}: the grids must match")
    pos_idx = affinity.topk(k_pos, dim=2, largest=True).indices
    neg_idx = affinity.topk(k_neg, dim=2, largest=False).indices
    return _contrastive(e_cnn, pos_idx, neg_idx, tau)
