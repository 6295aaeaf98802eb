"""Superpixels for activation self-modulation (ASM) losses (docs/methods/: the "Superpixels"
section of the page of a method that uses them).

The official code used ICD's pre-computed VOC superpixels (Felzenszwalb-Huttenlocher segments
hierarchically merged by selective-search grouping, at most 64 per image; paper §IV-B). These
generators rebuild that with scikit-image, once per image:
  * `fh_ss64`: felzenszwalb over-segmentation, split into 4-connected parts, then greedy
    selective-search merging of 4-adjacent regions (colour + size + fill similarity) down to
    `max_segments`;
  * `slic64`: SLIC with `max_segments` seeds, split into 4-connected parts, then the same merging.
Label maps are uint8 [H, W] with ids 0..S-1 consecutive, S ≤ max_segments ≤ 254, every segment
4-connected. A method declares them as its extra input (`Method.extra_input_fns`): the shared
data layer computes each map once per image, caches it beside the classifier and augments it
jointly with its image (nearest resize, same flip, same crop; the crop's padding gets id
`PAD_ID`, used by no segment).

The third source, `icd`, reads ICD's pre-computed maps themselves (`ICDSuperpixels`): one PNG
per image, `<folder>/<image id>.png`, each pixel's superpixel id stored in its colour as
R + 256·G + 65536·B (the official data loader of the method that uses them decodes them so;
its page under docs/methods/ names the file). They are read, not computed: ids are renumbered
0..S-1 in increasing order of the stored id, nothing is merged or split.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from skimage import color, measure, segmentation

from ..errors import DataError
from .palette import IGNORE

#: id of the crop's padding in an augmented superpixel map (random_crop's mask fill)
PAD_ID = IGNORE
HSV_BINS = 25
GENERATORS = ("fh_ss64", "slic64")
#: the superpixel sources a method may name: the generators, and ICD's pre-computed PNGs
ICD = "icd"
SOURCES = (*GENERATORS, ICD)


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique (i, j), i < j, of 4-adjacent pixels with different labels: [E, 2] int64."""
    pairs = [np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
             np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1)]
    p = np.concatenate(pairs)
    p = p[p[:, 0] != p[:, 1]]
    return np.unique(np.sort(p, axis=1), axis=0)


def merge_regions(labels: np.ndarray, image: np.ndarray, max_segments: int) -> np.ndarray:
    """Selective-search grouping of 4-adjacent regions until at most `max_segments` remain.

    `labels` [H, W] int ids 0..n-1 (each region 4-connected), `image` [H, W, 3] uint8 RGB.
    Similarity of neighbours i, j: s_col + s_size + s_fill with s_col = Σ min(h_i, h_j) over
    L1-normalised HSV histograms (25 bins per channel), s_size = 1 - (n_i + n_j)/N,
    s_fill = 1 - (|BB_ij| - n_i - n_j)/N (BB_ij the union bounding box). The most similar pair
    merges first (histogram size-weighted, sizes added, boxes and adjacency united). Returns
    [H, W] int64 ids 0..S-1. Loops run over regions, not pixels.
    """
    n = int(labels.max()) + 1
    if n <= max_segments:
        return labels.astype(np.int64)
    total = labels.size
    flat = labels.ravel()
    size = np.bincount(flat, minlength=n).astype(np.float64)
    hsv = color.rgb2hsv(image).reshape(-1, 3)
    bins = np.minimum((hsv * HSV_BINS).astype(np.int64), HSV_BINS - 1)
    hist = np.concatenate([np.bincount(flat * HSV_BINS + bins[:, c], minlength=n * HSV_BINS)
                           .reshape(n, HSV_BINS) for c in range(3)], 1).astype(np.float64)
    hist /= hist.sum(1, keepdims=True)
    ys, xs = np.divmod(np.arange(total), labels.shape[1])
    box = np.stack([np.full(n, labels.shape[0]), np.full(n, labels.shape[1]),
                    np.zeros(n), np.zeros(n)], 1)  # y0, x0, y1, x1
    np.minimum.at(box[:, 0], flat, ys)
    np.minimum.at(box[:, 1], flat, xs)
    np.maximum.at(box[:, 2], flat, ys)
    np.maximum.at(box[:, 3], flat, xs)
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for i, j in _adjacent_pairs(labels):
        neighbours[i].add(int(j))
        neighbours[j].add(int(i))

    def similarity(i: int, j: int) -> float:
        b = np.concatenate([np.minimum(box[i, :2], box[j, :2]), np.maximum(box[i, 2:], box[j, 2:])])
        bb = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        return (np.minimum(hist[i], hist[j]).sum() + 1 - (size[i] + size[j]) / total
                + 1 - (bb - size[i] - size[j]) / total)

    heap = [(-similarity(i, j), i, j) for i in range(n) for j in neighbours[i] if i < j]
    heapq.heapify(heap)
    parent = np.arange(n)
    alive = np.ones(n, dtype=bool)
    remaining = n
    while remaining > max_segments and heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]) or j not in neighbours[i]:
            continue  # a stale entry: one side was merged away
        # j joins i
        hist[i] = (hist[i] * size[i] + hist[j] * size[j]) / (size[i] + size[j])
        size[i] += size[j]
        box[i, :2] = np.minimum(box[i, :2], box[j, :2])
        box[i, 2:] = np.maximum(box[i, 2:], box[j, 2:])
        for k in neighbours[j]:
            neighbours[k].discard(j)
            if k != i:
                neighbours[k].add(i)
        neighbours[i] |= neighbours[j] - {i}
        neighbours[j] = set()
        alive[j] = False
        parent[j] = i
        remaining -= 1
        for k in neighbours[i]:
            heapq.heappush(heap, (-similarity(i, k), min(i, k), max(i, k)))
    root = parent.copy()
    while True:  # path compression: every region → the region it finally merged into
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return segmentation.relabel_sequential(root[labels] + 1)[0].astype(np.int64) - 1


def superpixels(image: np.ndarray, generator: str = "fh_ss64", max_segments: int = 64) -> np.ndarray:
    """Superpixel label map of `image` [H, W, 3] uint8 RGB → [H, W] uint8, ids 0..S-1, S ≤
    `max_segments`, every segment 4-connected. Generators: see the module docstring
    (felzenszwalb scale 100, sigma 0.8, min_size 50; SLIC compactness 10, sigma 1).
    Raises ValueError for an unknown generator or `max_segments` outside 1..254."""
    if not 1 <= max_segments <= 254:
        raise ValueError(f"max_segments {max_segments}: must lie in 1..254 "
                         f"(uint8 ids, {PAD_ID} = padding)")
    if generator == "fh_ss64":
        raw = segmentation.felzenszwalb(image, scale=100, sigma=0.8, min_size=50)
    elif generator == "slic64":
        raw = segmentation.slic(image, n_segments=max_segments, compactness=10, sigma=1, start_label=0,
                                enforce_connectivity=True, channel_axis=-1)
    else:
        raise ValueError(f"superpixel generator {generator!r}: one of {', '.join(GENERATORS)}")
    # 4-connected parts (felzenszwalb's graph is 8-connected); measure.label numbers from 1
    parts = measure.label(raw, background=-1, connectivity=1) - 1
    return merge_regions(parts, image, max_segments).astype(np.uint8)


#: the fix an ICD error names when its caller gives none; a method passes its own (`fix=`),
#: naming its config keys
ICD_FIX = ("put ICD's superpixel PNGs (<image id>.png) in the method's superpixel folder, or use "
           "the fh_ss64 or slic64 generator")


def decode_rgb_ids(rgb: np.ndarray) -> np.ndarray:
    """ICD's colour-encoded superpixel ids: uint8 [H, W, 3] RGB → int64 [H, W],
    id = R + 256·G + 65536·B (the official loader adds 1 more)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_icd_superpixels(path: str | os.PathLike, shape: tuple[int, int] | None = None,
                         fix: str = ICD_FIX) -> np.ndarray:
    """One ICD superpixel PNG → uint8 [H, W] with ids 0..S-1 (the stored ids renumbered in
    increasing order; S ≤ 254). `shape` (H, W), when given, must be the PNG's size.

    DataError (one line naming the file and the fix, `fix`: the caller's words, naming its
    config keys) when the file is missing, unreadable, of another size than its image, or holds
    more than 254 superpixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: ICD superpixel file not found; {fix}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ICD superpixel PNG ({e}); {fix}") from None
    if shape is not None and rgb.shape[:2] != tuple(shape):
        raise DataError(f"{path}: ICD superpixels of size {rgb.shape[0]}x{rgb.shape[1]}, its image "
                        f"is {shape[0]}x{shape[1]}; the PNGs must be those of this dataset's images")
    values, ids = np.unique(decode_rgb_ids(rgb), return_inverse=True)
    if len(values) > 254:
        raise DataError(f"{path}: {len(values)} superpixels, at most 254 fit the uint8 ids "
                        f"({PAD_ID} = padding); ICD's maps hold at most 64")
    return ids.reshape(rgb.shape[:2]).astype(np.uint8)


@dataclass(frozen=True)
class ICDSuperpixels:
    """The `icd` source as a picklable extra-input function: `(image, image_id, root)` →
    `read_icd_superpixels(<folder>/<image_id>.png, image.shape[:2])`. `folder` is absolute or
    relative to the dataset root (`root`, the index's root folder), so one setting serves every
    dataset that keeps its PNGs in the same place under its root. `fix`: the end of every
    file error (read_icd_superpixels), where the method names its config keys."""

    folder: str
    fix: str = ICD_FIX
    #: the data layer passes the image id and the dataset root (datasets.ClassificationDataset)
    needs_image_id: ClassVar[bool] = True

    def path(self, image_id: str, root: str | os.PathLike) -> Path:
        return Path(root) / self.folder / f"{image_id}.png"

    def __call__(self, image: np.ndarray, image_id: str, root: str | os.PathLike) -> np.ndarray:
        return read_icd_superpixels(self.path(image_id, root), image.shape[:2], self.fix)

    def check_files(self, image_ids: list[str], root: str | os.PathLike) -> None:
        """DataError naming the first missing PNG (and how many are missing) before training
        starts: the data layer calls it in the main process, where the error stays one line
        (an error raised in a DataLoader worker comes back with the worker's traceback)."""
        missing = [p for p in (self.path(i, root) for i in image_ids) if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: ICD superpixel file not found ({len(missing)} of "
                            f"{len(image_ids)} images have none); {self.fix}")
