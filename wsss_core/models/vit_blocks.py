"""The forward of a timm ViT `Block` that also returns its attention, and the identity start of
its query and key projections: shared by the ViT CAM (`vit_cam`) and the Conformer
(`conformer`)."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import ConfigError


def block_forward(blk: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm `Block.forward` (pre-norm MHSA + MLP, layer scale, drop path) that also returns
    the post-softmax attention averaged over heads, [B, T, T] (row = query, column = key)."""
    attn_mod = blk.attn
    if getattr(attn_mod, "gate", None) is not None:
        raise ConfigError("gated attention is not supported by the CAM attention forward")
    h = blk.norm1(x)
    B, N, _ = h.shape
    heads, head_dim = attn_mod.num_heads, attn_mod.head_dim
    qkv = attn_mod.qkv(h).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    probs = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    o = (attn_mod.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, heads * head_dim)
    o = attn_mod.norm(o) if hasattr(attn_mod, "norm") else o
    o = attn_mod.proj_drop(attn_mod.proj(o))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, probs.mean(dim=1)


def identity_query_key(qkv: nn.Linear) -> None:
    """Query and key projections of a fused qkv Linear [3D, D] set to the identity, their biases
    to zero (values keep their random start). The block's attention logits then start as the
    scaled dot products of its LayerNorm-ed input tokens h [B, T, D] within each head's slice
    of channels, head_dim^-1/2 · h_s h_s^T: a feature affinity instead of near-uniform weights.
    For new blocks on pretrained features (hybrid models) trained on data too small to learn
    attention from scratch."""
    d = qkv.in_features
    if qkv.out_features != 3 * d:
        raise ValueError(f"qkv Linear {d} -> {qkv.out_features}: not a fused [3D, D] projection")
    with torch.no_grad():
        qkv.weight[: 2 * d].copy_(torch.eye(d).repeat(2, 1))
        if qkv.bias is not None:
            qkv.bias[: 2 * d].zero_()
