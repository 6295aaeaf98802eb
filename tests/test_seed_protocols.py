"""Seed evaluation protocols (docs/algorithms.md §seed-protocols): the constant background sweep
and CoBra's per-image
percentile of a class-agnostic map, by hand and against a per-pixel loop oracle."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_official_seed_protocols import _oracle_labels  # tests/ is on sys.path under pytest

from wsss_core.errors import ConfigError
from wsss_core.io import write_json
from wsss_core.map_store import MapWriter
from wsss_core.metrics import read_miou
from wsss_core.pseudo.seeds import percentile_backgrounds, percentile_seed_labels_sweep
from wsss_core.stages.eval_seeds import eval_seeds

PARAMS = {"background": "percentile", "thresholds": {"start": 0.1, "stop": 0.9, "step": 0.2},
          "percentiles": {"start": 50, "stop": 95, "step": 5}, "agnostic_map": None}


def test_percentile_background_by_hand():
    """Attention [[0, 1, 2], [3, 4, 5]]: the 50th percentile of the six values is 2.5 (linear,
    rank 0.5 * 5 = 2.5 between 2 and 3), the 80th is 4.0 (rank 4); class 7's seed beats the
    background where it is strictly larger."""
    att = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.float32)
    seed = np.array([[[0.1, 3.0, 2.6], [2.4, 4.5, 1.0]]], dtype=np.float32)
    assert percentile_backgrounds(att, [50, 80]).tolist() == [2.5, 4.0]
    at50, at80 = percentile_seed_labels_sweep(seed, np.array([7]), att, [50, 80])
    assert at50.tolist() == [[0, 7, 7], [0, 7, 0]]
    assert at80.tolist() == [[0, 0, 0], [0, 7, 0]]
    # the score is the image's own: the same seed under a map ten times larger is all background
    assert not percentile_seed_labels_sweep(seed, np.array([7]), att * 10, [50])[0].any()


def _oracle_percentile(values: np.ndarray, theta: float) -> float:
    v = sorted(float(x) for x in values.ravel())
    rank = theta / 100 * (len(v) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (rank - lo) * (v[hi] - v[lo])


def _oracle_miou(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int) -> float:
    inter, union = [0] * num_classes, [0] * num_classes
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g == 255:
                continue
            p = 0 if p == 255 else int(p)
            for c in range(num_classes):
                inter[c] += int(p == c and g == c)
                union[c] += int(p == c or g == c)
    ious = [i / u for i, u in zip(inter, union) if u > 0]
    return 100 * sum(ious) / len(ious)


@pytest.fixture(scope="module")
def stores(toy_index, tmp_path_factory):
    """seeds.h5 and cams.h5 (with a class-agnostic `saliency` map) over the toy train split:
    noisy ground-truth seeds whose contrast differs per image."""
    base = tmp_path_factory.mktemp("seed_protocols")
    rng = np.random.default_rng(3)
    write_json(base / "index.json", toy_index.data)
    with MapWriter(base / "seeds.h5") as seeds, MapWriter(base / "cams.h5") as cams:
        for i in toy_index.ids("train_aug"):
            gt, keys, size = toy_index.mask(i), toy_index.labels(i), toy_index.size(i)
            gain = rng.uniform(0.3, 1.0)
            maps = np.stack([gain * (gt == k) + 0.4 * rng.random(size) for k in keys]).astype(np.float32)
            saliency = (gain * (gt > 0) + 0.3 * rng.random(size)).astype(np.float32)
            seeds.add(i, keys, size, {"seed": maps})
            cams.add(i, keys, size, {"cam": maps, "saliency": saliency}, dtypes={"saliency": "float32"})
    return base


def test_eval_seeds_records_both_curves_and_reports_the_chosen_protocol(stores, toy_index):
    base = stores
    report = eval_seeds(base / "index.json", base / "seeds.h5", PARAMS, base / "seed_miou.txt",
                        cams=base / "cams.h5")
    saved = json.loads((base / "seed_metrics.json").read_text())
    assert saved["protocol"] == "percentile" and saved["agnostic_map"] == "saliency"
    assert list(saved["curve"]) == ["0.1", "0.3", "0.5", "0.7", "0.9"]
    assert list(saved["percentile_curve"]) == [str(p) for p in range(50, 100, 5)]
    assert saved["miou"] == pytest.approx(max(saved["percentile_curve"].values()))
    assert saved["best"]["constant"] == pytest.approx(max(saved["curve"].values()))
    assert read_miou(base / "seed_miou.txt") == pytest.approx(report["miou"], abs=0.005)
    # per-pixel oracle of the percentile curve at the reported θ
    from wsss_core.map_store import MapReader
    theta = saved["percentile"]
    preds, gts = [], []
    with MapReader(base / "seeds.h5") as seeds, MapReader(base / "cams.h5") as cams:
        for i in toy_index.ids("train"):
            seed, keys, att = seeds.get(i, "seed"), seeds.keys(i), cams.get(i, "saliency")
            preds.append(_oracle_labels(seed, keys, _oracle_percentile(att, theta)))
            gts.append(toy_index.mask(i))
    assert saved["miou"] == pytest.approx(_oracle_miou(preds, gts, toy_index.num_classes), abs=1e-6)
    # the constant protocol reports the constant arg-max, with the percentile curve beside it
    constant = eval_seeds(base / "index.json", base / "seeds.h5", dict(PARAMS, background="constant"),
                          base / "c" / "seed_miou.txt", cams=base / "cams.h5")
    assert constant["miou"] == pytest.approx(saved["best"]["constant"])
    assert constant["percentile_curve"] == saved["percentile_curve"]


def test_eval_seeds_without_a_class_agnostic_map(stores):
    base = stores
    only_constant = eval_seeds(base / "index.json", base / "seeds.h5", dict(PARAMS, background="constant"),
                               base / "n" / "seed_miou.txt")
    assert "percentile_curve" not in only_constant
    with pytest.raises(ConfigError, match="eval_seeds.background: 'percentile' needs a class-agnostic"):
        eval_seeds(base / "index.json", base / "seeds.h5", PARAMS, base / "m" / "seed_miou.txt")
    with pytest.raises(ConfigError, match="eval_seeds.agnostic_map: 'attention'"):
        eval_seeds(base / "index.json", base / "seeds.h5", dict(PARAMS, agnostic_map="attention"),
                   base / "m" / "seed_miou.txt", cams=base / "cams.h5")
    assert not (base / "m").exists()
