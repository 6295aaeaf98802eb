"""The pseudo-mask rules (docs/algorithms.md §masks): propagated maps → label map, shared by
mask writing and the threshold sweep.

* `global_max`: global max normalisation and a constant background score `bg` (IRN);
* `per_class_alpha`: per class, scores below `alpha·max_c + min_c` are dropped, then argmax
  against a zero background.
"""
from __future__ import annotations

import numpy as np

from ..ops.crf import CRFParams
from ..ops.refine import crf_mask, full_keys, mask_irn_channels, mask_per_class_alpha_channels


def mask_channels(rw_up: np.ndarray, rule: str, threshold: float) -> np.ndarray:
    """Channel labels (0 = background, i = i-th present class) under `rule`."""
    if rule == "per_class_alpha":
        return mask_per_class_alpha_channels(rw_up, alpha=threshold)
    if rule == "global_max":
        return mask_irn_channels(rw_up, bg=threshold)
    raise ValueError(f"unknown mask rule {rule!r}")


#: the parameter each rule thresholds with
RULE_PARAMETER = {"global_max": "bg", "per_class_alpha": "alpha"}


def rule_threshold(params: dict) -> float:
    """The configured threshold of the mask rule (`bg` or `alpha`)."""
    return params[RULE_PARAMETER[params["rule"]]]


def pseudo_mask(image: np.ndarray | None, rw_up: np.ndarray, keys: np.ndarray, params: dict,
                threshold: float | None = None, crf: bool | None = None) -> np.ndarray:
    """uint8 segmentation ids of one image (optionally CRF-refined on the channel labels)."""
    t = rule_threshold(params) if threshold is None else threshold
    channels = mask_channels(rw_up, params["rule"], t)
    use_crf = params["crf"] if crf is None else crf
    if use_crf and rw_up.shape[0] and image is not None:
        return crf_mask(image, channels, keys, CRFParams(**params["crf_params"]))
    return full_keys(keys, rw_up.shape[0])[channels].astype(np.uint8)
