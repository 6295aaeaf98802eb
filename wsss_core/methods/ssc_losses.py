"""SSC training losses (docs/methods/ssc.md "Losses"), vectorised over batch, classes and
superpixels (no Python loop over pixels or segments).

Conventions: the class-map tensor A is [B, C, h, w] (raw, pre-ReLU); superpixel maps are
[B, H, W] int64 with arbitrary non-negative ids per image; image labels are [B, C] in {0, 1}.
Official code: `step/train_cam.py` (`alignment_loss`, `mx_norm`), `misc/loss_util.py`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def superpixel_mean(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Average `x` [B, C, H, W] inside each superpixel of `segments` [B, H, W] (int64 ids ≥ 0).

    Returns [B, C, H, W]: every pixel gets the mean of its segment (paper Eq. 7). Per image,
    one `scatter_add_` sums each segment (counts likewise) and one `gather` hands the means back,
    so the cost is O(B·C·H·W) whatever the number of segments. Raises ValueError on a shape
    mismatch or a negative id.
    """
    b, c, h, w = x.shape
    if segments.shape != (b, h, w):
        raise ValueError(f"superpixel map {tuple(segments.shape)} does not match maps {(b, h, w)}")
    seg = segments.long().reshape(b, 1, h * w)
    low, high = torch.aminmax(seg)
    if int(low) < 0:
        raise ValueError("superpixel ids must be non-negative")
    s_max = int(high) + 1
    values = x.reshape(b, c, h * w)
    index = seg.expand(b, c, h * w)
    sums = values.new_zeros(b, c, s_max).scatter_add_(2, index, values)
    counts = values.new_zeros(b, 1, s_max).scatter_add_(2, seg, torch.ones_like(values[:, :1]))
    return (sums / counts.clamp_min(1e-5)).gather(2, index).view(b, c, h, w)


def max_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU then divide by the spatial max (+eps) per (b, c) (paper Eq. 1): [B, C, H, W] → same,
    values in [0, 1). The max is not detached (official `mx_norm`)."""
    x = F.relu(x)
    return x / (x.amax(dim=(-2, -1), keepdim=True) + eps)


def _max_filter_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum over every window of k consecutive values along the last axis (valid windows
    only): [..., L] → [..., L - k + 1], one `max_pool1d`."""
    *lead, length = x.shape
    return F.max_pool1d(x.reshape(-1, 1, length), k, stride=1).reshape(*lead, length - k + 1)


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Binary erosion with OpenCV's `cv2.erode` semantics (all-ones kernel×kernel, one
    iteration, anchor at the kernel centre, outside the image counts as 1).

    `mask` [N, H, W] float in {0, 1} → [N, H, W]. Output (i, j) is 1 iff all of rows
    i - k//2 .. i + k - 1 - k//2 and the same columns are 1 (k = 8: i-4 .. i+3). Done as the
    complement of a dilation of the complement (zero padding = ones outside), with the k x k
    maximum taken separably by two 1-D `max_pool1d` passes (on CPU ~6x faster than one k x k
    `max_pool2d`).
    """
    if kernel <= 1:
        return mask
    lo, hi = kernel // 2, kernel - 1 - kernel // 2
    holes = F.pad(1.0 - mask, (lo, hi, lo, hi))
    rows = _max_filter_rows(holes, kernel)
    return 1.0 - _max_filter_rows(rows.transpose(-1, -2), kernel).transpose(-1, -2)


@torch.no_grad()
def asm_target(own: torch.Tensor, pooled: torch.Tensor, theta: float = 0.3, kernel: int = 8,
               use_ras: bool = True) -> torch.Tensor:
    """ASM target T (docs/methods/ssc.md "Losses", ASM steps 4-5) for P present rows.

    `own` O⁺ [P, H, W] (the network's normalised maps), `pooled` R⁺ [P, H, W] (normalised
    superpixel means). RAS: RS = O⁺ · erode(1[O⁺ > θ]); T = max(R⁺, RS). Without RAS, T = R⁺.
    No gradient flows through the target.
    """
    if not use_ras:
        return pooled.detach()
    own = own.detach()
    reliable = own * erode((own > theta).to(own.dtype), kernel)
    return torch.maximum(pooled.detach(), reliable)


def asm_loss(cams: torch.Tensor, segments: torch.Tensor, labels: torch.Tensor, theta: float = 0.3,
             kernel: int = 8, use_ras: bool = True, half_res: bool = True) -> torch.Tensor:
    """Activation self-modulation loss L_align (paper Eq. 8-9; official `alignment_loss`).

    `cams` A [B, C, h, w] (with gradient), `segments` [B, H, W] int64 (the augmented crop's
    superpixels), `labels` [B, C]. With `half_res`, S' = segments[:, ::2, ::2]; A is upsampled
    bilinearly to S' (Â); for the P present (image, class) rows, Ā = superpixel mean of Â,
    O⁺ = max_norm(Â), R⁺ = max_norm(Ā), and the loss is the MSE between O⁺ and the target of
    `asm_target` (the official code pools and normalises all C rows, absent ones zeroed, then
    keeps the present rows: the same values). Returns a scalar (0 with a graph when no class
    is present).
    """
    seg = segments[:, ::2, ::2] if half_res else segments
    up = F.interpolate(cams, size=seg.shape[-2:], mode="bilinear", align_corners=False)
    # only present rows enter the loss: pool those alone (absent rows are masked to 0 anyway)
    image, cls = torch.nonzero(labels > 0, as_tuple=True)
    if image.numel() == 0:
        return cams.sum() * 0.0
    rows = up[image, cls][:, None]  # [P, 1, H, W]
    own = max_norm(rows)[:, 0]
    pooled = max_norm(superpixel_mean(rows, seg[image]))[:, 0]
    return F.mse_loss(own, asm_target(own, pooled, theta, kernel, use_ras))


def shrink_wide(x: torch.Tensor, max_width: int = 1024) -> torch.Tensor:
    """Average-pool by 2 while the width exceeds `max_width` (official perceptual loss input)."""
    while x.shape[-1] > max_width:
        x = F.avg_pool2d(x, 2)
    return x


def perceptual_loss(taps_fn, rec: torch.Tensor, target: torch.Tensor,
                    weights: Sequence[float]) -> torch.Tensor:
    """L_per = Σ_j w_j · mean |Φ_j(rec) - Φ_j(target)| (paper Eq. 5-6; official `misc/loss_util.py`).

    `taps_fn` maps [B, 3, H, W] to a list of feature maps Φ_j (a frozen loss network);
    `rec`, `target` [B, 3, H, W]; the target branch carries no gradient. `weights` needs one
    weight per tap.
    """
    rec, target = shrink_wide(rec), shrink_wide(target)
    with torch.no_grad():
        t_feats = taps_fn(target)
    r_feats = taps_fn(rec)
    if len(weights) != len(r_feats):
        raise ValueError(f"perceptual loss: {len(weights)} weights for {len(r_feats)} taps")
    return sum(w * (r - t).abs().mean() for w, r, t in zip(weights, r_feats, t_feats))


def pixel_loss(rec: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The Tab. VIII ablation of the reconstruction loss: `pixel_l1` (mean |·|) or `pixel_l2`
    (mean squared error) between `rec` and `target` [B, 3, H, W]; target detached."""
    diff = rec - target.detach()
    return diff.abs().mean() if kind == "pixel_l1" else diff.pow(2).mean()
