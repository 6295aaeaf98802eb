"""Conformer as TransCAM uses it: a ResNet-style CNN branch and a ViT branch coupled by
feature-coupling units (FCUs), with a CAM head on the CNN branch (TransCAM paper §3).

Layout (Peng et al., "Conformer", ICCV 2021; TransCAM `network/conformer.py`): a 7x7 stem and
max-pool, then `depth` stages of (bottleneck ConvBlock → FCUDown into the tokens → timm ViT
block → FCUUp back → fusion ConvBlock with the tokens injected after its first 1x1 conv), in
three groups of `depth / 3` blocks at CNN strides 4, 8, 16 (the token grid is always stride
16). TransCAM's change: the last fusion block keeps stride 1, so the final CNN map and the
tokens share one grid. No positional embedding. Parameter names equal the official ones, so
the official ImageNet file (`Conformer_small_patch16.pth`) loads as it is, minus its heads.

The transformer blocks are timm's `Block`; `vit_blocks.block_forward` (shared with the ViT CAM) returns
their head-averaged attention probabilities.

`stem_stride` (not in the paper): 2 is the official stem (output stride 16); 1 halves every
stride (output stride 8) for the tiny toy model, whose 96-pixel crops would otherwise give a
6x6 grid.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import WeightsError
from .backbones import cnn_stages
from .vit_blocks import block_forward, identity_query_key

#: the stem stages a hybrid Conformer's CNN branch can start from, and the attention starts
HYBRID_CNN_STRIDES = (4, 16)
ATTN_INITS = ("random", "identity")

#: the heads of the ImageNet file (1000 classes) never load into a WSSS model
HEAD_PREFIXES = ("trans_cls_head.", "conv_cls_head.")

_BatchNorm = partial(nn.BatchNorm2d, eps=1e-6)
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class ConvBlock(nn.Module):
    """Bottleneck 1x1 → 3x3 (stride) → 1x1 with a shortcut (1x1 conv + BN if `res_conv`).

    `forward(x, injected)`: `injected` (the FCUUp output) is added to the ReLU output of the
    first 1x1 conv; returns (output, the 3x3 conv's ReLU output `x2`, which feeds FCUDown)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, res_conv: bool = False) -> None:
        super().__init__()
        mid = out_ch // 4
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn1 = _BatchNorm(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _BatchNorm(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn3 = _BatchNorm(out_ch)
        self.act3 = nn.ReLU(inplace=True)
        self.res_conv = res_conv
        if res_conv:
            self.residual_conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.residual_bn = _BatchNorm(out_ch)

    def forward(self, x: torch.Tensor, injected: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        shortcut = self.residual_bn(self.residual_conv(x)) if self.res_conv else x
        h = self.act1(self.bn1(self.conv1(x)))
        if injected is not None:
            h = h + injected
        x2 = self.act2(self.bn2(self.conv2(h)))
        return self.act3(self.bn3(self.conv3(x2)) + shortcut), x2


class FCUDown(nn.Module):
    """CNN map [B, C, H, W] → tokens [B, 1 + (H/r)(W/r), D]: 1x1 conv, r x r average pool,
    LayerNorm, GELU, with the current class token prepended."""

    def __init__(self, in_ch: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        self.conv_project = nn.Conv2d(in_ch, embed_dim, 1)
        self.sample_pooling = nn.AvgPool2d(stride, stride)
        self.ln = _LayerNorm(embed_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = self.act(self.ln(self.sample_pooling(self.conv_project(x)).flatten(2).transpose(1, 2)))
        return torch.cat([tokens[:, :1], t], dim=1)


class FCUUp(nn.Module):
    """Tokens [B, 1 + h*w, D] → CNN map [B, C, h*r, w*r]: patch tokens only, 1x1 conv, BN,
    ReLU, nearest upsampling by r."""

    def __init__(self, embed_dim: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv_project = nn.Conv2d(embed_dim, out_ch, 1)
        self.bn = _BatchNorm(out_ch)
        self.act = nn.ReLU()

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, d = tokens.shape
        x = tokens[:, 1:].transpose(1, 2).reshape(b, d, *grid)
        x = self.act(self.bn(self.conv_project(x)))
        return F.interpolate(x, scale_factor=self.stride, mode="nearest") if self.stride > 1 else x


class ConvTransBlock(nn.Module):
    """One coupled stage: CNN bottleneck, FCUDown, ViT block, FCUUp, fusion bottleneck."""

    def __init__(self, in_ch: int, out_ch: int, res_conv: bool, stride: int, token_stride: int,
                 embed_dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path: float, last_fusion: bool = False) -> None:
        super().__init__()
        self.cnn_block = ConvBlock(in_ch, out_ch, stride, res_conv)
        # TransCAM: the last fusion block is a stride-1 projection block (Conformer: stride 2)
        self.fusion_block = ConvBlock(out_ch, out_ch, 1, res_conv=last_fusion)
        self.squeeze_block = FCUDown(out_ch // 4, embed_dim, token_stride)
        self.expand_block = FCUUp(embed_dim, out_ch // 4, token_stride)
        self.trans_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                 drop_path=drop_path, norm_layer=_LayerNorm)
        self.token_stride = token_stride

    def forward(self, x: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, x2 = self.cnn_block(x)
        # the class-token slot receives 2 x cls here (FCUDown prepends a copy): official, and
        # what the ImageNet weights were trained with
        tokens, attn = block_forward(self.trans_block, self.squeeze_block(x2, tokens) + tokens)
        grid = (x2.shape[2] // self.token_stride, x2.shape[3] // self.token_stride)
        x, _ = self.fusion_block(x, self.expand_block(tokens, grid))
        return x, tokens, attn


class Conformer(nn.Module):
    """Conformer with TransCAM's heads: a 3x3 CAM conv on the CNN branch, a linear head on
    the class token.

    `forward(x)` with x [B, 3, H, W], H and W multiples of `output_stride`, returns
      `cam`    M [B, num_classes, H/s, W/s] raw CNN CAM (3x3 conv with bias, no ReLU),
      `logits` [B, num_classes] = GAP(M) + token-head logits (TransCAM sums them),
      `attn`   [B, depth, 1 + N, 1 + N] per-block head-mean attention (rows = queries,
               class token first, N = (H/s)(W/s)).
    Sizes: Conformer-S is base_channel 64, channel_ratio 4, embed_dim 384, depth 12, 6 heads.
    """

    def __init__(self, num_classes: int = 21, base_channel: int = 64, channel_ratio: int = 4,
                 stem_channels: int = 64, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.1, stem_stride: int = 2, in_chans: int = 3,
                 hybrid_stem: str | None = None, stem_pretrained: bool = False,
                 train_stem: bool = True, hybrid_cnn_stride: int = 4,
                 attn_init: str = "random") -> None:
        super().__init__()
        if depth % 3 or depth < 3:
            raise ValueError(f"conformer depth {depth}: must be a positive multiple of 3")
        if stem_stride not in (1, 2):
            raise ValueError(f"conformer stem_stride {stem_stride}: must be 1 or 2")
        if hybrid_cnn_stride not in HYBRID_CNN_STRIDES:
            raise ValueError(f"conformer hybrid_cnn_stride {hybrid_cnn_stride}: must be one of {HYBRID_CNN_STRIDES}")
        if attn_init not in ATTN_INITS:
            raise ValueError(f"conformer attn_init {attn_init!r}: must be one of {ATTN_INITS}")
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.output_stride = 8 * stem_stride
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.hybrid = hybrid_stem is not None
        if self.hybrid:
            if stem_stride != 2:
                raise ValueError("conformer with a hybrid stem: stem_stride must be 2 (stride 16)")
            # the CNN stages (stride 4) feed the CNN branch; stages 2-3 (stride 16) embed the
            # patches as a hybrid ViT does (ViT paper sec. 3.1), so attention starts from
            # ImageNet features; layer4 is never run
            lite = cnn_stages(hybrid_stem, strides=(2, 2, 2, 1), pretrained=stem_pretrained,
                              frozen_bn=True)
            lite.layer4 = nn.Identity()
            # stride 16: the CNN branch too starts from the stride-16 features, so every coupled
            # block runs on ImageNet features at the token grid (none of them downsamples)
            self.hybrid_cnn_stride = hybrid_cnn_stride
            stem_channels = lite.out_channels[1 if hybrid_cnn_stride == 4 else 3]
            patch_in, patch_kernel = lite.out_channels[3], 1
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_channels, 7, stride=stem_stride, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(stem_channels)
            self.act1 = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            patch_in, patch_kernel = stem_channels, 4
        ch = [base_channel * channel_ratio * m for m in (1, 2, 4)]
        self.conv_1 = ConvBlock(stem_channels, ch[0], 1, res_conv=True)
        self.trans_patch_conv = nn.Conv2d(patch_in, embed_dim, patch_kernel, stride=patch_kernel)
        self.trans_1 = Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                             drop_path=dpr[0], norm_layer=_LayerNorm)
        per_stage = depth // 3
        index, in_ch = 2, ch[0]
        at_token_grid = self.hybrid and hybrid_cnn_stride == 16
        for stage, (out_ch, token_stride) in enumerate(zip(ch, (1, 1, 1) if at_token_grid else (4, 2, 1))):
            for j in range(per_stage - 1 if stage == 0 else per_stage):
                first = stage > 0 and j == 0
                self.add_module(f"conv_trans_{index}", ConvTransBlock(
                    in_ch, out_ch, res_conv=first, stride=2 if first and not at_token_grid else 1,
                    token_stride=token_stride, embed_dim=embed_dim, num_heads=num_heads,
                    mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[index - 1],
                    last_fusion=index == depth))
                index, in_ch = index + 1, out_ch
        self.trans_norm = nn.LayerNorm(embed_dim)
        self.trans_cls_head = nn.Linear(embed_dim, num_classes)
        self.conv_cls_head = nn.Conv2d(ch[2], num_classes, 3, padding=1)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        if attn_init == "identity":
            for blk in [self.trans_1] + [b.trans_block for b in self.coupled_blocks()]:
                identity_query_key(blk.attn.qkv)
        if self.hybrid:  # added after the initialisation: keeps its ImageNet weights
            self.stem = lite
            self.stem.requires_grad_(train_stem)

    def coupled_blocks(self) -> list[ConvTransBlock]:
        return [getattr(self, f"conv_trans_{i}") for i in range(2, self.depth + 1)]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final CNN map f [B, C3, H/s, W/s], final tokens [B, 1+N, D] before the head
        LayerNorm, attention [B, depth, 1+N, 1+N])."""
        s = self.output_stride
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"conformer input {tuple(x.shape[-2:])}: height and width must be "
                             f"multiples of {s}")
        if self.hybrid:
            early = self.stem.layer1(self.stem.stem(x))
            patches = self.stem.layer3(self.stem.layer2(early))
            base = early if self.hybrid_cnn_stride == 4 else patches
        else:
            base = patches = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x, _ = self.conv_1(base)
        tokens = self.trans_patch_conv(patches).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens, attn = block_forward(self.trans_1, tokens)
        attns = [attn]
        for blk in self.coupled_blocks():
            x, tokens, attn = blk(x, tokens)
            attns.append(attn)
        return x, tokens, torch.stack(attns, dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f, tokens, attn = self.forward_features(x)
        cam = self.conv_cls_head(f)
        token_logits = self.trans_cls_head(self.trans_norm(tokens[:, 0]))
        return {"cam": cam, "logits": cam.mean(dim=(2, 3)) + token_logits, "attn": attn}

    def load_pretrained(self, path: str | Path) -> None:
        """Load an official ImageNet Conformer file (timm's `custom_load` hook).

        The file is a state dict or a checkpoint with a `model` entry. Its two heads are
        dropped; every other key must exist in this model with the same shape and every
        parameter or buffer of this model outside the heads must be in the file, otherwise a
        one-line WeightsError names the file, the first offending key and the fix.
        """
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsError(f"{path}: Conformer weights not found; download "
                               f"Conformer_small_patch16.pth there or fix model.pretrained_file") from None
        except Exception as e:  # truncated or not a torch file
            raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}); "
                               f"download it again") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path}: not a state dict of tensors (nor a checkpoint with a "
                               f"'model' entry); point model.pretrained_file at the Conformer file")
        state = {k.removeprefix("module."): v for k, v in state.items()
                 if not k.removeprefix("module.").startswith(HEAD_PREFIXES)}
        own = {k: v for k, v in self.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        wrong = [k for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
        if unexpected or missing or wrong:
            if wrong:
                k = wrong[0]
                what = f"{k} has shape {tuple(state[k].shape)}, model wants {tuple(own[k].shape)}"
            elif missing:
                what = f"{len(missing)} model keys missing, first {missing[0]}"
            else:
                what = f"{len(unexpected)} unexpected keys, first {unexpected[0]}"
            raise WeightsError(f"{path}: does not match this Conformer ({what}); use the official "
                               f"file of the same size (Conformer-S: Conformer_small_patch16.pth)")
        self.load_state_dict(state, strict=False)


def _init_weights(m: nn.Module) -> None:
    """Official initialisation: trunc-normal Linear, unit norms, Kaiming fan-out convs."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


#: read by timm's `register_model`: no URL exists; weights come from `pretrained_file`
default_cfgs = generate_default_cfgs({
    "conformer_small_patch16.in1k": {"num_classes": 1000, "custom_load": True,
                                     "classifier": ("trans_cls_head", "conv_cls_head")},
    "conformer_tiny_toy.untrained": {"num_classes": 0, "input_size": (3, 96, 96)},
    "conformer_lite0_hybrid.untrained": {"num_classes": 0, "input_size": (3, 224, 224)},
})


def _create(name: str, pretrained: bool, **kwargs) -> Conformer:
    file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
    if pretrained and not file:
        raise WeightsError(f"backbone {name}: no download exists; set model.pretrained_file to "
                           f"the official ImageNet file (Conformer_small_patch16.pth)")
    return build_model_with_cfg(Conformer, name, pretrained, **kwargs)


@register_model
def conformer_small_patch16(pretrained: bool = False, **kwargs) -> Conformer:
    """Conformer-S/16 as TransCAM uses it (37.7 M parameters with ImageNet heads)."""
    args = dict(base_channel=64, channel_ratio=4, stem_channels=64, embed_dim=384, depth=12,
                num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1)
    return _create("conformer_small_patch16", pretrained, **dict(args, **kwargs))


@register_model
def conformer_tiny_toy(pretrained: bool = False, **kwargs) -> Conformer:
    """A narrow, shallow Conformer for CPU toy runs (output stride 8, 6 blocks, ~0.9 M
    parameters); trained from scratch."""
    if pretrained:
        raise WeightsError("backbone conformer_tiny_toy: no pretrained weights exist; set pretrained: false")
    args = dict(base_channel=16, channel_ratio=2, stem_channels=16, embed_dim=96, depth=6,
                num_heads=3, mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.0, stem_stride=1)
    return _create("conformer_tiny_toy", False, **dict(args, **kwargs))


@register_model
def conformer_lite0_hybrid(pretrained: bool = False, **kwargs) -> Conformer:
    """A small hybrid Conformer for CPU toy runs: the CNN branch starts from EfficientNet-Lite0's
    stem and first stage (stride 4), the patches are Lite0's stride-16 features (1x1 embedding),
    then 6 coupled blocks (embed 192, 3 heads; CNN 32/64/128 channels), output stride 16.
    `pretrained` must be false (no Conformer weights); `stem_pretrained` loads the offline Lite0
    ImageNet weights into the stem, `train_stem: false` freezes it; `hybrid_cnn_stride=16`
    starts the CNN branch from the stride-16 features too; `attn_init="identity"` starts every
    attention as a feature affinity (`vit_blocks.identity_query_key`)."""
    if pretrained:
        raise WeightsError("backbone conformer_lite0_hybrid: no Conformer weights exist; set "
                           "pretrained: false (the Lite0 stem loads its own with stem_pretrained)")
    args = dict(base_channel=16, channel_ratio=2, embed_dim=192, depth=6, num_heads=3,
                mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.0, stem_stride=2,
                hybrid_stem="tf_efficientnet_lite0")
    return _create("conformer_lite0_hybrid", False, **dict(args, **kwargs))
