"""Seed mIoU (best constant background score) of single maps and fusion recipes on `train`,
straight from a method's cams.h5: which branch carries the seed.

    python scripts/branch_seeds.py results/toy cobra cnn vit max max_mean_last

A name of the method's maps scores that map alone; a recipe (max, mean, max_mean_last) fuses
the maps the method declares for fusion (wsss_core.pseudo.seeds.recipe_inputs).
"""
import sys
from pathlib import Path

import numpy as np

from wsss_core.data.index import DatasetIndex
from wsss_core.map_store import MapReader, map_roles
from wsss_core.metrics import ConfusionMatrix
from wsss_core.pseudo.seeds import fuse, recipe_inputs, seed_labels_sweep


def main(root: str, method: str, recipes: list[str]) -> None:
    part = Path(root) / "index" / "train.json"  # the index part with `train` (data.index.PARTS)
    idx = DatasetIndex.load(part if part.is_file() else Path(root) / "index.json")
    ths = [round(0.05 * i, 2) for i in range(1, 20)]
    cms = {r: [ConfusionMatrix(idx.num_classes) for _ in ths] for r in recipes}
    with MapReader(f"{root}/{method}/cams.h5") as reader:
        fuse_maps = map_roles(reader.attrs).fuse
        for i in idx.ids("train"):
            gt = idx.mask(i)
            for r in recipes:
                seed = fuse(r, [reader.get(i, n) for n in recipe_inputs(r, fuse_maps)])
                for pred, cm in zip(seed_labels_sweep(seed, reader.keys(i), ths), cms[r]):
                    cm.update(pred, gt)
    out = []
    for r in recipes:
        m = [cm.miou() * 100 for cm in cms[r]]
        b = int(np.argmax(m))
        out.append(f"{r} {m[b]:.2f}@{ths[b]}")
    print(root, method, " | ".join(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
