"""Sharded CAM export: three shard exports merged give the file of one unsharded export (every
map's dtype, shape, values and stored chunks; every attribute), MapReader reads it unchanged,
and the merge refuses shard sets that are not one complete export. The workflow with
`resources.rules.export_cams.shards: 3` schedules three export jobs and one merge."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
import yaml

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.data.index import build_index
from wsss_core.checkpoint import save_model
from wsss_core.errors import ConfigError, DataError
from wsss_core.map_store import MapReader
from wsss_core.methods import create_method
from wsss_core.stages.export_cams import export_cams, parse_shard, shard_ids
from wsss_core.stages import common
from wsss_core.stages.merge_cams import merge_cams

SCALES = {"scales": [1.0, 0.5]}


@pytest.fixture(scope="module")
def exported(repo_root, toy_root, tmp_path_factory):
    """An untrained CoBra (class, strided and float32 agnostic maps) exported unsharded and
    in three shards."""
    d = tmp_path_factory.mktemp("shards")
    lists = {s: s for s in ("train_aug", "train", "val")}
    (d / "index.json").write_text(json.dumps(build_index("toy_small", "toy", toy_root, lists,
                                                         progress=False)))
    cfg = load_config(repo_root / "config.yaml")
    method = method_params(cfg, "toy", "cobra")
    train = dict(stage_params(cfg, "toy", "cobra", "train_classifier"), crop=64)
    torch.manual_seed(0)
    model = create_method(method, 9, train_params=train)
    save_model(d / "model.pt", "classifier", model.state_dict(), method=method, num_classes=9,
               train_params=train)
    export_cams(d / "index.json", d / "model.pt", SCALES, d / "whole.h5", threads=2)
    shards = [d / f"{i}-of-3.h5" for i in (1, 2, 3)]
    for i, path in enumerate(shards, 1):
        export_cams(d / "index.json", d / "model.pt", SCALES, path, threads=2, shard=(i, 3))
    merge_cams(d / "index.json", shards, d / "merged.h5")
    # threads=2 on CPU: two worker processes of one thread export two blocks into part stores
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "IMAGES_PER_WORKER", 4)
        assert common.image_workers(2, 12, torch.device("cpu")) == 2
        export_cams(d / "index.json", d / "model.pt", SCALES, d / "workers.h5", threads=2)
    return d, shards


def _attrs(obj) -> dict:
    return {k: (v, np.asarray(v).dtype) for k, v in obj.attrs.items()}


@pytest.mark.parametrize("other", ["merged.h5", "workers.h5"])
def test_three_shards_or_two_workers_give_the_one_process_file(exported, other):
    d, _ = exported
    with h5py.File(d / "whole.h5", "r") as a, h5py.File(d / other, "r") as b:
        assert _attrs(a).keys() == _attrs(b).keys() and "shard" not in b.attrs
        for k, (v, dtype) in _attrs(a).items():
            assert np.array_equal(v, b.attrs[k]) and dtype == _attrs(b)[k][1], k
        assert list(a) == list(b) and len(a) == 12
        nonzero = 0
        for image_id in a:
            ga, gb = a[image_id], b[image_id]
            assert set(ga) == set(gb) == {"cnn", "cnn_s4", "vit", "vit_s4", "attention"}
            for k in ("keys", "size"):
                assert np.array_equal(ga.attrs[k], gb.attrs[k]) and ga.attrs[k].dtype == gb.attrs[k].dtype
            for name in ga:
                x, y = ga[name], gb[name]
                assert (x.dtype, x.shape, x.chunks, x.compression) == (y.dtype, y.shape, y.chunks, y.compression)
                assert np.array_equal(x[()], y[()]), (image_id, name)
                if x.size:  # the stored (compressed) bytes too
                    origin = (0,) * x.ndim
                    assert x.id.read_direct_chunk(origin) == y.id.read_direct_chunk(origin)
                nonzero += int(np.count_nonzero(x[()]) > 0)
        assert nonzero > 30  # the maps are not trivially zero
    with MapReader(d / other) as r, MapReader(d / "whole.h5") as w:
        assert r.map_names == w.map_names and r.attrs == w.attrs
        assert r.ids() == w.ids()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no part or temporary left


def test_shards_are_contiguous_blocks_covering_every_id_once():
    ids = [f"img{i:03d}" for i in range(11)]
    for n in (1, 2, 3, 5, 11, 13):
        blocks = [shard_ids(ids, (i, n)) for i in range(1, n + 1)]
        assert [i for block in blocks for i in block] == ids
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "3", "a/b"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_merge_refuses_an_incomplete_or_mixed_shard_set(exported, tmp_path):
    d, shards = exported
    with pytest.raises(DataError, match=r"shard 3/3 missing"):
        merge_cams(d / "index.json", shards[:2], tmp_path / "a.h5")
    with pytest.raises(DataError, match=r"shard 2/3 does not fit"):
        merge_cams(d / "index.json", [shards[0], shards[1], shards[1]], tmp_path / "b.h5")
    with pytest.raises(DataError, match=r"not a shard"):
        merge_cams(d / "index.json", [d / "whole.h5"], tmp_path / "c.h5")
    other = tmp_path / "other-3-of-3.h5"  # an export with other scales
    export_cams(d / "index.json", d / "model.pt", {"scales": [1.0]}, other, threads=2, shard=(3, 3))
    with pytest.raises(DataError, match=r"attribute 'scales' differs"):
        merge_cams(d / "index.json", [shards[0], shards[1], other], tmp_path / "d.h5")
    assert not list(tmp_path.glob("[abcd].h5")) and not list(tmp_path.glob(".*.tmp"))


def test_workflow_runs_three_export_jobs_and_one_merge(repo_root, tmp_path, cli_env):
    extra = tmp_path / "sharded.yaml"
    extra.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "resources": {
        "rules": {"export_cams": {"shards": 3, "mem_mb": 16000, "runtime": 240, "gpu": True}}}}))
    target = f"{tmp_path}/results/toy/cam/seed_miou.txt"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(repo_root),
           "-n", "-p", "--configfile", str(extra), "--", target]
    out = subprocess.run(cmd, cwd=repo_root, env=cli_env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout.split("Job stats:")[1], re.MULTILINE))
    assert stats["export_cams"] == "3" and stats["merge_cams"] == "1"
    shells = [line for line in out.stdout.splitlines() if re.search(r"\bwsss (export|merge)-cams ", line)]
    exports = sorted(line for line in shells if "wsss export-cams" in line)
    assert len(shells) == 4 and len(exports) == 3
    assert [re.search(r"--shard (\S+)", line).group(1) for line in exports] == ["1/3", "2/3", "3/3"]
    assert all(f"cams_shards/{i}-of-3.h5" in exports[i - 1] for i in (1, 2, 3))
    merge = next(line for line in shells if "wsss merge-cams" in line)
    assert all(f"cams_shards/{i}-of-3.h5" in merge for i in (1, 2, 3))
    assert merge.split("--out ")[1].split()[0].endswith("/toy/cam/cams.h5")
