"""Stage `sweep_masks`: the mask rule's threshold (per_class_alpha's alpha, global_max's bg)
swept over a full grid without CRF on the evaluation split, arg-max reported (the [FIX] of
docs/algorithms.md §irn: no stop-at-first-decrease). Reads only rw.h5, so it never re-runs the walk."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data.index import DatasetIndex
from ..io import write_json
from ..map_store import MapReader
from ..masks import RULE_PARAMETER, pseudo_mask, rule_threshold
from ..metrics import ConfusionMatrix, threshold_grid
from . import common

log = logging.getLogger("wsss")


def sweep_masks(index: str | Path, rw: str | Path, params: dict, out: str | Path,
                split: str = "train") -> dict:
    idx = DatasetIndex.load(index)
    grid = threshold_grid(params["sweep"])
    cms = [ConfusionMatrix(idx.num_classes) for _ in grid]
    with MapReader(rw) as reader:
        for image_id in tqdm(idx.ids(split), desc="mask sweep", unit="img", mininterval=2.0):
            rw_up, keys, gt = reader.get(image_id, "rw"), reader.keys(image_id), idx.mask(image_id)
            for t, cm in zip(grid, cms):
                cm.update(pseudo_mask(None, rw_up, keys, params, threshold=t, crf=False), gt)
    curve = {f"{t:g}": cm.miou() * 100 for t, cm in zip(grid, cms)}
    best = int(np.nanargmax([cm.miou() for cm in cms]))
    report = {"rule": params["rule"], "parameter": RULE_PARAMETER[params["rule"]],
              "best": grid[best], "best_miou": cms[best].miou() * 100,
              "configured": rule_threshold(params), "crf": False, "split": split, "curve": curve}
    write_json(out, report)
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
    return common.run_stage(a, sweep_masks, index=a.index, rw=a.rw, params=a.params, out=a.out,
                            split=a.split)


if __name__ == "__main__":
    raise SystemExit(main())
