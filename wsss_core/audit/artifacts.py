"""The artifacts of one results folder (results/{dataset}/{method}), read for auditing.

Every artifact is optional here: a panel or a table shows what a (possibly partial) run has
and marks the rest as missing, so the audit also works on a run stopped half-way.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.index import DatasetIndex
from ..errors import DataError
from ..io import read_json, read_label_png
from ..metrics import ConfusionMatrix

#: metric reports of a run: key → (file under the run folder, label in tables)
METRIC_FILES: dict[str, tuple[str, str]] = {
    "seed": ("seed_metrics.json", "seeds"),
    "ir_label": ("ir_label_metrics.json", "IR labels"),
    "mask": ("mask_metrics.json", "masks"),
    "seg": ("seg_metrics.json", "segmentation"),
}

#: per-run rules with a Snakemake benchmark file, in DAG order
BENCHMARK_RULES = ("train_classifier", "export_cams", "fuse_seeds", "eval_seeds", "ir_labels",
                   "train_irn", "propagate", "make_masks", "sweep_masks", "eval_masks", "train_seg",
                   "eval_seg")


@dataclass(frozen=True)
class Benchmark:
    """Last row of a Snakemake benchmark TSV: wall time (s) and peak resident memory (MB)."""
    seconds: float | None
    max_rss_mb: float | None


def _number(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # Snakemake writes "NA" when a job ended before the first memory sample
    return value if math.isfinite(value) else None


def read_benchmark(path: str | Path) -> Benchmark | None:
    path = Path(path)
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))
    if not rows:
        return None
    return Benchmark(_number(rows[-1].get("s")), _number(rows[-1].get("max_rss")))


class RunArtifacts:
    """Paths and lazy readers of results/{dataset}/{method}; the index is ../index.json."""

    def __init__(self, run_dir: str | Path, index: str | Path | None = None) -> None:
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: no such results folder; give results/<dataset>/<method>")
        index_path = Path(index) if index else self.dir.parent / "index.json"
        self.index = DatasetIndex.load(index_path)
        self.method = self.dir.name
        self.dataset = self.dir.parent.name

    # --- files ------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return self.path(name).exists()

    def metrics(self, key: str) -> dict | None:
        """A metric report (seed / ir_label / mask / seg) or None when the stage has not run."""
        path = self.path(METRIC_FILES[key][0])
        return read_json(path) if path.is_file() else None

    def mask_sweep(self) -> dict | None:
        path = self.path("mask_sweep.json")
        return read_json(path) if path.is_file() else None

    def benchmark(self, rule: str) -> Benchmark | None:
        return read_benchmark(self.path(f"benchmarks/{rule}.tsv"))

    def label_png(self, folder: str, image_id: str) -> np.ndarray | None:
        """ir_labels / masks / seg/pred PNG of one image, or None where the run has none."""
        path = self.path(f"{folder}/{image_id}.png")
        return read_label_png(path) if path.is_file() else None

    def seed_threshold(self) -> float | None:
        report = self.metrics("seed")
        return None if report is None or report.get("threshold") is None else float(report["threshold"])

    # --- per-image scores --------------------------------------------------------------------
    def image_miou(self, pred: np.ndarray, gt: np.ndarray | None) -> float | None:
        """mIoU of one image over the classes in its prediction or ground truth (percent); None
        without a ground truth or without a scorable pixel (255 everywhere)."""
        if gt is None:
            return None
        cm = ConfusionMatrix(self.index.num_classes)
        cm.update(pred, gt)
        return cm.miou() * 100 if cm.scorable else None

    def mask_ious(self, split: str = "train") -> dict[str, float]:
        """Per-image pseudo-mask mIoU over `split` (images without a pseudo mask, without a
        ground-truth mask or without a scorable pixel are left out)."""
        out: dict[str, float] = {}
        for image_id in self.index.mask_ids(split):
            mask = self.label_png("masks", image_id)
            if mask is not None and (score := self.image_miou(mask, self.index.mask(image_id))) is not None:
                out[image_id] = score
        return out
