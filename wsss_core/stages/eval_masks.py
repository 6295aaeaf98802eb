"""Stage `eval_masks`: mIoU of the pseudo masks and of the IR labels on the evaluation split.

IR labels are scored with their ignore pixels counted as background, as the literature does.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from ..data.index import DatasetIndex
from ..errors import DataError
from ..io import read_label_png, write_json
from ..metrics import ConfusionMatrix, write_metrics
from . import common

log = logging.getLogger("wsss")


def score_label_dir(idx: DatasetIndex, folder: str | Path, split: str) -> ConfusionMatrix:
    """Confusion matrix of `folder/<id>.png` against the ground truth of `split`."""
    folder = Path(folder)
    cm = ConfusionMatrix(idx.num_classes)
    for image_id in tqdm(idx.ids(split), desc=f"score {folder.name}", unit="img", mininterval=2.0):
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: missing; the {folder.name} stage must cover every {split} image")
        cm.update(read_label_png(path), idx.mask(image_id))
    return cm


def eval_masks(index: str | Path, masks: str | Path, ir_labels: str | Path, out: str | Path,
               ir_out: str | Path, split: str = "train") -> dict:
    idx = DatasetIndex.load(index)
    masks_cm = score_label_dir(idx, masks, split)
    report = masks_cm.report(idx.class_names, split=split)
    write_metrics(out, report)
    ir_cm = score_label_dir(idx, ir_labels, split)
    write_json(ir_out, ir_cm.report(idx.class_names, split=split, ignore_counted_as="background"))
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
