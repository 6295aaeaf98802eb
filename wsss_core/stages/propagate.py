"""Stage `propagate`: boundary maps from the trained IRN and the random walk of the stride-4
CAM (docs/algorithms.md §walk), upsampled to image size and stored in rw.h5.

This is the expensive half of mask making; it is its own artifact so that changing the mask
rule's threshold (alpha / bg) re-runs only mask writing and evaluation.

`source: method` walks the stride-4 map the method declares to walk (its `walk` role in
cams.h5); `source: fused` walks the fused seed at stride 4 from seeds.h5, so the walk sees what
the IR labels were made from (docs/algorithms.md §walk).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import transforms as T
from ..data.index import DatasetIndex
from ..errors import ConfigError, DataError
from ..map_store import MapReader, MapWriter
from ..models.irn import load_irn
from ..ops.random_walk import random_walk, upsample_rw
from . import common

log = logging.getLogger("wsss")


def _walk_source(params: dict, cams: str | Path, seeds: str | Path | None) -> tuple[Path, str]:
    """(map store, map name) of the stride-4 maps to propagate."""
    if params["source"] == "fused":
        if seeds is None:
            raise ConfigError("config key propagate.source: 'fused' needs the seeds (--seeds seeds.h5)")
        with MapReader(seeds) as reader:
            if "seed_s4" not in reader.map_names:
                raise ConfigError(f"config key propagate.source: 'fused', but {seeds} has no stride-4 "
                                  f"seed (its recipe {reader.attrs.get('recipe')!r} uses a map the "
                                  f"method does not export at stride 4); use source: method")
        return Path(seeds), "seed_s4"
    if params["source"] != "method":
        raise ConfigError(f"config key propagate.source: {params['source']!r} is not method or fused")
    with MapReader(cams) as reader:
        name = reader.attrs.get("propagate_map", "")
        if name not in reader.map_names:
            raise DataError(f"{cams}: no stride-4 map {name!r} to propagate; re-run export_cams")
    return Path(cams), name


def propagate(index: str | Path, cams: str | Path, irn: str | Path, params: dict, out: str | Path,
              seeds: str | Path | None = None, threads: int | None = None) -> None:
    common.set_threads(threads)
    idx = DatasetIndex.load(index)
    device = common.get_device()
    model, irn_params = load_irn(irn, device)
    crop = int(irn_params["crop"])
    store, source = _walk_source(params, cams, seeds)
    with MapReader(store) as reader:
        attrs = {"source": source, "params": json.dumps(params, sort_keys=True), "maps": str(store)}
        with MapWriter(out, attrs, dtype="float16") as writer:
            for image_id in tqdm(reader.ids(), desc="random walk", unit="img", mininterval=2.0):
                keys, size = reader.keys(image_id), reader.size(image_id)
                cam = torch.from_numpy(reader.get(image_id, source)).to(device)
                if cam.shape[0]:
                    img = torch.from_numpy(T.to_chw(T.normalize(idx.image(image_id)))).to(device)
                    boundary = model.boundary_map(torch.stack([img, img.flip(-1)]), crop=crop)
                    rw = random_walk(cam, boundary, radius=params["radius"], beta=params["beta"],
                                     exp_times=params["exp_times"])
                    rw_up = upsample_rw(rw, size, mode=params["upsample"]).float().cpu().numpy()
                    maps = {"rw": rw_up, "boundary": boundary[0].float().cpu().numpy()}
                else:
                    maps = {"rw": torch.zeros((0,) + size).numpy()}
                writer.add(image_id, keys, size, maps)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("propagate", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--cams", required=True)
    p.add_argument("--irn", required=True, help="IRN model.pt")
    p.add_argument("--seeds", help="seeds.h5 (for source: fused)")
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="rw.h5")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return common.run_stage(a, propagate, index=a.index, cams=a.cams, irn=a.irn, params=a.params,
                            out=a.out, seeds=a.seeds, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
