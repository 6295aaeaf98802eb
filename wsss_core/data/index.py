"""The dataset index (results/<dataset>/index.json): ids per split, sizes, labels, classes.

Building it opens every image and mask once, so a missing, corrupt or inconsistent file stops
the pipeline before any model is trained. Later stages read images through the index.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from ..io import read_json
from .palette import voc_palette
from .voc import VocLayout, labels_from_mask, multi_hot, read_list

SPLITS = ("train_aug", "train", "val")
INDEX_VERSION = 1


def build_index(name: str, kind: str, root: str | os.PathLike, lists: Mapping[str, str],
                num_classes: int | None = None, progress: bool = True) -> dict:
    layout = VocLayout(root, num_classes)
    splits = {split: read_list(layout.list_path(lists.get(split, split))) for split in SPLITS}
    all_ids = list(dict.fromkeys(i for split in SPLITS for i in splits[split]))
    images: dict[str, dict] = {}
    for image_id in tqdm(all_ids, desc=f"index {name}", disable=not progress, unit="img"):
        img = layout.read_image(image_id)
        size = (int(img.shape[0]), int(img.shape[1]))
        mask = layout.read_mask(image_id, expect_size=size)
        labels = labels_from_mask(mask, layout.num_classes)
        images[image_id] = {"size": list(size), "labels": labels}
    no_label = [i for i in splits["train_aug"] if not images[i]["labels"]]
    return {
        "version": INDEX_VERSION,
        "dataset": name,
        "kind": kind,
        "root": str(layout.root.resolve()),
        "mask_dir": layout.mask_dir,
        "num_classes": layout.num_classes,
        "class_names": layout.class_names,
        "palette": voc_palette()[: layout.num_classes].tolist(),
        "splits": splits,
        "images": images,
        "train_aug_without_foreground": no_label,
    }


class DatasetIndex:
    """Read access to a dataset through its index.json."""

    def __init__(self, data: dict, source: str | os.PathLike = "index.json") -> None:
        if data.get("version") != INDEX_VERSION:
            raise DataError(f"{source}: index version {data.get('version')} is not "
                            f"{INDEX_VERSION}; delete it and re-run the dataset_index rule")
        self.data = data
        self.source = str(source)
        self.name: str = data["dataset"]
        self.root = Path(data["root"])
        self.num_classes: int = int(data["num_classes"])
        self.class_names: list[str] = list(data["class_names"])
        self._layout: VocLayout | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetIndex":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: dataset index not found; run `snakemake {path}` first")
        return cls(read_json(path), path)

    @property
    def layout(self) -> VocLayout:
        if self._layout is None:
            self._layout = VocLayout(self.root, self.num_classes)
        return self._layout

    def ids(self, split: str) -> list[str]:
        try:
            return list(self.data["splits"][split])
        except KeyError:
            raise DataError(f"{self.source}: no split {split!r} (have {sorted(self.data['splits'])})") from None

    def labels(self, image_id: str) -> list[int]:
        return list(self.data["images"][image_id]["labels"])

    def label_vector(self, image_id: str) -> np.ndarray:
        return multi_hot(self.labels(image_id), self.num_classes)

    def size(self, image_id: str) -> tuple[int, int]:
        h, w = self.data["images"][image_id]["size"]
        return int(h), int(w)

    def image_files(self, split: str) -> list[Path]:
        """The image file of every id of `split` (what a stage reading the images depends on)."""
        return [self.layout.image_path(i) for i in self.ids(split)]

    def image(self, image_id: str) -> np.ndarray:
        return self.layout.read_image(image_id)

    def mask(self, image_id: str) -> np.ndarray:
        return self.layout.read_mask(image_id, expect_size=self.size(image_id))
