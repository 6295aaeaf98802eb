"""torch Datasets over a DatasetIndex: classification training and multi-scale inference."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..io import atomic_path, read_label_png
from . import transforms as T
from .index import DatasetIndex


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation stream of one sample: independent of workers and iteration order."""
    return np.random.default_rng([seed, epoch, index])


class EpochDataset(Dataset):
    """Training samples of one split whose augmentation is drawn from (seed, epoch, index)."""

    def __init__(self, index: DatasetIndex, split: str, seed: int = 0) -> None:
        self.index = index
        self.ids = index.ids(split)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def rng(self, i: int) -> np.random.Generator:
        return sample_rng(self.seed, self.epoch, i)


class ClassificationDataset(EpochDataset):
    """Random long-side resize → normalise → flip → crop (IRN order); multi-hot labels.

    Method data hooks (methods/base.py): `extra` maps a name to a picklable function
    uint8 image [H, W, 3] → integer map [H, W] (e.g. superpixel ids), computed once per image
    and cached as `<extra_cache>/<name>/<id>.npy` (in memory without a cache folder); each
    extra map goes through the image's resize (nearest), flip and crop (padded with 255) and
    is batched as int64 [crop, crop] under its name. `views` replaces the one augmented crop
    by the method's own views of the image: `views(uint8 image, rng) → {name: array}`.
    """

    def __init__(self, index: DatasetIndex, split: str, crop: int, scale_range: Sequence[int],
                 seed: int = 0, extra: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
                 extra_cache: str | Path | None = None,
                 views: Callable[[np.ndarray, np.random.Generator], dict] | None = None) -> None:
        super().__init__(index, split, seed)
        self.crop = crop
        self.scale_range = tuple(scale_range)
        self.extra = dict(extra or {})
        for fn in self.extra.values():  # a map read from files checks them here, in the main process
            if hasattr(fn, "check_files"):
                fn.check_files(self.ids, index.root)
        self.extra_cache = Path(extra_cache) if extra_cache else None
        self.views = views
        self._memory: dict[tuple[str, str], np.ndarray] = {}

    def _augment(self, img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        return T.classification_crop(img, mask, self.crop, self.scale_range, rng)

    def _compute_extra(self, name: str, image_id: str, image: np.ndarray) -> np.ndarray:
        """`extra[name](image)`; a function with `needs_image_id = True` (one that reads a file
        per image, e.g. pre-computed superpixels) gets `image_id=` and `root=` (the dataset root)."""
        fn = self.extra[name]
        if getattr(fn, "needs_image_id", False):
            return fn(image, image_id=image_id, root=self.index.root)
        return fn(image)

    def extra_input(self, name: str, image_id: str, image: np.ndarray) -> np.ndarray:
        """The extra map `name` of one image as int32 [H, W], computed at most once."""
        if self.extra_cache is None:
            key = (name, image_id)
            if key not in self._memory:
                self._memory[key] = np.asarray(self._compute_extra(name, image_id, image), dtype=np.int32)
            return self._memory[key]
        path = self.extra_cache / name / f"{image_id}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        value = np.asarray(self._compute_extra(name, image_id, image), dtype=np.int32)
        if value.shape != image.shape[:2]:
            raise ValueError(f"extra input {name!r} of {image_id}: shape {value.shape}, expected "
                             f"{image.shape[:2]} (a bug in the method's extra_input_fns)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, value, allow_pickle=False)
        return value

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        rng = self.rng(i)
        img = self.index.image(image_id, keep=True)
        if self.views is not None:
            item = {k: torch.as_tensor(v) for k, v in self.views(img, rng).items()}
        elif self.extra:
            # every extra map sees the image's random draws: a copy of the generator each
            start = copy.deepcopy(rng)
            out, _ = self._augment(img, None, rng)
            item = {"image": torch.from_numpy(T.to_chw(out))}
            for name in self.extra:
                _, m = self._augment(img, self.extra_input(name, image_id, img), copy.deepcopy(start))
                item[name] = torch.from_numpy(m.astype(np.int64))
        else:
            out, _ = self._augment(img, None, rng)
            item = {"image": torch.from_numpy(T.to_chw(out))}
        item["label"] = torch.from_numpy(self.index.label_vector(image_id))
        item["index"] = i
        return item


class MultiScaleDataset(Dataset):
    """One image at several scales (bicubic), normalised; flips are batched by the model code."""

    def __init__(self, index: DatasetIndex, split: str | Sequence[str], scales: Sequence[float]) -> None:
        self.index = index
        self.ids = index.ids(split) if isinstance(split, str) else list(split)
        self.scales = list(scales)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        img = self.index.image(image_id)  # the CAM export reads each image once
        scaled = []
        for s in self.scales:
            im = img if s == 1.0 else T.resize_image(img, T.scaled_size(img.shape[:2], s))
            scaled.append(torch.from_numpy(T.to_chw(T.normalize(im))))
        return {"id": image_id, "image": img, "scaled": scaled,
                "keys": self.index.labels(image_id), "size": img.shape[:2]}


def collate_single(batch: list[dict]) -> dict:
    """Inference runs one image at a time (scales differ in size)."""
    assert len(batch) == 1
    return batch[0]


class IRNDataset(EpochDataset):
    """IRN training pairs (docs/algorithms.md §irn): rescale 0.5-1.5 (image bicubic, label nearest) →
    normalise → joint flip → joint crop (image pad 0, label pad 255) → label ↓4 nearest."""

    def __init__(self, index: DatasetIndex, split: str, label_dir: str, crop: int,
                 scale_range: Sequence[float] = (0.5, 1.5), seed: int = 0) -> None:
        super().__init__(index, split, seed)
        self.label_dir = Path(label_dir)
        self.crop = crop
        self.scale_range = tuple(scale_range)
        missing = [i for i in self.ids if not (self.label_dir / f"{i}.png").is_file()]
        if missing:
            raise DataError(f"{self.label_dir / (missing[0] + '.png')}: IR label missing "
                            f"({len(missing)} in all); re-run the ir_labels stage")

    def __getitem__(self, i: int) -> dict:
        image_id = self.ids[i]
        rng = self.rng(i)
        img = self.index.image(image_id, keep=True)
        label = read_label_png(self.label_dir / f"{image_id}.png")
        img, label = T.random_rescale(img, label, *self.scale_range, rng)
        img = T.normalize(img)
        img, label = T.random_hflip(img, label, rng)
        img, label = T.random_crop(img, label, self.crop, rng)
        low = (self.crop - 1) // 4 + 1
        label = T.resize_mask(np.ascontiguousarray(label), (low, low))
        return {"image": torch.from_numpy(T.to_chw(img)),
                "label": torch.from_numpy(label.astype(np.int64)), "index": i}
