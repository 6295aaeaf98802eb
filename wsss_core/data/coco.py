"""COCO 2014 or 2017 instances JSON + images → the VOC layout this pipeline reads (81 classes).

Output (``out_dir``, written into a temporary sibling folder and renamed into place, so an
existing ``out_dir`` is replaced as a whole and an interrupted run leaves nothing behind)::

    JPEGImages/<id>.jpg                 hard link to the COCO image (a copy across filesystems)
    SegmentationClassAug/<id>.png       palette PNG, 0 background, 1..80 classes, 255 ignore
    ImageSets/Segmentation/train_aug.txt  every kept train2014 image
    ImageSets/Segmentation/train.txt      the first ``train_eval`` ids of train_aug (all if None)
    ImageSets/Segmentation/val.txt        every val2014 image
    class_names.txt                     background + the 80 COCO names, one per line
    coco_conversion.json                sources, counts, dropped ids, label ↔ COCO category id

Ids are the file stems (``COCO_train2014_000000000009``); lists are sorted by id, so "the
first N" of train is deterministic.

Choices (the usual WSSS practice unless noted):
- Classes: the 80 COCO categories in ascending category id map to labels 1..80 (the sparse ids
  1..90 become dense; e.g. person 1 → 1, dog 18 → 17, toothbrush 90 → 80). The mapping is the
  fixed COCO table (the same 80 categories in 2014 and 2017), so train and val always agree;
  a JSON naming another category stops.
- Overlaps: non-crowd instances are painted in decreasing pixel area (ties by annotation id),
  so where instances overlap the smaller one is drawn last and stays visible.
- Crowd regions (iscrowd=1): 255 (ignore) — neither class nor background — except where a
  non-crowd instance covers the pixel (an explicit instance is the more precise label). A
  class present only as a crowd is therefore absent from the image-level labels, which are
  derived from the masks.
- Images without any foreground pixel after this (no annotation, only crowds, only empty
  polygons) are dropped from train_aug/train — a classifier cannot learn from an image with
  no class — and logged with their ids in coco_conversion.json. Val is kept complete; its
  unlabelled images get all-background (or background + ignore) masks.
- Polygons with fewer than 3 points are skipped: they have no area, and pycocotools would
  read a 4-number polygon as a bounding box.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..io import atomic_dir, label_image, write_json
from ..ops.pool import die_with
from .palette import IGNORE
from .voc import check_id

log = logging.getLogger("wsss")

#: (COCO category id, name) of the 80 categories of COCO 2014/2017 instances, ascending id
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASSES: tuple[str, ...] = ("background",) + tuple(name for _, name in COCO_CATEGORIES)
NUM_COCO_CLASSES = len(COCO_CLASSES)  # 81
#: COCO category id → dense label 1..80
CATEGORY_TO_LABEL: dict[int, int] = {cid: i + 1 for i, (cid, _) in enumerate(COCO_CATEGORIES)}
_CATEGORY_NAME = dict(COCO_CATEGORIES)
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_LIST_DIR = Path("ImageSets") / "Segmentation"


def _import_pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("pycocotools is not installed; `pip install pycocotools` (it is a "
                        "dependency of wsss) to convert COCO") from None
    return COCO, mask_utils


def load_instances(path: str | os.PathLike, flag: str):
    """A pycocotools COCO object for an instances JSON; problems name the file and the fix."""
    COCO, _ = _import_pycocotools()
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: COCO instances JSON not found; pass {flag} the "
                        f"instances_*2014.json from annotations_trainval2014.zip")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-download or re-extract the "
                        f"annotations file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO instances file (top level is not an object); "
                        f"pass {flag} an instances_*.json")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list, so not a COCO instances file; pass {flag} "
                            f"an instances_*.json (not captions/image_info)")
    try:
        for img in data["images"]:
            int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"])
        for ann in data["annotations"]:
            int(ann["id"]), int(ann["image_id"]), int(ann["category_id"]), ann["segmentation"]
        for cat in data["categories"]:
            int(cat["id"]), str(cat["name"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed entry (missing or invalid {e}); re-download the "
                        f"annotations file") from None
    for cat in data["categories"]:
        cid, name = int(cat["id"]), str(cat["name"])
        if _CATEGORY_NAME.get(cid) != name:
            raise DataError(f"{path}: category {cid} {name!r} is not the COCO 2014/2017 category "
                            f"{cid} {_CATEGORY_NAME.get(cid)!r}; only the 80 COCO instance "
                            f"categories are supported")
    unknown = {int(a["category_id"]) for a in data["annotations"]} - set(CATEGORY_TO_LABEL)
    if unknown:
        raise DataError(f"{path}: annotations use category ids {sorted(unknown)} outside the 80 "
                        f"COCO categories; fix or remove those annotations")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def instance_mask(segmentation: Any, height: int, width: int, source: str) -> np.ndarray:
    """Boolean [H, W] mask of one annotation (polygons, uncompressed or compressed RLE)."""
    _, mask_utils = _import_pycocotools()
    try:
        if isinstance(segmentation, list):
            polygons = [[float(v) for v in p] for p in segmentation]
            if any(len(p) % 2 for p in polygons):
                raise ValueError("a polygon has an odd number of coordinates")
            polygons = [p for p in polygons if len(p) >= 6]
            if not polygons:
                return np.zeros((height, width), dtype=bool)
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict):
            size = [int(v) for v in segmentation["size"]]
            if size != [height, width]:
                raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
            counts = segmentation["counts"]
            rle = (mask_utils.frPyObjects(segmentation, height, width)
                   if isinstance(counts, list) else segmentation)
        else:
            raise ValueError(f"segmentation of type {type(segmentation).__name__}")
        return mask_utils.decode(rle).astype(bool)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{source}: bad segmentation ({e}); fix or remove the annotation") from None


def rasterise(annotations: Sequence[dict], height: int, width: int, source: str) -> np.ndarray:
    """uint8 [H, W] label map of one image under the module's overlap and crowd rules.

    `annotations` carry ``label`` (1..80), ``iscrowd``, ``id`` and ``segmentation``.
    """
    labels = np.zeros((height, width), dtype=np.uint8)
    instance_px = np.zeros((height, width), dtype=bool)
    crowd_px = np.zeros((height, width), dtype=bool)
    instances: list[tuple[int, int, int, np.ndarray]] = []
    for ann in annotations:
        m = instance_mask(ann["segmentation"], height, width, f"{source} annotation {ann['id']}")
        if ann.get("iscrowd", 0):
            crowd_px |= m
        else:
            instances.append((-int(m.sum()), int(ann["id"]), int(ann["label"]), m))
    instances.sort(key=lambda t: t[:2])  # largest first, so smaller instances end on top
    for _, _, label, m in instances:
        labels[m] = label
        instance_px |= m
    labels[crowd_px & ~instance_px] = IGNORE
    return labels


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # other filesystem, or links not permitted
        shutil.copyfile(src, dst)


def _convert_image(job: dict) -> bool:
    """Write one image's mask (and link its JPEG); False, writing nothing, if dropped."""
    src, h, w = Path(job["src"]), job["height"], job["width"]
    try:
        with Image.open(src) as img:
            size = img.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{src}: unreadable image ({e}); re-download it from cocodataset.org") from None
    if size != (w, h):
        raise DataError(f"{src}: image is {size[0]}x{size[1]} but {job['json']} says {w}x{h}; "
                        f"use the images that belong to this annotation file")
    labels = rasterise(job["annotations"], h, w, job["json"])
    if job["drop_empty"] and not ((labels > 0) & (labels != IGNORE)).any():
        return False
    out = Path(job["out"])
    label_image(labels).save(out / "SegmentationClassAug" / f"{job['id']}.png", format="PNG")
    _link_or_copy(src, out / "JPEGImages" / f"{job['id']}.jpg")
    return True


def _jobs(coco, json_path: Path, images_dir: Path, out: Path, flag: str,
          drop_empty: bool) -> list[dict]:
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder not found; pass {flag} the folder holding "
                        f"the images of {json_path.name} (e.g. train2014/)")
    jobs: list[dict] = []
    seen: dict[str, int] = {}
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        name = Path(str(info["file_name"]))
        stem = check_id(name.stem, f"{json_path} image {image_id}")
        if name.suffix.lower() not in _JPEG_SUFFIXES:
            raise DataError(f"{json_path}: image {name} is not a JPEG; the VOC layout holds "
                            f"JPEGImages/<id>.jpg, convert it first")
        if stem in seen:
            raise DataError(f"{json_path}: images {seen[stem]} and {image_id} share the file "
                            f"stem {stem}; ids must be unique, fix file_name")
        seen[stem] = image_id
        src = images_dir / name.name
        if not src.is_file():
            raise DataError(f"{src}: image listed in {json_path} not found; pass {flag} the "
                            f"folder that holds it")
        anns = [{"id": int(a["id"]), "label": CATEGORY_TO_LABEL[int(a["category_id"])],
                 "iscrowd": int(a.get("iscrowd", 0)), "segmentation": a["segmentation"]}
                for a in coco.imgToAnns.get(image_id, [])]
        jobs.append({"id": stem, "src": str(src), "height": int(info["height"]),
                     "width": int(info["width"]), "annotations": anns, "json": str(json_path),
                     "out": str(out), "drop_empty": drop_empty})
    return sorted(jobs, key=lambda j: j["id"])


def _run_jobs(jobs: list[dict], workers: int, desc: str) -> list[bool]:
    if workers <= 1 or len(jobs) < 2:
        return [_convert_image(j) for j in tqdm(jobs, desc=desc, unit="img")]
    with ProcessPoolExecutor(max_workers=workers, initializer=die_with,
                             initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.map(_convert_image, jobs, chunksize=64), total=len(jobs),
                         desc=desc, unit="img"))


def _write_list(path: Path, ids: Iterable[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in ids))


def convert_coco(train_json: str | os.PathLike, train_images: str | os.PathLike,
                 val_json: str | os.PathLike, val_images: str | os.PathLike,
                 out_dir: str | os.PathLike, *, train_eval: int | None = None,
                 workers: int = 1) -> dict:
    """Convert COCO 2014 or 2017 instances + images into a VOC-layout root; returns the summary."""
    if train_eval is not None and train_eval < 1:
        raise ConfigError(f"--train-eval {train_eval}: must be a positive number of images "
                          f"(or left out for all)")
    out_dir = Path(out_dir).expanduser()
    train_json, val_json = Path(train_json).expanduser(), Path(val_json).expanduser()
    train_coco = load_instances(train_json, "--train-json")
    val_coco = load_instances(val_json, "--val-json")
    with atomic_dir(out_dir) as tmp:
        for d in ("JPEGImages", "SegmentationClassAug", _LIST_DIR):
            (tmp / d).mkdir(parents=True)
        train_jobs = _jobs(train_coco, train_json, Path(train_images).expanduser(), tmp,
                           "--train-images", drop_empty=True)
        val_jobs = _jobs(val_coco, val_json, Path(val_images).expanduser(), tmp,
                         "--val-images", drop_empty=False)
        clash = {j["id"] for j in train_jobs} & {j["id"] for j in val_jobs}
        if clash:
            raise DataError(f"{val_json}: image ids {sorted(clash)[:3]} also occur in "
                            f"{train_json}; train and val must be disjoint")
        kept = _run_jobs(train_jobs, workers, "convert train")
        _run_jobs(val_jobs, workers, "convert val")
        train_aug = [j["id"] for j, k in zip(train_jobs, kept) if k]
        dropped = [j["id"] for j, k in zip(train_jobs, kept) if not k]
        if not train_aug:
            raise DataError(f"{train_json}: no train image has a foreground annotation; "
                            f"check that it is an instances file with segmentations")
        train = train_aug if train_eval is None else train_aug[:train_eval]
        val = [j["id"] for j in val_jobs]
        _write_list(tmp / _LIST_DIR / "train_aug.txt", train_aug)
        _write_list(tmp / _LIST_DIR / "train.txt", train)
        _write_list(tmp / _LIST_DIR / "val.txt", val)
        (tmp / "class_names.txt").write_text("".join(f"{n}\n" for n in COCO_CLASSES))
        summary = {
            "train_json": str(train_json.resolve()), "val_json": str(val_json.resolve()),
            "num_classes": NUM_COCO_CLASSES,
            "label_to_category_id": {str(CATEGORY_TO_LABEL[c]): c for c, _ in COCO_CATEGORIES},
            "counts": {"train_aug": len(train_aug), "train": len(train), "val": len(val),
                       "train_dropped_without_foreground": len(dropped)},
            "train_dropped_without_foreground": dropped,
            "rules": {"overlap": "smaller instance drawn last (decreasing area, ties by id)",
                      "crowd": f"{IGNORE} where no non-crowd instance covers the pixel",
                      "train_without_foreground": "dropped", "val": "complete"},
        }
        write_json(tmp / "coco_conversion.json", summary)
    log.info("COCO → %s: train_aug %d (dropped %d without foreground), train %d, val %d",
             out_dir, len(train_aug), len(dropped), len(train), len(val))
    return summary
