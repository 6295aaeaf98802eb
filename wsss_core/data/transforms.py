"""Image/mask transforms shared by the training stages (IRN conventions).

All randomness comes from a numpy Generator passed in, so a sample's augmentation depends only
on (seed, epoch, index) and not on worker count or order.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .palette import IGNORE

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def resize_image(img: np.ndarray, size_hw: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    return resize_image(mask, size_hw, resample=Image.NEAREST)


def scaled_size(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(1, int(round(hw[0] * scale))), max(1, int(round(hw[1] * scale)))


def random_resize_long(img: np.ndarray, mask: np.ndarray | None, lo: int, hi: int,
                       rng: np.random.Generator):
    """Resize so the long side is a uniform integer in [lo, hi] (both inclusive)."""
    target = int(rng.integers(lo, hi + 1))
    h, w = img.shape[:2]
    s = target / max(h, w)
    size = scaled_size((h, w), s)
    return resize_image(img, size), (None if mask is None else resize_mask(mask, size))


def random_rescale(img: np.ndarray, mask: np.ndarray | None, lo: float, hi: float,
                   rng: np.random.Generator):
    """Resize by a uniform factor in [lo, hi) (image bicubic, mask nearest)."""
    s = lo + float(rng.random()) * (hi - lo)
    size = scaled_size(img.shape[:2], s)
    return resize_image(img, size), (None if mask is None else resize_mask(mask, size))


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HWC → float32 HWC with ImageNet mean/std."""
    return (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def random_hflip(img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
    if rng.random() < 0.5:
        img = img[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    return img, mask


def _crop_window(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, target start, extent) along one axis, as IRN's random crop."""
    if length > crop:
        return int(rng.integers(0, length - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - length + 1)), length


def random_crop(img: np.ndarray, mask: np.ndarray | None, crop: int, rng: np.random.Generator,
                img_fill: float = 0.0, mask_fill: int = IGNORE):
    """Crop a crop x crop window; a shorter side is placed at a random offset on a padded canvas."""
    h, w = img.shape[:2]
    sy, ty, ey = _crop_window(h, crop, rng)
    sx, tx, ex = _crop_window(w, crop, rng)
    out = np.full((crop, crop) + img.shape[2:], img_fill, dtype=img.dtype)
    out[ty:ty + ey, tx:tx + ex] = img[sy:sy + ey, sx:sx + ex]
    out_mask = None
    if mask is not None:
        out_mask = np.full((crop, crop), mask_fill, dtype=mask.dtype)
        out_mask[ty:ty + ey, tx:tx + ex] = mask[sy:sy + ey, sx:sx + ex]
    return out, out_mask


def classification_crop(img: np.ndarray, mask: np.ndarray | None, crop: int,
                        scale_range: tuple[int, int], rng: np.random.Generator):
    """The classifier's training crop (IRN order): random long-side resize in `scale_range` →
    normalise → flip → crop x crop. uint8 HWC → (float32 HWC, mask or None)."""
    img, mask = random_resize_long(img, mask, *scale_range, rng)
    img, mask = random_hflip(normalize(img), mask, rng)
    return random_crop(img, mask, crop, rng)


def to_chw(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img.transpose(2, 0, 1))
