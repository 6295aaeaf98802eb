"""Stage `eval_masks`: mIoU of the pseudo masks and of the IR labels on the evaluation split.

IR labels are scored with their ignore pixels counted as background, as the literature does.
Only images with a ground-truth mask are scored (`DatasetIndex.mask_ids`); a split without any
writes both reports saying `no ground truth` (wsss_core/metrics.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from ..data.index import DatasetIndex
from ..errors import DataError
from ..io import read_label_png
from ..metrics import (ConfusionMatrix, check_ground_truth, check_scorable, mask_dir_of,
                       no_ground_truth_report,
                       write_metric_json, write_metrics)
from . import common

log = logging.getLogger("wsss")


def score_label_dir(idx: DatasetIndex, folder: str | Path, split: str) -> ConfusionMatrix:
    """Confusion matrix of `folder/<id>.png` against the ground truth of the images of `split`
    that have one (`mask_ids`). Raises DataError for a missing PNG, or when the split's ground
    truth has no scorable pixel (255 everywhere)."""
    folder = Path(folder)
    cm = ConfusionMatrix(idx.num_classes)
    for image_id in tqdm(idx.mask_ids(split), desc=f"score {folder.name}", unit="img", mininterval=2.0):
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: missing; the {folder.name} stage must cover every {split} image")
        cm.update(read_label_png(path), idx.mask(image_id))
    check_scorable(cm, split, mask_dir_of(idx), f"the labels in {folder}")
    return cm


def eval_masks(index: str | Path, masks: str | Path, ir_labels: str | Path, out: str | Path,
               ir_out: str | Path, split: str = "train") -> dict:
    """Score `masks` and `ir_labels` (folders of <id>.png) on `split`; write `out`
    (mask_miou.txt, mask_metrics.json beside it) and `ir_out` (ir_label_metrics.json)."""
    idx = DatasetIndex.load(index)
    if not check_ground_truth(idx, split, f"the masks {masks}"):
        report = no_ground_truth_report(split, len(idx.ids(split)))
        write_metrics(out, report)
        write_metric_json(ir_out, no_ground_truth_report(split, len(idx.ids(split)),
                                                         ignore_counted_as="background"))
        log.warning("no ground truth: none of the %d images of %s has a mask; masks not scored",
                    report["split_images"], split)
        return report
    masks_cm = score_label_dir(idx, masks, split)
    report = masks_cm.report(idx.class_names, split=split, split_images=len(idx.ids(split)))
    ir_cm = score_label_dir(idx, ir_labels, split)
    write_metrics(out, report)
    write_metric_json(ir_out, ir_cm.report(idx.class_names, split=split, ignore_counted_as="background",
                                           split_images=len(idx.ids(split))))
    log.info("mask mIoU %.2f, IR-label mIoU %.2f (%s, %d images)", report["miou"],
             ir_cm.miou() * 100, split, masks_cm.images)
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser("eval-masks", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--ir-labels", required=True)
    p.add_argument("--out", required=True, help="mask_miou.txt (mask_metrics.json beside it)")
    p.add_argument("--ir-out", required=True, help="ir_label_metrics.json")
    p.add_argument("--split", default="train")
    a = p.parse_args(argv)
    return common.run_stage(a, eval_masks, index=a.index, masks=a.masks, ir_labels=a.ir_labels,
                            out=a.out, ir_out=a.ir_out, split=a.split)


if __name__ == "__main__":
    raise SystemExit(main())
