"""The method data hooks of the plug-in contract: per-image extra inputs (computed once,
cached, transformed with the image) and a method's own training views."""
from __future__ import annotations

import numpy as np
import torch

from wsss_core.data import transforms as T
from wsss_core.data.datasets import ClassificationDataset

CALLS: list[int] = []


def pixel_coordinates(image: np.ndarray) -> np.ndarray:
    """Extra input whose value is the pixel's own flat index y * W + x, plus 256 (so no pixel
    takes the padding value 255)."""
    CALLS.append(1)
    h, w = image.shape[:2]
    return np.arange(256, 256 + h * w, dtype=np.int32).reshape(h, w)


def test_extra_input_follows_the_image_geometry_and_is_computed_once(toy_index, tmp_path):
    CALLS.clear()
    ds = ClassificationDataset(toy_index, "train_aug", crop=48, scale_range=(64, 64), seed=3,
                               extra={"coords": pixel_coordinates}, extra_cache=tmp_path)
    plain = ClassificationDataset(toy_index, "train_aug", crop=48, scale_range=(64, 64), seed=3)
    for epoch in range(2):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(3):
            item, ref = ds[i], plain[i]
            # the hook leaves the image's own augmentation as it was
            assert torch.equal(item["image"], ref["image"])
            img = toy_index.image(ds.ids[i])
            assert max(img.shape[:2]) == 64  # long side 64: the resize is the identity
            coords = item["coords"].numpy()
            want = T.to_chw(T.normalize(img))
            h, w = img.shape[:2]
            checked = 0
            for y in range(0, 48, 5):
                for x in range(0, 48, 5):
                    c = int(coords[y, x])
                    if c == 255:
                        assert not item["image"][:, y, x].any()  # padding in both
                        continue
                    sy, sx = divmod(c - 256, w)
                    assert torch.allclose(item["image"][:, y, x], torch.from_numpy(want[:, sy, sx]))
                    checked += 1
            assert checked > 20
    assert len(CALLS) == 3  # three images, each computed once over two epochs
    assert sorted(p.name for p in (tmp_path / "coords").iterdir()) == sorted(f"{i}.npy" for i in ds.ids[:3])


def two_views(image: np.ndarray, rng: np.random.Generator) -> dict:
    x = T.to_chw(T.normalize(image))
    return {"global": x, "local": x[:, :16, :16].copy()}


def test_train_views_replace_the_single_crop(toy_index):
    ds = ClassificationDataset(toy_index, "train_aug", crop=48, scale_range=(64, 64), views=two_views)
    item = ds[0]
    assert set(item) == {"global", "local", "label", "index"}
    assert item["local"].shape == (3, 16, 16)
    assert torch.equal(item["label"], torch.from_numpy(toy_index.label_vector(ds.ids[0])))
