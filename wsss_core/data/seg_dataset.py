"""Segmentation training data: dataset images with label PNGs from a folder (the pseudo masks).

Every mask is checked for existence up front, so a missing file stops the stage before any
model is built; size and label values are checked as each mask is read.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..io import read_label_png
from .datasets import EpochDataset
from .index import DatasetIndex
from .palette import IGNORE
from .transforms import normalize, random_crop, random_hflip, random_rescale, to_chw


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


def mask_path(masks_dir: str | os.PathLike, image_id: str) -> Path:
    return Path(masks_dir) / f"{image_id}.png"


def read_seg_mask(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """A label PNG as uint8 [H, W] with values 0..num_classes-1 or 255; DataError otherwise."""
    try:
        mask = read_label_png(path)
    except FileNotFoundError:
        raise DataError(f"{path}: mask not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable label PNG ({str(e).splitlines()[0][:160]})") from None
    if mask.shape != tuple(size):
        raise DataError(f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                        f"{size[0]}x{size[1]}")
    bad = (mask >= num_classes) & (mask != IGNORE)
    if bad.any():
        raise DataError(f"{path}: label {int(mask[bad].max())} outside 0..{num_classes - 1} "
                        f"and {IGNORE}")
    return mask


class SegmentationDataset(EpochDataset):
    """Images of `split` with `masks_dir/<id>.png` as labels, augmented by `augment`; a sample's
    randomness depends only on (seed, epoch, index), as in the classifier dataset."""

    def __init__(self, index: DatasetIndex, split: str, masks_dir: str | os.PathLike,
                 augment: SegTrainAugment, seed: int = 0) -> None:
        super().__init__(index, split, seed)
        self.masks_dir = Path(masks_dir)
        self.augment = augment
        if not self.masks_dir.is_dir():
            raise DataError(f"{self.masks_dir}: masks folder not found; run the masks stage first")
        missing = [i for i in self.ids if not mask_path(self.masks_dir, i).is_file()]
        if missing:
            raise DataError(f"{mask_path(self.masks_dir, missing[0])}: mask not found "
                            f"({len(missing)} of {len(self.ids)} {split} masks missing); "
                            f"re-run the stage that writes {self.masks_dir}")
        if not self.ids:
            raise DataError(f"{index.source}: split {split!r} is empty")

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        image = self.index.image(image_id, keep=True)
        mask = read_seg_mask(mask_path(self.masks_dir, image_id), image.shape[:2],
                             self.index.num_classes)
        image_chw, mask_hw = self.augment(image, mask, self.rng(i))
        return {"image": torch.from_numpy(image_chw), "mask": torch.from_numpy(mask_hw), "index": i}

    def mask_files(self) -> list[Path]:
        """The mask file of every training image (what a resume must match)."""
        return [mask_path(self.masks_dir, image_id) for image_id in self.ids]
