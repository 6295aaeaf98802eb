"""CNN CAM classifier: the IRN-style ResNet CAM, also the CNN branch of two-branch methods.

Layout (docs/algorithms.md §cam-models, IRN `net/resnet50_cam.py`): a ResNet split into IRN
stages (stem, layer1 .. layer4), a 1x1 no-bias conv head giving raw class logits per position,
and optionally a 1x1 no-bias projection (an embedding for contrastive losses). With
`detach_early` the output of stem+layer1+layer2 is cut from the graph (IRN trains only layer3,
layer4 and the heads)
and conv1/bn1 are marked `requires_grad=False`, exactly like the reference code.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import cnn_stages


class ResNetCAM(nn.Module):
    """ResNet + 1x1 CAM head (+ optional 1x1 projection head).

    Channels of the head: `num_classes + int(with_background)`; with a background channel it is
    channel 0 (21 for VOC). IRN's CAM uses `with_background=False` (20 for VOC).
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 20, *,
                 with_background: bool = False, proj_dim: int | None = None,
                 strides: Sequence[int] = (2, 2, 2, 1), detach_early: bool = True,
                 pretrained: bool = False, pretrained_file: str | None = None,
                 frozen_bn: bool = True) -> None:
        super().__init__()
        self.backbone = cnn_stages(backbone, strides=strides, pretrained=pretrained,
                                     pretrained_file=pretrained_file, frozen_bn=frozen_bn)
        feat_dim = self.backbone.out_channels[-1]
        self.num_classes = num_classes
        self.with_background = with_background
        self.num_channels = num_classes + int(with_background)
        self.detach_early = detach_early
        self.classifier = nn.Conv2d(feat_dim, self.num_channels, 1, bias=False)
        self.proj = nn.Conv2d(feat_dim, proj_dim, 1, bias=False) if proj_dim else None
        if detach_early:
            # the reference code freezes these explicitly; the detach below already keeps every
            # gradient away from stem/layer1/layer2
            for module in (self.backbone.stem[0], self.backbone.stem[1]):
                for p in module.parameters():
                    p.requires_grad_(False)

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if self.detach_early:
            with torch.no_grad():  # same as detaching layer2's output, without storing its graph
                x = b.layer2(b.layer1(b.stem(x)))
            x = x.detach()
        else:
            x = b.layer2(b.layer1(b.stem(x)))
        return b.layer4(b.layer3(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`logits` Z [B, ch, h, w] (raw, no ReLU), `proj` E [B, proj_dim, h, w] when a
        projection head exists, `features` f [B, F, h, w]."""
        f = self.features(x)
        out = {"logits": self.classifier(f), "features": f}
        if self.proj is not None:
            out["proj"] = self.proj(f)
        return out

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Inference CAM relu(Z) [B, ch, h, w] (background channel kept when present)."""
        return F.relu(self.classifier(self.features(x)))

    def param_groups(self, train_proj: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters (1x lr), new parameters (10x lr)), docs/algorithms.md §cam-models.

        The backbone group holds every backbone parameter, as the reference code does (frozen or
        detached ones never get a gradient, so SGD skips them). [OFFICIAL] `train_proj=False`:
        the projection conv is in neither group and stays at its random init; [FIX]
        `train_proj=True` puts it in the new group.
        """
        new = list(self.classifier.parameters())
        if train_proj and self.proj is not None:
            new += list(self.proj.parameters())
        return list(self.backbone.parameters()), new
