"""Export a trained segmentation network: `wsss export-model --model seg/model.pt --out DIR`.

Writes, into a temporary folder renamed into place when complete:
  DIR/model.torchscript.pt  TorchScript (traced; `torch.jit.load`), model.json also stored in it
                            as the extra file `model.json`
  DIR/model.onnx            ONNX (classic TorchScript-based exporter, opset 17), the same
                            metadata as `metadata_props` (lists and maps as JSON text)
  DIR/model.json            the metadata: class names, input normalisation, size constraints

Both take `image` float32 [N, 3, H, W]: RGB scaled to 0..1, minus `mean`, divided by `std`
(ImageNet statistics, as in training), H and W multiples of `size_multiple` (32: pad at the
bottom / right with 0, the mean colour after normalisation, and crop the output back; N, H and W
are dynamic). They return `logits` float32 [N, num_classes, H, W] (no softmax; class 0 is the
background). After writing, the export is checked: TorchScript and ONNX Runtime (CPU, when
installed) against PyTorch on one input, the largest differences recorded in model.json.
Multi-scale, flip and CRF are not part of the export (see `wsss predict` for those).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, WeightsError, WSSSError
from ..io import atomic_dir
from ..models.segmentation import load_seg_model
from ..seg_inference import SIZE_DIVISOR
from . import common
from .predict import model_kind, wrong_kind

log = logging.getLogger("wsss")

FORMAT = "wsss-exported-segmentation/1"
TORCHSCRIPT, ONNX, METADATA = "model.torchscript.pt", "model.onnx", "model.json"
OPSET = 17
#: the traced / checked example input size (any multiple of SIZE_DIVISOR works afterwards)
EXAMPLE_HW = (2 * SIZE_DIVISOR, 3 * SIZE_DIVISOR)
#: the largest ONNX vs PyTorch logit difference accepted by the check after the export
ONNX_ATOL = 1e-4


class ExportError(WSSSError):
    """The network could not be exported, or the exported files disagree with PyTorch."""


def metadata(record: dict, source: str | Path) -> dict:
    """The metadata of an exported network (JSON-able): format, source file and its SHA-256,
    architecture, encoder, classes, the input contract (`input`) and the output (`output`)."""
    names = record.get("class_names") or [str(c) for c in range(int(record["num_classes"]))]
    return {
        "format": FORMAT,
        "source": str(source),
        "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
        "architecture": record["model"],
        "encoder": record["encoder"],
        "num_classes": int(record["num_classes"]),
        "class_names": list(names),
        "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "scale": 1 / 255, "mean": [float(v) for v in IMAGENET_MEAN],
                  "std": [float(v) for v in IMAGENET_STD],
                  "size_multiple": SIZE_DIVISOR, "pad_value": 0.0, "pad": "bottom, right",
                  # the encoder's deepest stride (SegFormer's MiT has a fixed 32)
                  "output_stride": int(record["output_stride"]) if record["model"] == "deeplabv3plus"
                  else SIZE_DIVISOR},
        "output": {"name": "logits", "layout": "NCHW", "dtype": "float32",
                   "size": "input H x W", "softmax": False, "background_class": 0},
        "files": {"torchscript": TORCHSCRIPT, "onnx": ONNX},
        "onnx_opset": OPSET,
    }


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("export-model needs the onnx package: pip install onnx "
                          "(onnxruntime too, for the check after the export)") from None
    return onnx


def export_model(model: str | Path, out: str | Path, check: bool = True) -> dict:
    """Export the segmentation network of `model` (a seg/model.pt written by train_seg) to
    `out`/{model.torchscript.pt, model.onnx, model.json}; return the metadata written.

    With `check`, the TorchScript module and (when onnxruntime is installed) the ONNX model run
    on one random normalised input of EXAMPLE_HW beside PyTorch; ExportError when ONNX differs
    by more than ONNX_ATOL. Raises DataError / WeightsError (one line naming the file) for a
    missing, unreadable or non-segmentation model file, ConfigError when onnx is missing or
    `out` is a file or a foreign non-empty folder; nothing is written then."""
    onnx = _onnx()
    out = Path(out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / METADATA).is_file()):
        raise ConfigError(f"{out}: exists and is not an earlier export (no {METADATA}); choose a "
                          f"new --out folder or empty this one")
    try:
        net, record = load_seg_model(model, "cpu")
    except WeightsError:
        raise wrong_kind(model, model_kind(model), "export-model") from None
    net = net.float().eval()
    meta = metadata(record, model)
    example = torch.randn(1, 3, *EXAMPLE_HW, generator=torch.Generator().manual_seed(0))
    with atomic_dir(out) as tmp:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # tracing warns about every Python int taken from a shape; sizes stay dynamic
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, example, check_trace=False)
            torch.jit.save(traced, str(tmp / TORCHSCRIPT),
                           _extra_files={METADATA: json.dumps(meta, indent=2)})
            try:
                torch.onnx.export(net, (example,), str(tmp / ONNX), dynamo=False,
                                  opset_version=OPSET, input_names=["image"],
                                  output_names=["logits"],
                                  dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                                "logits": {0: "batch", 2: "height", 3: "width"}})
            except Exception as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ExportError(f"{model}: ONNX export of {meta['architecture']} / "
                                  f"{meta['encoder']} failed ({reason})") from None
        proto = onnx.load(str(tmp / ONNX))
        onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v)
                                            for k, v in meta.items()})
        onnx.save(proto, str(tmp / ONNX))
        if check:
            meta["check"] = _check(net, tmp, example, model)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %s (%s / %s, %d classes) to %s", model, meta["architecture"],
             meta["encoder"], meta["num_classes"], out)
    return meta


def _check(net: torch.nn.Module, folder: Path, example: torch.Tensor, model) -> dict:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        expected = net(example).numpy()
        scripted = torch.jit.load(str(folder / TORCHSCRIPT), map_location="cpu")(example).numpy()
    result = {"input_hw": list(example.shape[-2:]),
              "torchscript_max_abs_diff": float(np.abs(scripted - expected).max())}
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: the ONNX file was not checked")
        return result
    session = onnxruntime.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": example.numpy()})[0]
    diff = float(np.abs(logits - expected).max())
    if not diff <= ONNX_ATOL:
        raise ExportError(f"{model}: the ONNX model's logits differ from PyTorch's by {diff:.2g} "
                          f"(> {ONNX_ATOL}); report this with the model's architecture and encoder")
    result["onnx_max_abs_diff"] = diff
    return result


def main(argv: list[str] | None = None) -> int:
    p = common.parser("export-model", __doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, help="results/<dataset>/<method>/seg/model.pt")
    p.add_argument("--out", required=True, help="output folder (replaced if an earlier export)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the exported files against PyTorch after the export")
    a = p.parse_args(argv)
    return common.run_stage(a, export_model, model=a.model, out=a.out, check=not a.no_check)


if __name__ == "__main__":
    raise SystemExit(main())
