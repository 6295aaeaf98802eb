"""Stage `export_cams`: multi-scale + flip CAMs of every train_aug image into cams.h5.

Per image and map: for each scale, one forward of (image, mirrored image) per branch; each
per-scale map is resized bilinearly straight to the image size (and to stride 4 for maps the
random walk propagates), summed over scales, restricted to the image's classes and divided by
its spatial maximum (+1e-5), or min-max normalised per class where the map's spec asks for it
(`normalize="minmax"`). Class-agnostic maps (e.g. a ViT's attention) are summed, not
normalised (their thresholds are read from the raw values). The file records which map plays
which role downstream (`roles`: the map to walk, the maps to fuse, the class-agnostic map).

Sharding (`--shard i/n`): shard i exports the i-th of n contiguous blocks of the split's ids
and records `shard = "i/n"`; `merge_cams` joins the n files into one cams.h5. Each image is
computed alone (one image and its mirror per forward, whatever the shard), and on CPU with one
thread, so the maps are byte-identical to an unsharded export's. On CPU a job's threads become
worker processes of one thread each (`common.image_workers`), each exporting a contiguous block
into a part store that is then copied into cams.h5 as stored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..methods import load_method
from ..data.datasets import MultiScaleDataset, collate_single
from ..data.index import DatasetIndex
from ..errors import ConfigError
from ..map_store import MapWriter
from ..methods.base import Method
from . import common

log = logging.getLogger("wsss")


def strided_size(size: tuple[int, int], stride: int = 4) -> tuple[int, int]:
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


@torch.no_grad()
def image_maps(method: Method, scaled: list[torch.Tensor], size: tuple[int, int], keys: list[int],
               device: torch.device) -> dict[str, np.ndarray]:
    """All maps of one image: `<name>` at (H, W) and `<name>_s4` at stride 4 where declared."""
    h_s4 = strided_size(size)
    sums: dict[str, torch.Tensor] = {}
    for img in scaled:
        img = img.to(device)
        maps = method.infer(torch.stack([img, img.flip(-1)]))
        for spec in method.maps:
            m = maps[spec.name].float()[None]
            targets = [(spec.name, size)] + ([(spec.name + "_s4", h_s4)] if spec.strided else [])
            for key, target in targets:
                r = F.interpolate(m, size=target, mode="bilinear", align_corners=False)[0]
                sums[key] = sums[key] + r if key in sums else r
    idx = torch.as_tensor([k - 1 for k in keys], dtype=torch.long, device=device)
    out: dict[str, np.ndarray] = {}
    for spec in method.maps:
        for key in (spec.name, spec.name + "_s4") if spec.strided else (spec.name,):
            m = sums[key]
            if spec.kind == "class":
                m = m.index_select(0, idx)
                if spec.normalize == "minmax" and m.shape[0]:
                    m = min_max_normalize(F.relu(m))
                elif spec.normalize and m.shape[0]:
                    m = F.relu(m)
                    m = m / (m.flatten(1).max(dim=1).values[:, None, None] + 1e-5)
            else:
                m = m[0]
            out[key] = m.cpu().numpy()
    return out


def min_max_normalize(cams: torch.Tensor) -> torch.Tensor:
    """Per-class min-max normalisation of clamped maps [K, H, W] (float), for `MapSpec`s with
    `normalize="minmax"`; n and m are a class's minimum and maximum:
    max(0, (cam - n - 1e-5) / (m - n + 1e-5)), shape and dtype kept.

    Entries at or below n + 1e-5 become 0 rather than the negative values the plain formula
    gives, so no map handed to the random walk is negative; every entry above keeps the
    formula's value (the declaring method's page in docs/methods/ gives its source)."""
    flat = cams.flatten(1)
    n = flat.min(dim=1).values[:, None, None]
    m = flat.max(dim=1).values[:, None, None]
    return ((cams - n - 1e-5) / (m - n + 1e-5)).clamp_min(0)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' (1 <= i <= n) → (i, n)."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text!r}: expected i/n with 1 <= i <= n, e.g. 2/3")
    return i, n


def shard_ids(ids: list[str], shard: tuple[int, int]) -> list[str]:
    """The i-th of n contiguous blocks of `ids` (sizes differ by at most one)."""
    i, n = shard
    return ids[(i - 1) * len(ids) // n:i * len(ids) // n]


@dataclasses.dataclass(frozen=True)
class _Part:
    """One worker's share of a CPU export: its images, exported into the store `path`."""
    index: str
    model: str
    scales: tuple[float, ...]
    ids: tuple[str, ...]
    path: str
    attrs: dict


def _write_maps(method: Method, idx: DatasetIndex, image_ids: list[str], scales: list[float],
                out: str | Path, attrs: dict, device: torch.device) -> None:
    """Export `image_ids` into the map store `out` (written whole or not at all)."""
    dataset = MultiScaleDataset(idx, image_ids, scales)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_single, num_workers=0)
    dtypes = {s.name: "float32" for s in method.maps if s.kind == "agnostic"}
    with MapWriter(out, attrs) as writer:
        for item in tqdm(loader, desc="export cams", unit="img", mininterval=2.0):
            maps = image_maps(method, item["scaled"], tuple(item["size"]), item["keys"], device)
            writer.add(item["id"], item["keys"], tuple(item["size"]), maps, dtypes=dtypes)


def _export_part(part: _Part) -> int:
    """Worker process: one thread, the classifier loaded once, `part.ids` into `part.path`."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    _write_maps(load_method(part.model, cpu), DatasetIndex.load(part.index), list(part.ids),
                list(part.scales), part.path, part.attrs, cpu)
    return len(part.ids)


def export_cams(index: str | Path, model: str | Path, params: dict, out: str | Path,
                split: str = "train_aug", threads: int | None = None,
                ids: list[str] | None = None, shard: tuple[int, int] | None = None) -> dict:
    """Export the maps of the split's images (or `ids`; or shard i/n of them) into `out`.

    On CPU every image is computed with one thread, in `common.image_workers` processes that
    each export a contiguous block into a part store; the parts are copied into `out` as
    stored. The file is therefore the same for any number of threads, workers or shards."""
    common.set_threads(threads)
    idx = DatasetIndex.load(index)
    device = common.get_device()
    method = load_method(model, device)
    roles = method.map_roles()
    scales = list(params["scales"])
    image_ids = list(ids if ids is not None else idx.ids(split))
    if shard is not None:
        image_ids = shard_ids(image_ids, shard)
    attrs = {"method": method.name, "scales": json.dumps(scales), "flip": 1,
             "params": json.dumps(method.params, sort_keys=True), "split": split,
             "propagate_map": roles.walk + "_s4", "roles": dataclasses.asdict(roles),
             "dataset": idx.name, "num_classes": idx.num_classes}
    if shard is not None:
        attrs["shard"] = "{}/{}".format(*shard)  # merge_cams checks and drops it
    t0 = time.perf_counter()
    workers = common.image_workers(threads, len(image_ids), device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if workers == 1:
        _write_maps(method, idx, image_ids, scales, out, attrs, device)
    else:
        common.write_in_parts(out, attrs, image_ids, workers, functools.partial(
            _Part, str(index), str(model), tuple(scales), attrs=attrs), _export_part)
    seconds = time.perf_counter() - t0
    log.info("exported %d images in %.1f s (%.2f img/s, %d worker processes)", len(image_ids),
             seconds, len(image_ids) / max(seconds, 1e-9), workers)
    return {"images": len(image_ids), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("export-cams", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--model", required=True, help="classifier model.pt")
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True, help="cams.h5")
    p.add_argument("--split", default="train_aug")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="export only the I-th of N contiguous blocks of the split (1-based)")
    a = p.parse_args(argv)

    def run(**kw) -> dict:
        return export_cams(shard=parse_shard(a.shard) if a.shard else None, **kw)

    return common.run_stage(a, run, stage="export_cams",
                            index=a.index, model=a.model, params=a.params,
                            out=a.out, split=a.split, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
