"""Decoded-image cache of `DatasetIndex.image` on against off, side by side in one run.

    python bench/bench_image_cache.py results/voc632/index/train.json [--epochs 4] [--crop 192]

For one dataset index (built by the dataset_index rule, e.g. voc632 at its 320-px working
size) and the split the training stages read (`train_aug`), each epoch serves every sample of
the segmentation training dataset (read with `keep=True`, as every training dataset reads;
resize to the working size; scale, crop and flip), first with the cache off
(`IMAGE_CACHE_BYTES = 0`: every epoch decodes every file, as before the cache), then on. Printed:
seconds per epoch for both (the first epoch with the cache on is the one that fills it), the
off / on ratio over the later epochs, and that both served identical samples.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from wsss_core.data import index as index_module
from wsss_core.data.seg_dataset import SegTrainAugment


def epoch_times(index_path: Path, split: str, epochs: int, crop: int, cache_bytes: int):
    """Seconds of each epoch and a checksum of every sample served."""
    index_module.IMAGE_CACHE_BYTES = cache_bytes
    idx = index_module.DatasetIndex.load(index_path)
    augment = SegTrainAugment(crop, (0.75, 1.25), flip=True)
    ids = idx.ids(split)
    times, checksum = [], 0
    for epoch in range(epochs):
        start = time.perf_counter()
        for i, image_id in enumerate(ids):
            image = idx.image(image_id, keep=True)
            mask = (idx.mask(image_id) if idx.has_mask(image_id)
                    else np.zeros(image.shape[:2], np.uint8))
            x, y = augment(image, mask, np.random.default_rng([0, epoch, i]))
            checksum = (checksum * 31 + int(x.sum(dtype=np.float64)) + int(y.sum())) % (1 << 61)
        times.append(time.perf_counter() - start)
    return times, checksum


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", type=Path, help="a dataset's index.json (e.g. results/voc632/index/train.json)")
    p.add_argument("--split", default="train_aug")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--crop", type=int, default=192)
    args = p.parse_args()
    default = index_module.IMAGE_CACHE_BYTES
    off, sum_off = epoch_times(args.index, args.split, args.epochs, args.crop, 0)
    on, sum_on = epoch_times(args.index, args.split, args.epochs, args.crop, default)
    n = len(index_module.DatasetIndex.load(args.index).ids(args.split))
    print(f"{args.index} {args.split}: {n} images, {args.epochs} epochs, crop {args.crop}")
    print("epoch  cache off (s)  cache on (s)")
    for e, (a, b) in enumerate(zip(off, on)):
        print(f"{e + 1:5d}  {a:13.2f}  {b:12.2f}")
    later_off, later_on = sum(off[1:]), sum(on[1:])
    print(f"epochs 2..{args.epochs}: off / on = {later_off / later_on:.2f}x "
          f"({(later_off - later_on) / max(1, args.epochs - 1):.2f} s saved per epoch); "
          f"identical samples: {sum_off == sum_on}")


if __name__ == "__main__":
    main()
