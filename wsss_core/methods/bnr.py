"""`bnr`: TransCAM on a Conformer, with BNR's background-noise loss (docs/methods/bnr.md).

TransCAM (Li et al., JVCI 2023): the CNN branch's CAM M is refined by the transformer's
attention summed over blocks, M* = A*·M (class token removed). Training: multilabel soft-margin
on GAP(M) + the class-token logits. BNR (Fujimori et al., §3.3 eq. 6-9) adds the same loss on
GAP(k·Ā*·M*), Ā* the block-mean attention without the class token; `bnr: false` is TransCAM.
Inference (both): M* at several scales and flips, min-max normalised per class.
Training crops (`bnr.color_jitter`, official `train_TransCAM.py`): TransCAM's colour jitter
between the random resize and the normalisation (`transcam_crop`), else the shared crop.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..data import transforms as T
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


def transcam_crop(img: np.ndarray, rng: np.random.Generator, crop: int, scale_range: tuple[int, int],
                  jitter: tuple[float, float, float, float]) -> dict[str, np.ndarray]:
    """TransCAM's training crop (official `train_TransCAM.py`: RandomResizeLong → horizontal
    flip → ColorJitter → Normalize → RandomCrop): uint8 image [H, W, 3] →
    {"image": float32 [3, crop, crop]}.

    Random long-side resize in `scale_range`, then torchvision's `ColorJitter(*jitter)`
    (brightness, contrast, saturation, hue) on the PIL image, then the shared normalise → flip →
    crop. The geometric draws come from `rng` in the order of the shared
    `transforms.classification_crop` (so the jitter changes colours only, and zero jitter gives
    the shared crop); the jitter's own draws come from torch's generator seeded with
    `rng.spawn(1)[0].integers(2**63)` inside `torch.random.fork_rng`: a function of the sample's
    (config seed, epoch, index) stream that leaves `rng` and the global torch state unchanged.
    The flip comes after the jitter here: every jitter op is a per-pixel map of image-wide
    statistics, which a flip does not change."""
    from torchvision.transforms import ColorJitter

    img, _ = T.random_resize_long(img, None, *scale_range, rng)
    seed = int(rng.spawn(1)[0].integers(2 ** 63))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        img = np.asarray(ColorJitter(*jitter)(Image.fromarray(img)))
    out, _ = T.random_hflip(T.normalize(img), None, rng)
    out, _ = T.random_crop(out, None, crop, rng)
    return {"image": T.to_chw(out)}


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
    # training colour jitter (brightness, contrast, saturation, hue): [OFFICIAL] 0.3, 0.3, 0.3,
    # 0.1 (train_TransCAM.py); null: none (the shared crop)
    color_jitter: list[float] | None = None


@register_method
class BNRMethod(Method):
    name = "bnr"
    settings_blocks = {"model": ConformerSettings, "bnr": BNRSettings}
    maps = (MapSpec("cam", strided=True, normalize="minmax"),
            MapSpec("attention", kind="agnostic", normalize=False))
    propagate_map = "cam"

    @classmethod
    def check_settings(cls, name, settings, where) -> None:
        """Backbone names (Method's check) and `bnr.color_jitter`: null or four numbers ≥ 0,
        the hue ≤ 0.5 (torchvision's ColorJitter ranges)."""
        super().check_settings(name, settings, where)
        if name != "bnr" or settings.color_jitter is None:
            return
        j = settings.color_jitter
        if (not isinstance(j, (list, tuple)) or len(j) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in j)
                or j[3] > 0.5):
            raise ConfigError(f"config key bnr.color_jitter: {j!r} is not null or [brightness, "
                              f"contrast, saturation, hue], each ≥ 0, hue ≤ 0.5 (official: "
                              f"[0.3, 0.3, 0.3, 0.1])")

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

    def train_views(self):
        """None (the shared crop) without `bnr.color_jitter`, else `transcam_crop` with the
        stage's crop and scale range (a picklable partial)."""
        j = self.settings.color_jitter
        if j is None:
            return None
        return functools.partial(transcam_crop, crop=int(self.train_params.get("crop", 512)),
                                 scale_range=tuple(self.train_params.get("scale_range", (320, 640))),
                                 jitter=tuple(float(v) for v in j))

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
