"""Stage `eval_seg`: multi-scale (+ flip) inference of the trained segmentation network over a
split (val by default), an optional dense CRF on the averaged probabilities, the predicted
label maps as palette PNGs (`pred_dir/<id>.png`, so anyone can re-score them) and the mIoU.

With `--from-method` the model file is the classifier of a single-stage method
(`Method.single_stage`), whose own segmentation head (`Method.segment`) is evaluated the same
way (multi-scale + flip + CRF, as such methods' papers do), or as the block's `own_head`
says where it is set (a single-stage method's official own-head evaluation, set by its paper
preset; its page under docs/methods/ says so; `head_params`).

The network runs in this process; the CRF, CPU-bound per image, runs in a pool of `threads`
worker processes while the network goes on with the next images (at most 2 x threads images in
flight, so memory stays bounded). The workers import only `ops.crf` (numpy + pydensecrf), so the
pool starts quickly; with one thread the CRF runs in this process.
"""
from __future__ import annotations

import logging
import time
from contextlib import closing
from pathlib import Path

from tqdm import tqdm

from ..data.index import DatasetIndex
from ..errors import ConfigError, DataError
from ..io import atomic_dir, save_label_png
from ..metrics import (ConfusionMatrix, check_ground_truth, check_scorable, mask_dir_of,
                       no_ground_truth_report, write_metrics)
from ..methods import load_method
from ..models.segmentation import load_seg_model
from ..seg_inference import segment_images
from . import common

log = logging.getLogger("wsss")

#: the eval_seg keys (schemas/stages/eval_seg.schema.yaml; `wsss predict` takes them too)
EVAL_KEYS = ("scales", "flip", "crf", "crf_params")
CRF_KEYS = ("gauss_sxy", "gauss_compat", "bi_sxy", "bi_srgb", "bi_compat", "iterations")


class MethodSegmenter:
    """A single-stage method's segmentation head as the network `predict_multiscale` runs:
    images [B, 3, h, w] → class scores [B, C, h, w] (background first)."""

    def __init__(self, method) -> None:
        self.method = method

    def eval(self) -> "MethodSegmenter":
        self.method.eval()
        return self

    def __call__(self, images):
        return self.method.segment(images)


def load_predictor(model: str | Path, device, from_method: bool = False):
    """(network, record) of a segmentation model file, or with `from_method` of a single-stage
    method's classifier file (ConfigError when the method is not single-stage)."""
    if not from_method:
        return load_seg_model(model, device)
    method = load_method(model, device)
    if not method.single_stage:
        raise ConfigError(f"{model}: method {method.name!r} does not predict segmentation itself "
                          f"(single_stage is false); evaluate its segmentation network instead")
    return MethodSegmenter(method), {"model": f"method:{method.name}", "encoder": "",
                                     "num_classes": method.num_classes}


def head_params(params: dict, from_method: bool) -> dict:
    """The evaluation settings: `params`, and for a single-stage method's own head
    (`from_method`) its `own_head` block over them (a single-stage method's official own-head
    evaluation, e.g. 448·s squares, max over scales, its CRF); `square` (null) and
    `fuse` (mean) default to the shared protocol."""
    own = params.get("own_head") if from_method else None
    return {"square": None, "fuse": "mean", **{k: params[k] for k in EVAL_KEYS}, **(own or {})}


def eval_seg(index: str | Path, model: str | Path, params: dict, out: str | Path,
             pred_dir: str | Path, split: str = "val", threads: int | None = None,
             from_method: bool = False) -> dict:
    """Predict every image of `split`; write `pred_dir/<id>.png`, `out` (seg_miou.txt) and the
    seg_metrics.json beside it; return the metrics report."""
    common.set_threads(threads)
    idx = DatasetIndex.load(index)
    device = common.get_device()
    net, meta = load_predictor(model, device, from_method)
    if int(meta["num_classes"]) != idx.num_classes:
        raise DataError(f"{model}: trained for {meta['num_classes']} classes but {index} has "
                        f"{idx.num_classes}")
    params = head_params(params, from_method)
    scales = [float(s) for s in params["scales"]]
    flip, use_crf = bool(params["flip"]), bool(params["crf"])
    crf_kwargs = {k: params["crf_params"][k] for k in CRF_KEYS}
    workers = max(1, int(threads or 1))
    ids = idx.ids(split)
    check_ground_truth(idx, split, f"the predictions of {model}")  # before any prediction
    cm = ConfusionMatrix(idx.num_classes)
    t0 = time.perf_counter()
    # the one inference loop (network here, CRF in a process pool), shared with `wsss predict`
    images = ((image_id, idx.image(image_id)) for image_id in ids)
    with atomic_dir(pred_dir) as tmp, tqdm(total=len(ids), desc="eval seg", unit="img",
                                           mininterval=2.0) as bar, closing(segment_images(
            net, images, scales, flip, device, crf_kwargs if use_crf else None, workers,
            square=params["square"], fuse=params["fuse"])) as results:
        for image_id, _, label in results:
            save_label_png(tmp / f"{image_id}.png", label)
            if idx.has_mask(image_id):
                cm.update(label, idx.mask(image_id))
            bar.update(1)
    seconds = time.perf_counter() - t0
    settings = dict(split=split, split_images=len(ids), scales=scales, flip=flip, crf=use_crf,
                    crf_params=crf_kwargs if use_crf else None, square=params["square"],
                    fuse=params["fuse"], model=meta["model"],
                    encoder=meta["encoder"], seconds=round(seconds, 2))
    if not idx.mask_ids(split):  # predictions written, nothing to score them against
        report = no_ground_truth_report(**settings)
        write_metrics(out, report)
        log.warning("no ground truth: none of the %d images of %s has a mask; %d predictions "
                    "written, not scored", len(ids), split, len(ids))
        return report
    check_scorable(cm, split, mask_dir_of(idx), f"the predictions of {model}")
    report = cm.report(idx.class_names, **settings)
    write_metrics(out, report)
    log.info("seg mIoU %.2f on %s (%d images, scales %s, flip %s, crf %s) in %.1f s",
             report["miou"], split, cm.images, scales, flip, use_crf, seconds)
    return report


def main(argv: list[str] | None = None) -> int:
    p = common.parser("eval-seg", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--model", required=True, help="segmentation model.pt")
    p.add_argument("--params", required=True, type=common.json_arg, help="eval_seg parameters (JSON)")
    p.add_argument("--out", required=True, help="seg_miou.txt (seg_metrics.json beside it)")
    p.add_argument("--pred", required=True, help="folder for the predicted label PNGs")
    p.add_argument("--split", default="val")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--from-method", action="store_true",
                   help="--model is the classifier of a single-stage method: evaluate its own head")
    a = p.parse_args(argv)
    return common.run_stage(a, eval_seg, stage="eval_seg",
                            index=a.index, model=a.model, params=a.params,
                            out=a.out, pred_dir=a.pred, split=a.split, threads=a.threads,
                            from_method=a.from_method)


if __name__ == "__main__":
    raise SystemExit(main())
