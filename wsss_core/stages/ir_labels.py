"""Stage `ir_labels`: IRN training labels from the fused seeds (docs/algorithms.md §ir-labels).

Per image a strict and a lenient pass (constant background score, argmax, dense CRF) are
combined: class where the strict pass says so, background where both agree, 255 (ignore)
where only the lenient pass sees foreground. The two background scores are either fixed (IRN:
0.30 / 0.05) or read per image (`percentile`) from the class-agnostic map the method declares
(its `agnostic` role in cams.h5: 93rd percentile on a 0.05 grid, fg = bg + 0.5).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.index import DatasetIndex
from ..errors import ConfigError
from ..io import atomic_dir, save_label_png
from ..map_store import MapReader, map_roles
from ..metrics import write_metric_json
from ..ops.crf import CRFParams
from ..ops.pool import map_pool, pool_chunks
from ..ops.refine import attention_thresholds, ir_label
from . import common

log = logging.getLogger("wsss")


@dataclass(frozen=True)
class _Job:
    index: str
    seeds: str
    cams: str
    params: dict
    ids: tuple[str, ...]
    out_dir: str


def thresholds_for(params: dict, cams: MapReader | None, image_id: str) -> tuple[float, float]:
    """(fg, bg) background scores of the strict and lenient passes for one image."""
    if params["thresholds"] == "fixed":
        return params["fg"], params["bg"]
    att = cams.get(image_id, map_roles(cams.attrs).agnostic)
    bg, fg = attention_thresholds(att, params["percentile"], params["grid"], params["gap"])
    return fg, bg


def _chunk(job: _Job) -> list[tuple[str, float, float]]:
    idx = DatasetIndex.load(job.index)
    crf = CRFParams(**job.params["crf"])
    per_image = job.params["thresholds"] == "percentile"
    done = []
    with MapReader(job.seeds) as seeds, (MapReader(job.cams) if per_image else nullcontext()) as cams:
        for image_id in job.ids:
            fg, bg = thresholds_for(job.params, cams, image_id)
            label = ir_label(idx.image(image_id), seeds.get(image_id, "seed"), seeds.keys(image_id),
                             fg, bg, crf)
            save_label_png(Path(job.out_dir) / f"{image_id}.png", label)
            done.append((image_id, float(fg), float(bg)))
    return done


def ir_labels(index: str | Path, seeds: str | Path, cams: str | Path, params: dict,
              out: str | Path, threads: int = 1) -> None:
    with MapReader(seeds) as reader:
        ids = reader.ids()
    if params["thresholds"] == "percentile":
        with MapReader(cams) as reader:
            agnostic = map_roles(reader.attrs).agnostic
            if not agnostic or agnostic not in reader.map_names:
                raise ConfigError(f"config key ir_labels.thresholds: 'percentile' needs a class-agnostic "
                                  f"map, but the method of {cams} declares none; use thresholds: fixed")
    with atomic_dir(out) as tmp:
        jobs = [_Job(str(index), str(seeds), str(cams), params, c, str(tmp))
                for c in pool_chunks(ids, threads)]
        scores = {i: (fg, bg) for chunk in map_pool(_chunk, jobs, threads) for i, fg, bg in chunk}
        done = [(i, *scores[i]) for i in ids]
        # the per-image background scores, for auditing the per-image thresholds (null, never
        # NaN, for a score an attention map without finite values gives)
        write_metric_json(Path(tmp) / "thresholds.json", {i: {"fg": fg, "bg": bg} for i, fg, bg in done})
    fgs = np.array([fg for _, fg, _ in done])
    log.info("%d IR labels (%s thresholds; mean fg %.3f)", len(done), params["thresholds"],
             fgs.mean() if len(fgs) else 0)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("ir-labels", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--seeds", required=True)
    p.add_argument("--cams", required=True)
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="ir_labels/ folder of PNGs")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    return common.run_stage(a, ir_labels, stage="ir_labels",
                            index=a.index, seeds=a.seeds, cams=a.cams, params=a.params,
                            out=a.out, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
