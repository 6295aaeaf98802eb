"""`bnr`: TransCAM on a Conformer, with BNR's background-noise loss (docs/methods/bnr.md).

TransCAM (Li et al., JVCI 2023): the CNN branch's CAM M is refined by the transformer's
attention summed over blocks, M* = A*·M (class token removed). Training: multilabel soft-margin
on GAP(M) + the class-token logits. BNR (Fujimori et al., §3.3 eq. 6-9) adds the same loss on
GAP(k·Ā*·M*), Ā* the block-mean attention without the class token; `bnr: false` is TransCAM.
Inference (both): M* at several scales and flips, min-max normalised per class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import conformer  # noqa: F401  (registers the Conformer models with timm)
from ..models.backbones import create_timm
from ..models.conformer import ATTN_INITS, HYBRID_CNN_STRIDES
from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .common import merge_flip, multilabel_soft_margin


def refine_cam(attn_sum: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """TransCAM's attention-refined CAM M* = A*·M (docs/methods/bnr.md "Formulas"; TransCAM paper
    eq. 5).

    attn_sum [B, N+1, N+1]: head-mean attention summed over blocks (rows = queries, class token
    first); cam [B, C, N]: the CNN CAM M flattened row-major. Returns M* [B, C, N] with
    M*[b, c, i] = Σ_j A[b, 1+i, 1+j] M[b, c, j]."""
    return torch.bmm(cam, attn_sum[:, 1:, 1:].transpose(1, 2))


def noise_logits(attn: torch.Tensor, cam_refined: torch.Tensor, k_noise: float = 1.0) -> torch.Tensor:
    """BNR's pooled noise-multiplied CAM z** = GAP(k·Ā*·M*) (BNR paper eq. 6-7).

    attn [B, N+1, N+1]: head-mean attention averaged over blocks (class token first);
    cam_refined M* [B, C+1, N]. Returns [B, C+1]:
    z**[b, c] = (k / N) Σ_i Σ_j Ā[b, 1+i, 1+j] M*[b, c, j].
    Pooling commutes with the product, so this is M* times the column sums of Ā*, an O(N²)
    reduction and one batched mat-vec; neither Ā*·M* [B, C+1, N] nor Ā*·A* is formed.
    """
    n = cam_refined.shape[-1]
    column_sums = attn[:, 1:, 1:].sum(dim=1)  # [B, N]: Σ_i Ā*[i, j]
    return torch.bmm(cam_refined, column_sums.unsqueeze(-1)).squeeze(-1) * (k_noise / n)


@dataclass
class ConformerSettings:
    backbone: str = "conformer_small_patch16.in1k"  # or conformer_tiny_toy
    pretrained: bool = True
    pretrained_file: str | None = None  # the official Conformer_small_patch16.pth
    drop_path_rate: float | None = None  # None: the backbone's default (Conformer-S: 0.1)
    # hybrid Conformers (conformer_lite0_hybrid): the CNN stem whose stages start both branches
    hybrid_stem: str | None = None  # e.g. tf_efficientnet_lite0; None: the Conformer's own stem
    stem_pretrained: bool = True  # hybrid: the stem's ImageNet weights (offline Lite0)
    train_stem: bool = False  # hybrid: fine-tune the stem (false: frozen, CPU-cheap)
    hybrid_cnn_stride: int = 4  # hybrid: the stem stage (4 or 16) whose output starts the CNN branch
    attn_init: str = "random"  # "identity": query/key projections start as the identity


@dataclass
class BNRSettings:
    bnr: bool = True  # false: TransCAM (classification loss only)
    k_noise: float = 1.0  # P Table 5: x1 best, x2 tested
    weight: float = 1.0  # weight of L_M** (P eq. 9: 1)
    noise: bool = True  # false: the "without noise" ablation, GAP(M*) in place of GAP(M**)
    detach_attention: bool = False  # [FIX-option] stop the BNR gradient into the attention
    infer_shape: str = "square"  # [OFFICIAL] square inputs at inference | "keep" the aspect


@register_method
class BNRMethod(Method):
    name = "bnr"
    settings_blocks = {"model": ConformerSettings, "bnr": BNRSettings}
    maps = (MapSpec("cam", strided=True, normalize="minmax"),
            MapSpec("attention", kind="agnostic", normalize=False))
    propagate_map = "cam"

    def build(self) -> dict[str, nn.Module]:
        m = self.model_settings = self.blocks["model"]
        s = self.settings = self.blocks["bnr"]
        if s.infer_shape not in ("square", "keep"):
            raise ConfigError(f"config key bnr.infer_shape: {s.infer_shape!r} is not square or keep")
        if m.hybrid_cnn_stride not in HYBRID_CNN_STRIDES:
            raise ConfigError(f"config key model.hybrid_cnn_stride: {m.hybrid_cnn_stride} is not one of "
                              f"{HYBRID_CNN_STRIDES}")
        if m.attn_init not in ATTN_INITS:
            raise ConfigError(f"config key model.attn_init: {m.attn_init!r} is not one of {ATTN_INITS}")
        extra = {"attn_init": m.attn_init}
        if m.drop_path_rate is not None:
            extra["drop_path_rate"] = m.drop_path_rate
        if m.hybrid_stem is not None:
            extra.update(hybrid_stem=m.hybrid_stem, stem_pretrained=m.stem_pretrained,
                         train_stem=m.train_stem, hybrid_cnn_stride=m.hybrid_cnn_stride)
        net = create_timm(m.backbone, pretrained=m.pretrained, pretrained_file=m.pretrained_file,
                          num_classes=self.num_classes, **extra)
        crop = int(self.train_params.get("crop", net.output_stride))
        if crop % net.output_stride:
            raise ConfigError(f"config key train_classifier.crop: {crop} is not a multiple of "
                              f"{m.backbone}'s output stride {net.output_stride}")
        return {"conformer": net}

    def optimizers(self, lr, weight_decay, momentum, kind="adamw"):
        # TransCAM: one group, every parameter with the same lr and weight decay
        return [make_optimizer([{"params": list(self.models["conformer"].parameters())}],
                               lr, weight_decay, momentum, kind)]

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        out = self.models["conformer"](x)
        cls = multilabel_soft_margin(out["logits"].unsqueeze(-1), y)
        losses = {"cls": cls}
        total = cls
        if s.bnr:
            attn = out["attn"].detach() if s.detach_attention else out["attn"]
            refined = refine_cam(attn.sum(dim=1), out["cam"].flatten(2))
            z = noise_logits(attn.mean(dim=1), refined, s.k_noise) if s.noise else refined.mean(dim=2)
            losses["bnr"] = multilabel_soft_margin(z.unsqueeze(-1), y)
            total = total + s.weight * losses["bnr"]
        losses["total"] = total
        return losses

    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        """`cam` M* [C, h, w] (no background, mirror merged, raw) and `attention` [1, h, w]:
        the class token's block-mean attention to the patches. The pair is resized to a
        square (TransCAM) or to the nearest multiples of the output stride."""
        net = self.models["conformer"]
        stride = net.output_stride
        h, w = pair.shape[-2:]
        if self.settings.infer_shape == "square":
            h = w = stride * max(1, math.ceil(max(h, w) / stride))
        else:
            h, w = (stride * max(1, math.ceil(v / stride)) for v in (h, w))
        if (h, w) != tuple(pair.shape[-2:]):
            pair = F.interpolate(pair, size=(h, w), mode="bilinear", align_corners=False)
        out = net(pair)
        grid = (h // stride, w // stride)
        cam = refine_cam(out["attn"].sum(dim=1), out["cam"].flatten(2)).unflatten(2, grid)
        attention = out["attn"].mean(dim=1)[:, :1, 1:].unflatten(2, grid)
        return {"cam": merge_flip(cam)[1:], "attention": merge_flip(attention)}
