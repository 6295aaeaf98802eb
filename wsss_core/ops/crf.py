"""Dense CRF (pydensecrf) for label refinement, and a process-pool helper for per-image CPU work.

Parameter sets (docs/algorithms.md §ir-labels, §masks):
* `IR_LABEL_CRF` — ir_label synthesis: Gaussian 3/3, bilateral 50/5/10, 10 iterations;
* `FINAL_MASK_CRF` — final pseudo masks: Gaussian 2/3, bilateral 45/5/4, 10 iterations.
Both with `gt_prob = 0.7`, unary from hard labels with `zero_unsure = False`.
"""
from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, TypeVar

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

T = TypeVar("T")
R = TypeVar("R")


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


def die_with(stage_pid: int) -> None:
    """Pool initializer (`initargs=(os.getpid(),)`): the worker ends as soon as the stage's
    process `stage_pid` is gone. A SIGKILLed stage otherwise leaves its workers running, and
    with them the fork server and multiprocessing's resource tracker (both stay up while any
    worker holds their pipes). The parent-death signal cannot do this: under `forkserver` a
    worker's parent is the fork server, which waits for its workers."""
    def watch() -> None:
        try:
            select.select([os.pidfd_open(stage_pid)], [], [])  # readable once it has exited
        except (AttributeError, OSError):  # no pidfd (old kernel), or already gone: poll
            while _running(stage_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-stage", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _init_worker(stage_pid: int) -> None:
    die_with(stage_pid)
    # one BLAS/OpenMP thread per process: the pool itself provides the parallelism
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def pool_chunks(items: list[T], threads: int) -> list[tuple[T, ...]]:
    """`items` dealt round-robin into about 4 chunks per worker: a job per chunk opens the
    dataset index and the map stores once, not once per image."""
    n = max(1, int(threads)) * 4
    return [c for c in (tuple(items[i::n]) for i in range(n)) if c]


def map_pool(fn: Callable[[T], R], items: Iterable[T], threads: int = 1) -> list[R]:
    """`[fn(x) for x in items]`, spread over `threads` worker processes, results in input order.

    `threads <= 1` (or a single item) runs a plain loop in this process. Workers are started
    with the `forkserver` method (safe with an initialised torch), so `fn` and the items must be
    picklable (a module-level function and plain data such as ids and paths).
    """
    items = list(items)
    workers = min(int(threads), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    chunksize = max(1, len(items) // (workers * 4))
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))
