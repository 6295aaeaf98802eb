"""CoBra's ViT block start (`model.vit.init_values`, `model.vit.qk_identity`): what each does
to a new hybrid ViT at initialisation, that it is off by default, and how a bad value is
rejected."""
from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from wsss_core import config as wc
from wsss_core.errors import ConfigError
from wsss_core.methods.cobra import CobraMethod
from wsss_core.models.vit_blocks import block_forward
from wsss_core.models.vit_cam import ViTCAM, create_vit, interpolate_pos_embed

from test_config import CONFIG, rejected


def _hybrid(**start) -> ViTCAM:
    torch.manual_seed(0)
    return ViTCAM("hybrid", 5, proj_dim=8, img_size=64, embed_dim=48, depth=3, num_heads=3,
                  pretrained=False, hybrid_stem="tf_efficientnet_lite0", train_stem=False,
                  **start).eval()


def _embedded(vit: ViTCAM, x: torch.Tensor) -> torch.Tensor:
    """The blocks' input [B, 1 + h*w, D]: class token + projected stem tokens + positions."""
    v = vit.vit
    patches = v.patch_embed.proj(v.patch_embed.backbone(x))
    t = torch.cat([v.cls_token.expand(x.shape[0], -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    return v.norm_pre(t + interpolate_pos_embed(v.pos_embed, vit.pos_grid, patches.shape[-2:]))


@pytest.mark.parametrize("init_values", [0.0, 1e-6])
def test_layer_scale_start_passes_the_projected_stem_tokens_through(init_values):
    vit = _hybrid(init_values=init_values)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens, attn, grid = vit.tokens(x)
        expected = vit.vit.norm(_embedded(vit, x))
    assert grid == (4, 6) and tokens.shape == (2, 25, 48) and attn.shape == (2, 3, 25, 25)
    tol = 0 if init_values == 0 else 1e-3
    assert torch.allclose(tokens, expected, atol=tol, rtol=0), (tokens - expected).abs().max()
    for blk in vit.vit.blocks:
        assert torch.all(blk.ls1.gamma == init_values) and torch.all(blk.ls2.gamma == init_values)
    # the gains are trained (1x group): the blocks can leave the start
    base, _ = vit.param_groups()
    assert any(p is vit.vit.blocks[0].ls1.gamma for p in base)
    vit.train()
    vit(x)["logits"].sum().backward()
    assert vit.vit.blocks[-1].ls2.gamma.grad.abs().sum() > 0


def test_qk_identity_attention_starts_as_the_scaled_token_affinity():
    vit = _hybrid(qk_identity=True)
    x = torch.randn(2, 3, 64, 64)
    heads, d = 3, 48
    with torch.no_grad():
        t = _embedded(vit, x)
        for blk in vit.vit.blocks:
            qkv = blk.attn.qkv
            assert torch.equal(qkv.weight[:d], torch.eye(d)) and torch.equal(qkv.weight[d:2 * d], torch.eye(d))
            assert not qkv.bias[:2 * d].any()
            h = blk.norm1(t).reshape(2, t.shape[1], heads, d // heads).transpose(1, 2)  # [B, heads, T, hd]
            logits = (h @ h.transpose(-2, -1)) * (d // heads) ** -0.5
            t, probs = block_forward(blk, t)
            assert torch.allclose(probs, logits.softmax(-1).mean(1), atol=1e-6)
    # values and the output projection keep their random start
    assert not torch.equal(vit.vit.blocks[0].attn.qkv.weight[2 * d:], torch.zeros(d, d))


def test_both_off_by_default_the_plain_timm_blocks():
    vit = _hybrid()
    for blk in vit.vit.blocks:
        assert isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)
        assert not torch.equal(blk.attn.qkv.weight[:48], torch.eye(48))
    assert not any("gamma" in k for k in vit.state_dict())
    s = CobraMethod.parse_settings({})["model"].vit
    assert s.init_values is None and s.qk_identity is False


def test_a_timm_vit_by_name_keeps_its_blocks():
    with pytest.raises(ConfigError, match="init_values / qk_identity start new"):
        create_vit("deit_small_patch16_224", img_size=224, patch_size=None, embed_dim=None,
                   depth=None, num_heads=None, pretrained=False, pretrained_file=None,
                   hybrid_stem=None, key="vit", init_values=1e-5)


@pytest.fixture()
def cfg() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def _set(cfg: dict, preset: str, **vit) -> dict:
    cfg["methods"]["cobra"]["presets"][preset]["model"]["vit"].update(vit)
    return cfg


@pytest.mark.parametrize("value", [-1e-5, "small", True, float("nan"), [1e-5]])
def test_bad_init_values_is_one_config_line(cfg, value):
    rejected(_set(cfg, "tiny", init_values=value),
             "methods.cobra.presets.tiny.model.vit.init_values", "null or a number ≥ 0")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_qk_identity_is_one_config_line(cfg, value):
    rejected(_set(cfg, "tiny", qk_identity=value),
             "methods.cobra.presets.tiny.model.vit.qk_identity", "true or false")


def test_block_start_on_the_pretrained_paper_vit_is_rejected(cfg):
    rejected(_set(cfg, "paper", init_values=1e-5),
             "methods.cobra.presets.paper.model.vit.init_values", "pretrained ones")
    cfg = _set(cfg, "paper", init_values=None, qk_identity=True)
    rejected(cfg, "methods.cobra.presets.paper.model.vit.qk_identity", "pretrained ones")


def test_good_values_validate(cfg):
    wc.validate_config(wc.apply_defaults(_set(cfg, "tiny", init_values=0, qk_identity=True)))
    wc.validate_config(wc.apply_defaults(_set(cfg, "tiny", init_values=1e-5, qk_identity=False)))
