"""The dataset index (results/<dataset>/index.json): ids per split, sizes, labels, classes.

Building it opens every image and mask once, so a missing, corrupt or inconsistent file stops
the pipeline before any model is trained. Later stages read images through the index.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import DataError
from ..io import read_json
from .palette import voc_palette
from .labels import label_table_path, read_label_rows, read_label_table, table_class_names
from .voc import (IMAGE_SUFFIXES, MASK_DIRS, VocLayout, find_image, labels_from_mask, list_file,
                  multi_hot, read_class_names, read_list)

SPLITS = ("train_aug", "train", "val")
#: the index parts the workflow builds as separate jobs, each from the files of its splits only,
#: so that a corrected val mask re-runs the evaluations on val and not the classifier
PARTS = {"train": ("train_aug", "train"), "val": ("val",)}
INDEX_VERSION = 1


def resolve_lists(layout: VocLayout, lists: Mapping[str, str],
                  table: Mapping[str, list[int]] | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The ids of every split and where they come from.

    The list files name the ids (`lists[split]`: a name under ImageSets/Segmentation or a path).
    A dataset with a label table and none of the three list files uses every id of the table for
    `train_aug` and `train` and has an empty `val` (nothing to evaluate without masks).

    Returns:
        (split → ids, split → source file). Raises DataError for a missing list file (when
        some exist), a malformed or empty one.
    """
    paths = {split: layout.list_path(lists.get(split, split)) for split in SPLITS}
    if table is not None and not any(p.is_file() for p in paths.values()):
        ids = list(table)
        return {"train_aug": ids, "train": ids, "val": []}, {s: "label table" for s in SPLITS}
    return ({split: read_list(path) for split, path in paths.items()},
            {split: str(path) for split, path in paths.items()})


def check_split_overlap(splits: Mapping[str, list[str]], sources: Mapping[str, str],
                        allow: bool = False) -> None:
    """Refuse val ids that are also training ids (train_aug or train): scores on val would be
    measured on images the networks trained on.

    Raises:
        DataError naming both lists and the first shared ids, unless `allow` (the dataset option
        `allow_split_overlap: true`, for users who mean it).
    """
    if allow:
        return
    val = set(splits["val"])
    for split in ("train_aug", "train"):
        shared = [i for i in splits[split] if i in val]
        if shared:
            more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
            raise DataError(f"{sources['val']}: {len(shared)} val id(s) also in {split} "
                            f"({sources[split]}): {', '.join(shared[:3])}{more}; val scores would "
                            f"be measured on training images: remove them from one list, or set "
                            f"datasets.<name>.allow_split_overlap: true if you mean it")


def check_dataset_lists(root: str | os.PathLike, lists: Mapping[str, str], labels: str | None,
                        splits: tuple[str, ...], allow_split_overlap: bool = False,
                        num_classes: int | None = None) -> list[str]:
    """The workflow's start-up check of a dataset's lists and label table (cheap: no image is
    opened, one stat per table row): the lists exist and parse, val shares no id with the
    training lists (`check_split_overlap`), and the table parses, names known classes and
    covers exactly the listed ids and the photos (`_check_table_covers`). What needs the pixels
    (corrupt photos, masks that disagree with the table) is left to the index job.

    Returns:
        the files an index part of `splits` depends on besides its images and masks: those
        splits' list files and the label table (what the `dataset_index` rule declares).
    Raises:
        DataError naming the file and the fix.
    """
    root = Path(root).expanduser()
    paths = {s: list_file(root, lists.get(s, s)) for s in SPLITS}
    table = label_table_path(root, labels) if labels is not None else None
    if table is not None and not table.is_file():
        raise DataError(f"{table}: label table not found; fix datasets.<name>.labels (a path "
                        f"relative to the dataset root, or absolute)")
    layout = VocLayout(root, require_masks=table is None,
                       class_names=dataset_class_names(root, num_classes, labels))
    rows = read_label_table(table, layout.class_names) if table is not None else None
    ids, sources = resolve_lists(layout, lists, rows)
    check_split_overlap(ids, sources, allow_split_overlap)
    if rows is not None:
        _check_table_covers(rows, table, layout, ids, sources)
        if sources["train_aug"] == "label table":
            return [str(table)]  # no lists: the table's ids are train_aug and train, val is empty
    return [str(paths[s]) for s in splits] + ([str(table)] if table is not None else [])


def dataset_class_names(root: str | os.PathLike, num_classes: int | None,
                        labels: str | None) -> list[str]:
    """The classes: class_names.txt, else (with a label table naming classes) the table's, else
    VOC's 21 or `num_classes` generic names."""
    root = Path(root).expanduser()
    if labels is not None and not (root / "class_names.txt").is_file() and num_classes is None:
        named = table_class_names(label_table_path(root, labels))
        if named is not None and named != read_class_names(root):
            masks = next((d for d in MASK_DIRS if (root / d).is_dir() and any((root / d).iterdir())), None)
            if masks is not None:
                raise DataError(f"{root / 'class_names.txt'}: missing; the masks in {root / masks} "
                                f"hold class ids, and the table's names alone do not say which id "
                                f"is which class: write class_names.txt (background first, one "
                                f"name a line, line k = class id k-1)")
            return named
    return read_class_names(root, num_classes)


def build_index(name: str, kind: str, root: str | os.PathLike, lists: Mapping[str, str],
                num_classes: int | None = None, progress: bool = True, labels: str | None = None,
                allow_split_overlap: bool = False, splits: tuple[str, ...] = SPLITS,
                long_side: int | None = None) -> dict:
    """Validate the images (and masks) of `splits` and return the index dict.

    Args:
        name, kind: the dataset's config name and kind (toy | voc | coco).
        root: the dataset folder in VOC layout.
        lists: split → list name or path.
        num_classes: C with background when there is no class_names.txt.
        labels: a label table (`data/labels.py`; relative to `root` or absolute): image-level
            labels come from it and masks become optional; None: labels come from the masks,
            which every image must have.
        allow_split_overlap: accept val ids that are also training ids.
        splits: the splits whose images are indexed (an index part); every list is still read
            for the overlap check.
        long_side: the working resolution (pixels) every stage reads the dataset at
            (`DatasetIndex.image`), or None for the files' own size.

    Returns:
        the index: per image its file size (H, W), labels (foreground class ids), has_mask;
        `long_side` at the top.

    Raises:
        DataError: one line naming the file (list, table line, image or mask) and the fix.
    """
    names = dataset_class_names(root, num_classes, labels)
    layout = VocLayout(root, num_classes, require_masks=labels is None, class_names=names)
    table_path = label_table_path(layout.root, labels) if labels is not None else None
    table = read_label_table(table_path, layout.class_names) if table_path is not None else None
    all_splits, sources = resolve_lists(layout, lists, table)
    check_split_overlap(all_splits, sources, allow_split_overlap)
    if table is not None:
        _check_table_covers(table, table_path, layout, all_splits, sources)
    wanted = {split: all_splits[split] for split in splits}
    all_ids = list(dict.fromkeys(i for split in splits for i in wanted[split]))
    images: dict[str, dict] = {}
    for image_id in tqdm(all_ids, desc=f"index {name}", disable=not progress, unit="img"):
        img = layout.read_image(image_id)
        size = (int(img.shape[0]), int(img.shape[1]))
        has_mask = layout.has_mask(image_id) if table is not None else True
        mask_labels = (labels_from_mask(layout.read_mask(image_id, expect_size=size), layout.num_classes)
                       if has_mask else None)
        if table is None:
            image_labels = mask_labels
        else:
            image_labels = table[image_id]
            if mask_labels is not None and mask_labels != image_labels:
                shown = ", ".join(layout.class_names[c] for c in mask_labels) or "no class"
                given = ", ".join(layout.class_names[c] for c in image_labels)
                where = next(w for w, i, _ in read_label_rows(table_path) if i == image_id)
                raise DataError(f"{where}: image {image_id} is labelled {given} but its mask "
                                f"{layout.mask_path(image_id)} shows {shown}; fix the table row "
                                f"or the mask")
        images[image_id] = {"size": list(size), "labels": image_labels, "has_mask": has_mask}
    no_label = [i for i in wanted.get("train_aug", []) if not images[i]["labels"]]
    return {
        "version": INDEX_VERSION,
        "dataset": name,
        "kind": kind,
        "root": str(layout.root.resolve()),
        "mask_dir": layout.mask_dir,
        "labels_from": str(table_path) if table_path is not None else "masks",
        "num_classes": layout.num_classes,
        "class_names": layout.class_names,
        "palette": voc_palette()[: layout.num_classes].tolist(),
        "splits": wanted,
        "images": images,
        "train_aug_without_foreground": no_label,
        "long_side": None if long_side is None else int(long_side),
    }


def _check_table_covers(table: Mapping[str, list[int]], table_path: Path, layout: VocLayout,
                        splits: Mapping[str, list[str]], sources: Mapping[str, str]) -> None:
    """Every listed id has a table row, and every row has an image."""
    for split in SPLITS:
        for image_id in splits[split]:
            if image_id not in table:
                raise DataError(f"{sources[split]}: image {image_id} has no row in {table_path}; "
                                f"add its classes there or remove it from the list")
    for line, image_id, _ in read_label_rows(table_path):
        if not layout.image_path(image_id).is_file():
            raise DataError(f"{line}: image {image_id} has no file {layout.image_path(image_id)}; "
                            f"add the photo or remove the row")
    if sources["train_aug"] == "label table":  # no lists: the photos folder is the dataset
        for path in sorted((layout.root / "JPEGImages").iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.stem not in table:
                raise DataError(f"{path}: photo without a row in {table_path}; add a row with "
                                f"its classes, or move the photo out of JPEGImages/")


def working_size(size: tuple[int, int], long_side: int | None) -> tuple[int, int]:
    """(H, W) shrunk so that max(H, W) <= long_side, aspect kept (each side rounded, >= 1);
    unchanged when long_side is None or the image is already that small (never enlarged)."""
    h, w = int(size[0]), int(size[1])
    if long_side is None or max(h, w) <= long_side:
        return h, w
    f = long_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def merge_index_parts(parts: list[dict]) -> dict:
    """One index of every split from the parts (`PARTS`) built as separate jobs.

    Raises:
        DataError: the parts come from different datasets or class lists.
    """
    first = parts[0]
    merged = dict(first, splits={}, images={}, train_aug_without_foreground=[])
    for part in parts:
        for key in ("dataset", "root", "num_classes", "class_names", "long_side"):
            if part.get(key) != first.get(key):
                raise DataError(f"index parts disagree on {key} ({part.get(key)!r} vs {first.get(key)!r}); "
                                f"delete results/{first['dataset']}/index* and re-run")
        merged["splits"].update(part["splits"])
        merged["images"].update(part["images"])
        merged["train_aug_without_foreground"] += part["train_aug_without_foreground"]
    return merged


def files_fingerprint(root: str | os.PathLike, lists: Mapping[str, str], splits: tuple[str, ...],
                      labels: str | None = None) -> str:
    """A digest of the size and modification time of every file an index part reads: the list
    files, the label table, class_names.txt, and the image and mask of every id of `splits`.
    The workflow makes it a parameter of the index jobs, so editing, replacing, adding or
    removing any of those files re-runs the index (and through it what reads that part).
    Costs one stat per file (no decoding): ~0.1 s for 12k ids. Missing files count as such
    (the index job then names them).

    Returns: a hex SHA-256 digest.
    """
    root = Path(root).expanduser()
    h = hashlib.sha256()
    lines: list[str] = []

    def add(path: str, fallback=None) -> None:
        # plain strings and one os.stat per file: ~2 us a file (Path objects cost as much again)
        try:
            st = os.stat(path)
        except OSError:
            if fallback is None:
                lines.append(f"{path}\0-")
                return
            add(str(fallback()))
            return
        lines.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")

    list_paths = {s: list_file(root, lists.get(s, s)) for s in SPLITS}
    for p in list_paths.values():
        add(str(p))
    add(str(root / "class_names.txt"))
    ids: list[str] = []
    if labels is not None:
        table = label_table_path(root, labels)
        add(str(table))
        if not any(p.is_file() for p in list_paths.values()) and table.is_file():
            ids = [row[1] for row in read_label_rows(table)] if "val" not in splits else []
    for split in splits:
        if list_paths[split].is_file():
            ids += read_list(list_paths[split])
    mask_dir = str(next((root / d for d in MASK_DIRS if (root / d).is_dir()), root / MASK_DIRS[0]))
    photos = root / "JPEGImages"
    photo_dir = str(photos)
    for image_id in dict.fromkeys(ids):
        # `<id>.jpg`, else the photo find_image reads (another format)
        add(f"{photo_dir}/{image_id}.jpg", lambda i=image_id: find_image(photos, i))
        add(f"{mask_dir}/{image_id}.png")
    h.update("\n".join(lines).encode())
    return h.hexdigest()


def torch_worker_info():
    """torch's DataLoader worker info in a worker process, None elsewhere (torch not imported:
    None, without importing it)."""
    data = sys.modules.get("torch.utils.data")
    return None if data is None else data.get_worker_info()


#: bytes of decoded working-size images one process keeps (`DatasetIndex.image`): the training
#: stages read every image once per epoch, and decoding a ~500-px JPEG and resizing it costs
#: about as much as a tenth of a CPU training step; 1 GiB holds voc632 or the toy set many times
IMAGE_CACHE_BYTES = 1 << 30


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
        #: the working resolution: images and masks are read with their long side at most this
        #: many pixels (None: at their files' size); every size, map and score is at it
        self.long_side: int | None = data.get("long_side")
        self._layout: VocLayout | None = None
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._image_bytes = 0

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DatasetIndex":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: dataset index not found; run `snakemake {path}` first")
        return cls(read_json(path), path)

    @property
    def layout(self) -> VocLayout:
        if self._layout is None:
            self._layout = VocLayout(self.root, self.num_classes, require_masks=False,
                                     class_names=self.class_names)
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

    def file_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image file, pixels."""
        h, w = self.data["images"][image_id]["size"]
        return int(h), int(w)

    def size(self, image_id: str) -> tuple[int, int]:
        """(H, W) at which every stage sees the image: `working_size(file_size, long_side)`."""
        return working_size(self.file_size(image_id), self.long_side)

    def image_files(self, split: str) -> list[Path]:
        """The image file of every id of `split` (what a stage reading the images depends on)."""
        return [self.layout.image_path(i) for i in self.ids(split)]

    def image(self, image_id: str, keep: bool = False) -> np.ndarray:
        """RGB uint8 [H, W, 3] at `size(image_id)` (a larger photo resized with PIL's bilinear
        filter, which averages over the shrink factor), read-only; DataError naming a missing or
        corrupt file.

        `keep=True` (the training datasets, which read every image once per epoch) keeps the
        decoded image in this process, up to `IMAGE_CACHE_BYTES` (least recently used dropped
        first), so an epoch after the first decodes nothing; a DataLoader worker, which lives for
        one epoch, keeps none. Stages that read each image once leave `keep` off."""
        cached = self._images.get(image_id)
        if cached is not None:
            self._images.move_to_end(image_id)
            return cached
        image = self.layout.read_image(image_id)
        size = self.size(image_id)
        if image.shape[:2] != size:
            image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        image.flags.writeable = False  # shared by every later read: no caller may edit it
        if keep and image.nbytes <= IMAGE_CACHE_BYTES and torch_worker_info() is None:
            self._images[image_id] = image
            self._image_bytes += image.nbytes
            while self._image_bytes > IMAGE_CACHE_BYTES:
                self._image_bytes -= self._images.popitem(last=False)[1].nbytes
        return image

    def has_mask(self, image_id: str) -> bool:
        """Whether `image_id` has a ground-truth mask (label-only datasets have none, or masks for
        a few images only; indexes written before masks became optional have one for every id)."""
        return bool(self.data["images"][image_id].get("has_mask", True))

    def mask_ids(self, split: str) -> list[str]:
        """The ids of `split` that have a ground-truth mask, in list order (what evaluations score)."""
        return [i for i in self.ids(split) if self.has_mask(i)]

    def mask(self, image_id: str) -> np.ndarray:
        """The ground-truth mask, uint8 [H, W] of class ids and 255 (ignore); DataError when the
        image has none (check `has_mask` first)."""
        if not self.has_mask(image_id):
            raise DataError(f"{self.source}: image {image_id} has no ground-truth mask (the dataset "
                            f"gives image-level labels only); score only `mask_ids(split)`")
        mask = self.layout.read_mask(image_id, expect_size=self.file_size(image_id))
        size = self.size(image_id)
        if mask.shape == size:
            return mask
        return np.asarray(Image.fromarray(mask).resize(size[::-1], Image.NEAREST))
