"""Stage `make_masks`: pseudo masks (palette PNG) for every train_aug image from rw.h5,
with the `global_max` rule (IRN: constant background) or `per_class_alpha` (alpha·max + min),
optionally refined by a dense CRF. CPU work runs in a process pool sized from threads."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..data.index import DatasetIndex
from ..io import atomic_dir, save_label_png
from ..map_store import MapReader
from ..ops.pool import map_pool, pool_chunks
from ..pseudo.masks import pseudo_mask, rule_threshold
from . import common

log = logging.getLogger("wsss")


@dataclass(frozen=True)
class _Job:
    index: str
    rw: str
    params: dict
    ids: tuple[str, ...]
    out_dir: str
    #: the map of `rw` the rule reads: the walk's output, or (scripts/mask_alpha_grid.py
    #: --maps cam) the map a cams.h5 walks
    map_name: str = "rw"


def _chunk(job: _Job) -> int:
    idx = DatasetIndex.load(job.index)
    with MapReader(job.rw) as reader:
        for image_id in job.ids:
            image = idx.image(image_id) if job.params["crf"] else None
            mask = pseudo_mask(image, reader.get(image_id, job.map_name), reader.keys(image_id), job.params)
            save_label_png(Path(job.out_dir) / f"{image_id}.png", mask)
    return len(job.ids)


def make_masks(index: str | Path, rw: str | Path, params: dict, out: str | Path, threads: int = 1) -> None:
    with MapReader(rw) as reader:
        ids = reader.ids()
    with atomic_dir(out) as tmp:
        jobs = [_Job(str(index), str(rw), params, c, str(tmp)) for c in pool_chunks(ids, threads)]
        done = sum(map_pool(_chunk, jobs, threads))
    log.info("%d masks, rule %s, threshold %g, crf %s", done, params["rule"], rule_threshold(params),
             params["crf"])


def main(argv: list[str] | None = None) -> int:
    p = common.parser("make-masks", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--rw", required=True, help="rw.h5 from the propagate stage")
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="masks/ folder")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    return common.run_stage(a, make_masks, stage="make_masks",
                            index=a.index, rw=a.rw, params=a.params, out=a.out,
                            threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
