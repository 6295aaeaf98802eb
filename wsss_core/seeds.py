"""Seed fusion recipes and the seed → label-map rules (cobra.md §7): a constant background
score, or a per-image one read from a class-agnostic map at a percentile."""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

#: recipe → (maps it needs, fusion of those maps); all maps are per-class, max-normalised
RECIPES: dict[str, tuple[tuple[str, ...], Callable[..., np.ndarray]]] = {
    "cam": (("cam",), lambda cam: cam),
    "cnn": (("cnn",), lambda cnn: cnn),
    "vit": (("vit",), lambda vit: vit),
    "max": (("cnn", "vit"), lambda cnn, vit: np.maximum(cnn, vit)),
    "mean": (("cnn", "vit"), lambda cnn, vit: (cnn + vit) / 2),
    "cobra": (("cnn", "vit"), lambda cnn, vit: (np.maximum(cnn, vit) + vit) / 2),
}


def fuse(recipe: str, maps: Mapping[str, np.ndarray]) -> np.ndarray:
    names, fn = RECIPES[recipe]
    return fn(*(maps[n] for n in names))


def seed_labels(seed: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Prepend a constant background score, argmax (background wins ties), map through keys."""
    return seed_labels_sweep(seed, keys, [threshold])[0]


def seed_labels_sweep(seed: np.ndarray, keys: np.ndarray, thresholds) -> list[np.ndarray]:
    """`seed_labels` at every threshold, with the per-pixel argmax and max computed once."""
    if seed.shape[0] == 0:
        return [np.zeros(seed.shape[1:], dtype=np.uint8) for _ in thresholds]
    best = np.asarray(keys)[seed.argmax(axis=0)].astype(np.uint8)
    peak = seed.max(axis=0)
    return [np.where(peak > t, best, 0).astype(np.uint8) for t in thresholds]


def percentile_backgrounds(agnostic: np.ndarray, percentiles) -> np.ndarray:
    """Per-image background scores [len(percentiles)]: the θ-th percentiles of a class-agnostic
    map [H, W] (float32, numpy's default linear interpolation over all H·W values), the
    [OFFICIAL] rule of CoBra's `step/eval_cam.py` (cobra.md §7)."""
    return np.percentile(np.asarray(agnostic, dtype=np.float32), list(percentiles))


def percentile_seed_labels_sweep(seed: np.ndarray, keys: np.ndarray, agnostic: np.ndarray,
                                 percentiles) -> list[np.ndarray]:
    """`seed_labels` of one image at each percentile θ: the background score is
    `percentile_backgrounds(agnostic, θ)` of that image's own map, so it adapts per image.

    seed [K, H, W] class maps, keys [K] class ids, agnostic [H, W]; returns uint8 [H, W] label
    maps, one per θ (background wins ties, as with a constant score)."""
    if agnostic.shape != seed.shape[1:]:
        raise ValueError(f"class-agnostic map {agnostic.shape} and seed {seed.shape[1:]} differ in size")
    return seed_labels_sweep(seed, keys, percentile_backgrounds(agnostic, percentiles).tolist())
