"""Seed fusion recipes and the seed → label-map rules (docs/algorithms.md §seeds): a
constant background score, or a per-image one read from a class-agnostic map at a percentile.

A recipe combines the class maps a method declares for fusion (its `fuse` role, in order; all
per-class and max-normalised, each [K, H, W]) into one seed map [K, H, W]:
  * `max`: the pixel-wise maximum (one map: the map itself);
  * `mean`: the mean;
  * `max_mean_last`: the mean of the maximum and the last map, (max(a, b) + b) / 2 for two maps
    — the fusion that trusts the last map's extent most (docs/algorithms.md §seeds).
Any other recipe names one exported class map, used alone.
"""
from __future__ import annotations

from functools import reduce
from typing import Callable, Sequence

import numpy as np

#: recipe → fusion of the ordered maps it is given
RECIPES: dict[str, Callable[[Sequence[np.ndarray]], np.ndarray]] = {
    "max": lambda maps: reduce(np.maximum, maps),
    "mean": lambda maps: reduce(np.add, maps) / len(maps),
    "max_mean_last": lambda maps: (reduce(np.maximum, maps) + maps[-1]) / 2,
}


def recipe_inputs(recipe: str, fuse_maps: Sequence[str]) -> tuple[str, ...]:
    """Names of the maps `recipe` reads, in order: the method's fuse maps for a recipe of
    RECIPES, else the one map the recipe names."""
    return tuple(fuse_maps) if recipe in RECIPES else (recipe,)


def fuse(recipe: str, maps: Sequence[np.ndarray]) -> np.ndarray:
    """The seed of `maps` (ordered as `recipe_inputs` gives them) under `recipe`."""
    if recipe in RECIPES:
        return RECIPES[recipe](list(maps))
    (only,) = maps
    return only


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
    map [H, W] (float32, numpy's default linear interpolation over all H·W values), as in
    docs/algorithms.md §seed-protocols."""
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
