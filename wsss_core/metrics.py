"""Segmentation metrics from a confusion matrix accumulated image by image.

Rows are ground truth, columns prediction (as chainercv and IRN). Ground-truth pixels equal
to 255 are ignored; a prediction of 255 (an "ignore" pixel in a label PNG) counts as
background, as the literature scores pseudo labels. mIoU is the mean over classes whose union
is non-empty (nanmean), so absent classes do not pull the mean down.

No metric file ever holds NaN. Two cases without a score are told apart:
  * no image of the split has a ground-truth mask (a label-only dataset): the stage still
    writes its files, saying so: `*_miou.txt` holds the line `no ground truth`
    (`NO_GROUND_TRUTH`; `read_miou` returns None) and the JSON `"miou": null,
    "no_ground_truth": true` with the split and its counts (`no_ground_truth_report`);
  * masks exist but not one pixel is scorable (255 everywhere): `check_scorable` raises a
    DataError naming the split and the mask folder.
A class without a ground-truth pixel in the split is listed in `absent_classes` of the report
(its IoU is null, or 0 where it was predicted), never averaged as NaN.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data.palette import IGNORE
from .errors import DataError
from .io import write_json, write_text

#: the text of a `*_miou.txt` whose split has no image with a ground-truth mask
NO_GROUND_TRUTH = "no ground truth"


class ConfusionMatrix:
    """Streaming C x C confusion matrix; only the running counts are kept in memory."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
        gt = gt.reshape(-1).astype(np.int64)
        pred = pred.reshape(-1).astype(np.int64)
        pred = np.where(pred == IGNORE, 0, pred)
        keep = gt != IGNORE
        gt, pred = gt[keep], pred[keep]
        n = self.num_classes
        if gt.size and (gt.min() < 0 or gt.max() >= n):
            raise ValueError(f"ground-truth label outside 0..{n - 1} and {IGNORE}")
        if pred.size and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predicted label outside 0..{n - 1} and {IGNORE}")
        self.matrix += np.bincount(n * gt + pred, minlength=n * n).reshape(n, n)
        self.images += 1

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix
        self.images += other.images

    # --- derived quantities -------------------------------------------------------------
    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.matrix).astype(np.float64)

    @property
    def fp(self) -> np.ndarray:
        return self.matrix.sum(axis=0) - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.matrix.sum(axis=1) - self.tp

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN where the class is in neither prediction nor ground truth."""
        union = self.tp + self.fp + self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, self.tp / union, np.nan)

    @property
    def scorable(self) -> bool:
        """Whether any ground-truth pixel (not 255) was counted."""
        return bool(self.matrix.sum() > 0)

    def absent(self) -> np.ndarray:
        """bool [C]: classes without a single ground-truth pixel in what was scored."""
        return self.matrix.sum(axis=1) == 0

    def miou(self) -> float:
        """Mean IoU (0..1) over classes with a non-empty union; NaN only when nothing is
        scorable (`scorable` False): check that before writing it."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def precision(self) -> np.ndarray:
        denom = self.tp + self.fp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, self.tp / denom, np.nan)

    def recall(self) -> np.ndarray:
        denom = self.tp + self.fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, self.tp / denom, np.nan)

    def fp_tp_ratio(self) -> np.ndarray:
        """False positives over true positives per class (the confusion ratio, docs/algorithms.md §audit)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tp > 0, self.fp / np.where(self.tp > 0, self.tp, 1), np.nan)

    def pair_confusion(self, cls: int, other: int) -> float:
        """Pixels of ground-truth `other` predicted as `cls`, over `cls`'s true positives."""
        tp = self.matrix[cls, cls]
        return float(self.matrix[other, cls] / tp) if tp > 0 else float("nan")

    def overall_fp_tp(self) -> float:
        """Dataset-level FP/TP over foreground classes (background excluded)."""
        tp, fp = self.tp[1:].sum(), self.fp[1:].sum()
        return float(fp / tp) if tp > 0 else float("nan")

    def report(self, class_names: Sequence[str], **extra) -> dict:
        """A JSON-ready dict: mIoU, per-class IoU / precision / recall / FP-TP, counts."""

        def clean(values: Iterable[float]) -> dict:
            return {name: (None if not math.isfinite(v) else round(float(v), 6))
                    for name, v in zip(class_names, values)}

        if not self.scorable:
            raise ValueError("report of a confusion matrix without a scorable pixel "
                             "(call check_scorable first; a bug)")
        out = {
            "miou": self.miou() * 100,
            "images": self.images,
            "absent_classes": [n for n, a in zip(class_names, self.absent()) if a],
            "iou": clean(self.iou()),
            "precision": clean(self.precision()),
            "recall": clean(self.recall()),
            "fp_tp": clean(self.fp_tp_ratio()),
            "fp_tp_overall": round(self.overall_fp_tp(), 6) if self.tp[1:].sum() > 0 else None,
        }
        out.update(extra)
        out["confusion"] = self.matrix.tolist()
        return out


def check_scorable(cm: ConfusionMatrix, split: str, mask_dir: str | Path, what: str) -> None:
    """Raise DataError when `cm` (the scores of `what` on `split`, whose images have masks)
    counted no ground-truth pixel: every mask of the split is 255 (ignore) everywhere."""
    if not cm.scorable:
        raise DataError(f"{mask_dir}: the ground-truth masks of the {cm.images} image(s) of split "
                        f"{split} are 255 (ignore) everywhere, so {what} cannot be scored; fix those "
                        f"masks or give the images no mask (has_mask: false)")


def check_ground_truth(idx, split: str, what: str) -> list[str]:
    """The ids of `split` with a ground-truth mask (`idx.mask_ids`), after checking, before any
    work, that at least one of their pixels is scorable (reads masks until one is).

    Raises DataError naming the split and the mask folder when every pixel is 255."""
    ids = idx.mask_ids(split)
    total = len(idx.ids(split))
    if 0 < len(ids) < total:
        logging.getLogger("wsss").info("%d of the %d images of %s have a ground-truth mask: %s is "
                                       "scored on those only", len(ids), total, split, what)
    if ids and not any((idx.mask(i) != IGNORE).any() for i in ids):
        cm = ConfusionMatrix(idx.num_classes)
        cm.images = len(ids)
        check_scorable(cm, split, mask_dir_of(idx), what)
    return ids


def mask_dir_of(idx) -> Path:
    """The ground-truth mask folder of a DatasetIndex (named in error messages)."""
    return Path(idx.root) / str(idx.data.get("mask_dir", ""))


def no_ground_truth_report(split: str, split_images: int, **extra) -> dict:
    """The JSON report of a split without any ground-truth mask: `miou` null, counts, no score."""
    out = {"miou": None, "no_ground_truth": True, "split": split, "images": 0,
           "split_images": int(split_images)}
    out.update(extra)
    return out


def finite_or_none(obj):
    """`obj` (JSON-ready nesting of dicts, lists, numbers) with every NaN / inf replaced by None."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_metric_json(path: str | Path, report: dict) -> None:
    """Write a metric JSON (atomically) with any non-finite number as null."""
    write_json(path, finite_or_none(report))


def write_metrics(miou_path: str | Path, report: dict) -> None:
    """Write `*_miou.txt` and the JSON report beside it (`*_metrics.json`). The text file holds
    the mIoU with two decimals, or `NO_GROUND_TRUTH` when `report["miou"]` is None (a split
    without masks). Raises ValueError (a bug) for a NaN mIoU."""
    miou_path = Path(miou_path)
    json_path = miou_path.with_name(miou_path.name.replace("_miou.txt", "_metrics.json"))
    miou = report["miou"]
    if miou is not None and not math.isfinite(miou):
        raise ValueError(f"{miou_path}: mIoU is {miou} (a bug: check_scorable was not called)")
    write_metric_json(json_path, report)
    write_text(miou_path, f"{NO_GROUND_TRUTH}\n" if miou is None else f"{miou:.2f}\n")


def parse_miou(text: str, source: str | Path = "mIoU file") -> float | None:
    """The number of a `*_miou.txt` text, or None for `NO_GROUND_TRUTH`; DataError otherwise."""
    text = text.strip()
    if text == NO_GROUND_TRUTH:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise DataError(f"{source}: not an mIoU ({text[:40]!r}); delete it and re-run the "
                        f"stage that writes it")
    return value


def read_miou(path: str | Path) -> float | None:
    """The mIoU (percent) of a `*_miou.txt`, None when it says `no ground truth`.

    Raises DataError when the file holds anything else (NaN included)."""
    return parse_miou(Path(path).read_text(), path)


def threshold_grid(spec: dict) -> list[float]:
    """The thresholds start, start + step, … ≤ stop of a `{start, stop, step}` block, rounded
    to 6 decimals (swept by eval_seeds and sweep_masks)."""
    n = int(np.floor((spec["stop"] - spec["start"]) / spec["step"] + 1e-9)) + 1
    return [round(spec["start"] + i * spec["step"], 6) for i in range(max(n, 1))]
