"""SeCo's online labels, category tags and losses (docs/methods/seco.md; SeCo paper §3).

Online labels: dual-threshold CAM labels, the ROI mask for tagging, ToCo's token-affinity mask
and the PAR-refined segmentation label (official `utils/camutils.py`). Decomposition: local
crops with category tags (`assign_csc_tags`). Losses: LiG (image-to-patch, against class
prototypes), LiL (patch-to-patch, against the reservoir, with tag rectification), ToCo's PTC,
the balanced segmentation CE and the dense energy (regularised) loss (official
`model/losses.py`). Every function is vectorised over pixels, crops, anchors and bank entries;
`tests/test_seco.py` checks each against a loop written from the formula.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..ops.par import par_refine

IGNORE = 255
UNCERTAIN = -1

Box = Sequence[Sequence[int]] | None  # per image [top, bottom, left, right] of the valid region


def _apply_box(label: torch.Tensor, img_box: Box) -> torch.Tensor:
    """Pixels outside each image's box → 255; slices clip to the tensor (official quirk Q5)."""
    if img_box is None:
        return label
    out = torch.full_like(label, IGNORE)
    for b, (t, d, l, r) in enumerate(img_box):
        out[b, t:d, l:r] = label[b, t:d, l:r]
    return out


def cam_to_label(cams: torch.Tensor, cls_label: torch.Tensor, high: float, low: float,
                 bkg: float, img_box: Box = None, ignore_mid: bool = True,
                 mid_value: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual-threshold labels from normalised CAMs (docs/methods/seco.md "One training step" 2).

    cams [B, C, h, w] in [0, 1], cls_label [B, C] multi-hot (no background). Returns
    (valid_cam = cams masked to present classes, label [B, h, w] long): class c+1 where the
    best present CAM v > high, `mid_value` (255, or −1 for the ROI mask) where low < v ≤ high,
    0 where v ≤ low; with `ignore_mid` False the rule is c+1 if v > bkg else 0. Outside
    `img_box` → 255.
    """
    valid = cams * cls_label[:, :, None, None]
    v, k = valid.max(dim=1)
    label = k + 1
    if ignore_mid:
        label = torch.where(v <= high, torch.full_like(label, mid_value), label)
        label = torch.where(v <= low, torch.zeros_like(label), label)
    else:
        label = torch.where(v <= bkg, torch.zeros_like(label), label)
    return valid, _apply_box(label, img_box)


def ptc_affinity_mask(cams_aux: torch.Tensor, cls_label: torch.Tensor, grid: tuple[int, int],
                      high: float, low: float, img_box: Box = None) -> torch.Tensor:
    """ToCo's token-affinity target A [B, N, N] (docs/methods/seco.md "One training step" 2): 1
    same label, 0 different,
    255 on the diagonal and on rows/columns of ignored tokens. `img_box` is passed in pixel
    coordinates unchanged (official quirk Q5); pass a grid-scaled box for the fixed form."""
    small = F.interpolate(cams_aux, size=grid, mode="bilinear", align_corners=False)
    _, label = cam_to_label(small, cls_label, high, low, 0.0, img_box)
    lab = label.flatten(1)
    aff = (lab[:, :, None] == lab[:, None, :]).long()
    ign = lab == IGNORE
    aff = aff.masked_fill(ign[:, :, None] | ign[:, None, :], IGNORE)
    eye = torch.eye(lab.shape[1], dtype=torch.bool, device=lab.device)
    return aff.masked_fill(eye[None], IGNORE)


def refine_cams_with_bkg(image01: torch.Tensor, valid_cam: torch.Tensor, cls_label: torch.Tensor,
                         high: float, low: float, img_box: Box = None,
                         refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = par_refine
                         ) -> torch.Tensor:
    """Segmentation pseudo label (docs/methods/seco.md "One training step" 2; official
    `refine_cams_with_bkg_v2`).

    image01 [B, 3, H, W] in [0, 1]; valid_cam [B, C, H, W]. For each background level
    t ∈ {high, low}: background channel t + present-class CAMs at half size → softmax → PAR
    → bilinear to (H, W) → argmax. Merge: high label, its background → 255, background in both
    → 0. Returns [B, H, W] long in {0, present classes, 255}.

    One `refine` call for the batch and both levels (the image's affinities are shared): each
    image's kept channels (background, then its classes in increasing order) are packed into
    K = 1 + the most classes any image has; the unused channels get softmax weight 0 (−inf
    logits), PAR keeps them 0 and the argmax never picks them (kept channels stay > 0).
    """
    B, C, H, W = valid_cam.shape
    half = (H // 2, W // 2)
    images = F.interpolate(image01, size=half, mode="bilinear", align_corners=False)
    cams = F.interpolate(valid_cam, size=half, mode="bilinear", align_corners=False)
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0], dim=1)
    count = keep.sum(dim=1)
    K = int(count.max())
    # per image the kept channel ids in increasing order, then the others: [B, K]
    channel = torch.arange(C + 1, device=valid_cam.device).expand(B, -1)
    order = torch.sort((~keep).long() * (C + 1) + channel, dim=1).values[:, :K] % (C + 1)
    used = torch.arange(K, device=valid_cam.device)[None] < count[:, None]  # [B, K]
    index = order[:, :, None, None].expand(-1, -1, *half)
    levels = []
    for t in (high, low):
        logits = torch.cat([torch.full_like(cams[:, :1], t), cams], dim=1).gather(1, index)
        levels.append(logits.masked_fill(~used[:, :, None, None], float("-inf")).softmax(dim=1))
    ref = refine(images, torch.cat(levels, dim=1))  # [B, 2K, h/2, w/2]
    ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
    best = _first_argmax(ref.view(B, 2, K, H, W).unbind(2))  # [B, 2, H, W]
    high_l, low_l = order.gather(1, best.flatten(1)).view(B, 2, H, W).unbind(1)
    label = torch.where(high_l == 0, torch.full_like(high_l, IGNORE), high_l)
    label = torch.where((high_l == 0) & (low_l == 0), torch.zeros_like(label), label)
    return _apply_box(label, img_box)


def _first_argmax(planes: Sequence[torch.Tensor]) -> torch.Tensor:
    """The index of the largest of K same-shaped planes per element, the first on ties (as
    `argmax`); K elementwise passes, where `argmax` over a short middle dimension of a large
    tensor runs ~8x slower on CPU."""
    best, index = planes[0], torch.zeros_like(planes[0], dtype=torch.long)
    for k, plane in enumerate(planes[1:], start=1):
        better = plane > best
        index.masked_fill_(better, k)
        best = torch.maximum(best, plane)
    return index


def assign_csc_tags(images: Sequence[torch.Tensor], roi: torch.Tensor, num_crops: int = 10,
                    crop: int = 64, threshold: float = 0.2, proportion: str = "weighted"
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decompose images into local crops with category tags (docs/methods/seco.md "One training
    step" 3, `assign_csc_tags`).

    images: views [B, 3, H, W] cut at the same positions (weak, strong); roi [B, H, W] long
    with −1 (uncertain), 0, 1..C, 255. Crop top-left corners are a permutation (a CPU
    generator seeded 0 per image, so positions depend only on `roi`) of the uncertain pixels
    of the inner window [crop/2, H − crop/2) (all window positions when fewer than
    `num_crops`). Returns (per view a [num_crops, B, 3, crop, crop] tensor (crop-major),
    tags [B, 2 + num_crops] float: two global-view tags then one per crop) with values
    −1 (uncertain), 0 (background), 1..C. `proportion`: "weighted" (official: Σ class ids / area,
    quirk Q1) or "count" (fraction of non-background pixels).
    """
    if proportion not in ("weighted", "count"):
        raise ValueError(f"tag_proportion {proportion!r}: use weighted or count")
    B, H, W = roi.shape
    half = crop // 2
    if H < crop or W < crop:
        raise ValueError(f"assign_csc_tags: image {H}x{W} smaller than the local crop {crop}")
    r0 = torch.where(roi == IGNORE, torch.zeros_like(roi), roi)
    r1 = r0.clamp(min=0)
    ru = r1 + (r0 == UNCERTAIN).long()
    if proportion == "count":
        ru = (ru > 0).long()
    num_cls = max(int(r1.max()) + 1, 2)
    tags = torch.empty(B, 2 + num_crops)
    corners = torch.empty(B, num_crops, 2, dtype=torch.long)
    ar = torch.arange(crop)
    for b in range(B):
        win = r0[b, half:H - half, half:W - half].cpu()
        cand = (win == UNCERTAIN).nonzero()
        if len(cand) < num_crops:
            cand = torch.ones_like(win, dtype=torch.bool).nonzero()
        present = r1[b].unique()
        present = present[present != 0]
        r1b = r1[b]
        if len(present) >= 2:
            tags[b, :2] = UNCERTAIN
        elif len(present) == 1:
            tags[b, :2] = float(present[0])
            r1b = torch.where(r0[b] == UNCERTAIN, present[0], r1b)
        else:
            tags[b, :2] = 1.0  # official initial value (quirk Q2)
        g = torch.Generator().manual_seed(0)
        pos = cand[torch.randperm(len(cand), generator=g)[:num_crops]]
        corners[b] = pos
        rows = (pos[:, :1] + ar).to(roi.device)  # [n, crop]
        cols = (pos[:, 1:] + ar).to(roi.device)
        r1c = r1b[rows[:, :, None], cols[:, None, :]]  # [n, crop, crop]
        rho = ru[b][rows[:, :, None], cols[:, None, :]].flatten(1).sum(1).float() / (crop * crop)
        counts = torch.zeros(num_crops, num_cls, device=roi.device).scatter_(
            1, r1c.flatten(1), 1.0)[:, 1:]
        single = (counts > 0).sum(1) == 1
        local = torch.where(single, counts.argmax(1).float() + 1, torch.full_like(rho, UNCERTAIN))
        tags[b, 2:] = torch.where(rho <= threshold, torch.zeros_like(rho), local).cpu()
    views = []
    for img in images:
        rows = corners[:, :, :1].to(img.device) + ar.to(img.device)  # [B, n, crop]
        cols = corners[:, :, 1:].to(img.device) + ar.to(img.device)
        bidx = torch.arange(B, device=img.device)[:, None, None, None]
        cropped = img.permute(0, 2, 3, 1)[bidx, rows[:, :, :, None], cols[:, :, None, :]]
        views.append(cropped.permute(1, 0, 4, 2, 3).contiguous())  # [n, B, 3, crop, crop]
    return views, tags.to(roi.device)


def lig_loss(q: torch.Tensor, prototypes: torch.Tensor, tags: torch.Tensor,
             temperature: float = 0.1, base_temperature: float = 0.1) -> torch.Tensor:
    """LiG, image-to-patch contrast (docs/methods/seco.md "LiG"; official `LIG_Loss`).

    q [n, D] unit queries, prototypes [C, D] (detached here), tags [n] (revised by LiL).
    Each anchor with a class tag is pulled to its class prototype against the prototypes of
    the classes tagged anywhere in the batch. Scalar.
    """
    tags = tags.reshape(-1)
    C = prototypes.shape[0]
    logits = q @ prototypes.detach().T / temperature  # [n, C]
    cls = torch.arange(1, C + 1, device=q.device, dtype=tags.dtype)
    pos = tags[:, None] == cls[None]
    present = (pos.any(dim=0)).to(logits.dtype)  # columns of classes tagged in the batch
    pos_logits = logits * pos
    masked = logits * present
    e = masked.exp()
    e = e * (e != 1.0)  # the official filter: drops masked columns (and exact zeros)
    denom = e.sum(dim=1, keepdim=True)
    log_prob = (pos_logits - torch.log(denom + 1e-12)) * (pos_logits != 0)
    total = (log_prob.sum(dim=1) * (denom[:, 0] > 0)).sum()
    count = pos.sum()
    total = total / count if count > 0 else total / q.shape[0]
    return -(temperature / base_temperature) * total


def rectify_tags(pos_logits: torch.Tensor, tags: torch.Tensor, ratio: float = 10.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """LiL's tag rectification (docs/methods/seco.md "LiL"): a row whose filtered positive logits
    have more than `ratio`× as many entries below their mean (over all columns) as at or above
    it is re-tagged 0 and its positives dropped. Returns (pos_logits, tags), both new tensors."""
    mean = pos_logits.mean(dim=1, keepdim=True)
    above = (pos_logits >= mean).sum(dim=1)
    below = (pos_logits < mean).sum(dim=1)
    bad = below / (above + 1e-6) > ratio
    return pos_logits * ~bad[:, None], torch.where(bad, torch.zeros_like(tags), tags)


def lil_loss(q: torch.Tensor, bank: torch.Tensor, tags: torch.Tensor, bank_tags: torch.Tensor,
             temperature: float = 0.08, base_temperature: float = 0.08, impl: str = "reference"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """LiL, patch-to-patch contrast against the reservoir (docs/methods/seco.md "LiL"; official
    `LIL_Loss`).

    q [n, D] unit queries with tags [n]; bank [m, D] = [keys; queue] with bank_tags [m]
    (no gradient). Returns (loss, revised tags [n]); tags 0/−1 stay, rectified rows → 0.
    impl "reference" reproduces the official formula (log-denominator over all m columns,
    global normaliser, sign-gated rows, quirk Q8); "clean" is a supervised-contrastive InfoNCE
    over non-uncertain columns with the same rectified tags.
    """
    tags = tags.reshape(-1)
    bank_tags = bank_tags.reshape(-1)
    s = q @ bank.detach().T / temperature  # [n, m]
    logits = s - s.max(dim=1, keepdim=True).values.detach()
    anchor_unc = tags == UNCERTAIN
    pos = (tags[:, None] == bank_tags[None]) & ~anchor_unc[:, None]
    logits = logits.masked_fill(anchor_unc[:, None], 0.0)
    pos_logits, revised = rectify_tags(logits * pos, tags)
    col_unc = bank_tags == UNCERTAIN
    if impl == "clean":
        keep = revised != UNCERTAIN
        pos_c = (revised[:, None] == bank_tags[None]) & ~col_unc[None] & keep[:, None]
        lse = s.masked_fill(col_unc[None], float("-inf")).logsumexp(dim=1, keepdim=True)
        per = ((s - lse) * pos_c).sum(1) / pos_c.sum(1).clamp(min=1)
        valid = pos_c.any(dim=1)
        loss = -(per * valid).sum() / valid.sum().clamp(min=1)
        return loss * (temperature / base_temperature), revised
    if impl != "reference":
        raise ValueError(f"lil_impl {impl!r}: use reference or clean")
    logits = logits.masked_fill(col_unc[None], 0.0)
    e = logits.exp()
    e = e * (e != 1.0)
    denom = e.sum(dim=1)
    row = pos_logits.sum(dim=1) - logits.shape[1] * torch.log(denom + 1e-12)
    z = (pos_logits != 0).sum()
    gate = (denom > 0) & (row < 0) & (z > 0)
    total = (row * gate).sum() / z.clamp(min=1)
    return -(temperature / base_temperature) * total / q.shape[0], revised


def ptc_loss(tokens2d: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """ToCo's patch-token contrast (docs/methods/seco.md "The others"): tokens2d [B, D, h, w],
    affinity [B, N, N]
    (1 / 0 / 255). 0.5(1 − mean |cos| over positives) + 0.5 mean |cos| over negatives, the
    means with +1 in the denominator. Scalar in [0, 1]."""
    t = F.normalize(tokens2d.flatten(2), p=2, dim=1, eps=1e-8)
    cos = (t.transpose(1, 2) @ t).abs()
    pos, neg = affinity == 1, affinity == 0
    return 0.5 * (1 - (cos * pos).sum() / (pos.sum() + 1)) + 0.5 * (cos * neg).sum() / (neg.sum() + 1)


def seg_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Balanced CE (docs/methods/seco.md "The others"): logits [B, C+1, H, W], label [B, H, W]
    (255 ignored);
    0.5 (mean CE over background pixels + mean CE over foreground pixels), counts + 1e-6."""
    ce = F.cross_entropy(logits, label.clamp(max=logits.shape[1] - 1) * (label != IGNORE),
                         reduction="none")
    bg, fg = label == 0, (label != 0) & (label != IGNORE)
    return 0.5 * ((ce * bg).sum() / (bg.sum() + 1e-6) + (ce * fg).sum() / (fg.sum() + 1e-6))


def bilateral_filter(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float,
                     chunk: int = 512) -> torch.Tensor:
    """Exact dense bilateral filter (W v)(i) = Σ_j exp(−|p_i−p_j|²/2σ_xy² − |I_i−I_j|²/2σ_rgb²) v(j).

    image [B, 3, h, w] (0-255 float), values [B, K, h, w] → [B, K, h, w]. The kernel includes
    j = i and is not normalised (the permutohedral filter of the official rloss extension,
    computed here exactly, in chunks of `chunk` output pixels: O(chunk · h·w) memory).

    With features f = (p/σ_xy, I/σ_rgb), centred per image, the exponent −|f_i − f_j|²/2 is
    one matrix product of [f_i, −|f_i|²/2, 1] and [f_j, 1, −|f_j|²/2] (the form `cdist` uses
    too, without its square root and re-squaring). Exponents below log of the dtype's smallest
    normal number (−87 in float32) are raised to it: such a kernel entry (< 1.2e-38) is below
    the float resolution of every output, which holds the j = i term v(i), and denormal
    arithmetic is slow on x86 CPUs (3.6x for the whole filter on a toy batch at 56² px;
    colourful images have many such pairs).
    """
    B, K, h, w = values.shape
    yy, xx = torch.meshgrid(torch.arange(h, device=image.device, dtype=image.dtype),
                            torch.arange(w, device=image.device, dtype=image.dtype), indexing="ij")
    pos = torch.stack([yy, xx]).flatten(1) / sigma_xy  # [2, N]
    floor = float(math.ceil(math.log(torch.finfo(image.dtype).tiny)))
    out = torch.empty_like(values.flatten(2))
    for b in range(B):
        f = torch.cat([pos, image[b].flatten(1) / sigma_rgb]).T  # [N, 5]
        f = f - f.mean(dim=0)  # distances unchanged; smaller norms cancel less in the product
        half = f.square().sum(dim=1, keepdim=True).mul_(-0.5)  # [N, 1]
        one = torch.ones_like(half)
        left = torch.cat([f, half, one], dim=1)  # [N, 7]
        right = torch.cat([f, one, half], dim=1).T.contiguous()  # [7, N]
        v = values[b].flatten(1)  # [K, N]
        for s in range(0, f.shape[0], chunk):
            # rounding can leave the j = i exponent a hair above 0: clamp to the exact bound
            k = torch.mm(left[s:s + chunk], right).clamp_(floor, 0.0).exp_()  # [c, N]
            out[b, :, s:s + chunk] = v @ k.T
    return out.reshape(B, K, h, w)


class _DenseEnergy(torch.autograd.Function):
    """−Σ S̃·G·(W S̃) / B with the rloss gradient −2 G (W S̃) R / B (gate treated as constant)."""

    @staticmethod
    def forward(ctx, image, probs, roi, unlabeled, sigma_rgb, sigma_xy):
        seg = probs * roi[:, None]
        filtered = bilateral_filter(image, seg, sigma_rgb, sigma_xy)
        gate = roi - seg.max(dim=1).values
        gate = torch.where(unlabeled, torch.ones_like(gate), gate).clamp(min=0)[:, None]
        ctx.save_for_backward(filtered * gate * roi[:, None])
        ctx.batch = probs.shape[0]
        return -(seg * gate * filtered).sum() / ctx.batch

    @staticmethod
    def backward(ctx, grad):
        (gated,) = ctx.saved_tensors
        return None, -2 * grad * gated / ctx.batch, None, None, None, None


def dense_energy_loss(image255: torch.Tensor, probs: torch.Tensor, label: torch.Tensor,
                      roi: torch.Tensor | None = None, weight: float = 1e-7, sigma_rgb: float = 15.0,
                      sigma_xy: float = 100.0, scale: float = 0.5) -> torch.Tensor:
    """Dense energy ("regularised") loss of Tang et al. as used by ToCo/SeCo (docs/methods/seco.md
    "The others").

    image255 [B, 3, H, W] de-normalised 0-255; probs [B, K, H, W] softmax of the upsampled
    segmentation logits; label [B, H, W] (255 = unlabelled); roi [B, H, W] 1 inside the valid
    crop region (None: all ones). Everything is scaled by `scale` (image, roi and label nearest,
    probs bilinear), σ_xy too. Scalar.
    """
    if roi is None:
        roi = torch.ones_like(label, dtype=probs.dtype)
    size = (int(probs.shape[-2] * scale), int(probs.shape[-1] * scale))
    img = F.interpolate(image255, size=size, mode="nearest")
    p = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    r = F.interpolate(roi[:, None].float(), size=size, mode="nearest")[:, 0]
    unl = F.interpolate(label[:, None].float(), size=size, mode="nearest")[:, 0] == IGNORE
    return weight * _DenseEnergy.apply(img, p, r.to(p.dtype), unl, sigma_rgb, sigma_xy * scale)
