"""Stage `eval_seeds`: seed mIoU on the evaluation split with a swept background threshold.

Background score = a constant threshold; every threshold of the configured grid is scored in
one pass over the images (one confusion matrix per threshold) and the arg-max is reported.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.index import DatasetIndex
from ..errors import DataError
from ..map_store import MapReader
from ..metrics import ConfusionMatrix, threshold_grid, write_metrics
from ..seeds import seed_labels_sweep
from . import common

log = logging.getLogger("wsss")


def eval_seeds(index: str | Path, seeds: str | Path, params: dict, out: str | Path,
               split: str = "train") -> dict:
    idx = DatasetIndex.load(index)
    thresholds = threshold_grid(params["thresholds"])
    cms = [ConfusionMatrix(idx.num_classes) for _ in thresholds]
    background = ConfusionMatrix(idx.num_classes)
    ids = idx.ids(split)
    with MapReader(seeds) as reader:
        for image_id in tqdm(ids, desc="eval seeds", unit="img", mininterval=2.0):
            if image_id not in reader:
                raise DataError(f"{seeds}: no seed for {image_id} of split {split}; re-run "
                                f"export_cams/fuse_seeds over a train_aug that contains {split}")
            seed, keys = reader.get(image_id, "seed"), reader.keys(image_id)
            gt = idx.mask(image_id)
            for pred, cm in zip(seed_labels_sweep(seed, keys, thresholds), cms):
                cm.update(pred, gt)
            background.update(np.zeros_like(gt), gt)
    curve = {f"{t:g}": cm.miou() * 100 for t, cm in zip(thresholds, cms)}
    best_i = int(np.nanargmax([cm.miou() for cm in cms]))
    report = cms[best_i].report(idx.class_names, threshold=thresholds[best_i], split=split,
                                curve=curve, all_background_miou=background.miou() * 100)
    write_metrics(out, report)
    log.info("seed mIoU %.2f at background threshold %g (all-background %.2f)",
             report["miou"], thresholds[best_i], report["all_background_miou"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser("eval-seeds", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--seeds", required=True)
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="seed_miou.txt (seed_metrics.json beside it)")
    p.add_argument("--split", default="train")
    a = p.parse_args(argv)
    return common.run_stage(a, eval_seeds, index=a.index, seeds=a.seeds, params=a.params,
                            out=a.out, split=a.split)


if __name__ == "__main__":
    raise SystemExit(main())
