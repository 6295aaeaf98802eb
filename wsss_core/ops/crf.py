"""Dense CRF (pydensecrf) for label refinement (the process pool that runs it per image is
`ops.pool`).

Parameter sets (docs/algorithms.md §ir-labels, §masks):
* `IR_LABEL_CRF` — ir_label synthesis: Gaussian 3/3, bilateral 50/5/10, 10 iterations;
* `FINAL_MASK_CRF` — final pseudo masks: Gaussian 2/3, bilateral 45/5/4, 10 iterations.
Both with `gt_prob = 0.7`, unary from hard labels with `zero_unsure = False`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings (Potts compatibilities; pixel/colour bandwidths)."""

    gt_prob: float = 0.7
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bi_sxy: float = 50
    bi_srgb: float = 5
    bi_compat: float = 10
    iterations: int = 10

    def as_kwargs(self) -> dict[str, float]:
        return asdict(self)


IR_LABEL_CRF = CRFParams()
FINAL_MASK_CRF = CRFParams(gauss_sxy=2, gauss_compat=3, bi_sxy=45, bi_srgb=5, bi_compat=4)


def _check_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != shape:
        raise ValueError(f"CRF image {image.shape[:2]} and labels/probs {shape} differ in size")
    # pydensecrf needs a writable C-contiguous buffer; index images are read-only views
    return np.require(image, np.uint8, ["C", "W"])


def _inference(image: np.ndarray, unary: np.ndarray, n_labels: int, gauss_sxy: float,
               gauss_compat: float, bi_sxy: float, bi_srgb: float, bi_compat: float,
               iterations: int) -> np.ndarray:
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    crf.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=image, compat=bi_compat)
    return np.asarray(crf.inference(iterations), dtype=np.float32).reshape(n_labels, height, width)


def crf_from_labels(image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
                    gauss_sxy: float = 3, gauss_compat: float = 3, bi_sxy: float = 50,
                    bi_srgb: float = 5, bi_compat: float = 10, iterations: int = 10) -> np.ndarray:
    """Refine a hard labelling `labels [H, W]` (values 0..n_labels−1) on `image` (uint8 RGB).

    Unary: `−log gt_prob` for the given label, `−log((1−gt_prob)/(n_labels−1))` otherwise
    (label 0 is an ordinary label). Returns the per-pixel argmax of the marginals, int64 [H, W].
    With `n_labels == 1` the labelling is returned unchanged (nothing to decide).
    """
    labels = np.asarray(labels)
    image = _check_image(image, labels.shape)
    if n_labels < 1 or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_labels:
        raise ValueError(f"labels must lie in 0..{n_labels - 1}")
    if n_labels == 1:
        return np.zeros(labels.shape, dtype=np.int64)
    unary = unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False)
    q = _inference(image, unary, n_labels, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat,
                   iterations)
    return np.argmax(q, axis=0)


def crf_from_probs(image: np.ndarray, probs: np.ndarray, gauss_sxy: float = 3,
                   gauss_compat: float = 3, bi_sxy: float = 50, bi_srgb: float = 5,
                   bi_compat: float = 10, iterations: int = 10, gt_prob: float | None = None
                   ) -> np.ndarray:
    """Refine class probabilities `probs [n, H, W]` (unary `−log p`) → marginals `[n, H, W]`.

    `gt_prob` is accepted (and ignored) so that `**CRFParams.as_kwargs()` can be passed.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be [n, H, W], got {probs.shape}")
    image = _check_image(image, probs.shape[1:])
    unary = unary_from_softmax(probs)
    return _inference(image, unary, probs.shape[0], gauss_sxy, gauss_compat, bi_sxy, bi_srgb,
                      bi_compat, iterations)
