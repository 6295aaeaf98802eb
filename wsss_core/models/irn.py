"""IRNet inter-pixel relation network (class-boundary + displacement branches), docs/algorithms.md §irn.

The backbone (`ResNetStages`, strides (2, 2, 2, 1) → stage strides 4, 4, 8, 16, 16) is frozen
as in the reference: every stage output is detached, it stays in eval mode and only the two
1×1-conv heads are trained. `train_backbone=True` fine-tunes it as well (BN statistics stay
frozen): a backbone trained from scratch on a small dataset has no edge features for the
heads to read, and the boundary branch then learns object*ness* instead of object boundaries
(on toy with ground-truth labels: boundary 0.44 on edges, 0.24 inside objects, 0.30 on the
background when frozen; 0.42 / 0.11 / 0.11 fine-tuned). Layer widths follow the reference
(ResNet-50/152 input widths 64/256/512/1024/2048); the head *input* widths are read from
`ResNetStages.out_channels`, so narrow test backbones work unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.path_index import PathIndex, affinity_from_boundary
from ..precision import place_model
from .backbones import cnn_stages


def _block(c_in: int, c_out: int, groups: int, upsample: int = 1) -> nn.Sequential:
    """1×1 conv (no bias) → GroupNorm → [bilinear ×upsample] → ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False), nn.GroupNorm(groups, c_out)]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MeanShift(nn.Module):
    """Subtracts the stored mean displacement in eval mode; identity while training."""

    def __init__(self, num_features: int = 2) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x
        return x - self.running_mean.view(1, -1, 1, 1)


class IRN(nn.Module):
    """IRNet with a frozen ResNet backbone.

    `forward(x [B,3,H,W]) -> (edge_logits [B,1,h,w], displacement [B,2,h,w])`, `h = ⌈H/4⌉`
    (for inputs whose sides are multiples of 4; see `boundary_map` for arbitrary images).
    """

    def __init__(self, backbone: str, strides: Sequence[int] = (2, 2, 2, 1), pretrained: bool = False,
                 pretrained_file: str | None = None, train_backbone: bool = False) -> None:
        super().__init__()
        self.train_backbone = train_backbone
        self.backbone = cnn_stages(backbone, strides=strides, pretrained=pretrained,
                                     pretrained_file=pretrained_file, frozen_bn=True)
        for p in self.backbone.parameters():
            p.requires_grad_(train_backbone)
        c1, c2, c3, c4, c5 = self.backbone.out_channels

        self.edge1 = _block(c1, 32, 4)
        self.edge2 = _block(c2, 32, 4)
        self.edge3 = _block(c3, 32, 4, upsample=2)
        self.edge4 = _block(c4, 32, 4, upsample=4)
        self.edge5 = _block(c5, 32, 4, upsample=4)
        self.edge6 = nn.Conv2d(160, 1, 1, bias=True)

        self.dp1 = _block(c1, 64, 8)
        self.dp2 = _block(c2, 128, 16)
        self.dp3 = _block(c3, 256, 16)
        self.dp4 = _block(c4, 256, 16, upsample=2)
        self.dp5 = _block(c5, 256, 16, upsample=2)
        self.dp6 = _block(768, 256, 16, upsample=2)
        self.dp7 = nn.Sequential(nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256),
                                 nn.ReLU(inplace=True), nn.Conv2d(256, 2, 1, bias=False),
                                 MeanShift(2))

    @property
    def mean_shift(self) -> MeanShift:
        """The displacement mean-shift module; set `mean_shift.running_mean` after training."""
        return self.dp7[-1]

    def edge_layers(self) -> list[nn.Module]:
        return [self.edge1, self.edge2, self.edge3, self.edge4, self.edge5, self.edge6]

    def dp_layers(self) -> list[nn.Module]:
        return [self.dp1, self.dp2, self.dp3, self.dp4, self.dp5, self.dp6, self.dp7]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.train_backbone:
            return self.backbone(x)
        # a frozen backbone's outputs are detached: no graph needs to be recorded
        with torch.no_grad():
            return self.backbone(x)

    def _edge_branch(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x1, x2, x3, x4, x5 = feats
        e2 = self.edge2(x2)
        h2, w2 = e2.shape[-2:]
        edges = [self.edge1(x1), e2, self.edge3(x3)[..., :h2, :w2],
                 self.edge4(x4)[..., :h2, :w2], self.edge5(x5)[..., :h2, :w2]]
        return self.edge6(torch.cat(edges, dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._features(x)
        x1, x2, x3, x4, x5 = feats
        edge_logits = self._edge_branch(feats)

        d2, d3 = self.dp2(x2), self.dp3(x3)
        h2, w2 = d2.shape[-2:]
        h3, w3 = d3.shape[-2:]
        d_mid = self.dp6(torch.cat([d3, self.dp4(x4)[..., :h3, :w3],
                                    self.dp5(x5)[..., :h3, :w3]], dim=1))[..., :h2, :w2]
        displacement = self.dp7(torch.cat([self.dp1(x1), d2, d_mid], dim=1))
        return edge_logits, displacement

    def edge_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary-branch logits only `[B, 1, h, w]` (skips the displacement branch)."""
        return self._edge_branch(self._features(x))

    def train(self, mode: bool = True) -> "IRN":
        super().train(mode)
        self.backbone.eval()
        return self

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(boundary-branch parameters E1..E6, displacement-branch parameters D1..D7, trainable
        backbone parameters — empty when the backbone is frozen).

        The reference optimiser uses lr 1×base for the first group and 10×base for the second,
        weight decay 1e-4 on both.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return ([p for m in self.edge_layers() for p in m.parameters()],
                [p for m in self.dp_layers() for p in m.parameters()], backbone)

    @torch.no_grad()
    def boundary_map(self, image_pair: torch.Tensor, crop: int = 512) -> torch.Tensor:
        """Class-boundary probabilities of one image (docs/algorithms.md §irn) → `[1, ⌈H/4⌉, ⌈W/4⌉]`.

        Args:
            image_pair: `[2, 3, H, W]` normalised image and its horizontal mirror.
            crop: the training crop; the pair is zero-padded on the right/bottom to
                `max(crop, ceil16(H)) x max(crop, ceil16(W))` ([FIX]: the reference pads to
                exactly `crop`, which silently crops larger images). Each side is padded on its
                own, so a panorama costs its pixel count, not its long side squared; images
                within the crop get the reference's `crop x crop` input.
        Returns `σ((e + mirror(e'))/2)` of the edge logits cropped to the stride-4 image grid.
        Call in eval mode (`model.eval()`).
        """
        if image_pair.dim() != 4 or image_pair.shape[0] != 2:
            raise ValueError(f"image_pair must be [2, 3, H, W], got {tuple(image_pair.shape)}")
        height, width = image_pair.shape[-2:]
        padded_h, padded_w = max(crop, -(-height // 16) * 16), max(crop, -(-width // 16) * 16)
        padded = F.pad(image_pair, (0, padded_w - width, 0, padded_h - height))
        edge_logits = self.edge_logits(padded)  # the displacement output is unused here
        h, w = (height - 1) // 4 + 1, (width - 1) // 4 + 1
        edge_logits = edge_logits[..., :h, :w]
        return torch.sigmoid(edge_logits[0] / 2 + edge_logits[1].flip(-1) / 2)


def pair_displacement(disp: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """`δ = D(src) − D(dst)` for every (direction, source) → `[B, 2, n_dirs, n_src]`."""
    (c_h, c_w), rf = path_index.crop, path_index.radius_floor
    if tuple(disp.shape[-2:]) != path_index.grid:
        raise ValueError(f"displacement {tuple(disp.shape)} does not match the path-index grid "
                         f"{path_index.grid}")
    src = disp[:, :, :c_h, rf:rf + c_w]
    dst = torch.stack([disp[:, :, dy:dy + c_h, rf + dx:rf + dx + c_w]
                       for dy, dx in path_index.search_dst.tolist()], dim=2)
    pair = src.unsqueeze(2) - dst
    return pair.reshape(pair.shape[0], pair.shape[1], pair.shape[2], -1)


def affinity_displacement_loss(edge_logits: torch.Tensor, disp: torch.Tensor, bg_pos: torch.Tensor,
                               fg_pos: torch.Tensor, neg: torch.Tensor, path_index: PathIndex
                               ) -> dict[str, torch.Tensor]:
    """IRN training loss (docs/algorithms.md §irn), reduced over the whole batch.

    Args:
        edge_logits: `[B, 1, G_h, G_w]`; disp: `[B, 2, G_h, G_w]` (the path-index grid).
        bg_pos, fg_pos, neg: `[B, n_dirs, n_src]` pair masks (bool or float) from
            `affinity_labels`.
    Returns:
        dict with scalar tensors `pos_bg`, `pos_fg`, `neg`, `dp_fg`, `dp_bg` and
        `total = (pos_bg/2 + pos_fg/2 + neg)/2 + (dp_fg + dp_bg)/2`.
    """
    eps = 1e-5
    aff = affinity_from_boundary(torch.sigmoid(edge_logits).reshape(edge_logits.shape[0], -1),
                                 path_index)
    bg_pos, fg_pos, neg = (m.to(aff.dtype) for m in (bg_pos, fg_pos, neg))
    pos_term = -torch.log(aff + eps)
    neg_term = -torch.log(1.0 + eps - aff)
    pos_bg = (bg_pos * pos_term).sum() / (bg_pos.sum() + eps)
    pos_fg = (fg_pos * pos_term).sum() / (fg_pos.sum() + eps)
    neg_loss = (neg * neg_term).sum() / (neg.sum() + eps)

    pair = pair_displacement(disp, path_index)
    target = path_index.disp_target(device=disp.device, dtype=disp.dtype)
    dp_fg = (torch.abs(pair - target) * fg_pos.unsqueeze(1)).sum() / (2 * fg_pos.sum() + eps)
    dp_bg = (torch.abs(pair) * bg_pos.unsqueeze(1)).sum() / (2 * bg_pos.sum() + eps)

    total = (pos_bg / 2 + pos_fg / 2 + neg_loss) / 2 + (dp_fg + dp_bg) / 2
    return dict(pos_bg=pos_bg, pos_fg=pos_fg, neg=neg_loss, dp_fg=dp_fg, dp_bg=dp_bg, total=total)


def load_irn(path, device: torch.device | str = "cpu") -> tuple[IRN, dict]:
    """The trained IRN (eval mode, on `device`) and its training parameters, from the model
    file train_irn wrote (checkpoint.read_model: one-line errors)."""
    from ..checkpoint import read_model

    record = read_model(path, "irn", map_location=device)
    params = dict(record["params"])
    model = IRN(params["backbone"], strides=tuple(params["strides"]))
    model.load_state_dict(record["state"])
    return place_model(model, device).eval(), params
