"""Stage `superpixels`: one superpixel map per image of a split into superpixels.h5 (SSC's ASM
input, docs/methods/ssc.md "Superpixels"). Computed once per image at its original size; the
classifier's data layer augments it jointly with the image every epoch."""
from __future__ import annotations

import logging
from multiprocessing import Pool
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..data.index import DatasetIndex
from ..data.superpixels import GENERATORS, superpixels as compute_superpixels
from ..errors import ConfigError
from ..io import atomic_path
from . import common

log = logging.getLogger("wsss")

_INDEX: DatasetIndex | None = None


def _init_worker(index_path: str) -> None:
    global _INDEX
    _INDEX = DatasetIndex.load(index_path)


def _one(job: tuple[str, str, int]) -> tuple[str, np.ndarray]:
    image_id, generator, max_segments = job
    assert _INDEX is not None
    return image_id, compute_superpixels(_INDEX.image(image_id), generator, max_segments)


def superpixels(index: str | Path, params: dict, out: str | Path, split: str = "train_aug",
                threads: int | None = None) -> dict:
    """Write `out` (HDF5: one gzip uint8 [H, W] dataset per image id; attributes generator,
    max_segments, split). `params`: {generator: fh_ss64 | slic64, max_segments}. Returns the
    segment-count summary that is also logged."""
    generator = params.get("generator", "fh_ss64")
    max_segments = int(params.get("max_segments", 64))
    if generator not in GENERATORS:
        raise ConfigError(f"config key superpixels.generator: {generator!r} is not one of "
                          f"{', '.join(GENERATORS)}")
    idx = DatasetIndex.load(index)
    ids = idx.ids(split)
    jobs = [(i, generator, max_segments) for i in ids]
    counts = []
    with atomic_path(out, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(generator=generator, max_segments=max_segments, split=split, dataset=idx.name)
        with Pool(max(1, threads or 1), initializer=_init_worker, initargs=(str(index),)) as pool:
            for image_id, seg in tqdm(pool.imap(_one, jobs, chunksize=8), total=len(jobs),
                                      desc="superpixels", unit="img", mininterval=2.0):
                f.create_dataset(image_id, data=seg, compression="gzip", compression_opts=4)
                counts.append(int(seg.max()) + 1)
    c = np.asarray(counts)
    summary = {"images": len(c), "min": int(c.min()), "median": float(np.median(c)), "max": int(c.max())}
    log.info("%s superpixels of %d images: segments per image min %d, median %.0f, max %d",
             generator, summary["images"], summary["min"], summary["median"], summary["max"])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = common.parser("superpixels", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--params", required=True, type=common.json_arg,
                   help='e.g. {"generator": "fh_ss64", "max_segments": 64}')
    p.add_argument("--out", required=True, help="superpixels.h5")
    p.add_argument("--split", default="train_aug")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return common.run_stage(a, superpixels, index=a.index, params=a.params, out=a.out,
                            split=a.split, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
