"""IRN training-label synthesis and pseudo-mask rules (docs/algorithms.md §ir-labels, §masks).

* `attention_thresholds` — per-image fg/bg thresholds from a class-agnostic (attention) map;
* `ir_label` — strict + lenient CRF passes combined into an ir_label (0 bg, ids, 255 ignore);
  IRN's fixed thresholds are `IRN_FG_THRESHOLD` / `IRN_BG_THRESHOLD`;
* `mask_irn` / `mask_per_class_alpha` — propagated maps `rw_up` → uint8 ids without CRF; with CRF the
  stage chains `crf_mask(image, mask_per_class_alpha_channels(rw_up), keys)` (CRF on the K+1 channel
  labels with `FINAL_MASK_CRF`, then keys).

`keys` everywhere: either the K segmentation ids of the K foreground channels (1..20 for VOC),
or the reference's `[0, k₁, …, k_K]` of length K+1 — a leading 0 cannot be a class id, so the
two forms are unambiguous. Arrays are numpy; torch tensors are accepted and converted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import numpy as np

from ..data.palette import IGNORE
from .crf import FINAL_MASK_CRF, IR_LABEL_CRF, CRFParams, crf_from_labels

#: IRN-REPO fixed confidence thresholds (docs/algorithms.md §irn, `--conf_fg_thres` / `--conf_bg_thres`)
IRN_FG_THRESHOLD = 0.30
IRN_BG_THRESHOLD = 0.05


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def full_keys(keys, n_channels: int | None = None) -> np.ndarray:
    """Channel → segmentation id table `[0, k₁, …, k_K]` (int64, length K+1).

    A leading 0 marks the full form (0 is never a class id); otherwise 0 is prepended.
    `n_channels` (K), when given, is checked against the table.
    """
    keys = _as_numpy(keys).astype(np.int64).reshape(-1)
    table = keys if keys.size and keys[0] == 0 else np.concatenate([[0], keys])
    if n_channels is not None and table.shape[0] != n_channels + 1:
        raise ValueError(f"keys {keys.tolist()} do not match {n_channels} class channels "
                         f"(give the {n_channels} class ids, or [0] + them)")
    if (table[1:] <= 0).any():
        raise ValueError(f"class ids in keys must be positive, got {keys.tolist()}")
    return table


def to_class_ids(channel_labels, keys) -> np.ndarray:
    """Map channel labels (0 = background, i = i-th class channel) to uint8 segmentation ids."""
    return full_keys(keys)[_as_numpy(channel_labels)].astype(np.uint8)


def grid_bounds(t: float, grid: float = 0.05) -> tuple[float, float]:
    """The multiples of `grid` around `t` (docs/algorithms.md §ir-labels, Python float arithmetic).

    `r = round(t/grid)·grid` with Python's banker's `round`; `t == r` → `(r − grid, r + grid)`,
    `t < r` → `(r − grid, r)`, else `(r, r + grid)`. The lower bound is the largest multiple of
    `grid` strictly below `t` (up to float noise).
    """
    steps = round(1.0 / grid)
    if abs(steps * grid - 1.0) > 1e-9:
        raise ValueError(f"grid must divide 1 (got {grid})")
    t = float(t)
    r = round(t * steps) / steps
    if t == r:
        return r - grid, r + grid
    if t < r:
        return r - grid, r
    return r, r + grid


def attention_thresholds(attention_hr, percentile: float = 93.0, grid: float = 0.05,
                         gap: float = 0.5) -> tuple[float, float]:
    """Dynamic IRN thresholds `(bg_thr, fg_thr)` from a full-res class-agnostic map [H, W]
    (docs/algorithms.md §ir-labels).

    `t = percentile(attention, 93)` (numpy linear), `bg_thr = grid_bounds(t)[0]`,
    `fg_thr = bg_thr + gap`.
    """
    t = float(np.percentile(_as_numpy(attention_hr), percentile))
    bg = grid_bounds(t, grid)[0]
    return bg, bg + gap


def _crf_kwargs(crf_params: CRFParams | Mapping | None) -> dict:
    if crf_params is None:
        return {}
    if isinstance(crf_params, CRFParams):
        return crf_params.as_kwargs()
    return dict(crf_params)


def ir_label(image: np.ndarray, seed_maps, keys, fg_thr: float, bg_thr: float,
             crf_params: CRFParams | Mapping | None = IR_LABEL_CRF) -> np.ndarray:
    """IRN training label from seed maps (docs/algorithms.md §ir-labels).

    Args:
        image: uint8 RGB `[H, W, 3]`.
        seed_maps: `[K, H, W]` class maps (K = the image's foreground classes).
        keys: class ids of the K channels (or `[0, k₁, …]`).
        fg_thr, bg_thr: constant background score of the strict / lenient pass.
        crf_params: dense-CRF settings (`None` → `crf_from_labels` defaults, which equal
            `IR_LABEL_CRF`).
    Returns:
        uint8 `[H, W]`: class ids where the strict pass says foreground, 0 where both passes
        say background, 255 (ignore) where only the lenient pass says foreground.
    """
    seeds = _as_numpy(seed_maps).astype(np.float32)
    if seeds.ndim != 3:
        raise ValueError(f"seed_maps must be [K, H, W], got {seeds.shape}")
    table = full_keys(keys, seeds.shape[0])
    kwargs = _crf_kwargs(crf_params)

    def one_pass(threshold: float) -> np.ndarray:
        scores = np.concatenate([np.full((1,) + seeds.shape[1:], threshold, np.float32), seeds])
        labels = np.argmax(scores, axis=0)
        return table[crf_from_labels(image, labels, n_labels=table.shape[0], **kwargs)]

    fg_conf = one_pass(fg_thr)
    bg_conf = one_pass(bg_thr)
    out = fg_conf.copy()
    out[fg_conf == 0] = IGNORE
    out[(fg_conf == 0) & (bg_conf == 0)] = 0
    return out.astype(np.uint8)


def mask_irn_channels(rw_up, bg: float = 0.25) -> np.ndarray:
    """IRN rule (docs/algorithms.md §irn) → channel labels `[H, W]` (0 = background, i = i-th class)."""
    rw = _as_numpy(rw_up).astype(np.float32)
    peak = float(rw.max(initial=0.0))
    if peak > 0:  # an all-zero map has no foreground (the reference would divide by zero)
        rw = rw / peak
    scores = np.concatenate([np.full((1,) + rw.shape[1:], bg, np.float32), rw])
    return np.argmax(scores, axis=0)


def per_class_alpha_thresholds(rw_up, alpha: float = 0.31) -> np.ndarray:
    """Per-class thresholds `α·max_c + min_c` of `rw_up [K, H, W]` → `[K]` (K may be 0: an
    image without a foreground class)."""
    rw = _as_numpy(rw_up).astype(np.float32)
    flat = rw.reshape(rw.shape[0], int(np.prod(rw.shape[1:])))
    return alpha * flat.max(axis=1) + flat.min(axis=1)


def mask_per_class_alpha_channels(rw_up, alpha: float = 0.31) -> np.ndarray:
    """`per_class_alpha` rule (docs/algorithms.md §masks) → channel labels `[H, W]` (0 = background, i = i-th class).

    Zero every class below `α·max_c + min_c`, prepend a zero background channel, argmax
    (first index wins ties, so pixels with every class zeroed become background).
    """
    rw = _as_numpy(rw_up).astype(np.float32)
    thr = per_class_alpha_thresholds(rw, alpha)
    rw = np.where(rw < thr[:, None, None], np.float32(0), rw)
    scores = np.concatenate([np.zeros((1,) + rw.shape[1:], np.float32), rw])
    return np.argmax(scores, axis=0)


def mask_irn(rw_up, keys, bg: float = 0.25) -> np.ndarray:
    """IRN pseudo mask: global-max normalisation, constant bg channel `bg`, argmax → uint8 ids."""
    channels = mask_irn_channels(rw_up, bg)
    return full_keys(keys, _as_numpy(rw_up).shape[0])[channels].astype(np.uint8)


def mask_per_class_alpha(rw_up, keys, alpha: float = 0.31) -> np.ndarray:
    """`per_class_alpha` pseudo mask without CRF (per-class relative threshold) → uint8 segmentation ids."""
    channels = mask_per_class_alpha_channels(rw_up, alpha)
    return full_keys(keys, _as_numpy(rw_up).shape[0])[channels].astype(np.uint8)


def crf_mask(image: np.ndarray, channel_labels, keys,
             crf_params: CRFParams | Mapping = FINAL_MASK_CRF) -> np.ndarray:
    """Final-mask CRF on channel labels (`n_labels = K+1`), then map through keys → uint8 ids.

    Chain after `mask_per_class_alpha_channels` / `mask_irn_channels` (the CRF must see the K+1 channel
    labels, not the 0..20 ids: the unary depends on the label count).
    """
    table = full_keys(keys)
    refined = crf_from_labels(image, _as_numpy(channel_labels), n_labels=table.shape[0],
                              **_crf_kwargs(crf_params))
    return table[refined].astype(np.uint8)


__all__: Sequence[str] = (
    "IRN_FG_THRESHOLD", "IRN_BG_THRESHOLD", "full_keys", "to_class_ids", "grid_bounds",
    "attention_thresholds", "ir_label", "mask_irn", "mask_irn_channels", "mask_per_class_alpha",
    "mask_per_class_alpha_channels", "per_class_alpha_thresholds", "crf_mask")
