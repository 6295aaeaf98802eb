"""The embedded toy dataset: layout, determinism, masks and the statistics its knobs promise."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsss_core.data import toy
from wsss_core.data.palette import IGNORE
from wsss_core.data.toy import (
    DEFAULT_CONFIG, SPLIT_TRAIN_AUG, SPLIT_VAL, ToyConfig, border_band, generate_toy, image_rng,
    plan_scene, synthesize,
)
from wsss_core.errors import ConfigError, DataError
from wsss_core.io import read_label_png
from wsss_core.stages import make_toy

SMALL = dict(image_size=64, num_train_aug=10, num_train_eval=4, num_val=5)
NUM_STAT_IMAGES = 500


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "data"
    generate_toy(out, seed=3, **SMALL)
    return out


@pytest.fixture(scope="module")
def samples() -> list:
    return [synthesize(image_rng(11, SPLIT_TRAIN_AUG, i), 112) for i in range(NUM_STAT_IMAGES)]


# ----------------------------------------------------------------------------- layout

def test_voc_layout_and_lists(small_dataset: Path):
    seg = small_dataset / "ImageSets" / "Segmentation"
    train_aug, train, val = (_lines(seg / f"{n}.txt") for n in ("train_aug", "train", "val"))
    assert len(train_aug) == SMALL["num_train_aug"] and len(val) == SMALL["num_val"]
    assert train == train_aug[: SMALL["num_train_eval"]]
    assert not set(val) & set(train_aug)
    assert len(set(train_aug)) == len(train_aug) and len(set(val)) == len(val)
    names = _lines(small_dataset / "class_names.txt")
    assert names == ["background", *toy.CLASS_NAMES] and len(names) == 9

    ids = train_aug + val
    assert sorted(p.stem for p in (small_dataset / "JPEGImages").iterdir()) == sorted(ids)
    assert sorted(p.stem for p in (small_dataset / "SegmentationClassAug").iterdir()) == sorted(ids)
    for image_id in ids:
        with Image.open(small_dataset / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            w, h = im.size
        with Image.open(small_dataset / "SegmentationClassAug" / f"{image_id}.png") as m:
            assert m.mode == "P" and m.size == (w, h)
        assert max(h, w) == SMALL["image_size"]
        lo, hi = toy.ASPECT_RANGE
        assert lo - 0.02 <= min(h, w) / max(h, w) <= hi
        mask = read_label_png(small_dataset / "SegmentationClassAug" / f"{image_id}.png")
        assert set(np.unique(mask).tolist()) <= set(range(9)) | {IGNORE}
        assert (mask != 0).any() and (mask == IGNORE).any()


def test_voc_reader_accepts_it(small_dataset: Path):
    from wsss_core.data.voc import VocLayout
    layout = VocLayout(small_dataset)
    assert layout.num_classes == 9
    image_id = _lines(small_dataset / "ImageSets" / "Segmentation" / "val.txt")[0]
    image = layout.read_image(image_id)
    assert layout.read_mask(image_id, expect_size=image.shape[:2]).shape == image.shape[:2]


# ----------------------------------------------------------------------------- determinism

def test_byte_deterministic_and_seed_dependent(tmp_path: Path, small_dataset: Path):
    again = tmp_path / "again"
    generate_toy(again, seed=3, **SMALL)
    first, second = _all_bytes(small_dataset), _all_bytes(again)
    assert first.keys() == second.keys() and len(first) == 2 * 15 + 4
    assert all(first[k] == second[k] for k in first)

    other = tmp_path / "other"
    generate_toy(other, seed=4, **SMALL)
    third = _all_bytes(other)
    images = [k for k in first if k.endswith((".jpg", ".png"))]
    assert all(first[k] != third[k] for k in images)
    lists = [k for k in first if k.endswith(".txt")]
    assert all(first[k] == third[k] for k in lists)


def test_images_depend_only_on_seed_split_index(tmp_path: Path, small_dataset: Path):
    """Changing split sizes does not change the images both sets share."""
    bigger = tmp_path / "bigger"
    generate_toy(bigger, seed=3, image_size=64, num_train_aug=12, num_train_eval=4, num_val=2)
    a, b = _all_bytes(small_dataset), _all_bytes(bigger)
    shared = [k for k in b if k in a and not k.endswith(".txt")]
    assert len(shared) == 2 * (10 + 2)
    assert all(a[k] == b[k] for k in shared)


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch):
    out = tmp_path / "data"
    real = toy.synthesize
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "synthesize", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_toy(out, seed=0, **SMALL)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    # A complete earlier dataset survives an interrupted regeneration untouched.
    monkeypatch.setattr(toy, "synthesize", real)
    generate_toy(out, seed=0, **SMALL)
    before = _all_bytes(out)
    calls["n"] = 0
    monkeypatch.setattr(toy, "synthesize", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_toy(out, seed=1, **SMALL)
    assert _all_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


@pytest.mark.parametrize("bad", [dict(num_train_eval=11), dict(image_size=8), dict(num_val=0),
                                 dict(seed=-1)])
def test_bad_arguments(tmp_path: Path, bad: dict):
    args = dict(SMALL, seed=0) | bad
    with pytest.raises(ConfigError):
        generate_toy(tmp_path / "d", **args)
    assert not (tmp_path / "d").exists()


def test_config_validation():
    with pytest.raises(ConfigError):
        ToyConfig(class_probs=(0.5,) * 8)
    with pytest.raises(ConfigError):
        ToyConfig(context_backgrounds=(("dragon", "water"),))


# ----------------------------------------------------------------------------- masks

def _band_oracle(instances: np.ndarray) -> np.ndarray:
    """Per-pixel loop: a pixel is band iff a 4-neighbour inside the image has another id."""
    h, w = instances.shape
    band = np.zeros((h, w), dtype=bool)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and instances[yy, xx] != instances[y, x]:
                    band[y, x] = True
    return band


def _dilate_oracle(band: np.ndarray) -> np.ndarray:
    h, w = band.shape
    out = np.zeros_like(band)
    for y in range(h):
        for x in range(w):
            out[y, x] = band[max(0, y - 1): y + 2, max(0, x - 1): x + 2].any()
    return out


def test_border_band_matches_loop_oracle(samples):
    for s in samples[:4]:
        expected = _band_oracle(s.instances)
        np.testing.assert_array_equal(border_band(s.instances, 1), expected)
        np.testing.assert_array_equal(s.mask == IGNORE, expected)
        np.testing.assert_array_equal(border_band(s.instances, 2), _dilate_oracle(expected))


def test_wider_band_knob():
    cfg = dataclasses.replace(DEFAULT_CONFIG, border_width=2)
    thin = synthesize(image_rng(5, 0, 0), 112)
    wide = synthesize(image_rng(5, 0, 0), 112, cfg)
    np.testing.assert_array_equal(thin.instances, wide.instances)
    assert (wide.mask == IGNORE).sum() > (thin.mask == IGNORE).sum()
    assert ((thin.mask == IGNORE) <= (wide.mask == IGNORE)).all()


def test_masks_are_voc_like(samples):
    fractions, far = [], []
    for s in samples:
        m = s.mask
        assert m.shape == s.image.shape[:2] and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) <= set(range(9)) | {IGNORE}
        # Labels outside the band are exactly the layered objects' classes.
        classes = np.array([0, *s.object_labels])[s.instances]
        keep = m != IGNORE
        np.testing.assert_array_equal(m[keep], classes[keep])
        # The band separates every pair of regions: no two different labels touch directly.
        for a, b in ((m[1:, :], m[:-1, :]), (m[:, 1:], m[:, :-1])):
            touching = (a != b) & (a != IGNORE) & (b != IGNORE)
            assert not touching.any()
        # Thin: band pixels lie next to a labelled pixel, except where a sliver of an object
        # narrower than the band is swallowed by it (a few per cent, never more than 3 px).
        ign = m == IGNORE
        steps = ndimage.distance_transform_cdt(ign, metric="chessboard")
        assert steps.max() <= 3
        far.append((steps > 1).sum() / max(ign.sum(), 1))
        fractions.append(ign.mean())
        # Image-level labels are honest: every kept object shows in the mask.
        present = set(np.unique(m).tolist()) - {0, IGNORE}
        assert present == set(s.object_labels)
    assert 0.01 < np.mean(fractions) < 0.07 and max(fractions) < 0.15
    assert np.mean(far) < 0.05 and max(far) < 0.2


# ----------------------------------------------------------------------------- statistics

def test_objects_per_image_distribution(samples):
    planned = np.bincount([s.num_planned for s in samples], minlength=4)[1:] / len(samples)
    np.testing.assert_allclose(planned, toy.OBJECTS_PER_IMAGE_PROBS, atol=0.08)
    kept = [len(s.object_labels) for s in samples]
    assert min(kept) >= 1 and max(kept) <= 3
    dropped = sum(s.dropped for s in samples)
    assert dropped <= 0.06 * sum(s.num_planned for s in samples)


def test_class_frequencies(samples):
    p_obj = np.array(toy.OBJECTS_PER_IMAGE_PROBS)
    q = np.array(toy.CLASS_PROBS)
    n = np.arange(1, len(p_obj) + 1)
    # P(class c in an image) with classes drawn with replacement for each planned object.
    expected = (p_obj[None, :] * (1 - (1 - q[:, None]) ** n[None, :])).sum(axis=1)
    present = np.zeros(len(q))
    for s in samples:
        for c in set(np.unique(s.mask).tolist()) - {0, IGNORE}:
            present[c - 1] += 1
    present /= len(samples)
    np.testing.assert_allclose(present, expected, atol=0.07)
    objects = np.bincount([c for s in samples for c in s.object_labels], minlength=9)[1:]
    np.testing.assert_allclose(objects / objects.sum(), q, atol=0.05)


def _background_oracle(cfg: ToyConfig) -> dict[tuple[str, str], tuple[float, float]]:
    """P(background | class planned) and P(background | class not planned), by enumerating
    every class sequence the knobs allow and applying the rule "the first contextual class
    claims its background with context_prob; otherwise draw from background_probs"."""
    import itertools
    names = cfg.class_names
    base = dict(cfg.background_probs)
    out = {}
    for cls, bg in cfg.context_backgrounds:
        joint_with = p_with = joint_without = p_without = 0.0
        for n, p_n in enumerate(cfg.objects_per_image_probs, start=1):
            for seq in itertools.product(range(len(names)), repeat=n):
                p_seq = p_n * float(np.prod([cfg.class_probs[c] for c in seq]))
                ctx = [cfg.typical_background(names[c]) for c in seq]
                ctx = [b for b in ctx if b is not None]
                p_bg = base.get(bg, 0.0)
                if ctx:
                    p_bg = cfg.context_prob * (ctx[0] == bg) + (1 - cfg.context_prob) * p_bg
                if names.index(cls) in seq:
                    joint_with, p_with = joint_with + p_seq * p_bg, p_with + p_seq
                else:
                    joint_without, p_without = joint_without + p_seq * p_bg, p_without + p_seq
        out[(cls, bg)] = (joint_with / p_with, joint_without / p_without)
    return out


def _check_cooccurrence(plans: list[tuple[list[int], str]], cfg: ToyConfig) -> None:
    names = list(cfg.class_names)
    for (cls, bg), (p_with, p_without) in _background_oracle(cfg).items():
        c = names.index(cls)
        with_cls = [b == bg for classes, b in plans if c in classes]
        without = [b == bg for classes, b in plans if c not in classes]
        for measured, p in ((with_cls, p_with), (without, p_without)):
            sigma = np.sqrt(p * (1 - p) / len(measured))
            assert abs(np.mean(measured) - p) < 4 * sigma, (cls, bg, np.mean(measured), p)


def test_context_cooccurrence(samples):
    assert dict(toy.CONTEXT_BACKGROUNDS) == {"boat": "water", "horse": "grass"}
    for p_with, p_without in _background_oracle(DEFAULT_CONFIG).values():
        # Usually on its background (~70-80 %), which also appears without the class.
        assert 0.7 < p_with < 0.8 and 0.05 < p_without < 0.25
    # The rendered images follow the plan ...
    _check_cooccurrence([([c - 1 for c in s.planned_labels], s.background) for s in samples],
                        DEFAULT_CONFIG)
    # ... and many cheap plans pin the rates down tightly, for the defaults and another setting.
    for cfg in (DEFAULT_CONFIG, dataclasses.replace(DEFAULT_CONFIG, context_prob=0.4)):
        rng = np.random.default_rng(0)
        _check_cooccurrence([plan_scene(rng, cfg) for _ in range(20000)], cfg)


def test_plan_statistics():
    rng = np.random.default_rng(1)
    plans = [plan_scene(rng) for _ in range(20000)]
    counts = np.bincount([len(c) for c, _ in plans], minlength=4)[1:] / len(plans)
    np.testing.assert_allclose(counts, toy.OBJECTS_PER_IMAGE_PROBS, atol=0.015)
    objects = np.bincount([c for classes, _ in plans for c in classes], minlength=8)
    np.testing.assert_allclose(objects / objects.sum(), toy.CLASS_PROBS, atol=0.01)
    skewed = dataclasses.replace(DEFAULT_CONFIG, class_probs=(0.3,) + (0.1,) * 7,
                                 objects_per_image_probs=(0.2, 0.2, 0.6))
    plans = [plan_scene(rng, skewed) for _ in range(20000)]
    counts = np.bincount([len(c) for c, _ in plans], minlength=4)[1:] / len(plans)
    np.testing.assert_allclose(counts, skewed.objects_per_image_probs, atol=0.015)
    objects = np.bincount([c for classes, _ in plans for c in classes], minlength=8)
    np.testing.assert_allclose(objects / objects.sum(), skewed.class_probs, atol=0.01)


def test_colour_is_only_a_partial_cue(samples):
    """Colour is a partial cue by design (CLASS_TINT_PROB of the objects wear their class's
    tint, as skies are blue on VOC): a nearest-centroid classifier on object colour statistics
    beats chance (1/8) but stays far from naming the class (measured 0.49)."""
    feats, labels = [], []
    for s in samples:
        for j, label in enumerate(s.object_labels):
            px = s.image[(s.instances == j + 1) & (s.mask != IGNORE)].astype(np.float64) / 255
            if len(px) >= 10:
                feats.append(np.concatenate([px.mean(0), px.std(0)]))
                labels.append(label)
    x, y = np.array(feats), np.array(labels)
    half = len(y) // 2
    centroids = np.array([x[:half][y[:half] == c].mean(0) for c in range(1, 9)])
    pred = 1 + np.argmin(((x[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y[half:]).mean()
    assert 0.2 < accuracy < 0.65


def test_val_differs_from_train():
    a = synthesize(image_rng(0, SPLIT_TRAIN_AUG, 0), 96)
    b = synthesize(image_rng(0, SPLIT_VAL, 0), 96)
    assert a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)


# ----------------------------------------------------------------------------- stage

def test_stage_main_with_grid(tmp_path: Path):
    out, grid = tmp_path / "data", tmp_path / "grid.png"
    rc = make_toy.main(["--out", str(out), "--seed", "0", "--image-size", "64",
                        "--num-train-aug", "6", "--num-train-eval", "2", "--num-val", "2",
                        "--grid", str(grid), "--grid-n", "4"])
    assert rc == 0 and (out / "JPEGImages").is_dir()
    with Image.open(grid) as im:
        assert im.mode == "RGB" and im.width > 4 * 64 and im.height > 64


def test_stage_errors_are_one_line(tmp_path: Path, capsys):
    rc = make_toy.main(["--out", str(tmp_path / "d"), "--num-train-aug", "3",
                        "--num-train-eval", "5", "--num-val", "1"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "num_train_eval" in err and "\n" not in err
    with pytest.raises(DataError):
        make_toy.write_grid(tmp_path / "missing", tmp_path / "g.png")


def test_module_entry_point(tmp_path: Path):
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "wsss_core.stages.make_toy", "--out", str(out),
                           "--image-size", "48", "--num-train-aug", "3", "--num-train-eval", "1",
                           "--num-val", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(_lines(out / "ImageSets" / "Segmentation" / "train_aug.txt")) == 3
