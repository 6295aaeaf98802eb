"""DRS, the DRS ResNet CAM classifier, the CAM-driven reconstruction (CDR) decoder and the
frozen loss network of a perceptual loss (formulas: the method page under docs/methods/ of the
plug-in that uses them).

Official code (spatial-structure-constraints repository): `net/resnet50_drs.py`,
`net/resnet50_cam.py`, `net/decoder.py`, `net/model_util.py`, `misc/loss_util.py`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_timm
from .resnet_cam import ResNetCAM


def drs(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Discriminative region suppression (spatial-structure-constraints paper §III-A Eq. 3; official `net/resnet50_drs.py`).

    `x` [B, K, h, w] float → [B, K, h, w]: min(ReLU(x), δ · max_ij ReLU(x)) per (b, k). The
    spatial max is *not* detached: clipped positions pass δ times their gradient to the arg-max.
    δ = 1 is a plain ReLU.
    """
    x = F.relu(x)
    return torch.minimum(x, delta * x.amax(dim=(2, 3), keepdim=True))


class DRS(nn.Module):
    """`drs` as a layer (it replaces the final activation of each layer-4 block)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drs(x, self.delta)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class DRSResNetCAM(ResNetCAM):
    """IRN ResNet CAM with two DRS insertion points (the method page's "Network" section).

    * `drs_layer4`: the activation after the residual addition of every layer-4 block is DRS
      (train and inference: it is part of the network); on EfficientNet stages (linear block
      outputs) DRS follows the head's activation instead;
    * `drs_stage2`: DRS on the (detached) layer-2 output, in `forward` (training) only; `cam`
      (inference) skips it.
    `forward` returns the raw class-map tensor A [B, C, h, w] as `logits` (pre-ReLU).
    """

    def __init__(self, *args, drs_delta: float = 0.55, drs_layer4: bool = True,
                 drs_stage2: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drs_delta, self.drs_stage2 = drs_delta, drs_stage2
        if drs_layer4:
            layer4 = self.backbone.layer4
            if hasattr(layer4[-1], "act"):
                # EfficientNet stages: the inverted-residual blocks end linear (no activation
                # after the addition), so DRS follows the only activation of layer 4's
                # output, the head BN's ReLU6 ([FIX], see the method page)
                layer4[-1].act = nn.Sequential(layer4[-1].act, DRS(drs_delta))
            else:
                for block in layer4:
                    # bottleneck: act3 after the addition; basic block: act2
                    setattr(block, "act3" if hasattr(block, "act3") else "act2", DRS(drs_delta))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.backbone
        x = self.early_features(x)
        if self.drs_stage2:
            x = drs(x, self.drs_delta)
        f = b.layer4(b.layer3(x))
        return {"logits": self.classifier(f), "features": f}


class LayerNormCDR(nn.Module):
    """The CDR decoder's layer norm (official `net/model_util.py`), not nn.LayerNorm: per sample,
    (x - mean) / (unbiased std + eps) over all C·H·W values, then a per-channel affine with
    γ ~ U[0, 1) and β = 0 at init. [B, C, H, W] → same."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.rand(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = flat.std(dim=1, unbiased=True).view(-1, 1, 1, 1)
        x = (x - mean) / (std + self.eps)
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


def decoder_norm(kind: str, channels: int) -> nn.Module:
    """`official`: LayerNormCDR; `layernorm`: PyTorch's per-sample layer norm over C·H·W
    (GroupNorm with one group: biased std, eps inside the root, γ = 1)."""
    if kind == "official":
        return LayerNormCDR(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"decoder norm {kind!r}: official or layernorm")


def conv_block(cin: int, cout: int, *, norm: str | None = "official", act: bool = True,
               reflect: bool = False, bias: bool = True) -> nn.Sequential:
    """Explicit 1-pixel padding (reflection or zeros) → 3x3 conv → layer norm → ReLU."""
    layers: list[nn.Module] = [nn.ReflectionPad2d(1) if reflect else nn.ZeroPad2d(1),
                               nn.Conv2d(cin, cout, 3, bias=bias)]
    if norm:
        layers.append(decoder_norm(norm, cout))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, dim: int, norm: str = "official") -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(dim, dim, norm=norm),
                                  conv_block(dim, dim, norm=norm, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def up_block(cin: int, cout: int, norm: str = "official") -> nn.Sequential:
    """x2 transposed conv (no bias) → InstanceNorm → ReLU → conv_block(cin → cout)."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cin, 4, stride=2, padding=1, bias=False),
                         nn.InstanceNorm2d(cin), nn.ReLU(inplace=True),
                         conv_block(cin, cout, norm=norm))


class CDRDecoder(nn.Module):
    """CAM-driven reconstruction decoder (paper §III-B, Tab. I; official `net/decoder.py`).

    A [B, C, h, w] (raw class maps, any sign) → x_rec [B, 3, s·h, s·w] in (-1, 1), s =
    `upscale` (the classifier's output stride, a power of two; 16 in the paper). Channels:
    C → width (reflection pad, no bias) → ResBlock → one up block per factor 2 with outputs
    width, width/2, width/4, ... → 3x3 conv with bias → tanh. Paper: width 256, four up blocks
    (256, 128, 64, 32). `norm`: see `decoder_norm`.
    """

    def __init__(self, in_channels: int, width: int = 256, upscale: int = 16,
                 norm: str = "official") -> None:
        super().__init__()
        n_up = int(round(math.log2(upscale)))
        if 2 ** n_up != upscale or n_up < 1:
            raise ValueError(f"CDR decoder: upscale {upscale} is not a power of two >= 2")
        outs = [max(width >> i, 8) for i in range(n_up)]
        layers: list[nn.Module] = [conv_block(in_channels, width, norm=norm, reflect=True, bias=False),
                                   ResBlock(width, norm)]
        cin = width
        for cout in outs:
            layers.append(up_block(cin, cout, norm))
            cin = cout
        layers += [nn.Conv2d(cin, 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, cams: torch.Tensor) -> torch.Tensor:
        return self.net(cams)


#: relu1_1 .. relu5_1 of VGG-19 `features` as the ends of half-open slices (official
#: `misc/loss_util.py`; the paper's text says "before each pooling layer")
VGG_RELU_K_1 = (2, 7, 12, 21, 30)


class FeatureTaps(nn.Module):
    """A frozen loss network returning a list of feature maps ("taps").

    * VGG (`name` starts with "vgg"): `features` cut into slices ending at `taps` (indices into
      `features`; default relu1_1 .. relu5_1);
    * any other timm model: `features_only` outputs at `taps` (out_indices; e.g. Lite0's five
      strides 2 .. 32).
    Parameters never require grad; the module stays in eval mode whatever `train()` says.
    """

    def __init__(self, name: str, taps: Sequence[int] | None = None, pretrained: bool = True,
                 pretrained_file: str | None = None) -> None:
        super().__init__()
        self.is_vgg = name.split(".")[0].startswith("vgg")
        if self.is_vgg:
            ends = list(taps or VGG_RELU_K_1)
            features = create_timm(name, pretrained=pretrained, pretrained_file=pretrained_file).features
            starts = [0] + ends[:-1]
            self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, ends))
        else:
            self.net = create_timm(name, pretrained=pretrained, pretrained_file=pretrained_file,
                                   features_only=True,
                                   out_indices=tuple(taps) if taps else None)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureTaps":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.is_vgg:
            return list(self.net(x))
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out
