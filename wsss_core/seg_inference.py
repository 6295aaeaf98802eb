"""Inference of a segmentation network (eval_seg, predict, export_model's size divisor).
Its training parts live elsewhere: the augmentation in data/seg_dataset.py (`SegTrainAugment`),
the loss in models/segmentation.py (`segmentation_loss`), the loop in engine.py.

Multi-scale (+ flip) softmax averaging at the image's own size, then an optional
dense-CRF callable (`predict_multiscale`); over many images, with the CRF in a process pool
while the network goes on (`segment_images`, the one loop of eval_seg and predict).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Hashable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.transforms import normalize, to_chw
from .ops.crf import crf_from_probs
from .ops.pool import die_with

#: smp encoders need input sides divisible by their total stride (32 for both presets)
SIZE_DIVISOR = 32

#: crf(image_uint8 [H,W,3], probs [C,H,W]) -> refined probs [C,H,W]
CRFFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: CRF jobs in flight per worker: enough to keep every worker busy, few enough to bound memory
IN_FLIGHT_PER_WORKER = 2
K = TypeVar("K", bound=Hashable)


def _pad_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    # zero after ImageNet normalisation = the mean colour, as in training-time padding
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0) if pad_h or pad_w else x


#: `fuse` values of predict_multiscale: softmax averaged over flips and scales | a single-stage
#: method's official own-head fusion (logits summed over the flip, element-wise max over scales)
FUSE_MODES = ("mean", "max")


@torch.inference_mode()
def predict_multiscale(model: nn.Module, image_uint8: np.ndarray, scales: Sequence[float],
                       flip: bool, device: torch.device | str,
                       crf: CRFFn | None = None, square: int | None = None,
                       fuse: str = "mean") -> np.ndarray:
    """Class probabilities float32 [C,H,W] of one uint8 [H,W,3] image: for each scale, resize
    (bilinear), pad to a multiple of 32, run the image together with its mirror in one batch,
    softmax, crop, un-mirror and average, resize to H×W; average over scales; then `crf`.

    `square` (a single-stage method's official own-head evaluation): each scale s resizes the
    normalised image to int(square·s) × int(square·s) (aspect not kept, bilinear, no
    antialias) and feeds it unpadded. `fuse="max"` (same source): per scale the logits of
    the image and of its un-mirrored mirror, each bilinear to H×W, are summed; the scales'
    logits are fused by element-wise max and one softmax follows."""
    if not scales:
        raise ValueError("predict_multiscale needs at least one scale")
    if fuse not in FUSE_MODES:
        raise ValueError(f"predict_multiscale: fuse {fuse!r} is not one of {', '.join(FUSE_MODES)}")
    device = torch.device(device)
    model.eval()
    h, w = image_uint8.shape[:2]
    base = torch.from_numpy(to_chw(normalize(image_uint8)))[None].to(device)
    if fuse == "max":
        return _predict_max(model, base, (h, w), scales, flip, device, image_uint8, crf, square)
    probs_sum: torch.Tensor | None = None
    for scale in scales:
        size, logits = _scale_logits(model, base, scale, flip, device, square)
        probs = logits.softmax(dim=1)
        if flip:
            probs = (probs[:1] + probs[1:].flip(-1)) / 2
        if size != (h, w):
            # bilinear weights are convex, so the resized maps still sum to 1 per pixel
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        probs_sum = probs if probs_sum is None else probs_sum + probs
    result = (probs_sum[0] / len(scales)).cpu().numpy().astype(np.float32)
    if crf is not None:
        result = np.asarray(crf(image_uint8, result), dtype=np.float32)
    return result


def _scale_logits(model: nn.Module, base: torch.Tensor, scale: float, flip: bool,
                  device: torch.device, square: int | None) -> tuple[tuple[int, int], torch.Tensor]:
    """(size, float logits [1 or 2, C, *size]) of the normalised image `base` [1, 3, H, W] at
    one scale: the image's own size × scale (bilinear, antialiased below 1, padded to a
    multiple of SIZE_DIVISOR and cropped back), or with `square` an int(square·scale) square
    fed unpadded; with `flip` the mirror is the second row (still mirrored)."""
    h, w = base.shape[-2:]
    size = ((max(1, int(square * scale)),) * 2 if square
            else (max(1, int(round(h * scale))), max(1, int(round(w * scale)))))
    x = base if size == (h, w) else F.interpolate(
        base, size=size, mode="bilinear", align_corners=False, antialias=scale < 1 and not square)
    batch = torch.cat([x, x.flip(-1)]) if flip else x
    with torch.autocast(device_type=device.type, enabled=device.type == "cuda"):
        logits = model(batch if square else _pad_to_multiple(batch, SIZE_DIVISOR))
    return size, logits[..., :size[0], :size[1]].float()


def _predict_max(model: nn.Module, base: torch.Tensor, hw: tuple[int, int],
                 scales: Sequence[float], flip: bool, device: torch.device,
                 image_uint8: np.ndarray, crf: CRFFn | None, square: int | None) -> np.ndarray:
    """predict_multiscale with fuse="max" (a single-stage method's official own-head
    evaluation): per scale the (flip-summed) logits at H×W, element-wise max over scales,
    softmax, then `crf`."""
    fused: torch.Tensor | None = None
    for scale in scales:
        _, logits = _scale_logits(model, base, scale, flip, device, square)
        logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        logits = logits[:1] + logits[1:].flip(-1) if flip else logits
        fused = logits if fused is None else torch.maximum(fused, logits)
    result = fused[0].softmax(dim=0).cpu().numpy().astype(np.float32)
    if crf is not None:
        result = np.asarray(crf(image_uint8, result), dtype=np.float32)
    return result


class _Done:
    """The `result()` interface of a Future for a value computed in this process."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def segment_images(model: nn.Module, images: Iterable[tuple[K, np.ndarray]],
                   scales: Sequence[float], flip: bool, device: torch.device | str,
                   crf_params: Mapping[str, float] | None = None,
                   workers: int = 1, square: int | None = None,
                   fuse: str = "mean") -> Iterator[tuple[K, np.ndarray, np.ndarray]]:
    """Segment a stream of images: yield (key, image, label) per `(key, image)` of `images`,
    in input order; image uint8 [H,W,3] as given, label uint8 [H,W] = argmax over classes of
    `predict_multiscale(model, image, scales, flip, device, square=, fuse=)`, refined first
    by the dense CRF
    (`ops.crf.crf_from_probs(**crf_params)`) when `crf_params` is given.

    The network runs in this process; the CRF, CPU-bound per image, runs in a pool of
    `workers` processes (forkserver, importing only `ops.crf`) while the network goes on with
    the next images, at most IN_FLIGHT_PER_WORKER x workers images in flight, so memory stays
    bounded; with one worker the CRF runs in this process. Close the generator (or exhaust it)
    to stop the pool: `with contextlib.closing(segment_images(...)) as results: ...`.
    Errors raised by `images` (an unreadable file) pass through unchanged."""
    scales = [float(s) for s in scales]
    workers = max(1, int(workers or 1))
    # a module-level function with plain kwargs: picklable, and unpickling imports only ops.crf
    crf_fn: CRFFn | None = (functools.partial(crf_from_probs, **crf_params)
                            if crf_params is not None else None)
    pool = (ProcessPoolExecutor(max_workers=workers, initializer=die_with, initargs=(os.getpid(),),
                                mp_context=multiprocessing.get_context("forkserver"))
            if crf_fn is not None and workers > 1 else None)
    pending: deque[tuple[K, np.ndarray, Future | _Done]] = deque()

    def finish(key: K, image: np.ndarray, scores: Future | _Done):
        return key, image, np.argmax(scores.result(), axis=0).astype(np.uint8)

    try:
        for key, image in images:
            probs = predict_multiscale(model, image, scales, flip, device, square=square, fuse=fuse)
            if crf_fn is None:
                yield finish(key, image, _Done(probs))
            elif pool is None:
                # pydensecrf needs a writable buffer; a decoded image may be read-only
                yield finish(key, image, _Done(crf_fn(np.array(image), probs)))
            else:
                pending.append((key, image, pool.submit(crf_fn, image, probs)))
                while len(pending) > workers * IN_FLIGHT_PER_WORKER:
                    yield finish(*pending.popleft())
        while pending:
            yield finish(*pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
