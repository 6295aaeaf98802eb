"""Segment new images with a trained model: `wsss predict --model MODEL --images PATH --out DIR`.

MODEL is a segmentation network (`results/<dataset>/<method>/seg/model.pt`), or with
`--from-method` the classifier of a single-stage method (its own segmentation head). PATH is an
image, a folder of images (not recursive) or a list file (.txt/.lst: one image path a line,
relative to the list's folder; blank lines and `#` comments skipped). Images may have any size.

Inference is eval_seg's, by the same code (`seg_inference.segment_images`): multi-scale (+ flip)
softmax averaging at the image's own size, then the dense CRF in a pool of `--threads`
processes while the network goes on. Each forward holds one image and its mirror, so images of
different sizes need no resizing and the labels equal eval_seg's for the same model and
parameters. `--params` takes eval_seg's keys as JSON; keys not given keep the defaults below
(the eval_seg block of the `tiny` preset: one scale, flip, CRF).

Output, written into a temporary folder renamed into place only when every image is done:
DIR/<image stem>.png (VOC palette PNG, class index per pixel), DIR/overlay/<stem>.jpg with
`--overlay` (classes coloured over the photo), and DIR/predict.json (model, parameters, classes
and the source of every PNG). An existing DIR is replaced only when it is an earlier predict
output. Bad input (missing path, unreadable image, empty folder, model file of the wrong kind)
stops with one line naming the file and exit code 2, writing nothing.
"""
from __future__ import annotations

import argparse
import copy
import logging
import time
from contextlib import closing
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..checkpoint import load_checkpoint
from ..data.palette import IGNORE, voc_palette
from ..data.voc import IMAGE_SUFFIXES, read_image
from ..errors import ConfigError, DataError, WeightsError
from ..io import atomic_dir, read_user_text, save_label_png, write_json
from ..seg_inference import segment_images
from . import common
from .eval_seg import CRF_KEYS, EVAL_KEYS, head_params, load_predictor

log = logging.getLogger("wsss")

#: parameters when --params leaves a key out: the `tiny` preset's eval_seg block
DEFAULT_PARAMS = {"scales": [1.0], "flip": True, "crf": True,
                  "crf_params": {"gauss_sxy": 1, "gauss_compat": 3, "bi_sxy": 67, "bi_srgb": 3,
                                 "bi_compat": 4, "iterations": 10}}
LIST_SUFFIXES = (".txt", ".lst")
#: the file that marks a folder as predict output (only such a folder is ever replaced)
RECORD = "predict.json"
OVERLAY_ALPHA = 0.5


def resolve_params(params: dict | None) -> dict:
    """eval_seg parameters: `params` (any subset of scales / flip / crf / crf_params, and of the
    CRF keys) over DEFAULT_PARAMS. Raises ConfigError naming an unknown key or a bad scale."""
    params = dict(params or {})
    own_head = params.pop("own_head", None)  # eval_seg's own-head block (--from-method only)
    unknown = sorted(set(params) - set(EVAL_KEYS))
    if unknown:
        raise ConfigError(f"--params key {unknown[0]!r} unknown; use {', '.join(EVAL_KEYS)}")
    crf_params = dict(params.pop("crf_params", None) or {})
    unknown = sorted(set(crf_params) - set(CRF_KEYS) - {"gt_prob"})
    if unknown:
        raise ConfigError(f"--params crf_params key {unknown[0]!r} unknown; use {', '.join(CRF_KEYS)}")
    resolved = copy.deepcopy(DEFAULT_PARAMS)
    resolved.update(params)
    resolved["crf_params"].update({k: v for k, v in crf_params.items() if k in CRF_KEYS})
    scales = resolved["scales"]
    if (not isinstance(scales, list) or not scales
            or not all(isinstance(s, (int, float)) and s > 0 for s in scales)):
        raise ConfigError(f"--params scales must be a non-empty list of positive numbers, "
                          f"e.g. [0.75, 1.0, 1.25], not {scales!r}")
    resolved["scales"] = [float(s) for s in scales]
    resolved["flip"], resolved["crf"] = bool(resolved["flip"]), bool(resolved["crf"])
    resolved["own_head"] = own_head
    return resolved


def collect_images(path: str | Path) -> list[Path]:
    """The image files `path` names: itself (an image), the images of a folder (suffixes
    IMAGE_SUFFIXES, any case, hidden files skipped, name order) or the paths of a list file
    (LIST_SUFFIXES). Each is checked to exist and to open as an image (header only).

    Raises DataError (one line naming the file and the fix) for a missing path, a folder or list
    without images, a listed file that is missing or not an image, or two images with the same
    stem (their PNGs would collide)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; give an image, a folder of images or a "
                        f"list file (.txt, one image path a line)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder; "
                            f"point --images at a folder that holds the images themselves")
    elif path.suffix.lower() in LIST_SUFFIXES:
        lines = [line.strip() for line in read_user_text(path).split("\n")]
        files = [(path.parent / Path(line).expanduser()) for line in lines
                 if line and not line.startswith("#")]
        if not files:
            raise DataError(f"{path}: the list names no images; write one image path a line")
        for file in files:
            if not file.is_file():
                raise DataError(f"{file}: image not found (listed in {path}); fix the list or "
                                f"restore the file")
    else:
        files = [path]
    seen: dict[str, Path] = {}
    for file in files:
        _check_image(file)
        if file.stem in seen and file.resolve() == seen[file.stem].resolve():
            raise DataError(f"{file}: listed twice; remove the duplicate line")
        if file.stem in seen:
            raise DataError(f"{file}: same name as {seen[file.stem]}, both would be written as "
                            f"{file.stem}.png; rename one or predict them in separate runs")
        seen[file.stem] = file
    return files


def _check_image(file: Path) -> None:
    try:
        with Image.open(file) as img:
            img.size  # noqa: B018 - the header is enough here; decoding errors come later
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{file}: not a readable image ({type(e).__name__}); give image files "
                        f"({', '.join(IMAGE_SUFFIXES)}) or remove it from the input") from None


def model_kind(path: str | Path) -> str | None:
    """The `kind` a wsss model file records ("segmentation", "classifier", "irn"), None when it
    records none. Raises DataError when the file is missing or unreadable."""
    kind = load_checkpoint(path, map_location="cpu").get("kind")
    return kind if isinstance(kind, str) else None


def wrong_kind(path: str | Path, kind: str | None, command: str) -> WeightsError:
    """The one-line error for a model file of the wrong kind given to `command`."""
    if kind == "classifier":
        fix = ("give the segmentation network results/<dataset>/<method>/seg/model.pt"
               + (", or add --from-method for a single-stage method's classifier"
                  if command == "predict" else ""))
    elif kind == "segmentation":
        fix = "drop --from-method (it is for a single-stage method's classifier/model.pt)"
    else:
        fix = "give results/<dataset>/<method>/seg/model.pt, written by train_seg"
    return WeightsError(f"{path}: a {kind or 'non-wsss'} model file, which `wsss {command}` "
                        f"cannot use; {fix}")


def load_model(model: str | Path, device, from_method: bool = False):
    """(network, record) as eval_seg loads them (`load_predictor`), with the WeightsError of a
    model file of the wrong kind saying which file to give instead."""
    try:
        return load_predictor(model, device, from_method)
    except WeightsError:
        raise wrong_kind(model, model_kind(model), "predict") from None
    except ConfigError as e:  # a classifier of a method that is not single-stage
        raise WeightsError(f"{e}; give its seg/model.pt without --from-method") from None


def overlay_image(image: np.ndarray, label: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 [H,W,3]: the photo with every non-background, non-ignore pixel of the uint8 [H,W]
    `label` blended with its VOC palette colour (weight `alpha`)."""
    colours = voc_palette()[label].astype(np.float32)
    blend = image.astype(np.float32) * (1 - alpha) + colours * alpha
    show = ((label != 0) & (label != IGNORE))[..., None]
    return np.where(show, blend, image).round().astype(np.uint8)


def _ensure_replaceable(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file()):
        raise ConfigError(f"{out}: exists and is not an earlier `wsss predict` output (no "
                          f"{RECORD}); choose a new --out folder or empty this one")


def predict(model: str | Path, images: str | Path, out: str | Path, params: dict | None = None,
            overlay: bool = False, threads: int | None = None, from_method: bool = False) -> dict:
    """Segment the images `images` names (`collect_images`) with `model`; write
    `out/<stem>.png` (uint8 class index per pixel, VOC palette, the image's own H x W), with
    `overlay` `out/overlay/<stem>.jpg`, and `out/predict.json`; return that record.

    `params`: eval_seg keys over DEFAULT_PARAMS (`resolve_params`). `threads`: torch threads and
    CRF worker processes (default 1). Runs on `common.get_device()` (CUDA when present, or
    WSSS_DEVICE). Raises DataError / ConfigError / WeightsError before writing anything for bad
    input; an image that fails to decode midway leaves no output either."""
    out = Path(out).expanduser()
    resolved = resolve_params(params)
    files = collect_images(images)
    _ensure_replaceable(out)
    common.set_threads(threads)
    device = common.get_device()
    net, meta = load_model(model, device, from_method)
    resolved = head_params(resolved, from_method)
    crf_params = resolved["crf_params"] if resolved["crf"] else None
    workers = max(1, int(threads or 1))
    record = {"model": str(model), "architecture": meta["model"], "encoder": meta["encoder"],
              "num_classes": int(meta["num_classes"]), "class_names": meta.get("class_names"),
              "params": resolved, "device": str(device), "images": {}}
    t0 = time.perf_counter()

    def decoded() -> Iterator[tuple[Path, np.ndarray]]:
        for file in files:
            yield file, read_image(file)

    with atomic_dir(out) as tmp, tqdm(total=len(files), desc="predict", unit="img",
                                      mininterval=1.0) as bar, closing(segment_images(
            net, decoded(), resolved["scales"], resolved["flip"], device, crf_params,
            workers, square=resolved["square"], fuse=resolved["fuse"])) as results:
        if overlay:
            (tmp / "overlay").mkdir()
        for file, image, label in results:
            save_label_png(tmp / f"{file.stem}.png", label)
            if overlay:
                Image.fromarray(overlay_image(image, label)).save(
                    tmp / "overlay" / f"{file.stem}.jpg", quality=90)
            record["images"][f"{file.stem}.png"] = str(file)
            bar.update(1)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / RECORD, record)
    log.info("predicted %d images into %s (scales %s, flip %s, crf %s, %s) in %.1f s",
             len(files), out, resolved["scales"], resolved["flip"], resolved["crf"], device,
             record["seconds"])
    return record


def main(argv: list[str] | None = None) -> int:
    p = common.parser("predict", __doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True,
                   help="results/<dataset>/<method>/seg/model.pt (or a single-stage method's "
                        "classifier/model.pt with --from-method)")
    p.add_argument("--images", required=True,
                   help="an image, a folder of images or a list file (.txt/.lst, one path a line)")
    p.add_argument("--out", required=True, help="output folder (replaced if an earlier predict output)")
    p.add_argument("--params", type=common.json_arg, default=None,
                   help="eval_seg keys as JSON over the defaults, e.g. "
                        "'{\"scales\": [0.75, 1, 1.25], \"crf\": false}'")
    p.add_argument("--overlay", action="store_true", help="also write overlay/<stem>.jpg colour overlays")
    p.add_argument("--threads", type=int, default=None, help="torch threads and CRF processes (default 1)")
    p.add_argument("--from-method", action="store_true",
                   help="--model is the classifier of a single-stage method: use its own head")
    a = p.parse_args(argv)
    return common.run_stage(a, predict, model=a.model, images=a.images, out=a.out, params=a.params,
                            overlay=a.overlay, threads=a.threads, from_method=a.from_method)


if __name__ == "__main__":
    raise SystemExit(main())
