"""The stride-4 map the random walk propagates: the method's own (`source: method`) or the fused
seed at stride 4 (`source: fused`, docs/algorithms.md §walk [FIX]) that fuse_seeds writes beside
the seed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core.data import transforms as T
from wsss_core.data.index import DatasetIndex
from wsss_core.errors import ConfigError
from wsss_core.io import write_json
from wsss_core.map_store import MapReader, MapWriter
from wsss_core.models.irn import IRN, load_irn
from wsss_core.ops.random_walk import random_walk, upsample_rw
from wsss_core.stages.fuse_seeds import fuse_seeds
from wsss_core.stages.propagate import propagate
from wsss_core.checkpoint import save_model

WALK = {"radius": 5, "beta": 10, "exp_times": 3, "upsample": "resize"}


def strided(size: tuple[int, int]) -> tuple[int, int]:
    return (size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1


@pytest.fixture(scope="module")
def index_json(tmp_path_factory, toy_index: DatasetIndex) -> Path:
    path = tmp_path_factory.mktemp("index") / "index.json"
    write_json(path, toy_index.data)
    return path


@pytest.fixture(scope="module")
def cams(tmp_path_factory, toy_index: DatasetIndex):
    """A cobra-like map store (cnn, vit, their stride-4 maps) over four toy images."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("walk") / "cams.h5"
    ids = toy_index.ids("train_aug")[:4]
    with MapWriter(path, {"method": "cobra", "propagate_map": "vit_s4",
                                  "roles": {"walk": "vit", "fuse": ["cnn", "vit"], "agnostic": ""}}) as writer:
        for image_id in ids:
            size = toy_index.image(image_id).shape[:2]
            keys = np.array([k for k in np.unique(toy_index.mask(image_id)) if 0 < k < 255])
            maps = {}
            for name in ("cnn", "vit"):
                maps[name] = rng.random((len(keys),) + size, dtype=np.float32)
                maps[name + "_s4"] = rng.random((len(keys),) + strided(size), dtype=np.float32)
            writer.add(image_id, keys, size, maps)
    return path, ids


@pytest.fixture(scope="module")
def irn_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("irn") / "model.pt"
    params = {"backbone": "resnet_tiny", "strides": [2, 2, 2, 1], "crop": 64}
    save_model(path, "irn", IRN("resnet_tiny").state_dict(), params=params)
    return str(path)


def test_fused_stride4_seed_follows_the_recipe_pixel_by_pixel(cams, tmp_path):
    path, ids = cams
    fuse_seeds(path, {"recipe": "max_mean_last"}, tmp_path / "seeds.h5")
    with MapReader(path) as c, MapReader(tmp_path / "seeds.h5") as s:
        assert "seed_s4" in s.map_names and s.attrs["strided"] == 1
        for image_id in ids:
            cnn, vit, got = c.get(image_id, "cnn_s4"), c.get(image_id, "vit_s4"), s.get(image_id, "seed_s4")
            k, h, w = cnn.shape
            for ch in range(k):
                for y in range(h):
                    for x in range(w):  # docs/algorithms.md §seeds: (max(M_c, M_v) + M_v) / 2
                        want = (max(cnn[ch, y, x], vit[ch, y, x]) + vit[ch, y, x]) / 2
                        assert got[ch, y, x] == pytest.approx(want, abs=1e-3)  # stored as float16


def test_no_stride4_maps_means_no_stride4_seed_and_a_clear_fused_walk_error(cams, irn_model, index_json, tmp_path):
    path, _ = cams
    # "cnn" has cnn_s4, so drop it by fusing from a store that only has full-resolution maps
    bare = tmp_path / "bare.h5"
    with MapReader(path) as c, MapWriter(bare, {"method": "cam", "propagate_map": "cam_s4",
                                                         "roles": {"walk": "cam", "fuse": ["cam"]}}) as w:
        for image_id in c.ids():
            w.add(image_id, c.keys(image_id), c.size(image_id), {"cam": c.get(image_id, "cnn")})
    fuse_seeds(bare, {"recipe": "max"}, tmp_path / "seeds.h5")
    with MapReader(tmp_path / "seeds.h5") as s:
        assert "seed_s4" not in s.map_names
    with pytest.raises(ConfigError, match="propagate.source: 'fused'.*no stride-4 seed"):
        propagate(index_json, bare, irn_model, dict(WALK, source="fused"), tmp_path / "rw.h5",
                  seeds=tmp_path / "seeds.h5")
    assert not (tmp_path / "rw.h5").exists()


@pytest.mark.parametrize("source", ["method", "fused"])
def test_propagate_walks_the_chosen_map(cams, irn_model, index_json, toy_index, tmp_path, source):
    path, ids = cams
    fuse_seeds(path, {"recipe": "max"}, tmp_path / "seeds.h5")
    propagate(index_json, path, irn_model, dict(WALK, source=source), tmp_path / "rw.h5",
              seeds=tmp_path / "seeds.h5")
    model, _ = load_irn(irn_model, torch.device("cpu"))
    store, name = (path, "vit_s4") if source == "method" else (tmp_path / "seeds.h5", "seed_s4")
    with MapReader(store) as m, MapReader(tmp_path / "rw.h5") as rw:
        assert rw.attrs["source"] == name
        image_id = ids[1]
        img = torch.from_numpy(T.to_chw(T.normalize(toy_index.image(image_id))))
        boundary = model.boundary_map(torch.stack([img, img.flip(-1)]), crop=64)
        want = upsample_rw(random_walk(torch.from_numpy(m.get(image_id, name)), boundary, radius=5,
                                       beta=10, exp_times=3), m.size(image_id), mode="resize")
        np.testing.assert_allclose(rw.get(image_id, "rw"), want.numpy(), rtol=2e-3, atol=2e-3)


def test_propagate_in_worker_processes_writes_the_file_one_process_writes(
        cams, irn_model, index_json, tmp_path, monkeypatch):
    """threads=2 on CPU: two worker processes of one thread walk two blocks into part stores,
    copied into rw.h5 as stored; every map equals the one-process run's, bit for bit, and no
    part is left beside the output."""
    from wsss_core.stages import common

    path, ids = cams
    propagate(index_json, path, irn_model, dict(WALK, source="method"), tmp_path / "one.h5",
              threads=1)
    monkeypatch.setattr(common, "IMAGES_PER_WORKER", 2)  # 4 images: two workers
    assert common.image_workers(2, len(ids), torch.device("cpu")) == 2
    propagate(index_json, path, irn_model, dict(WALK, source="method"), tmp_path / "two.h5",
              threads=2)
    with MapReader(tmp_path / "one.h5") as a, MapReader(tmp_path / "two.h5") as b:
        assert a.ids() == b.ids() == ids and a.attrs == b.attrs
        for image_id in ids:
            for name in ("rw", "boundary"):
                assert np.array_equal(a.get(image_id, name), b.get(image_id, name)), (image_id, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]
