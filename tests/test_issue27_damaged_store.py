"""Issue 27 item 6: random bytes over any part of a map store (its group structure and
attributes, not only its data chunks) are one DataError line naming the file, in every reader."""
from __future__ import annotations

import json

import numpy as np
import pytest

from wsss_core.errors import DataError
from wsss_core.map_store import MapReader, MapWriter
from wsss_core.stages import fuse_seeds

N_IMAGES = 24


def _store(path) -> None:
    rng = np.random.default_rng(0)
    attrs = {"method": "cam", "maps": json.dumps(["cam", "attention"]),
             "roles": json.dumps({"fuse": ["cam"], "agnostic": "attention"})}
    with MapWriter(path, attrs) as w:
        for k in range(N_IMAGES):
            w.add(f"img{k:03d}", [1, 3], (20, 24), {"cam": rng.random((2, 20, 24)),
                                                     "attention": rng.random((20, 24))})


def _read_everything(path) -> None:
    with MapReader(path) as r:
        r.attrs, r.stored_attrs, r.map_names, r.agnostic_map_names()
        for image_id in r.ids():
            assert image_id in r
            r.has(image_id, "cam"), r.keys(image_id), r.size(image_id)
            r.get(image_id, "cam"), r.get(image_id, "attention")
        for _ in r.items("cam"):
            pass


def _damaged(tmp_path, seed: int, fraction: float):
    path = tmp_path / f"cams{seed}.h5"
    _store(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    start = int(len(data) * fraction)
    data[start:start + 512] = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("fraction", [0.002, 0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97])
def test_any_damage_is_a_data_error(tmp_path, fraction):
    """Offsets from the superblock and the root group's B-tree to the heaps and chunks."""
    for seed in range(4):
        path = _damaged(tmp_path, seed, fraction)
        try:
            _read_everything(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            assert "delete it" in str(e)


def test_fuse_seeds_on_damaged_group_structure_is_one_line(tmp_path, capsys):
    """The issue's case: random bytes over the middle of cams.h5 (found by scanning offsets
    until the damage hits metadata that fuse_seeds reads), one line, exit 2."""
    hits = 0
    for fraction in (0.002, 0.005, 0.01, 0.02, 0.05, 0.5):
        path = _damaged(tmp_path, 1, fraction)
        cams = path.with_name("cams.h5")
        path.replace(cams)
        out = tmp_path / f"seeds{fraction}.h5"
        rc = fuse_seeds.main(["--cams", str(cams), "--out", str(out),
                              "--params", json.dumps({"recipe": "max"})])
        err = capsys.readouterr().err
        assert "Traceback" not in err and "unexpected" not in err, err
        if rc:
            hits += 1
            assert rc == 2
            lines = [line for line in err.splitlines() if "wsss: error" in line]
            assert len(lines) == 1 and str(cams) in lines[0], err
            assert not out.exists()
    assert hits
