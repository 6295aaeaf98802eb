"""scripts/mask_alpha_grid.py: each row is the configured mask rule over the grid, applied to
the walk's output (rw.h5) or, with `--maps cam`, to the map the method walks (cams.h5, its
`walk` role); checked against masks made and scored here image by image."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from wsss_core.data.index import DatasetIndex
from wsss_core.io import write_json
from wsss_core.map_store import MapReader, MapWriter
from wsss_core.metrics import ConfusionMatrix
from wsss_core.pseudo.masks import pseudo_mask

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mask_alpha_grid.py"
GRID = [0.3, 0.55]


def _script():
    spec = importlib.util.spec_from_file_location("mask_alpha_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _oracle(path: Path, name: str, idx: DatasetIndex, params: dict) -> list[float]:
    row = []
    with MapReader(path) as reader:
        for alpha in GRID:
            cm = ConfusionMatrix(idx.num_classes)
            for image_id in idx.ids("train"):
                mask = pseudo_mask(None, reader.get(image_id, name), reader.keys(image_id),
                                   dict(params, alpha=alpha))
                cm.update(mask, idx.mask(image_id))
            row.append(cm.miou() * 100)
    return row


def test_rw_and_cam_rows_are_the_rule_on_each_map(tmp_path, toy_index: DatasetIndex):
    rng = np.random.default_rng(3)
    results = tmp_path / "results"
    run = results / "toy" / "m"
    run.mkdir(parents=True)
    write_json(results / "toy" / "index.json", toy_index.data)
    # the walked map is "act" (not "cam"), so the row must come from the store's roles
    cam_attrs = {"method": "m", "propagate_map": "act_s4",
                 "roles": {"walk": "act", "fuse": ["act"], "agnostic": ""}}
    with MapWriter(run / "cams.h5", cam_attrs) as cams, MapWriter(run / "rw.h5", {"method": "m"}) as rw:
        for image_id in toy_index.ids("train"):
            size = toy_index.image(image_id).shape[:2]
            keys = np.array([k for k in np.unique(toy_index.mask(image_id)) if 0 < k < 255])
            cams.add(image_id, keys, size, {"act": rng.random((len(keys), *size), dtype=np.float32),
                                            "other": np.zeros((len(keys), *size), np.float32)})
            rw.add(image_id, keys, size, {"rw": rng.random((len(keys), *size), dtype=np.float32)})
    params = {"rule": "per_class_alpha", "alpha": 0.6, "bg": 0.25, "crf": False}
    grid = _script()
    walked = grid.grid_row(results, "toy", "m", params, GRID, threads=1)
    not_walked = grid.grid_row(results, "toy", "m", params, GRID, threads=1, maps="cam")
    assert walked == pytest.approx(_oracle(run / "rw.h5", "rw", toy_index, params))
    assert not_walked == pytest.approx(_oracle(run / "cams.h5", "act", toy_index, params))
    assert walked != pytest.approx(not_walked)
