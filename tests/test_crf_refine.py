"""Dense CRF, process pool, dynamic thresholds, ir_label synthesis and mask rules
(docs/algorithms.md §ir-labels, §masks)."""
from __future__ import annotations

import numpy as np
import pytest

from wsss_core.ops.crf import FINAL_MASK_CRF, IR_LABEL_CRF, crf_from_labels, crf_from_probs
from wsss_core.ops.pool import map_pool
from wsss_core.ops.refine import (IRN_BG_THRESHOLD, IRN_FG_THRESHOLD, attention_thresholds,
                                  per_class_alpha_thresholds, crf_mask, full_keys, grid_bounds,
                                  ir_label, mask_per_class_alpha, mask_per_class_alpha_channels, mask_irn,
                                  to_class_ids)


def _two_region_image(h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2:] = (20, 40, 210)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2:] = 1
    return img, labels


def test_crf_keeps_clean_labelling():
    img, labels = _two_region_image()
    out = crf_from_labels(img, labels, n_labels=2)
    assert out.shape == labels.shape
    assert np.array_equal(out, labels)


def test_crf_removes_speckle_and_stays_in_label_set():
    img, labels = _two_region_image()
    noisy = labels.copy()
    noisy[10:12, 5:7] = 1          # speckle of the wrong label in a uniform region
    noisy[30, 40] = 0
    out = crf_from_labels(img, noisy, n_labels=3, **IR_LABEL_CRF.as_kwargs())
    assert np.array_equal(out, labels)
    assert set(np.unique(out)) <= set(np.unique(noisy))


def test_crf_final_mask_params_and_input_checks():
    img, labels = _two_region_image()
    assert np.array_equal(crf_from_labels(img, labels, 2, **FINAL_MASK_CRF.as_kwargs()), labels)
    assert np.array_equal(crf_from_labels(img, np.zeros_like(labels), 1), np.zeros_like(labels))
    with pytest.raises(ValueError):
        crf_from_labels(img.astype(np.float32), labels, 2)
    with pytest.raises(ValueError):
        crf_from_labels(img, labels, 1)
    # a non-contiguous view is accepted (copied C-contiguous)
    assert np.array_equal(crf_from_labels(img[:, ::-1], labels[:, ::-1], 2), labels[:, ::-1])


def test_crf_from_probs():
    img, labels = _two_region_image()
    probs = np.stack([labels == 0, labels == 1]).astype(np.float32) * 0.6 + 0.2
    probs[:, 10:12, 5:7] = probs[::-1, 10:12, 5:7]
    out = crf_from_probs(img, probs)
    assert out.shape == probs.shape
    assert np.allclose(out.sum(axis=0), 1, atol=1e-4)
    assert np.array_equal(out.argmax(axis=0), labels)


def _crf_job(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (24, 30))
    return crf_from_labels(img, labels, 3)


def test_map_pool_matches_serial():
    items = list(range(6))
    serial = map_pool(_crf_job, items, threads=1)
    pooled = map_pool(_crf_job, items, threads=2)
    assert len(pooled) == len(items)
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    assert map_pool(grid_bounds, [0.07, 0.2], threads=2) == [grid_bounds(0.07), grid_bounds(0.2)]
    assert map_pool(grid_bounds, [], threads=2) == []


# docs/algorithms.md §ir-labels (percentile): t → (bg_thr, fg_thr)
THRESHOLD_VECTORS = [(0.0, -0.05, 0.45), (0.01, 0.0, 0.5), (0.025, 0.0, 0.5), (0.05, 0.0, 0.5),
                     (0.07, 0.05, 0.55), (0.1, 0.05, 0.55), (0.125, 0.1, 0.6), (0.15, 0.1, 0.6),
                     (0.2, 0.15, 0.65), (0.333, 0.3, 0.8), (0.5, 0.45, 0.95), (1.0, 0.95, 1.45)]


@pytest.mark.parametrize("t,bg,fg", THRESHOLD_VECTORS)
def test_grid_bounds_vectors(t, bg, fg):
    lower = grid_bounds(t)[0]
    assert lower == pytest.approx(bg, abs=1e-12)
    assert lower + 0.5 == pytest.approx(fg, abs=1e-12)


def test_grid_bounds_float_noise_and_rounding():
    # the spec's "0.0999…" and "0.15000…02": Python float arithmetic, exactly as REPO
    assert grid_bounds(0.15)[0] == 0.15 - 0.05 == 0.09999999999999999
    assert grid_bounds(0.2)[0] == 0.2 - 0.05 == 0.15000000000000002
    assert grid_bounds(0.125)[0] == 0.1            # banker's rounding: round(2.5) = 2
    assert grid_bounds(0.05) == (0.0, 0.1)         # exact multiple → (r − 0.05, r + 0.05)
    assert grid_bounds(0.07) == (0.05, 0.1)        # t > r → (r, r + 0.05)
    assert grid_bounds(0.09)[0] == pytest.approx(0.05)  # t < r → (r − 0.05, r)


def test_attention_thresholds_percentile():
    att = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 101)  # 93rd percentile = 0.93
    bg, fg = attention_thresholds(att)
    assert bg == pytest.approx(0.9) and fg == pytest.approx(1.4)
    att = np.full((20, 30), 0.2)
    assert attention_thresholds(att) == (grid_bounds(0.2)[0], grid_bounds(0.2)[0] + 0.5)


def test_keys_forms():
    assert full_keys([3, 15]).tolist() == [0, 3, 15]
    assert full_keys([0, 3, 15], 2).tolist() == [0, 3, 15]
    with pytest.raises(ValueError):
        full_keys([3, 15], 3)
    assert to_class_ids(np.array([[0, 1, 2]]), [3, 15]).tolist() == [[0, 3, 15]]


def _three_band_scene():
    """Three colour bands; class-A scores strong / medium / weak; class B strong in band 3."""
    h, w = 36, 45
    img = np.zeros((h, w, 3), np.uint8)
    img[:12] = (220, 40, 40)
    img[12:24] = (40, 220, 40)
    img[24:] = (40, 40, 220)
    seeds = np.zeros((2, h, w), np.float32)
    seeds[0, :12] = 0.9        # above fg_thr → class pixels (strict pass)
    seeds[0, 12:24] = 0.3      # between bg_thr and fg_thr → ignore
    seeds[0, 24:] = 0.02       # below both → background …
    seeds[1, 24:, 30:] = 0.8   # … except where class B is confident
    img[24:, 30:] = (230, 230, 20)
    return img, seeds


def test_ir_label_combination_rule():
    img, seeds = _three_band_scene()
    out = ir_label(img, seeds, keys=[5, 12], fg_thr=0.6, bg_thr=0.1)
    assert out.dtype == np.uint8
    assert (out[:12] == 5).all()
    assert (out[12:24] == 255).all()
    assert (out[24:, :30] == 0).all()
    assert (out[24:, 30:] == 12).all()
    # the rule itself, on the two CRF passes
    table = np.array([0, 5, 12])
    passes = []
    for thr in (0.6, 0.1):
        scores = np.concatenate([np.full((1,) + seeds.shape[1:], thr, np.float32), seeds])
        passes.append(table[crf_from_labels(img, scores.argmax(0), 3)])
    fg_conf, bg_conf = passes
    expected = np.where(fg_conf > 0, fg_conf, np.where(bg_conf == 0, 0, 255))
    assert np.array_equal(out, expected)


def test_ir_label_fixed_irn_thresholds_and_no_classes():
    img, seeds = _three_band_scene()
    out = ir_label(img, seeds, [0, 5, 12], IRN_FG_THRESHOLD, IRN_BG_THRESHOLD)
    assert (out[:12] == 5).all() and (out[24:, :30] == 0).all()
    assert (out[12:24] == 255).all()  # 0.3 is not above the strict 0.30 → ignore
    empty = ir_label(img, np.zeros((0,) + seeds.shape[1:], np.float32), [], 0.6, 0.1)
    assert (empty == 0).all()


def test_mask_per_class_alpha_thresholds_and_ties():
    rw = np.zeros((2, 4, 5), np.float32)
    rw[0] = 0.1                     # class 0: min 0.1, max 1.0 → thr = 0.31 + 0.1 = 0.41
    rw[0, 0, :] = [1.0, 0.5, 0.41, 0.40, 0.2]
    rw[1] = 0.2                     # class 1: min 0.2, max 0.6 → thr = 0.186 + 0.2 = 0.386
    rw[1, 0, :] = [0.6, 0.6, 0.3, 0.6, 0.39]
    rw[1, 1, 0] = 0.5
    rw[0, 1, 0] = 0.5               # exact tie between classes → first class wins
    assert per_class_alpha_thresholds(rw).tolist() == pytest.approx([0.41, 0.386], abs=1e-6)
    channels = mask_per_class_alpha_channels(rw)
    assert channels[0].tolist() == [1, 2, 1, 2, 2]
    assert channels[1, 0] == 1
    assert (channels[2:] == 0).all()   # every class zeroed → background
    assert mask_per_class_alpha(rw, [4, 9])[0].tolist() == [4, 9, 4, 9, 9]
    # a constant class map: thr = 1.31·c > c → zeroed everywhere → background
    assert (mask_per_class_alpha(np.full((1, 3, 3), 0.5, np.float32), [7]) == 0).all()


def test_mask_irn_global_normalisation():
    rw = np.zeros((2, 2, 3), np.float32)
    rw[0, 0] = [4.0, 1.0, 0.9]   # /4 → 1.0, 0.25 (tie with bg → bg), 0.225
    rw[1, 1] = [2.0, 0.5, 1.2]   # /4 → 0.5, 0.125, 0.3
    out = mask_irn(rw, [3, 8])
    assert out.tolist() == [[3, 0, 0], [8, 0, 8]]
    assert (mask_irn(np.zeros((1, 2, 2), np.float32), [3]) == 0).all()


def test_crf_mask_chain():
    img, labels = _two_region_image()
    rw = np.stack([(labels == 0) * 0.9, (labels == 1) * 0.7]).astype(np.float32)
    rw[0, 5, 5] = 0.0
    channels = mask_per_class_alpha_channels(rw)
    out = crf_mask(img, channels, [2, 17])
    assert out.dtype == np.uint8
    assert np.array_equal(out, np.where(labels == 0, 2, 17))
