"""Stage `sweep_masks`: the mask rule's threshold (per_class_alpha's alpha, global_max's bg)
swept over a full grid without CRF on the evaluation split, arg-max reported (the [FIX] of
docs/algorithms.md §irn: no stop-at-first-decrease). Reads only rw.h5, so it never re-runs the walk."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.index import DatasetIndex
from ..map_store import MapReader
from ..pseudo.masks import RULE_PARAMETER, pseudo_mask, rule_threshold
from ..metrics import (ConfusionMatrix, check_ground_truth, check_scorable, mask_dir_of,
                       no_ground_truth_report,
                       threshold_grid, write_metric_json)
from . import common

log = logging.getLogger("wsss")


def sweep_masks(index: str | Path, rw: str | Path, params: dict, out: str | Path,
                split: str = "train") -> dict:
    """Sweep the mask rule's threshold over `params["sweep"]` on the images of `split` with a
    ground-truth mask and write `out` (mask_sweep.json: curve, arg-max, configured value).
    Without any mask in the split the report says `no_ground_truth` (best and best_miou null).
    Raises DataError when the split's ground truth is 255 everywhere."""
    idx = DatasetIndex.load(index)
    grid = threshold_grid(params["sweep"])
    ids = check_ground_truth(idx, split, f"the masks of {rw}")
    if not ids:
        report = no_ground_truth_report(split, len(idx.ids(split)), rule=params["rule"],
                                        parameter=RULE_PARAMETER[params["rule"]], best=None,
                                        best_miou=None, configured=rule_threshold(params), crf=False,
                                        curve={})
        write_metric_json(out, report)
        log.warning("no ground truth: none of the %d images of %s has a mask; sweep not scored",
                    report["split_images"], split)
        return report
    cms = [ConfusionMatrix(idx.num_classes) for _ in grid]
    with MapReader(rw) as reader:
        for image_id in tqdm(ids, desc="mask sweep", unit="img", mininterval=2.0):
            rw_up, keys, gt = reader.get(image_id, "rw"), reader.keys(image_id), idx.mask(image_id)
            for t, cm in zip(grid, cms):
                cm.update(pseudo_mask(None, rw_up, keys, params, threshold=t, crf=False), gt)
    check_scorable(cms[0], split, mask_dir_of(idx), f"the masks of {rw}")
    curve = {f"{t:g}": cm.miou() * 100 for t, cm in zip(grid, cms)}
    best = int(np.nanargmax([cm.miou() for cm in cms]))
    report = {"rule": params["rule"], "parameter": RULE_PARAMETER[params["rule"]],
              "best": grid[best], "best_miou": cms[best].miou() * 100,
              "configured": rule_threshold(params), "crf": False, "split": split, "images": cms[best].images,
              "split_images": len(idx.ids(split)), "curve": curve}
    write_metric_json(out, report)
    log.info("best %s %g: mIoU %.2f without CRF (configured %g)", report["parameter"], grid[best],
             report["best_miou"], report["configured"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser("sweep-masks", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--rw", required=True)
    p.add_argument("--params", required=True, type=common.json_arg, help="make_masks parameters")
    p.add_argument("--out", required=True, help="mask_sweep.json")
    p.add_argument("--split", default="train")
    a = p.parse_args(argv)
    return common.run_stage(a, sweep_masks, stage="make_masks",
                            index=a.index, rw=a.rw, params=a.params, out=a.out,
                            split=a.split)


if __name__ == "__main__":
    raise SystemExit(main())
