"""Metrics against a per-pixel loop written from the definitions, plus the specs' golden values."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from wsss_core import metrics
from wsss_core.metrics import ConfusionMatrix, read_miou, write_metrics

IGNORE = 255
NUM_CLASSES = 6
#: class 3 never occurs in ground truth or prediction; class 5 only in predictions
PRESENT_GT = np.array([0, 1, 2, 4])
PRESENT_PRED = np.array([0, 1, 2, 4, 5])


# ------------------------------------------------------------------------------ the oracle

def oracle(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> dict:
    """Per-class counts from pixel sets, one pixel at a time (no confusion-matrix algebra)."""
    matrix = [[0] * n for _ in range(n)]
    in_gt = [0] * n      # ground-truth pixels of class c (not ignored)
    in_pred = [0] * n    # scored pixels predicted as c
    hit = [0] * n        # both
    for pred, gt in pairs:
        for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
            if g == IGNORE:
                continue
            if p == IGNORE:
                p = 0
            matrix[g][p] += 1
            in_gt[g] += 1
            in_pred[p] += 1
            if p == g:
                hit[g] += 1
    iou, precision, recall, fp_tp = [], [], [], []
    for c in range(n):
        union = in_gt[c] + in_pred[c] - hit[c]
        iou.append(hit[c] / union if union else math.nan)
        precision.append(hit[c] / in_pred[c] if in_pred[c] else math.nan)
        recall.append(hit[c] / in_gt[c] if in_gt[c] else math.nan)
        fp_tp.append((in_pred[c] - hit[c]) / hit[c] if hit[c] else math.nan)
    valid = [v for v in iou if not math.isnan(v)]
    fg_tp = sum(hit[1:])
    fg_fp = sum(in_pred[c] - hit[c] for c in range(1, n))
    return {
        "matrix": np.array(matrix), "iou": np.array(iou), "miou": sum(valid) / len(valid),
        "precision": np.array(precision), "recall": np.array(recall), "fp_tp": np.array(fp_tp),
        "overall_fp_tp": fg_fp / fg_tp if fg_tp else math.nan,
    }


def pair_oracle(pairs, cls: int, other: int) -> float:
    confused = tp = 0
    for pred, gt in pairs:
        for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
            if g == IGNORE:
                continue
            p = 0 if p == IGNORE else p
            confused += int(g == other and p == cls)
            tp += int(g == cls and p == cls)
    return confused / tp if tp else math.nan


def random_pairs(seed: int, count: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """Label maps of varied sizes; gt has 255 pixels, predictions have 255 and a spurious class."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        h, w = rng.integers(5, 24, size=2)
        gt = rng.choice(PRESENT_GT, size=(h, w)).astype(np.uint8)
        # predictions agree with gt on ~half of the pixels, so IoUs are far from 0 and 1
        pred = np.where(rng.random((h, w)) < 0.5, gt, rng.choice(PRESENT_PRED, size=(h, w)))
        pred = pred.astype(np.uint8)
        gt[rng.random((h, w)) < 0.15] = IGNORE
        pred[rng.random((h, w)) < 0.1] = IGNORE
        pairs.append((pred, gt))
    return pairs


def accumulate(pairs, n: int = NUM_CLASSES) -> ConfusionMatrix:
    cm = ConfusionMatrix(n)
    for pred, gt in pairs:
        cm.update(pred, gt)
    return cm


# ------------------------------------------------------------------------------ vs the oracle

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_metrics_match_the_per_pixel_oracle(seed: int):
    pairs = random_pairs(seed)
    cm = accumulate(pairs)
    ref = oracle(pairs, NUM_CLASSES)
    np.testing.assert_array_equal(cm.matrix, ref["matrix"])
    for name in ("iou", "precision", "recall"):
        np.testing.assert_allclose(getattr(cm, name)(), ref[name], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(cm.fp_tp_ratio(), ref["fp_tp"], rtol=1e-12, equal_nan=True)
    assert cm.miou() == pytest.approx(ref["miou"], rel=1e-12)
    assert cm.overall_fp_tp() == pytest.approx(ref["overall_fp_tp"], rel=1e-12)
    assert cm.images == len(pairs)
    for cls, other in [(1, 0), (1, 2), (4, 1), (2, 5), (3, 1)]:
        expected = pair_oracle(pairs, cls, other)
        got = cm.pair_confusion(cls, other)
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = accumulate(random_pairs(3))
    iou = cm.iou()
    assert math.isnan(iou[3])                      # in neither prediction nor ground truth
    assert iou[5] == 0.0                           # predicted only: counts, with IoU 0
    assert math.isnan(cm.recall()[5]) and cm.precision()[5] == 0.0
    valid = [v for i, v in enumerate(iou) if i != 3]
    assert cm.miou() == pytest.approx(sum(valid) / len(valid))
    # had the absent class counted as 0 the mean would be lower
    assert cm.miou() > float(np.nan_to_num(iou).mean())


def test_ignore_in_ground_truth_is_skipped_and_in_prediction_is_background():
    gt = np.array([[1, IGNORE], [2, 0]], np.uint8)
    pred = np.array([[IGNORE, 2], [2, IGNORE]], np.uint8)
    cm = accumulate([(pred, gt)], 3)
    expected = np.zeros((3, 3), np.int64)
    expected[1, 0] = 1   # gt 1 predicted 255 → background
    expected[2, 2] = 1
    expected[0, 0] = 1   # gt 0 predicted 255 → background, a hit
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.sum() == 3  # the gt-255 pixel is not counted at all


def test_streaming_equals_one_big_update_and_merge():
    pairs = random_pairs(4, count=6)
    per_image = accumulate(pairs)
    big = ConfusionMatrix(NUM_CLASSES)
    big.update(np.concatenate([p.reshape(-1) for p, _ in pairs]),
               np.concatenate([g.reshape(-1) for _, g in pairs]))
    np.testing.assert_array_equal(per_image.matrix, big.matrix)
    first, second = accumulate(pairs[:2]), accumulate(pairs[2:])
    first.merge(second)
    np.testing.assert_array_equal(first.matrix, per_image.matrix)
    assert first.images == per_image.images == 6


def test_out_of_range_labels_and_shape_mismatch_are_rejected():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="ground-truth"):
        cm.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 3, np.uint8))
    with pytest.raises(ValueError, match="predicted"):
        cm.update(np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8))
    assert cm.matrix.sum() == 0 and cm.images == 0


def test_empty_matrix_has_nan_miou():
    cm = ConfusionMatrix(4)
    cm.update(np.zeros((2, 2), np.uint8), np.full((2, 2), IGNORE, np.uint8))
    assert math.isnan(cm.miou()) and math.isnan(cm.overall_fp_tp())


# ------------------------------------------------------------------------------ golden values

def test_irn_worked_example():
    """docs/algorithms.md §miou: pred [[0,1],[1,1]], gt [[0,1],[ignore,0]]."""
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [IGNORE, 0]]))
    np.testing.assert_array_equal(cm.matrix, [[1, 1], [0, 1]])
    np.testing.assert_allclose(cm.iou(), [0.5, 0.5])
    assert cm.miou() == 0.5


#: CoBra paper, supp. Tab. 8: per-class IoU (bg, aero, ..., tv) | reported mIoU
COBRA_TABLES = {
    "seed_train": ("85.26 59.90 37.03 68.79 48.30 58.55 77.13 68.00 70.89 29.19 72.04 55.53 "
                   "75.68 70.55 70.74 63.74 56.70 76.71 56.86 64.81 41.41", 62.28),
    "mask_train": ("90.70 79.83 42.42 83.74 68.26 71.63 86.42 79.88 87.39 32.75 85.23 62.48 "
                   "86.86 82.84 78.19 76.83 64.50 88.33 75.03 73.46 45.87", 73.45),
    "r101_val": ("92.17 85.53 45.47 86.9 72.64 77.89 89.67 84.26 86.33 37.94 80.32 47.49 "
                 "84.79 83.11 80.87 83.72 61.13 82.77 52.61 82.36 56.25", 74.01),
    "r101_test": ("94.97 90.03 37.24 85.43 64.3 71.84 93.02 86.33 91.82 25.2 83.42 59.62 "
                  "87.59 85.53 86.48 84.38 64.14 85.33 57.84 73.24 44.97", 73.94),
    "mitb2_val": ("94.90 87.39 36.08 89.63 72.17 74.55 92.12 84.27 92.47 28.45 92.54 45.57 "
                  "88.29 87.44 80.74 83.71 64.38 93.13 48.92 78.17 45.37", 74.30),
    "mitb2_test": ("95.79 89.88 35.74 82.82 65.33 70.51 90.87 85.75 94.08 24.92 87.13 60.80 "
                   "89.87 86.52 86.50 84.17 65.83 87.55 55.58 71.50 47.08", 74.20),
}


def matrix_with_ious(iou: np.ndarray, spill: int = 1_000_000) -> np.ndarray:
    """A confusion matrix with the given per-class IoUs.

    Class c sends `spill` pixels to class c+1 (cyclically), so fn_c = fp_{c+1} = spill and
    IoU_c = tp_c / (tp_c + 2 spill), i.e. tp_c = 2 spill IoU_c / (1 - IoU_c).
    """
    n = len(iou)
    m = np.zeros((n, n), np.int64)
    m[np.arange(n), np.arange(n)] = np.round(2 * spill * iou / (1 - iou)).astype(np.int64)
    m[np.arange(n), (np.arange(n) + 1) % n] = spill
    return m


@pytest.mark.parametrize("table", sorted(COBRA_TABLES))
def test_cobra_per_class_tables_reproduce_reported_miou(table: str):
    values, reported = COBRA_TABLES[table]
    per_class = np.array([float(v) for v in values.split()]) / 100
    assert len(per_class) == 21
    cm = ConfusionMatrix(21)
    cm.matrix = matrix_with_ious(per_class)
    np.testing.assert_allclose(cm.iou(), per_class, atol=1e-6)
    assert abs(cm.miou() * 100 - reported) <= 0.01 + 1e-6
    assert abs(cm.report(["c"] * 21)["miou"] - reported) <= 0.01 + 1e-6


# ------------------------------------------------------------------------------ writer

def test_report_contents():
    pairs = random_pairs(5)
    cm = accumulate(pairs)
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    rep = cm.report(names, threshold=0.3)
    json.dumps(rep, allow_nan=False)  # strictly JSON: NaN became null
    assert rep["miou"] == pytest.approx(cm.miou() * 100)
    assert rep["iou"]["class3"] is None and rep["recall"]["class5"] is None
    assert rep["iou"]["class1"] == pytest.approx(cm.iou()[1], abs=1e-6)
    assert rep["threshold"] == 0.3 and rep["images"] == len(pairs)
    assert rep["confusion"] == cm.matrix.tolist()


def test_write_metrics_one_number_two_decimals(tmp_path):
    cm = accumulate(random_pairs(6))
    rep = cm.report([f"c{i}" for i in range(NUM_CLASSES)])
    miou_path = tmp_path / "seed_miou.txt"
    write_metrics(miou_path, rep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_metrics.json", "seed_miou.txt"]
    text = miou_path.read_text()
    assert re.fullmatch(r"\d+\.\d\d\n?", text), text
    saved = json.loads((tmp_path / "seed_metrics.json").read_text())
    assert text.strip() == f"{saved['miou']:.2f}"
    assert read_miou(miou_path) == pytest.approx(saved["miou"], abs=0.005)
    assert 0 < saved["miou"] <= 100


def test_write_metrics_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    rep = accumulate(random_pairs(7)).report([f"c{i}" for i in range(NUM_CLASSES)])

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        write_metrics(tmp_path / "mask_miou.txt", rep)
    assert list(tmp_path.iterdir()) == []  # neither output nor temporary file


def test_metrics_module_keeps_no_per_image_maps():
    """Streaming: the object holds only the C x C counts, whatever the number of images."""
    cm = accumulate(random_pairs(8, count=6))
    arrays = [v for v in vars(cm).values() if isinstance(v, np.ndarray)]
    assert [a.shape for a in arrays] == [(NUM_CLASSES, NUM_CLASSES)]
    assert metrics.IGNORE == IGNORE
