"""The "Separate and Conquer" ViT (its paper §3; "Network" in the method's page; official
`model/model_seco.py`).

`SeCoEncoder`: a timm ViT with a frozen positional embedding resized bicubically to every
input's patch grid, returning the final-normed class token, the final-normed patch tokens and
the un-normed patch tokens of block `aux_layer`. `SeCoNet` (the student): encoder, final and
auxiliary 1x1 CAM classifiers (no bias, global max pooling), the four-branch dilated
segmentation decoder and the projection MLP; its forward runs every trainable path of one
training step, so a DistributedDataParallel wrapper sees them all. `SeCoTeacher`: the EMA
local teacher (encoder copy + projection copy).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import BatchNormAct2d, Conv2dSame, HybridEmbed, trunc_normal_
from timm.layers.padding import get_same_padding

from ..errors import ConfigError
from .vit_cam import create_vit


#: images per call of the frozen CNN stem: as many as fit this many pixels (at least one). The
#: Lite0 stem is memory-bound on CPU; chunks of 1 (336 px), 4 (224 px), 16 (112 px) images
#: run 1.2-1.6x faster than one batch of 32 (1 thread; bench/bench_seco.py step)
STEM_CHUNK_PIXELS = 4 * 224 * 224


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of `module` in which every eval-mode BatchNorm that directly follows
    a convolution among its parent's children (the forward order of timm's EfficientNet
    blocks and of `EfficientNetStages.stem`) is folded into that convolution:
    w' = w·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β. timm's `BatchNormAct2d` keeps its
    activation. The copy equals `module` in eval mode up to float rounding
    (tests/test_seco.py); its parameters need no gradient."""
    folded = copy.deepcopy(module).requires_grad_(False)

    def visit(parent: nn.Module) -> None:
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                if bn.training or not bn.track_running_stats:
                    raise ValueError("fold_batchnorm: BatchNorm must use running statistics")
                scale = bn.running_var.add(bn.eps).rsqrt()
                if bn.weight is not None:
                    scale = scale * bn.weight
                bias = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
                bias = bias * scale + (bn.bias if bn.bias is not None else 0)
                conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                rest = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
                setattr(parent, bn_name, rest)
        for _, child in parent.named_children():
            visit(child)

    with torch.no_grad():
        visit(folded)
    return folded


class SamePadConv2d(nn.Conv2d):
    """timm's `Conv2dSame` (TensorFlow "SAME": zero padding, the odd pixel at the bottom /
    right) with the input copied into a buffer whose border alone is zeroed; `F.pad` zeroes
    the whole padded buffer first (that fill took ~14 % of the Lite0 stem's CPU time at
    336 px)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = get_same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = get_same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph or pw:
            t, l = ph // 2, pw // 2
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            padded = torch.empty(*x.shape[:2], ih + ph, iw + pw, dtype=x.dtype, device=x.device,
                                 memory_format=fmt)
            padded[..., t:t + ih, l:l + iw] = x
            for border in (padded[..., :t, :], padded[..., t + ih:, :],
                           padded[..., t:t + ih, :l], padded[..., t:t + ih, l + iw:]):
                border.zero_()
            x = padded
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def inference_stem(module: nn.Module) -> nn.Module:
    """The frozen stem for forward passes without gradient: `fold_batchnorm`, and timm's
    `Conv2dSame` run as `SamePadConv2d` (same weights, same zero padding). Equal to `module`
    in eval mode up to float rounding (tests/test_seco.py)."""
    folded = fold_batchnorm(module)
    for m in folded.modules():
        if type(m) is Conv2dSame:
            m.__class__ = SamePadConv2d
    return folded


class SeCoEncoder(nn.Module):
    """ViT encoder. `backbone` is a timm name (paper: `vit_base_patch16_224.orig_in21k_ft_in1k`,
    the weights the official code loads) unless `embed_dim` is given: then a from-scratch timm
    `VisionTransformer` (`patch_size`, `embed_dim`, `depth`, `num_heads`, grid img_size/patch),
    or with `hybrid_stem` a hybrid ViT (ViT paper sec. 3.1; `vit_cam.hybrid_vit`): the CNN's
    ImageNet stages to stride 16 embed the patches (no gradient unless `train_stem`)."""

    def __init__(self, backbone: str, *, aux_layer: int = -3, img_size: int = 224,
                 patch_size: int | None = None, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 pretrained: bool = False, pretrained_file: str | None = None,
                 hybrid_stem: str | None = None, train_stem: bool = False) -> None:
        super().__init__()
        vit = create_vit(backbone, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, pretrained=pretrained,
                         pretrained_file=pretrained_file, hybrid_stem=hybrid_stem, key="model")
        if hybrid_stem is not None:
            vit.patch_embed.backbone.requires_grad_(train_stem)
        if not -len(vit.blocks) <= aux_layer < len(vit.blocks):
            raise ConfigError(f"model.aux_layer {aux_layer}: the ViT has {len(vit.blocks)} blocks")
        vit.pos_embed.requires_grad_(False)  # frozen in the reference code
        self.vit = vit
        self.aux_index = aux_layer % len(vit.blocks)
        self.hybrid = isinstance(vit.patch_embed, HybridEmbed)
        self.train_stem = train_stem
        self.patch_size = 16 if self.hybrid else vit.patch_embed.patch_size[0]
        self.pos_grid = tuple(vit.patch_embed.grid_size)
        self.embed_dim = vit.embed_dim
        self._folded: tuple[tuple, nn.Module] | None = None  # (weights key, folded stem): not state

    def _folded_stem(self) -> nn.Module:
        """The frozen stem for inference (`inference_stem`: BatchNorms folded), rebuilt whenever a
        stem weight changed (storage or in-place version: `.to`, the teacher's EMA)."""
        stem = self.vit.patch_embed.backbone
        key = tuple((t.data_ptr(), t._version) for t in (*stem.parameters(), *stem.buffers()))
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, inference_stem(stem))
        return self._folded[1]

    def stem_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """Hybrid ViT with a frozen stem: its features [B, C, H/16, W/16] of x [B, 3, H, W]
        (no gradient; the BatchNorms folded, the batch cut into chunks of about
        `STEM_CHUNK_PIXELS` pixels), which `forward(x, stem=...)` accepts in place of running
        the stem again. None when the stem trains or the ViT has no CNN stem."""
        if not self.hybrid or self.train_stem:
            return None
        if any(m.training for m in self.vit.patch_embed.backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            with torch.no_grad():  # batch statistics: nothing to fold
                return self.vit.patch_embed.backbone(x)
        stem = self._folded_stem()
        n = max(1, STEM_CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
        with torch.no_grad():
            return torch.cat([stem(chunk) for chunk in x.split(n)]) if len(x) > n else stem(x)

    def pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """[1, 1 + h*w, D]: the patch positions resized bicubically (align_corners False)."""
        pe = self.vit.pos_embed
        patch = pe[:, 1:].reshape(1, *self.pos_grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([pe[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor, stem: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] → (class token [B, D], tokens [B, N, D], aux tokens [B, N, D]),
        N = h·w row-major (`encode` gives the grid); the aux tokens are not normed. `stem`:
        x's `stem_features`, when the caller has them already (x is then not read)."""
        return self.encode(x, stem)[:3]

    def encode(self, x: torch.Tensor, stem: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """`forward`'s outputs and the token grid (h, w): ⌊H/p⌋ × ⌊W/p⌋ for a patch
        embedding, ⌈H/16⌉ × ⌈W/16⌉ for a hybrid stem (TF "SAME" padding keeps the partial
        last patch)."""
        vit = self.vit
        if stem is not None:
            x = stem
        elif self.hybrid:
            frozen = self.stem_features(x)
            x = vit.patch_embed.backbone(x) if frozen is None else frozen
        patches = vit.patch_embed.proj(x)
        grid = (patches.shape[-2], patches.shape[-1])
        t = patches.flatten(2).transpose(1, 2)
        t = vit.patch_embed.norm(t) if hasattr(vit.patch_embed, "norm") else t
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed(grid)
        aux = None
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i == self.aux_index:
                aux = t[:, 1:]
        t = vit.norm(t)
        return t[:, 0], t[:, 1:], aux, grid


class ProjectionHead(nn.Module):
    """DINO-style MLP (Linear-GELU-Linear-GELU-Linear) followed by L2 normalisation."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 768) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), p=2, dim=-1)


class DilatedDecoder(nn.Module):
    """DeepLab-v2 classifier: the sum of four 3x3 convs with dilation = padding 6, 12, 18, 24."""

    def __init__(self, in_dim: int, num_classes: int, dilations=(6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_dim, num_classes, 3, padding=d, dilation=d)
                                      for d in dilations)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(conv(x) for conv in self.branches)


def to_2d(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, D] row-major tokens → [B, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class SeCoNet(nn.Module):
    """Student network. `num_classes` C excludes background; the decoder has C+1 outputs."""

    def __init__(self, encoder: SeCoEncoder, num_classes: int, proj_hidden: int = 2048,
                 proj_dim: int = 768) -> None:
        super().__init__()
        d = encoder.embed_dim
        self.encoder = encoder
        self.classifier = nn.Conv2d(d, num_classes, 1, bias=False)
        self.aux_classifier = nn.Conv2d(d, num_classes, 1, bias=False)
        self.decoder = DilatedDecoder(d, num_classes + 1)
        self.proj_head = ProjectionHead(d, proj_hidden, proj_dim)

    def features(self, x: torch.Tensor, stem: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class token [B, D], final tokens [B, D, h, w], aux tokens [B, D, h, w]); `stem`:
        x's `encoder.stem_features` when already computed."""
        cls, tok, aux, grid = self.encoder.encode(x, stem)
        return cls, to_2d(tok, grid), to_2d(aux, grid)

    def cams(self, x: torch.Tensor, stem: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw CAMs w_c·f(p) (no bias, no ReLU): (final [B, C, h, w], aux [B, C, h, w])."""
        _, tok, aux = self.features(x, stem)
        return F.conv2d(tok, self.classifier.weight), F.conv2d(aux, self.aux_classifier.weight)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits [B, C+1, h, w] at the patch grid."""
        return self.decoder(self.features(x)[1])

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None,
                local: torch.Tensor | None = None, stem: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """x [B, 3, H, W] main crop (the first global view); views [V, B, 3, H', W'] the other
        global views and local [L, B, 3, s, s] local crops (view-major). Returns `cls`,
        `cls_aux` [B, C], `seg` [B, C+1, h, w], `tokens` [B, D, h, w], `cls_token` [B, D] and,
        with views and local, `global_tokens` [B, 1+V, D] (student class tokens of x and the
        views; x's is the main forward's, not a second pass over the same crop) and `q`
        [B·(1+V+L), D] unit queries ordered per image (global views first, then crops).
        `stem`: x's frozen-stem features when the caller has them (`multi_scale_cam`)."""
        cls_token, tok, aux = self.features(x, stem)
        out = {"cls": self.classifier(F.adaptive_max_pool2d(tok, 1)).flatten(1),
               "cls_aux": self.aux_classifier(F.adaptive_max_pool2d(aux, 1)).flatten(1),
               "seg": self.decoder(tok), "tokens": tok, "cls_token": cls_token}
        if views is not None and local is not None:
            V, B = views.shape[:2]
            L = local.shape[0]
            g = self.encoder(views.flatten(0, 1))[0].reshape(V, B, -1).transpose(0, 1)
            g = torch.cat([cls_token[:, None], g], dim=1)
            lq = self.encoder(local.flatten(0, 1))[0].reshape(L, B, -1).transpose(0, 1)
            out["global_tokens"] = g
            out["q"] = self.proj_head(torch.cat([g, lq], dim=1).flatten(0, 1))
        return out


class SeCoTeacher(nn.Module):
    """Local teacher: EMA copies of the student's encoder and projection head (no gradients)."""

    def __init__(self, student: SeCoNet) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(student.encoder)
        self.proj_head = copy.deepcopy(student.proj_head)
        self.requires_grad_(False)

    @torch.no_grad()
    def ema_encoder(self, student: SeCoNet, momentum: float) -> None:
        _ema(self.encoder, student.encoder, momentum)

    @torch.no_grad()
    def ema_proj(self, student: SeCoNet, momentum: float) -> None:
        _ema(self.proj_head, student.proj_head, momentum)


def _ema(teacher: nn.Module, student: nn.Module, m: float) -> None:
    """θ_t ← m θ_t + (1 − m) θ_s over parameters (frozen ones too: they are equal copies)."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)
