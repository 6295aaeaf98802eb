"""Mask mIoU on `train` of the configured mask rule over a grid of its threshold, with the
rule's CRF setting as configured (`sweep_masks` scores the rule without CRF): the check behind
the tiny preset's `make_masks.alpha`, run on several toy generator seeds.

    python scripts/mask_alpha_grid.py --config config.yaml [--config more.yaml] \
        --runs toy/cam toy_s1/cam toy_s2/cam --grid 0.31 0.4 0.45 0.5 0.55 [--results results] \
        [--maps cam]

Reads each run's rw.h5 (the walk's output) and index/train.json, writes nothing under results/
(masks go to a temporary folder), prints one row per run and the mean over runs per grid value.
`--maps cam` applies the same rule and CRF to the map the method walks (cams.h5, its `walk`
role, at the image size) instead: the difference between the two rows is what the random walk
adds (docs/results.md, real photos).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from wsss_core.config import load_config, stage_params
from wsss_core.data.index import DatasetIndex
from wsss_core.map_store import MapReader
from wsss_core.ops.pool import map_pool, pool_chunks
from wsss_core.pseudo.masks import rule_threshold
from wsss_core.stages.eval_masks import score_label_dir
from wsss_core.stages.make_masks import _chunk, _Job

#: the threshold key of each mask rule
THRESHOLD_KEY = {"per_class_alpha": "alpha", "global_max": "bg"}


def grid_row(results: Path, dataset: str, method: str, params: dict, grid: list[float],
             threads: int, maps: str = "rw") -> list[float]:
    part = results / dataset / "index" / "train.json"  # the index part with `train` (data.index.PARTS)
    index = part if part.is_file() else results / dataset / "index.json"
    rw = results / dataset / method / ("rw.h5" if maps == "rw" else "cams.h5")
    if maps == "rw":
        name = "rw"
    else:
        with MapReader(rw) as reader:
            name = reader.attrs["roles"]["walk"]
    idx = DatasetIndex.load(index)
    ids = idx.ids("train")
    key = THRESHOLD_KEY[params["rule"]]
    row = []
    for value in grid:
        p = dict(params, **{key: value})
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [_Job(str(index), str(rw), p, c, tmp, name) for c in pool_chunks(ids, threads)]
            map_pool(_chunk, jobs, threads)
            row.append(score_label_dir(idx, tmp, "train").miou() * 100)
        assert rule_threshold(p) == value
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="DATASET/METHOD under --results")
    ap.add_argument("--grid", nargs="+", type=float, required=True)
    ap.add_argument("--results", default="results")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--maps", choices=("rw", "cam"), default="rw",
                    help="rw: the walk's output (rw.h5); cam: the map the method walks, not walked")
    a = ap.parse_args()
    cfg = load_config(*a.config)
    rows = []
    print("run".ljust(22) + "".join(f"{v:>8.2f}" for v in a.grid))
    for run in a.runs:
        dataset, method = run.split("/")
        params = stage_params(cfg, dataset, method, "make_masks")
        row = grid_row(Path(a.results), dataset, method, params, a.grid, a.threads, a.maps)
        rows.append(row)
        print(f"{run} (crf {params['crf']})".ljust(22) + "".join(f"{v:>8.2f}" for v in row), flush=True)
    print("mean".ljust(22) + "".join(f"{sum(c) / len(c):>8.2f}" for c in zip(*rows)))


if __name__ == "__main__":
    main()
