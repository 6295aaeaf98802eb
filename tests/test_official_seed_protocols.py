"""Official seed protocols and IRN's full-resolution CAM (issue 31 items 3, 4).

* eval_seeds `official`: the number a method's own evaluation script prints at its fixed
  setting (IRN eval_cam.py 0.15, SSC 0.20, SeCo 0.5 on its own view, TransCAM's 0.00-0.59
  sweep), beside the sweeps, against a per-pixel loop oracle;
* export_cams `upsample: upsample_crop` (IRN step/make_cam.py): a stride-16 map resized to
  (ceil(H/16)*16, ceil(W/16)*16) and cropped to H x W, against a loop oracle of bilinear
  interpolation (align_corners=False) and a one-hot cell that must land on known pixels;
* export_cams `seed_view`: SeCo tools/infer_cam.py's 448-square view, step by step.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.data import transforms as T
from wsss_core.errors import ConfigError
from wsss_core.io import write_json
from wsss_core.map_store import MapReader, MapWriter
from wsss_core.methods.base import MapSpec
from wsss_core.metrics import read_miou
from wsss_core.param_schema import check_stage_params
from wsss_core.stages.eval_seeds import eval_seeds
from wsss_core.stages.export_cams import full_resolution, image_maps, view_maps

CPU = torch.device("cpu")
IRN = {"name": "IRN step/eval_cam.py, constant 0.15", "rule": "constant", "threshold": 0.15}
PARAMS = {"background": "constant", "thresholds": {"start": 0.05, "stop": 0.95, "step": 0.05},
          "percentiles": {"start": 50, "stop": 95, "step": 5}, "agnostic_map": None,
          "official": IRN}
ROLES = {"walk": "cam", "fuse": ["cam"], "agnostic": ""}


# ---------------------------------------------------------------------------- oracles

def _oracle_labels(seed: np.ndarray, keys, bg: float) -> np.ndarray:
    """IRN eval_cam.py by the letter: prepend a constant `bg` plane, arg-max (the first wins
    ties, so background), map index i > 0 to keys[i - 1]."""
    pred = np.zeros(seed.shape[1:], dtype=np.uint8)
    for y in range(seed.shape[1]):
        for x in range(seed.shape[2]):
            scores = [bg] + [float(v) for v in seed[:, y, x]]
            k = int(np.argmax(scores))
            pred[y, x] = 0 if k == 0 else keys[k - 1]
    return pred


def _oracle_miou(preds, gts, num_classes: int) -> float:
    inter, union = [0] * num_classes, [0] * num_classes
    for pred, gt in zip(preds, gts):
        for p, g in zip(pred.ravel(), gt.ravel()):
            if g == 255:
                continue
            for c in range(num_classes):
                inter[c] += int(p == c and g == c)
                union[c] += int(p == c or g == c)
    ious = [i / u for i, u in zip(inter, union) if u > 0]
    return 100 * sum(ious) / len(ious)


def _oracle_score(store, name: str, index, bg: float) -> float:
    preds, gts = [], []
    with MapReader(store) as reader:
        for i in index.ids("train"):
            preds.append(_oracle_labels(reader.get(i, name), reader.keys(i), bg))
            gts.append(index.mask(i))
    return _oracle_miou(preds, gts, index.num_classes)


def _oracle_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch's bilinear resize (align_corners=False) of a 2-D `grid`, pixel by pixel: output
    pixel i reads source coordinate max(0, (i + 0.5) * in / out - 0.5)."""
    in_h, in_w = grid.shape

    def taps(i: int, n_in: int, n_out: int):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        return i0, i1, frac

    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        y0, y1, fy = taps(y, in_h, out_h)
        for x in range(out_w):
            x0, x1, fx = taps(x, in_w, out_w)
            out[y, x] = ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1])
                         + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))
    return out


# ----------------------------------------------------------------- eval_seeds official

@pytest.fixture(scope="module")
def stores(toy_index, tmp_path_factory):
    """seeds.h5 and cams.h5 over the toy train split: ground-truth seeds at 0.7 under uniform
    noise in [0, 0.6), so the constant sweep's best background score lies near 0.6-0.7, far
    from IRN's 0.15 and above TransCAM's 0.59; cams.h5 also holds a `cam_view` map (the seed
    map with less noise) as export_cams.seed_view writes it."""
    base = tmp_path_factory.mktemp("official_protocols")
    rng = np.random.default_rng(7)
    write_json(base / "index.json", toy_index.data)
    with MapWriter(base / "seeds.h5") as seeds, MapWriter(base / "cams.h5", {"roles": ROLES}) as cams:
        for i in toy_index.ids("train_aug"):
            gt, keys, size = toy_index.mask(i), toy_index.labels(i), toy_index.size(i)
            maps = np.stack([0.7 * (gt == k) + 0.6 * rng.random(size) for k in keys]).astype(np.float32)
            view = np.stack([0.7 * (gt == k) + 0.2 * rng.random(size) for k in keys]).astype(np.float32)
            seeds.add(i, keys, size, {"seed": maps})
            cams.add(i, keys, size, {"cam": maps, "cam_view": view})
    return base


def test_official_constant_is_irn_at_015_not_the_sweeps_best(stores, toy_index):
    """IRN's 0.15 scored alone (loop oracle of eval_cam.py) differs from the sweep's arg-max;
    the paper preset's `background: official` makes it seed_miou.txt, the sweep stays beside."""
    base = stores
    report = eval_seeds(base / "index.json", base / "seeds.h5", dict(PARAMS, background="official"),
                        base / "o" / "seed_miou.txt", cams=base / "cams.h5")
    saved = json.loads((base / "o" / "seed_metrics.json").read_text())
    official = saved["official"]
    assert official["name"] == IRN["name"] and official["rule"] == "constant"
    assert official["threshold"] == 0.15 and official["map"] == "seed"
    oracle = _oracle_score(base / "seeds.h5", "seed", toy_index, 0.15)
    assert official["miou"] == pytest.approx(oracle, abs=1e-6)
    assert saved["miou"] == pytest.approx(oracle, abs=1e-6)
    assert read_miou(base / "o" / "seed_miou.txt") == pytest.approx(report["miou"], abs=0.005)
    assert saved["protocol"] == "official" and saved["best"]["official"] == official["miou"]
    # the sweep stays beside it, and its best is another (higher) number at another score
    assert saved["threshold"] != 0.15
    assert saved["best"]["constant"] == pytest.approx(max(saved["curve"].values()))
    assert saved["best"]["constant"] > official["miou"] + 5
    # background: constant keeps the sweep's arg-max as seed_miou.txt, the official beside it
    sweep = eval_seeds(base / "index.json", base / "seeds.h5", PARAMS, base / "c" / "seed_miou.txt")
    assert sweep["miou"] == pytest.approx(saved["best"]["constant"])
    assert sweep["official"]["miou"] == pytest.approx(oracle, abs=1e-6)


def test_official_sweep_is_transcams_grid(stores, toy_index):
    """TransCAM evaluation.py --curve: 0.00, 0.01, ... 0.59, the best reported; the optimum here
    lies above 0.59, so it differs from the 0.05-0.95 sweep's best; each curve point is the
    constant rule at that score (loop oracle at the arg-max and at 0.00)."""
    base = stores
    official = {"name": "TransCAM evaluation.py", "rule": "sweep", "threshold": None,
                "grid": {"start": 0.0, "stop": 0.59, "step": 0.01}}
    report = eval_seeds(base / "index.json", base / "seeds.h5",
                        dict(PARAMS, background="official", official=official), base / "s" / "seed_miou.txt")
    block = report["official"]
    assert list(block["curve"]) == [f"{i / 100:g}" for i in range(60)]
    assert block["miou"] == pytest.approx(max(block["curve"].values())) == pytest.approx(report["miou"])
    assert block["threshold"] == 0.59   # the curve still rises at the grid's end
    assert block["miou"] == pytest.approx(_oracle_score(base / "seeds.h5", "seed", toy_index, 0.59), abs=1e-6)
    assert block["curve"]["0"] == pytest.approx(_oracle_score(base / "seeds.h5", "seed", toy_index, 0.0), abs=1e-6)
    assert report["best"]["constant"] > block["miou"]


def test_official_view_scores_the_exported_view_not_the_seed(stores, toy_index):
    """SeCo: `map: view` reads cams.h5's `<fuse map>_view` (export_cams.seed_view) at 0.5."""
    base = stores
    official = {"name": "SeCo tools/infer_cam.py", "rule": "constant", "threshold": 0.5, "map": "view"}
    report = eval_seeds(base / "index.json", base / "seeds.h5",
                        dict(PARAMS, background="official", official=official),
                        base / "v" / "seed_miou.txt", cams=base / "cams.h5")
    assert report["official"]["map"] == "view"
    view = _oracle_score(base / "cams.h5", "cam_view", toy_index, 0.5)
    assert report["miou"] == pytest.approx(view, abs=1e-6)
    assert view != pytest.approx(_oracle_score(base / "seeds.h5", "seed", toy_index, 0.5), abs=1)


def test_official_protocol_errors_name_the_key(stores, tmp_path):
    base = stores
    args = (base / "index.json", base / "seeds.h5")
    with pytest.raises(ConfigError, match="eval_seeds.background: 'official' needs"):
        eval_seeds(*args, dict(PARAMS, background="official", official=None), tmp_path / "a.txt")
    view = dict(IRN, map="view")
    with pytest.raises(ConfigError, match="eval_seeds.official.map: view needs a method with one fuse"):
        eval_seeds(*args, dict(PARAMS, official=view), tmp_path / "b.txt")
    with MapWriter(tmp_path / "cams.h5", {"roles": ROLES}) as w:
        w.add("x", [1], (2, 2), {"cam": np.zeros((1, 2, 2), np.float32)})
    with pytest.raises(ConfigError, match="'cam_view', which .* does not hold; set export_cams.seed_view"):
        eval_seeds(*args, dict(PARAMS, official=view), tmp_path / "c.txt", cams=tmp_path / "cams.h5")
    with pytest.raises(ConfigError, match="official.rule: 'percentile' needs a class-agnostic"):
        eval_seeds(*args, dict(PARAMS, official={"name": "CoBra", "rule": "percentile"}), tmp_path / "d.txt")
    assert not list(tmp_path.glob("*.txt"))


def test_official_and_upsample_switches_pass_the_stage_schemas():
    base = {k: v for k, v in PARAMS.items()}
    for official in (IRN, None, {"name": "x", "rule": "percentile", "threshold": None},
                     {"name": "x", "rule": "sweep", "threshold": None,
                      "grid": {"start": 0.0, "stop": 0.59, "step": 0.01}},
                     dict(IRN, threshold=0.5, map="view")):
        check_stage_params("eval_seeds", dict(base, background="official", official=official))
    for bad, key in (({"name": "x", "rule": "constant", "threshold": None}, "official.threshold"),
                     ({"name": "x", "rule": "sweep", "threshold": None}, "official.grid")):
        with pytest.raises(ConfigError, match=key):
            check_stage_params("eval_seeds", dict(base, official=bad))
    for upsample in ("upsample_crop", "resize"):
        check_stage_params("export_cams", {"scales": [1.0], "upsample": upsample,
                                           "seed_view": {"size": 448, "scales": [1.0]}})
    with pytest.raises(ConfigError, match="upsample"):
        check_stage_params("export_cams", {"scales": [1.0], "upsample": "crop"})


# ------------------------------------------------------------------- full resolution

def test_upsample_crop_puts_the_hot_cell_where_irn_does():
    """A 40 x 56 image: its stride-16 grid is 3 x 4. One hot cell at (1, 2). IRN resizes the
    grid x16 to 48 x 64 (source coordinate (y + 0.5) / 16 - 0.5) and crops: the cell's centre
    lands between pixels 23 / 24 and 39 / 40, each at weight 31/32 per axis. Resizing straight
    to 40 x 56 puts it between 19 / 20 and 34 / 35."""
    grid = np.zeros((3, 4), dtype=np.float32)
    grid[1, 2] = 1.0
    m = torch.from_numpy(grid)[None, None]
    crop = full_resolution(m, (40, 56), (40, 56), "upsample_crop")[0, 0].numpy()
    resize = full_resolution(m, (40, 56), (40, 56), "resize")[0, 0].numpy()
    assert crop.shape == resize.shape == (40, 56)
    peak = np.argwhere(crop == crop.max())
    assert sorted(map(tuple, peak.tolist())) == [(23, 39), (23, 40), (24, 39), (24, 40)]
    assert crop.max() == pytest.approx((31 / 32) ** 2)
    peak = np.argwhere(resize > resize.max() - 1e-6)   # 40 / 3 is not exact in float
    assert sorted(map(tuple, peak.tolist())) == [(19, 34), (19, 35), (20, 34), (20, 35)]
    # every pixel, against the bilinear formula: x16 then the top-left 40 x 56, or straight
    assert np.allclose(crop, _oracle_bilinear(grid, 48, 64)[:40, :56], atol=1e-6)
    assert np.allclose(resize, _oracle_bilinear(grid, 40, 56), atol=1e-6)
    # sides that 16 divides: the two are one
    m = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full_resolution(m, (48, 64), (48, 64), "upsample_crop"),
                       full_resolution(m, (48, 64), (48, 64), "resize"))


def test_upsample_crop_targets_the_original_size_at_every_scale():
    """make_cam.py's strided_up_size comes from the original (H, W): a scale-0.5 input
    (20 x 28, grid 2 x 2) is resized to 48 x 64 too, then cropped."""
    m = torch.rand(1, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = full_resolution(m, (40, 56), (20, 28), "upsample_crop")
    want = F.interpolate(m, size=(48, 64), mode="bilinear", align_corners=False)[..., :40, :56]
    assert torch.equal(out, want)
    # a map not on its input's stride-16 grid (a ViT's floor grid, 2 x 3 for 40 x 56) is resized
    vit = torch.rand(1, 1, 2, 3)
    assert torch.equal(full_resolution(vit, (40, 56), (40, 56), "upsample_crop"),
                       F.interpolate(vit, size=(40, 56), mode="bilinear", align_corners=False))


class _HotCell:
    """A stand-in method: `cam` on the stride-16 grid of the input with one hot cell at
    (1, 2) for class 1 (the mirror's cell mirrored back), and a class-agnostic map."""
    maps = (MapSpec("cam", strided=True), MapSpec("attention", kind="agnostic", normalize=False))

    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        h, w = ((s - 1) // 16 + 1 for s in pair.shape[-2:])
        cam = torch.zeros(3, h, w)
        cam[0, 1, 2] = 1.0
        return {"cam": cam, "attention": torch.ones(1, h, w)}


def test_image_maps_upsample_crop_and_the_stride4_map():
    """export_cams' image maps of a 40 x 56 image under each switch: the full-resolution CAM
    peaks on IRN's pixels (max-normalised after the crop, as make_cam.py), the stride-4 map
    (10 x 14) is resized straight either way, as make_cam.py's strided_cam."""
    img = torch.zeros(3, 40, 56)
    crop = image_maps(_HotCell(), [img], (40, 56), [1], CPU, "upsample_crop")
    resize = image_maps(_HotCell(), [img], (40, 56), [1], CPU, "resize")
    assert crop["cam"].shape == (1, 40, 56) and crop["cam_s4"].shape == (1, 10, 14)
    assert np.unravel_index(crop["cam"][0].argmax(), (40, 56)) == (23, 39)
    assert np.unravel_index(resize["cam"][0].argmax(), (40, 56)) == (19, 34)
    assert crop["cam"].max() == pytest.approx(1.0, abs=1e-4)
    assert np.array_equal(crop["cam_s4"], resize["cam_s4"])
    assert crop["attention"].shape == (40, 56)


# ------------------------------------------------------------------------ seed view

class _Recorder:
    """A stand-in method whose `cam` is the input's first channel, mirror merged by max,
    recording each forward's input shape."""
    maps = (MapSpec("cam", strided=True), MapSpec("aux"))

    def __init__(self):
        self.shapes = []

    def map_roles(self):
        from wsss_core.map_store import MapRoles
        return MapRoles(walk="cam", fuse=("cam",))

    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(pair.shape))
        c = torch.maximum(pair[0, :1], pair[1, :1].flip(-1))
        return {"cam": torch.cat([c, 2 * c]), "aux": c}


def test_seed_view_is_secos_square_view():
    """seed_view {size: 32, scales: [1.0, 0.5]} of a 20 x 28 image: the normalised image resized
    bilinearly to 32 x 32 (image + mirror in one forward), a 16 x 16 resize of that for 0.5,
    maps back to 32 x 32, summed, class-restricted and max-normalised there, then resized to
    20 x 28; only the fuse map gets a view."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    method = _Recorder()
    out = view_maps(method, image, [2], CPU, {"size": 32, "scales": [1.0, 0.5]})
    assert list(out) == ["cam_view"] and out["cam_view"].shape == (1, 20, 28)
    assert method.shapes == [(2, 3, 32, 32), (2, 3, 16, 16)]
    x = F.interpolate(torch.from_numpy(T.to_chw(T.normalize(image)))[None], size=(32, 32),
                      mode="bilinear", align_corners=False)
    total = torch.zeros(1, 1, 32, 32)
    for v in (x, F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)):
        c = v[:, :1]   # max(image, mirror of the mirror)
        total += F.interpolate(2 * c, size=(32, 32), mode="bilinear", align_corners=False)
    total = F.relu(total)
    total = total / (total.max() + 1e-5)
    want = F.interpolate(total, size=(20, 28), mode="bilinear", align_corners=False)[0]
    assert np.allclose(out["cam_view"], want.numpy(), atol=1e-6)


# ------------------------------------------------------------------ the presets' switches

@pytest.fixture(scope="module")
def cfg(repo_root):
    from wsss_core.config import load_config
    return load_config(repo_root / "config.yaml")


def test_each_method_declares_its_official_protocol(cfg):
    """The paper preset reports each method's official number as seed_miou.txt; the tiny
    preset keeps the constant sweep and records the official number beside it. Stride-16 CNN
    methods (IRN host) upsample-then-crop; CoBra, TransCAM / BNR and SeCo resize straight, as
    their official code; the tiny preset resizes (it measures better with the Lite0)."""
    from wsss_core.config import stage_params
    want = {"cam": ("constant", 0.15, "seed"), "fbr": ("constant", 0.25, "seed"),
            "ssc": ("constant", 0.20, "seed"), "seco": ("constant", 0.5, "view"),
            "bnr": ("sweep", None, "seed"), "transcam": ("sweep", None, "seed"),
            "cobra": ("percentile", None, "seed")}
    for dataset, background in (("voc", "official"), ("toy", "constant")):
        for method, (rule, threshold, source) in want.items():
            block = stage_params(cfg, dataset, method, "eval_seeds")
            assert block["background"] == background, (dataset, method)
            official = block["official"]
            assert (official["rule"], official["threshold"], official.get("map", "seed")) == \
                (rule, threshold, source), (dataset, method)
            check_stage_params("eval_seeds", block)
            export = stage_params(cfg, dataset, method, "export_cams")
            check_stage_params("export_cams", export)
            crop = method in ("cam", "fbr", "ssc") and dataset == "voc"   # tiny: measured
            assert export["upsample"] == ("upsample_crop" if crop else "resize"), (dataset, method)
            assert (export["seed_view"] is not None) == (method == "seco"), (dataset, method)
        grid = stage_params(cfg, dataset, "transcam", "eval_seeds")["official"]["grid"]
        assert grid == {"start": 0.0, "stop": 0.59, "step": 0.01}
    assert stage_params(cfg, "voc", "seco", "export_cams")["seed_view"] == {"size": 448, "scales": [1.0]}
