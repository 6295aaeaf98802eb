"""Stage `export_cams`: multi-scale + flip CAMs of every train_aug image into cams.h5.

Per image and map: for each scale, one forward of (image, mirrored image) per branch; each
per-scale map is brought to the image size H x W (below), and resized bilinearly straight to
stride 4 for maps the random walk propagates, summed over scales, restricted to the image's
classes and divided by its spatial maximum (+1e-5), or min-max normalised per class where the
map's spec asks for it (`normalize="minmax"`). Class-agnostic maps (e.g. a ViT's attention)
are summed, not normalised (their thresholds are read from the raw values). The file records
which map plays which role downstream (`roles`: the map to walk, the maps to fuse, the
class-agnostic map).

Full resolution (`upsample`, docs/algorithms.md §cam-upsampling):
  * `upsample_crop` (IRN, jiwoon-ahn/irn step/make_cam.py `highres_cam`): a map on the
    stride-16 grid of its scaled input (ceil(h_s/16) x ceil(w_s/16), a stride-16 CNN) is
    resized bilinearly (align_corners=False) to (ceil(H/16)*16, ceil(W/16)*16) -- the target
    is computed from the original size, the same for every scale -- and its top-left H x W
    kept. Any other map (a ViT grid that drops trailing pixels, a map a method already
    returns at input resolution) is resized, as below. Both equal when 16 divides H and W;
  * `resize`: every map bilinearly straight to H x W, as several methods' official code does
    (their pages under docs/methods/ say which).

`seed_view` (null, or {size: S, scales}) also exports the method's fuse maps at one official
evaluation view, as `<name>_view` [K, H, W] (the official evaluation view of a ViT method):
the normalised image resized bilinearly to S x S, each scale s an int(s*S)-square resize of
that, the maps resized to S x S and summed, restricted and normalised at S x S as above, then
resized to H x W.

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
from ..data import transforms as T
from ..data.datasets import MultiScaleDataset, collate_single
from ..data.index import DatasetIndex
from ..errors import ConfigError
from ..map_store import MapWriter
from ..methods.base import Method
from . import common

log = logging.getLogger("wsss")


#: `export_cams.upsample` values (schema enum); the first is the schema default
UPSAMPLE_MODES = ("upsample_crop", "resize")
#: the network stride IRN's upsample-then-crop assumes (make_cam.py: get_strided_up_size(size, 16))
CAM_STRIDE = 16


def strided_size(size: tuple[int, int], stride: int = 4) -> tuple[int, int]:
    """(ceil(H / stride), ceil(W / stride)), as IRN's get_strided_size."""
    return (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1


def strided_up_size(size: tuple[int, int], stride: int = CAM_STRIDE) -> tuple[int, int]:
    """(ceil(H / stride) * stride, ceil(W / stride) * stride), as IRN's get_strided_up_size."""
    h, w = strided_size(size, stride)
    return h * stride, w * stride


def full_resolution(m: torch.Tensor, size: tuple[int, int], input_size: tuple[int, int],
                    upsample: str = "resize") -> torch.Tensor:
    """One scale's map [1, C, h, w] (float) at the image size [1, C, H, W].

    `upsample_crop`: a map on the stride-16 grid of its input (h, w) = ceil(input_size / 16)
    is resized bilinearly (align_corners=False) to strided_up_size(size) and cropped to its
    top-left H x W (IRN make_cam.py); any other map, and every map under `resize`, is resized
    bilinearly straight to H x W (the stage schema's enum admits no other value)."""
    if upsample == "upsample_crop" and tuple(m.shape[-2:]) == strided_size(input_size, CAM_STRIDE):
        up = F.interpolate(m, size=strided_up_size(size), mode="bilinear", align_corners=False)
        return up[..., :size[0], :size[1]]
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


def _finish(spec, m: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A summed map: class maps restricted to the image's classes `idx` and normalised as
    `spec` declares; a class-agnostic map [1, H, W] → [H, W] raw."""
    if spec.kind != "class":
        return m[0]
    m = m.index_select(0, idx)
    if spec.normalize == "minmax" and m.shape[0]:
        return min_max_normalize(F.relu(m))
    if spec.normalize and m.shape[0]:
        m = F.relu(m)
        return m / (m.flatten(1).max(dim=1).values[:, None, None] + 1e-5)
    return m


def _accumulate(sums: dict[str, torch.Tensor], key: str, r: torch.Tensor) -> None:
    """Sum over scales: `r` added to sums[key] (or stored as its first term)."""
    sums[key] = sums[key] + r if key in sums else r


def _class_idx(keys: list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor([k - 1 for k in keys], dtype=torch.long, device=device)


@torch.no_grad()
def image_maps(method: Method, scaled: list[torch.Tensor], size: tuple[int, int], keys: list[int],
               device: torch.device, upsample: str = "resize") -> dict[str, np.ndarray]:
    """All maps of one image: `<name>` at (H, W) and `<name>_s4` at stride 4 where declared.

    scaled: the normalised image [3, h_s, w_s] (float32) per scale; size (H, W); keys: the
    image's class ids (1-based); `upsample`: how a scale's map reaches H x W
    (`full_resolution`; the stride-4 maps are always resized straight, as IRN's
    strided_cam). Returns float32 arrays: class maps [K, H, W], agnostic maps [H, W]."""
    h_s4 = strided_size(size)
    sums: dict[str, torch.Tensor] = {}
    for img in scaled:
        img = img.to(device)
        maps = method.infer(torch.stack([img, img.flip(-1)]))
        for spec in method.maps:
            m = maps[spec.name].float()[None]
            full = full_resolution(m, size, tuple(img.shape[-2:]), upsample)[0]
            _accumulate(sums, spec.name, full)
            if spec.strided:
                _accumulate(sums, spec.name + "_s4", F.interpolate(m, size=h_s4, mode="bilinear",
                                                                   align_corners=False)[0])
    idx = _class_idx(keys, device)
    out: dict[str, np.ndarray] = {}
    for spec in method.maps:
        for key in (spec.name, spec.name + "_s4") if spec.strided else (spec.name,):
            out[key] = _finish(spec, sums[key], idx).cpu().numpy()
    return out


@torch.no_grad()
def view_maps(method: Method, image: np.ndarray, keys: list[int], device: torch.device,
              view: dict) -> dict[str, np.ndarray]:
    """The method's fuse maps at one evaluation view, `<name>_view` [K, H, W] float32 (the
    official evaluation view of a ViT method, as its own inference script computes it): the
    normalised image [3, H, W] resized bilinearly (align_corners=False) to S x S
    (S = view["size"]); per scale s of view["scales"] that view resized to int(s*S) x int(s*S)
    (s = 1: the view itself), its maps (image + mirror, merged by the method) resized to S x S
    and summed over scales; restricted and normalised at S x S as the map's spec declares, then
    resized bilinearly to H x W. image: uint8 [H, W, 3]."""
    size = tuple(image.shape[:2])
    side = int(view["size"])
    base = torch.from_numpy(T.to_chw(T.normalize(image)))[None].to(device)
    base = F.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)
    fuse = set(method.map_roles().fuse)
    specs = [spec for spec in method.maps if spec.name in fuse and spec.kind == "class"]
    sums: dict[str, torch.Tensor] = {}
    for s in view["scales"]:
        x = base if s == 1.0 else F.interpolate(base, size=(int(s * side), int(s * side)),
                                                mode="bilinear", align_corners=False)
        maps = method.infer(torch.cat([x, x.flip(-1)]))
        for spec in specs:
            r = F.interpolate(maps[spec.name].float()[None], size=(side, side), mode="bilinear",
                              align_corners=False)[0]
            _accumulate(sums, spec.name, r)
    idx = _class_idx(keys, device)
    out = {}
    for spec in specs:
        m = _finish(spec, sums[spec.name], idx)
        m = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
        out[spec.name + "_view"] = m.cpu().numpy()
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
    upsample: str = "upsample_crop"
    seed_view: dict | None = None


def _write_maps(method: Method, idx: DatasetIndex, image_ids: list[str], scales: list[float],
                out: str | Path, attrs: dict, device: torch.device, upsample: str = "upsample_crop",
                seed_view: dict | None = None) -> None:
    """Export `image_ids` into the map store `out` (written whole or not at all)."""
    dataset = MultiScaleDataset(idx, image_ids, scales)
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_single, num_workers=0)
    dtypes = {s.name: "float32" for s in method.maps if s.kind == "agnostic"}
    with MapWriter(out, attrs) as writer:
        for item in tqdm(loader, desc="export cams", unit="img", mininterval=2.0):
            maps = image_maps(method, item["scaled"], tuple(item["size"]), item["keys"], device,
                              upsample)
            if seed_view:
                maps.update(view_maps(method, item["image"], item["keys"], device, seed_view))
            writer.add(item["id"], item["keys"], tuple(item["size"]), maps, dtypes=dtypes)


def _export_part(part: _Part) -> int:
    """Worker process: one thread, the classifier loaded once, `part.ids` into `part.path`."""
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    _write_maps(load_method(part.model, cpu), DatasetIndex.load(part.index), list(part.ids),
                list(part.scales), part.path, part.attrs, cpu, part.upsample, part.seed_view)
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
    upsample = params.get("upsample", UPSAMPLE_MODES[0])
    seed_view = params.get("seed_view")
    image_ids = list(ids if ids is not None else idx.ids(split))
    if shard is not None:
        image_ids = shard_ids(image_ids, shard)
    attrs = {"method": method.name, "scales": json.dumps(scales), "flip": 1,
             "params": json.dumps(method.params, sort_keys=True), "split": split,
             "propagate_map": roles.walk + "_s4", "roles": dataclasses.asdict(roles),
             "dataset": idx.name, "num_classes": idx.num_classes, "upsample": upsample,
             "seed_view": json.dumps(seed_view, sort_keys=True)}
    if shard is not None:
        attrs["shard"] = "{}/{}".format(*shard)  # merge_cams checks and drops it
    t0 = time.perf_counter()
    workers = common.image_workers(threads, len(image_ids), device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    if workers == 1:
        _write_maps(method, idx, image_ids, scales, out, attrs, device, upsample, seed_view)
    else:
        common.write_in_parts(out, attrs, image_ids, workers, functools.partial(
            _Part, str(index), str(model), tuple(scales), attrs=attrs, upsample=upsample,
            seed_view=seed_view), _export_part)
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
