"""The plug-in kit: what several method plug-ins share (a plug-in imports from here, from
`base` and from `_registry`, never from another plug-in; tests/test_layers.py checks it).

  * `ResNetSettings`: the `model` block of an IRN-style ResNet CAM classifier (cam, fbr, and
    the CNN branch of cobra and ssc);
  * `multilabel_soft_margin`: GAP + multilabel soft-margin loss over a score map whose
    background channel, when present, is dropped;
  * `merge_flip`: the maps of (image, mirrored image) summed in the image's frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models.resnet_cam import ResNetCAM


@dataclass
class ResNetSettings:
    backbone: str = "resnet50.tv_in1k"  # torchvision V1 weights, as IRN
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 1])
    pretrained: bool = True
    # offline route: a checkpoint of the weights the tag names (resnet50.tv_in1k: torchvision's
    # resnet50-0676ba61.pth; resnet152.tv_in1k: resnet152-394f9c45.pth)
    pretrained_file: str | None = None
    frozen_bn: bool = True  # IRN: BN statistics stay at their ImageNet values
    detach_early: bool = True  # IRN: stem, layer1, layer2 get no gradient

    def build(self, num_classes: int, with_background: bool, proj_dim: int | None = None) -> ResNetCAM:
        return ResNetCAM(self.backbone, num_classes, with_background=with_background,
                         proj_dim=proj_dim, strides=tuple(self.strides),
                         detach_early=self.detach_early, pretrained=self.pretrained,
                         pretrained_file=self.pretrained_file, frozen_bn=self.frozen_bn)


def foreground_logits(logits_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The foreground channels of a [B, ch, h, w] map: drop channel 0 when ch == C + 1."""
    ch = logits_map.shape[1]
    if ch == num_classes + 1:
        return logits_map[:, 1:]
    if ch == num_classes:
        return logits_map
    raise ValueError(f"map has {ch} channels; expected {num_classes} (no background) or "
                     f"{num_classes + 1} (background first) for {num_classes} labels")


def multilabel_soft_margin(logits_map: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GAP over space, then PyTorch's multilabel soft-margin loss (mean over classes and batch).

    The background channel is excluded here, decided from the shapes: a map with
    `labels.shape[1] + 1` channels has background at channel 0, which is dropped (it gets no
    gradient from this loss, docs/methods/cobra.md "Losses"); a map with `labels.shape[1]`
    channels is used whole.
    """
    fg = foreground_logits(logits_map, labels.shape[1])
    scores = fg.flatten(2).mean(dim=2)
    return F.multilabel_soft_margin_loss(scores, labels.to(scores.dtype))


def merge_flip(out: torch.Tensor) -> torch.Tensor:
    """[2, C, h, w] maps of (image, mirrored image) → map(image) + mirror(map(mirror))."""
    return out[0] + out[1].flip(-1)
