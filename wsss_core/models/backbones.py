"""Backbones built through timm, reshaped to the WSSS conventions.

IRN-style ResNets: strides are placed on the first block of a layer (no dilation anywhere);
`strides = (conv1, layer2, layer3, layer4)` with layer1 and the max-pool fixed (1 and 2), so
(2, 2, 2, 1) gives output stride 16 and (2, 2, 1, 1) stride 8. BatchNorm is "frozen": it
always normalises with the stored running statistics, while its affine parameters stay
trainable where gradients reach them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
from timm.models import build_model_with_cfg, get_pretrained_cfg, register_model, split_model_name_tag
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from .efficientnet_lite import OFFLINE_WEIGHTS


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that never updates or uses batch statistics (train or eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def batchnorm_eval(module: nn.Module) -> nn.Module:
    """Put every BatchNorm of `module` in eval mode (in place; call after `train()`): they
    normalise with their running statistics and never update them, while their affine weights
    still train. The modules stay, unlike `freeze_batchnorm_stats`, so timm's `BatchNormAct2d`
    keeps the activation it carries."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return module


def freeze_batchnorm_stats(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a FrozenStatsBatchNorm2d."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FrozenStatsBatchNorm2d):
            frozen = FrozenStatsBatchNorm2d(child.num_features, eps=child.eps, affine=child.affine)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm_stats(child)
    return module


#: read by timm's `register_model` from this module: the configs of the models defined here
default_cfgs = generate_default_cfgs({"resnet_tiny.untrained": {"num_classes": 0, "input_size": (3, 96, 96)}})


@register_model
def resnet_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
    """A ResNet-10 with a 3-conv stem 16 wide and stages 16/32/64/96: ~10x cheaper than
    resnet18 at 96 px, so a CPU can take the hundreds of steps training from scratch needs.
    Registered with timm, so smp builds it as the segmentation encoder `tu-resnet_tiny`."""
    if pretrained:
        raise WeightsError("backbone resnet_tiny: no pretrained weights exist; set pretrained: false")
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 96),
                stem_type="deep", stem_width=16, num_classes=0)
    return build_model_with_cfg(ResNet, "resnet_tiny", False, **dict(args, **kwargs))


def pretrained_source(name: str) -> tuple[str, str, str]:
    """(architecture, weights tag, where timm downloads them from) of a tagged timm name
    `<architecture>.<tag>`, e.g. `resnet152.tv_in1k` → torchvision's IMAGENET1K_V1 file.

    Nothing is downloaded. Raises WeightsError for a name without a tag (timm would silently
    pick its default, e.g. `resnet152.a1h_in1k`, weights trained with another recipe than the
    papers used) or with a tag timm does not know.
    """
    arch, tag = split_model_name_tag(name)
    if not tag:
        default = ""
        try:
            default = f" (timm's default would be {arch}.{get_pretrained_cfg(arch).tag})"
        except Exception:  # an unknown architecture or one without weights: named below anyway
            pass
        raise WeightsError(f"backbone {name}: name the ImageNet weights with an explicit timm tag, "
                           f"<model>.<tag>, e.g. resnet152.tv_in1k{default}")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:
        raise WeightsError(f"backbone {name}: {e}") from None
    if cfg is None:
        raise WeightsError(f"backbone {name}: timm knows no weights of that name")
    return arch, tag, cfg.url or (f"hf-hub:{cfg.hf_hub_id}" if cfg.hf_hub_id else "")


def create_timm(name: str, pretrained: bool = False, pretrained_file: str | None = None,
                **kwargs) -> nn.Module:
    """timm.create_model with the project's weight policy: a local file, the weights shipped
    in a Python package (`efficientnet_lite.OFFLINE_WEIGHTS`: `tf_efficientnet_lite0` to
    `_lite2`, no network), the timm cache/hub, or a one-line WeightsError naming what was
    looked for.

    With `pretrained` and no `pretrained_file`, `name` must carry an explicit weights tag
    (`pretrained_source`), so no default tag is ever implied — except for the packaged offline
    weights, which are the only weights that name can mean here. `pretrained_file` is the
    offline route: a checkpoint with the state dict the tagged weights have (e.g. torchvision's
    `resnet152-394f9c45.pth` for `resnet152.tv_in1k`), read by timm's loader.
    """
    if pretrained and not pretrained_file and name.split(".")[0] in OFFLINE_WEIGHTS:
        model = timm.create_model(name.split(".")[0], pretrained=False, **kwargs)
        load_offline_weights(model, name.split(".")[0])
        return model
    if pretrained and not pretrained_file:
        pretrained_source(name)
    if pretrained and pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: pretrained weights for {name} not found; download them "
                               f"there or set pretrained_file to the right path")
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except WeightsError:  # a model defined here that has no weights says so itself
        raise
    except RuntimeError as e:  # unknown model name
        raise WeightsError(f"backbone {name}: {e}") from None
    except Exception as e:  # hub unreachable and nothing cached
        if not pretrained:
            raise
        raise WeightsError(
            f"backbone {name}: ImageNet weights not in the timm/Hugging Face cache and not "
            f"downloadable ({type(e).__name__}); set model.pretrained_file to a local "
            f"checkpoint or pre-fetch them with timm.create_model('{name}', pretrained=True)"
        ) from None


def load_offline_weights(model: nn.Module, name: str, prefix: str = "") -> None:
    """Load `OFFLINE_WEIGHTS[name]` strictly into `model` (keys under `prefix`); the ImageNet
    head's tensors are dropped when the model has none (num_classes=0, features_only, smp
    encoders). Raises WeightsError naming missing/unexpected keys."""
    state = {prefix + k: v for k, v in OFFLINE_WEIGHTS[name]().items()}
    own = model.state_dict()
    head = tuple(prefix + h for h in ("conv_head.", "bn2.", "classifier."))
    state = {k: v for k, v in state.items() if k in own or not k.startswith(head)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(f"backbone {name}: offline weights do not fit the model (missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]})")
    nn.Module.load_state_dict(model, state, strict=True)


def timm_key_map(stages: nn.Module, net: nn.Module) -> dict[str, str]:
    """{state-dict key in `stages`: the same tensor's key in `net`}, for a stage split built from
    the modules of the timm model `net` (matched by tensor identity, so no naming rule is
    written twice). Lets weights trained in the split go back into timm-named models, such as
    smp's `tu-` encoders."""
    names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    return {k: names[id(t)] for k, t in stages.state_dict(keep_vars=True).items()}


class ResNetStages(nn.Module):
    """A timm ResNet split into the five IRN stages: stem (conv1..max-pool), layer1..layer4."""

    def __init__(self, name: str, strides: Sequence[int] = (2, 2, 2, 1), pretrained: bool = False,
                 pretrained_file: str | None = None, frozen_bn: bool = True) -> None:
        super().__init__()
        net = create_timm(name, pretrained=pretrained, pretrained_file=pretrained_file)
        if not all(hasattr(net, a) for a in ("conv1", "bn1", "maxpool", "layer4")):
            raise WeightsError(f"backbone {name}: not a ResNet-style timm model (need conv1 .. layer4)")
        if len(strides) != 4:
            raise ValueError("strides = (conv1, layer2, layer3, layer4)")
        _set_stride(net.conv1, strides[0])
        for layer, s in zip((net.layer2, net.layer3, net.layer4), strides[1:]):
            _set_layer_stride(layer, s)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = [
            _out_channels(self.stem), _out_channels(net.layer1), _out_channels(net.layer2),
            _out_channels(net.layer3), _out_channels(net.layer4)]
        self.strides = tuple(strides)
        self.output_stride = 2 * strides[0] * strides[1] * strides[2] * strides[3]
        self.timm_keys = timm_key_map(self, net)
        if frozen_bn:
            freeze_batchnorm_stats(self)

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages():
            x = stage(x)
            feats.append(x)
        return feats


class EfficientNetStages(nn.Module):
    """A timm EfficientNet(-Lite) split into the five IRN stages, strides as `ResNetStages`.

    stem = conv_stem, bn1, blocks[0], blocks[1][0] (stride 4); layer1 = blocks[1][1:] (4);
    layer2 = blocks[2] (8); layer3 = blocks[3..4] (16); layer4 = blocks[5..6], conv_head, bn2
    (32, or 16 / 8 with the strides below). `strides = (conv_stem, layer2, layer3, layer4)` go on
    the first conv that strides in each (no dilation, as for the ResNets); (2, 2, 2, 1) gives
    output stride 16, (2, 2, 1, 1) stride 8. Layer4 ends with the ImageNet head's 1x1 conv
    (1280 channels), the features the pretrained classifier reads.

    `frozen_bn` keeps every BatchNorm in eval mode (running statistics, never updated) whatever
    `train()` is called with; the modules are not replaced, because timm's `BatchNormAct2d`
    carries the block's activation (ReLU6 for Lite) and a plain BN in its place drops it.
    """

    def __init__(self, name: str, strides: Sequence[int] = (2, 2, 2, 1), pretrained: bool = False,
                 pretrained_file: str | None = None, frozen_bn: bool = True) -> None:
        super().__init__()
        net = create_timm(name, pretrained=pretrained, pretrained_file=pretrained_file)
        if len(strides) != 4:
            raise ValueError("strides = (conv_stem, layer2, layer3, layer4)")
        if len(net.blocks) != 7 or len(net.blocks[1]) < 2:
            raise WeightsError(f"backbone {name}: not an EfficientNet with 7 stages")
        for module, s in zip((net.conv_stem, net.blocks[2][0], net.blocks[3][0], net.blocks[5][0]),
                             strides):
            conv = module if isinstance(module, nn.Conv2d) else module.conv_dw
            conv.stride = (s, s)
        b = net.blocks
        self.stem = nn.Sequential(net.conv_stem, net.bn1, b[0], b[1][0])
        self.layer1 = nn.Sequential(*b[1][1:])
        self.layer2 = b[2]
        self.layer3 = nn.Sequential(b[3], b[4])
        self.layer4 = nn.Sequential(b[5], b[6], net.conv_head, net.bn2)
        self.out_channels = [b[1][0].conv_pwl.out_channels, b[1][-1].conv_pwl.out_channels,
                             b[2][-1].conv_pwl.out_channels, b[4][-1].conv_pwl.out_channels,
                             net.conv_head.out_channels]
        self.strides = tuple(strides)
        self.output_stride = 2 * strides[0] * strides[1] * strides[2] * strides[3]
        self.timm_keys = timm_key_map(self, net)
        self.frozen_bn = frozen_bn

    def train(self, mode: bool = True) -> "EfficientNetStages":
        super().train(mode)
        if self.frozen_bn:
            batchnorm_eval(self)
        return self

    stages = ResNetStages.stages
    forward = ResNetStages.forward


def cnn_stages(name: str, strides: Sequence[int] = (2, 2, 2, 1), pretrained: bool = False,
               pretrained_file: str | None = None, frozen_bn: bool = True) -> nn.Module:
    """The five-stage CNN backbone for `name`: `EfficientNetStages` for timm EfficientNets
    (`*efficientnet*`), `ResNetStages` otherwise. Same arguments, attributes and outputs."""
    cls = EfficientNetStages if "efficientnet" in name else ResNetStages
    return cls(name, strides=strides, pretrained=pretrained, pretrained_file=pretrained_file,
               frozen_bn=frozen_bn)


def _set_stride(conv: nn.Module, stride: int) -> None:
    """Set the stride of a conv, or of the first conv of a deep (3-conv) stem."""
    if not isinstance(conv, nn.Conv2d):
        conv = next(m for m in conv.modules() if isinstance(m, nn.Conv2d))
    conv.stride = (stride, stride)


def _set_layer_stride(layer: nn.Sequential, stride: int) -> None:
    """Put `stride` on the first block's strided conv and its downsample path (v1.5 style)."""
    block = layer[0]
    strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # bottleneck vs basic
    _set_stride(strided, stride)
    for conv in (block.conv1, block.conv2, getattr(block, "conv3", None)):
        if conv is not None and conv is not strided:
            _set_stride(conv, 1)
    if block.downsample is not None:
        for m in block.downsample.modules():
            if isinstance(m, nn.Conv2d):
                _set_stride(m, stride)
            elif isinstance(m, nn.AvgPool2d):  # avg-down variants
                m.stride = stride
                m.kernel_size = stride if stride > 1 else 1
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            m.dilation = (1, 1)
            k = m.kernel_size[0]
            m.padding = (k // 2, k // 2)


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if hasattr(module[-1] if isinstance(module, nn.Sequential) else module, "conv3"):
        return module[-1].conv3.out_channels
    return bns[-1].num_features if bns else convs[-1].out_channels
