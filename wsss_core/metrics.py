"""Segmentation metrics from a confusion matrix accumulated image by image.

Rows are ground truth, columns prediction (as chainercv and IRN). Ground-truth pixels equal
to 255 are ignored; a prediction of 255 (an "ignore" pixel in a label PNG) counts as
background, as the literature scores pseudo labels. mIoU is the mean over classes whose union
is non-empty (nanmean), so absent classes do not pull the mean down.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data.palette import IGNORE
from .io import write_json, write_text


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

    def miou(self) -> float:
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

        out = {
            "miou": self.miou() * 100,
            "images": self.images,
            "iou": clean(self.iou()),
            "precision": clean(self.precision()),
            "recall": clean(self.recall()),
            "fp_tp": clean(self.fp_tp_ratio()),
            "fp_tp_overall": round(self.overall_fp_tp(), 6) if self.tp[1:].sum() > 0 else None,
        }
        out.update(extra)
        out["confusion"] = self.matrix.tolist()
        return out


def write_metrics(miou_path: str | Path, report: dict) -> None:
    """Write `*_miou.txt` (one number) and the JSON report beside it (`*_metrics.json`)."""
    miou_path = Path(miou_path)
    json_path = miou_path.with_name(miou_path.name.replace("_miou.txt", "_metrics.json"))
    write_json(json_path, report)
    write_text(miou_path, f"{report['miou']:.2f}\n")


def read_miou(path: str | Path) -> float:
    return float(Path(path).read_text().strip())


def threshold_grid(spec: dict) -> list[float]:
    """The thresholds start, start + step, … ≤ stop of a `{start, stop, step}` block, rounded
    to 6 decimals (swept by eval_seeds and sweep_masks)."""
    n = int(np.floor((spec["stop"] - spec["start"]) / spec["step"] + 1e-9)) + 1
    return [round(spec["start"] + i * spec["step"], 6) for i in range(max(n, 1))]
