"""ViT CAM classifier: a semantic-aware ViT branch, a TS-CAM-style head on a timm ViT
(docs/algorithms.md §cam-models). The blocks are run by `vit_blocks.block_forward`, which repeats timm's `Block` math with
the attention probabilities made explicit (timm's fused attention never materialises them);
`tests/test_cam_models.py` checks it against timm's own `forward_features`. The positional
embedding is resampled DINO-style for any input size, so the patch grid is
floor(H/p) x floor(W/p) (trailing pixels dropped).
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import HybridEmbed
from timm.models.vision_transformer import Block, LayerScale, VisionTransformer

from ..errors import ConfigError, WeightsError
from .backbones import cnn_stages, create_timm
from .vit_blocks import block_forward, identity_query_key


def interpolate_pos_embed(pos_embed: torch.Tensor, src_grid: tuple[int, int],
                          grid: tuple[int, int]) -> torch.Tensor:
    """Resample a [1, 1 + gh*gw, D] class+patch positional embedding to a `grid` of patches.

    DINO form (as in the reference code): bicubic, align_corners False, with scale factors
    ((h + 0.1)/gh, (w + 0.1)/gw) so that floor() lands exactly on (h, w). Unchanged when the
    grid already matches.
    """
    (gh, gw), (h, w) = src_grid, grid
    if (gh, gw) == (h, w):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw),
                              mode="bicubic", align_corners=False)
    if patch_pos.shape[-2:] != (h, w):
        raise RuntimeError(f"positional embedding resampled to {tuple(patch_pos.shape[-2:])}, "
                           f"expected {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class CNNStem(nn.Module):
    """The first four stages (stem .. layer3, output stride 16) of a `cnn_stages` backbone: the
    patch embedding of a hybrid ViT (ViT paper sec. 3.1 "hybrid architecture", timm
    `HybridEmbed`). BatchNorm statistics stay frozen (the backbone's own `train` override)."""

    def __init__(self, name: str, pretrained: bool = False, pretrained_file: str | None = None) -> None:
        super().__init__()
        self.cnn = cnn_stages(name, strides=(2, 2, 2, 1), pretrained=pretrained,
                              pretrained_file=pretrained_file, frozen_bn=True)
        self.cnn.layer4 = nn.Identity()  # never run: drop its parameters
        self.num_features = self.cnn.out_channels[3]  # read by HybridEmbed
        self.stride = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cnn
        return c.layer3(c.layer2(c.layer1(c.stem(x))))


def hybrid_vit(name: str, stem_name: str, *, img_size: int, patch_size: int | None,
               embed_dim: int | None, depth: int | None, num_heads: int | None,
               pretrained: bool = False, pretrained_file: str | None = None) -> VisionTransformer:
    """A timm `VisionTransformer` whose patch embedding is `CNNStem(stem_name)` (stride 16, the
    stem's ImageNet weights with `pretrained`) followed by a 1x1 projection to `embed_dim`;
    the transformer blocks are new. ConfigError when a size is missing or `patch_size` is given
    and is not 16."""
    if None in (embed_dim, depth, num_heads):
        raise ConfigError(f"vit {name}: a hybrid ViT needs embed_dim, depth and num_heads")
    stem = CNNStem(stem_name, pretrained=pretrained, pretrained_file=pretrained_file)
    if patch_size not in (None, stem.stride):
        raise ConfigError(f"vit {name}: patch_size {patch_size} != the hybrid stem's "
                          f"stride {stem.stride}")
    embed = partial(HybridEmbed, backbone=stem, feature_size=img_size // stem.stride,
                    feature_ratio=stem.stride, in_chans=3)
    return VisionTransformer(img_size=img_size, patch_size=1, embed_layer=embed,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=4.0, qkv_bias=True, num_classes=0)


def builds_new_blocks(hybrid_stem: str | None, embed_dim: int | None) -> bool:
    """Whether `create_vit` builds new transformer blocks (a hybrid or a custom size), the only
    ones `start_blocks` may start; a timm ViT by name keeps its pretrained blocks."""
    return hybrid_stem is not None or embed_dim is not None


def valid_init_values(value) -> bool:
    """Whether `value` is a LayerScale start `start_blocks` takes: None or a finite number ≥ 0
    (a bool is not a number here)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and 0 <= value < float("inf"))


def start_blocks(vit: VisionTransformer, init_values: float | None = None,
                 qk_identity: bool = False) -> None:
    """Start the new transformer blocks of `vit` as the features they read (in place).

    `init_values` (≥ 0; None: unchanged, timm's plain residual blocks): every block's two
    residual branches get a LayerScale, a learned per-channel gain γ [D] started at that value
    (CaiT, Touvron et al. 2021, sec. 3 "LayerScale"; 0 is ReZero's start), so
    x + γ1 ⊙ MHSA(LN(x)) and x + γ2 ⊙ MLP(LN(x)) begin as x: with γ ≈ 0 the output tokens
    [B, T, D] equal the final LayerNorm of the patch-embedded tokens + positions (ViT paper,
    eq. 1). `qk_identity`: every block's query and key projections start as the identity
    (`vit_blocks.identity_query_key`), its attention [B, heads, T, T] as the softmax of the
    scaled affinity of its LayerNorm-ed input tokens instead of near-uniform weights.

    Raises: ConfigError for a negative or non-finite `init_values`."""
    if not valid_init_values(init_values):
        raise ConfigError(f"vit init_values: {init_values!r} is not null or a number ≥ 0")
    if init_values is not None:
        for blk in vit.blocks:
            blk.ls1 = LayerScale(vit.embed_dim, init_values=float(init_values))
            blk.ls2 = LayerScale(vit.embed_dim, init_values=float(init_values))
    if qk_identity:
        for blk in vit.blocks:
            identity_query_key(blk.attn.qkv)


class ViTCAM(nn.Module):
    """ViT + 3x3 CAM head (background = channel 0) + 1x1 projection head (SAP embedding).

    `backbone` names a timm ViT (e.g. `deit_small_patch16_224`, built through `create_timm`
    with the weight policy; its stored positional grid is kept and resampled per input), unless
    `embed_dim` is given: then a from-scratch timm `VisionTransformer` with `patch_size`,
    `embed_dim`, `depth`, `num_heads` and positional grid `img_size / patch_size` is built and
    `backbone` is only a label.
    """

    def __init__(self, backbone: str = "deit_small_patch16_224", num_classes: int = 20, *,
                 proj_dim: int | None = 256, img_size: int = 224, patch_size: int | None = None,
                 embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None, pretrained: bool = False,
                 pretrained_file: str | None = None, hybrid_stem: str | None = None,
                 train_stem: bool = True, init_values: float | None = None,
                 qk_identity: bool = False) -> None:
        super().__init__()
        self.train_stem = train_stem
        vit = create_vit(backbone, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, pretrained=pretrained,
                         pretrained_file=pretrained_file, hybrid_stem=hybrid_stem, key="vit",
                         init_values=init_values, qk_identity=qk_identity)
        if hybrid_stem is not None:
            patch_size = 16
        if not all(isinstance(b, Block) for b in vit.blocks):
            raise ConfigError(f"vit {backbone}: blocks must be timm vision_transformer.Block")
        self.vit = vit
        self.hybrid = isinstance(vit.patch_embed, HybridEmbed)
        self.patch_size = 16 if self.hybrid else vit.patch_embed.patch_size[0]
        if patch_size is not None and patch_size != self.patch_size:
            raise ConfigError(f"vit {backbone}: patch_size {patch_size} != model's {self.patch_size}")
        self.pos_grid = tuple(vit.patch_embed.grid_size)
        self.embed_dim = vit.embed_dim
        self.num_classes = num_classes
        self.num_channels = num_classes + 1
        self.head = nn.Conv2d(self.embed_dim, self.num_channels, 3, padding=1, bias=True)
        self.proj = nn.Conv2d(self.embed_dim, proj_dim, 1, bias=False) if proj_dim else None

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Final-LN tokens [B, T, D], head-averaged attention [B, L, T, T], patch grid (h, w)."""
        vit = self.vit
        if self.hybrid:
            with torch.set_grad_enabled(self.train_stem and torch.is_grad_enabled()):
                x = vit.patch_embed.backbone(x)
        patches = vit.patch_embed.proj(x)  # a stride-p conv: trailing pixels are dropped
        grid = (patches.shape[-2], patches.shape[-1])
        t = patches.flatten(2).transpose(1, 2)
        t = vit.patch_embed.norm(t) if hasattr(vit.patch_embed, "norm") else t
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = vit.pos_drop(t + interpolate_pos_embed(vit.pos_embed, self.pos_grid, grid))
        t = vit.norm_pre(vit.patch_drop(t))
        attns = []
        for blk in vit.blocks:
            t, a = block_forward(blk, t)
            attns.append(a)
        return vit.norm(t), torch.stack(attns, dim=1), grid

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`logits` Z_v [B, C+1, h, w] (raw), `attn` A [B, L, T, T] (head mean per layer),
        `proj` E_v [B, proj_dim, h, w] when a projection head exists."""
        tokens, attn, (h, w) = self.tokens(x)
        fmap = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)
        out = {"logits": self.head(fmap), "attn": attn}
        if self.proj is not None:
            out["proj"] = self.proj(fmap)
        return out

    def infer(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward, both inference maps (docs/algorithms.md §cam-models): `attention`
        a = Σ_l A[:, l, 0, 1:] as [B, 1, h, w] (class-token row, summed over layers) and
        `cam` = relu(a ⊙ Z_v) [B, C+1, h, w]."""
        tokens, attn, (h, w) = self.tokens(x)
        fmap = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)
        logits = self.head(fmap)
        a = F.relu(attn[:, :, 0, 1:].sum(dim=1)).reshape(-1, 1, h, w)
        return {"cam": F.relu(a * logits), "attention": a}

    def param_groups(self, mode: Literal["official", "intended"] = "official"
                     ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(1x-lr parameters, 10x-lr parameters), docs/algorithms.md §cam-models.

        official: 10x = {head.bias, proj.weight} (the reference code's positional slice);
        intended: 10x = {head.weight, head.bias, proj.weight}.
        """
        if mode == "official":
            new = [self.head.bias]
        elif mode == "intended":
            new = [self.head.weight, self.head.bias]
        else:
            raise ConfigError(f"vit_head_group: {mode!r} is not one of official, intended")
        if self.proj is not None:
            new.append(self.proj.weight)
        new_ids = {id(p) for p in new}
        return [p for p in self.parameters() if id(p) not in new_ids], new


def create_vit(backbone: str, img_size: int, patch_size: int | None, embed_dim: int | None,
               depth: int | None, num_heads: int | None, pretrained: bool,
               pretrained_file: str | None, hybrid_stem: str | None, key: str,
               init_values: float | None = None, qk_identity: bool = False) -> VisionTransformer:
    """The ViT a method's settings describe: a hybrid on a pretrained CNN stem (`hybrid_stem`),
    a custom-size ViT trained from scratch (`embed_dim` set), or a timm model by name with the
    project's weights policy. `key` names the config block in errors. `init_values` and
    `qk_identity` start the new blocks of the first two (`start_blocks`).

    Raises: ConfigError for an incomplete custom size, `init_values` / `qk_identity` on a timm
    model by name (its blocks are not new), or a model that is not a timm VisionTransformer
    with one class token, no register tokens and a class position embedding; WeightsError for
    pretrained weights of a custom size."""
    if not builds_new_blocks(hybrid_stem, embed_dim) and (init_values is not None or qk_identity):
        raise ConfigError(f"{key} {backbone}: init_values / qk_identity start new transformer "
                          f"blocks; set hybrid_stem or embed_dim, or leave them null / false")
    if hybrid_stem is not None:
        vit = hybrid_vit(backbone, hybrid_stem, img_size=img_size, patch_size=patch_size,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         pretrained=pretrained, pretrained_file=pretrained_file)
    elif embed_dim is not None:
        if None in (patch_size, depth, num_heads):
            raise ConfigError(f"{key} {backbone}: a custom ViT needs patch_size, embed_dim, "
                              f"depth and num_heads")
        if pretrained:
            raise WeightsError(f"{key} {backbone}: a custom-size ViT has no pretrained weights; "
                               f"set pretrained: false")
        vit = VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                                depth=depth, num_heads=num_heads, mlp_ratio=4.0,
                                qkv_bias=True, num_classes=0)
    else:
        vit = create_timm(backbone, pretrained=pretrained, pretrained_file=pretrained_file,
                          num_classes=0)
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None \
            or vit.reg_token is not None or vit.no_embed_class or vit.pos_embed is None:
        raise ConfigError(f"{key} {backbone}: need a timm VisionTransformer with one class "
                          f"token, no register tokens and a class position embedding")
    if builds_new_blocks(hybrid_stem, embed_dim):
        start_blocks(vit, init_values=init_values, qk_identity=qk_identity)
    return vit
