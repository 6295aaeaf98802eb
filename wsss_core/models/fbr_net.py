"""The Fine-grained Background Representation network (its method page under docs/methods/,
"Host A"): the IRN-style ResNet CAM classifier with a foreground and a background 1x1
projection head, an optional auxiliary background segmentation head, and TAP (thresholded
average pooling) for the classification logits. Its plug-in trains it with the loss terms kept
beside the plug-in (wsss_core/methods/).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cam import ResNetCAM


# ----------------------------------------------------------------------------- TAP (§III-B1)

def thresholded_avg_pool(f: torch.Tensor, theta: float) -> torch.Tensor:
    """Thresholded average pooling, [B, D, h, w] → [B, D] (paper Supp. Eq. 11; official
    `util/imutils.py: ThresholdedAvgPool2d`).

    Per (b, k): the mean of the values of channel k strictly above `theta` times the channel's
    spatial maximum; a channel with no such value (all zero) pools to 0. θ = 0 on positive
    features is GAP. Gradient flows through the kept values only.
    """
    peak = f.amax(dim=(2, 3), keepdim=True)
    keep = (f > theta * peak).to(f.dtype)
    return (f * keep).sum(dim=(2, 3)) / keep.sum(dim=(2, 3)).clamp_min(1.0)


# ----------------------------------------------------------------------------- network

class FBRNet(ResNetCAM):
    """ResNet CAM classifier + the foreground / background heads ("Host A" of the method page).

    `forward` (training) returns `cam` A [B, C, h, w] (raw W ⊛ F), `logits` z [B, C] = W·TAP(F)
    (W·GAP(F) with `tap_threshold=None`), `fg` f = ReLU(P_f F) [B, d, h, w], `bg_pre` u = P_b F,
    and with the BG head `bg_post` ReLU(BN(u)) and `bg_logit` g [B, 1, h, w]. `cam()` (inherited)
    is the inference CAM: the heads never touch it.
    """

    def __init__(self, *args, proj_dim: int = 128, tap_threshold: float | None = 0.1,
                 bg_seg: bool = True, bg_dropout: float = 0.5, **kwargs) -> None:
        super().__init__(*args, with_background=False, proj_dim=None, **kwargs)
        dim = self.backbone.out_channels[-1]
        self.tap_threshold = tap_threshold
        self.fg_proj = nn.Conv2d(dim, proj_dim, 1, bias=False)
        self.bg_proj = nn.Conv2d(dim, proj_dim, 1, bias=False)
        heads = [self.fg_proj, self.bg_proj]
        self.bg_norm = self.bg_drop = self.bg_cls = None
        if bg_seg:
            self.bg_norm = nn.BatchNorm2d(proj_dim)
            nn.init.ones_(self.bg_norm.weight)
            nn.init.constant_(self.bg_norm.bias, 1e-4)
            self.bg_drop = nn.Dropout(bg_dropout)
            self.bg_cls = nn.Conv2d(proj_dim, 1, 1, bias=False)
            heads.append(self.bg_cls)
        for conv in heads:
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feat = self.features(x)
        weight = self.classifier.weight.flatten(1)  # [C, D]
        pooled = (thresholded_avg_pool(feat, self.tap_threshold) if self.tap_threshold is not None
                  else feat.mean(dim=(2, 3)))
        u = self.bg_proj(feat)
        out = {"cam": self.classifier(feat), "logits": pooled @ weight.t(),
               "fg": F.relu(self.fg_proj(feat)), "bg_pre": u}
        if self.bg_norm is not None:
            v = F.relu(self.bg_norm(u))
            out["bg_post"] = v
            out["bg_logit"] = self.bg_cls(self.bg_drop(v))
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        mods = [self.fg_proj, self.bg_proj] + [m for m in (self.bg_norm, self.bg_cls) if m is not None]
        return [p for m in mods for p in m.parameters()]
