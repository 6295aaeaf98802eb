"""Stage `propagate`: boundary maps from the trained IRN and the random walk of the stride-4
CAM (docs/algorithms.md §walk), upsampled to image size and stored in rw.h5.

This is the expensive half of mask making; it is its own artifact so that changing the mask
rule's threshold (alpha / bg) re-runs only mask writing and evaluation.

`source: method` walks the stride-4 map the method declares to walk (its `walk` role in
cams.h5); `source: fused` walks the fused seed at stride 4 from seeds.h5, so the walk sees what
the IR labels were made from (docs/algorithms.md §walk).

On CPU a job's threads become worker processes of one thread each (`common.image_workers`):
the walk of one image leaves a second thread of its process mostly idle.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
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
    with MapReader(cams) as reader:
        name = reader.attrs.get("propagate_map", "")
        if name not in reader.map_names:
            raise DataError(f"{cams}: no stride-4 map {name!r} to propagate; re-run export_cams")
    return Path(cams), name


@dataclass(frozen=True)
class _Part:
    """One worker's share of a CPU walk: its images, walked into the store `path`."""
    index: str
    irn: str
    store: str
    source: str
    params: dict
    attrs: dict
    ids: tuple[str, ...]
    path: str


def _walk_images(model, crop: int, idx: DatasetIndex, reader: MapReader, source: str,
                 image_ids: list[str], params: dict, out: str | Path, attrs: dict,
                 device: torch.device) -> None:
    """Random walk of `image_ids` into the map store `out` (written whole or not at all)."""
    with MapWriter(out, attrs, dtype="float16") as writer:
        for image_id in tqdm(image_ids, desc="random walk", unit="img", mininterval=2.0):
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


def _walk_part(part: _Part) -> int:
    """Worker process: one thread, the IRN loaded once, `part.ids` into `part.path`."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model, irn_params = load_irn(part.irn, cpu)
    with MapReader(part.store) as reader:
        _walk_images(model, int(irn_params["crop"]), DatasetIndex.load(part.index), reader,
                     part.source, list(part.ids), part.params, part.path, part.attrs, cpu)
    return len(part.ids)


def propagate(index: str | Path, cams: str | Path, irn: str | Path, params: dict, out: str | Path,
              seeds: str | Path | None = None, threads: int | None = None) -> None:
    """Random walk of every image's stride-4 map (the `source` of `params`) into rw.h5.

    On CPU every image is walked with one thread, in `common.image_workers` processes that
    each walk a contiguous block into a part store; the parts are copied into `out` as stored,
    so the file is the same for any number of threads."""
    common.set_threads(threads)
    idx = DatasetIndex.load(index)
    device = common.get_device()
    store, source = _walk_source(params, cams, seeds)
    attrs = {"source": source, "params": json.dumps(params, sort_keys=True), "maps": str(store)}
    if device.type == "cpu":
        torch.set_num_threads(1)
    with MapReader(store) as reader:
        image_ids = reader.ids()
        workers = common.image_workers(threads, len(image_ids), device)
        if workers == 1:
            # the workers load the IRN themselves: loaded here only when this process walks
            model, irn_params = load_irn(irn, device)
            _walk_images(model, int(irn_params["crop"]), idx, reader, source, image_ids, params,
                         out, attrs, device)
            return
    common.write_in_parts(out, attrs, image_ids, workers, functools.partial(
        _Part, str(index), str(irn), str(store), source, params, attrs), _walk_part)


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
    return common.run_stage(a, propagate, stage="propagate",
                            index=a.index, cams=a.cams, irn=a.irn, params=a.params,
                            out=a.out, seeds=a.seeds, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
