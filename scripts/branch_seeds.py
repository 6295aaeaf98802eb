"""Seed mIoU (best constant threshold) of each recipe on train, straight from cams.h5."""
import sys
import numpy as np
from wsss_core.data.index import DatasetIndex
from wsss_core.map_store import MapReader
from wsss_core.metrics import ConfusionMatrix
from wsss_core.seeds import RECIPES, fuse, seed_labels_sweep
root, method, recipes = sys.argv[1], sys.argv[2], sys.argv[3:]
idx = DatasetIndex.load(f"{root}/index.json")
ths = [round(0.05 * i, 2) for i in range(1, 20)]
cms = {r: [ConfusionMatrix(idx.num_classes) for _ in ths] for r in recipes}
with MapReader(f"{root}/{method}/cams.h5") as reader:
    for i in idx.ids("train"):
        gt = idx.mask(i)
        for r in recipes:
            seed = fuse(r, {n: reader.get(i, n) for n in RECIPES[r][0]})
            for pred, cm in zip(seed_labels_sweep(seed, reader.keys(i), ths), cms[r]):
                cm.update(pred, gt)
out = []
for r in recipes:
    m = [cm.miou() * 100 for cm in cms[r]]
    b = int(np.argmax(m))
    out.append(f"{r} {m[b]:.2f}@{ths[b]}")
print(root, method, " | ".join(out))
