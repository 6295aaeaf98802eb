"""Training and inference helpers for the fully supervised segmentation stage (its training
loop, schedule and optimiser are the shared ones: engine.fit, optim).

Training: random scale (0.5-2.0), horizontal flip, padded random crop, cross-entropy with the
ignore label 255.
Inference: multi-scale (+ flip) softmax averaging at the image's own size, then an optional
dense-CRF callable.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.palette import IGNORE
from .data.transforms import normalize, random_crop, random_hflip, random_rescale, to_chw

#: smp encoders need input sides divisible by their total stride (32 for both presets)
SIZE_DIVISOR = 32

#: crf(image_uint8 [H,W,3], probs [C,H,W]) -> refined probs [C,H,W]
CRFFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class SegTrainAugment:
    """Random rescale (image bicubic, mask nearest), horizontal flip, ImageNet normalisation and
    a crop x crop random crop padded with 0 (image, i.e. the mean colour) and 255 (mask)."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True) -> None:
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.crop_size = int(crop_size)
        self.scale_range = (float(lo), float(hi))
        self.flip = flip

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [H,W,3] image and uint8 [H,W] mask → float32 [3,crop,crop], int64 [crop,crop]."""
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size")
        image, mask = random_rescale(image, mask, *self.scale_range, rng)
        if self.flip:
            image, mask = random_hflip(image, mask, rng)
        image, mask = random_crop(normalize(image), mask, self.crop_size, rng,
                                  img_fill=0.0, mask_fill=IGNORE)
        return to_chw(image), mask.astype(np.int64)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (≠255) pixels; exactly 0 when none is labelled
    (torch's mean reduction would give 0/0 = NaN there)."""
    if logits.shape[-2:] != masks.shape[-2:]:
        logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE, reduction="sum")
    labelled = (masks != IGNORE).sum()
    return total / labelled.clamp(min=1)


def _pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    # zero after ImageNet normalisation = the mean colour, as in training-time padding
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else x


@torch.inference_mode()
def predict_multiscale(model: nn.Module, image_uint8: np.ndarray, scales: Sequence[float],
                       flip: bool, device: torch.device | str,
                       crf: CRFFn | None = None) -> np.ndarray:
    """Class probabilities float32 [C,H,W] of one uint8 [H,W,3] image: for each scale, resize
    (bilinear), pad to a multiple of 32, run the image together with its mirror in one batch,
    softmax, crop, un-mirror and average, resize to H×W; average over scales; then `crf`."""
    if not scales:
        raise ValueError("predict_multiscale needs at least one scale")
    device = torch.device(device)
    model.eval()
    h, w = image_uint8.shape[:2]
    base = torch.from_numpy(to_chw(normalize(image_uint8)))[None].to(device)
    probs_sum: torch.Tensor | None = None
    for scale in scales:
        size = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
        x = base if size == (h, w) else F.interpolate(
            base, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
            logits = model(_pad_to_multiple(batch, SIZE_DIVISOR))
        probs = logits[..., :size[0], :size[1]].float().softmax(dim=1)
        if flip:
            probs = (probs[:1] + probs[1:].flip(-1)) / 2
        if size != (h, w):
            # bilinear weights are convex, so the resized maps still sum to 1 per pixel
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        probs_sum = probs if probs_sum is None else probs_sum + probs
    result = (probs_sum[0] / len(scales)).cpu().numpy().astype(np.float32)
    if crf is not None:
        result = np.asarray(crf(image_uint8, result), dtype=np.float32)
    return result
