"""CNN and ViT CAM branches (docs/methods/cobra.md "Architecture", docs/algorithms.md
§cam-models): shapes, frozen BN, detach, attention forward,
positional-embedding resampling, parameter groups. Random weights only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsss_core.models.backbones import FrozenStatsBatchNorm2d
from wsss_core.models.resnet_cam import ResNetCAM
from wsss_core.models.vit_cam import ViTCAM, interpolate_pos_embed


def _tiny_cnn(**kw) -> ResNetCAM:
    torch.manual_seed(0)
    return ResNetCAM("resnet_tiny", 20, with_background=True, proj_dim=16,
                     strides=(2, 2, 1, 1), **kw)


def _tiny_vit(proj_dim: int | None = 16) -> ViTCAM:
    torch.manual_seed(0)
    return ViTCAM("vit_tiny_p8", 20, proj_dim=proj_dim, img_size=96, patch_size=8,
                  embed_dim=48, depth=3, num_heads=3)


# ---------------------------------------------------------------- paper-size shapes

def test_paper_resnet152_shapes() -> None:
    torch.manual_seed(0)
    model = ResNetCAM("resnet152", 20, with_background=True, proj_dim=256, strides=(2, 2, 2, 1))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out["logits"].shape == (1, 21, 14, 14)
    assert out["proj"].shape == (1, 256, 14, 14)
    assert out["features"].shape == (1, 2048, 14, 14)
    assert model.classifier.bias is None and model.proj.bias is None


def test_paper_deit_small_shapes_and_attention_forward_equals_timm() -> None:
    torch.manual_seed(0)
    model = ViTCAM("deit_small_patch16_224", 20, proj_dim=256).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        tokens, _, _ = model.tokens(x)
        want = model.vit.forward_features(x)
    assert out["logits"].shape == (1, 21, 14, 14)
    assert out["attn"].shape == (1, 12, 197, 197)
    assert out["proj"].shape == (1, 256, 14, 14)
    torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tiny configs

def test_tiny_shapes_and_cam() -> None:
    cnn, vit = _tiny_cnn(), _tiny_vit()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        c, v = cnn(x), vit(x)
        cam = cnn.cam(x)
    assert c["logits"].shape == (2, 21, 12, 12) and c["proj"].shape == (2, 16, 12, 12)
    assert v["logits"].shape == (2, 21, 12, 12) and v["proj"].shape == (2, 16, 12, 12)
    assert v["attn"].shape == (2, 3, 145, 145)
    torch.testing.assert_close(v["attn"].sum(-1), torch.ones(2, 3, 145))
    torch.testing.assert_close(cam, F.relu(c["logits"]))
    baseline = ResNetCAM("resnet_tiny", 20, with_background=False, strides=(2, 2, 1, 1))
    with torch.no_grad():
        out = baseline(x)
    assert out["logits"].shape == (2, 20, 12, 12) and "proj" not in out


def test_tiny_attention_forward_equals_timm_forward_features() -> None:
    vit = _tiny_vit().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens, attn, grid = vit.tokens(x)
        want = vit.vit.forward_features(x)
        # explicit head-mean attention of block 0 from its own weights
        blk = vit.vit.blocks[0]
        t0 = vit.vit._pos_embed(vit.vit.patch_embed(x))
        qkv = blk.attn.qkv(blk.norm1(t0)).reshape(2, 145, 3, 3, 16).permute(2, 0, 3, 1, 4)
        ref = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(16)).softmax(-1).mean(1)
    assert grid == (12, 12)
    torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn[:, 0], ref, rtol=1e-5, atol=1e-6)


def test_vit_infer_one_forward_gives_cam_and_attention() -> None:
    vit = _tiny_vit().eval()
    x = torch.randn(1, 3, 100, 90)  # 12 x 11 grid, trailing pixels dropped
    with torch.no_grad():
        out = vit(x)
        inf = vit.infer(x)
    a = out["attn"][:, :, 0, 1:].sum(1).reshape(1, 1, 12, 11)
    torch.testing.assert_close(inf["attention"], a)
    torch.testing.assert_close(inf["cam"], F.relu(a * out["logits"]))
    assert inf["cam"].shape == (1, 21, 12, 11)


# ---------------------------------------------------------------- positional embedding

def _dino_reference(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's `interpolate_pos_encoding` for a square stored grid, as written there."""
    npatch, n = h * w, pos_embed.shape[1] - 1
    if npatch == n and h == w:
        return pos_embed
    dim = pos_embed.shape[-1]
    side = int(math.sqrt(n))
    h0, w0 = h + 0.1, w + 0.1
    patch = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                          scale_factor=(h0 / side, w0 / side), mode="bicubic")
    assert int(h0) == patch.shape[-2] and int(w0) == patch.shape[-1]
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).view(1, -1, dim)], dim=1)


def test_pos_embed_interpolation_320x480() -> None:
    torch.manual_seed(0)
    vit = ViTCAM("vit_custom_p16", 20, proj_dim=8, img_size=224, patch_size=16, embed_dim=32,
                 depth=1, num_heads=2)
    pe = vit.vit.pos_embed.detach()
    assert interpolate_pos_embed(pe, (14, 14), (14, 14)) is pe
    resampled = interpolate_pos_embed(pe, (14, 14), (20, 30))
    assert resampled.shape == (1, 1 + 600, 32)
    torch.testing.assert_close(resampled, _dino_reference(pe, 20, 30), rtol=0, atol=0)
    torch.testing.assert_close(resampled[:, :1], pe[:, :1])
    # a constant field stays constant and a ramp stays increasing on the finer grid
    const = torch.full((1, 197, 1), 0.3)
    torch.testing.assert_close(interpolate_pos_embed(const, (14, 14), (20, 30)),
                               torch.full((1, 601, 1), 0.3))
    ys, xs = torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij")
    ramp = torch.cat([torch.zeros(1, 1, 1), ((ys + xs) / 10).reshape(1, 196, 1)], dim=1)
    fine = interpolate_pos_embed(ramp, (14, 14), (20, 30))[0, 1:, 0].reshape(20, 30)
    assert (fine.diff(dim=1) > 0).all() and (fine.diff(dim=0) > 0).all()
    with torch.no_grad():
        out = vit(torch.randn(1, 3, 330, 485))  # floor(330/16) = 20, floor(485/16) = 30
    assert out["logits"].shape == (1, 21, 20, 30) and out["proj"].shape == (1, 8, 20, 30)
    assert out["attn"].shape == (1, 1, 601, 601)


# ---------------------------------------------------------------- CNN training behaviour

def test_frozen_bn_and_detach_after_train_step() -> None:
    model = _tiny_cnn()
    assert all(isinstance(m, FrozenStatsBatchNorm2d) for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))
    stem_conv, stem_bn = model.backbone.stem[0], model.backbone.stem[1]
    assert not any(p.requires_grad for p in (*stem_conv.parameters(), *stem_bn.parameters()))
    # non-trivial running stats so that an update would show; non-zero gammas (timm zero-inits
    # the last BN of each block, which would block the gradient of the BNs before it)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    backbone, new = model.param_groups(train_proj=True)
    opt = torch.optim.SGD([{"params": backbone, "lr": 0.1}, {"params": new, "lr": 1.0}])
    model.train()
    out = model(torch.randn(4, 3, 96, 96))
    loss = out["logits"].pow(2).mean() + out["proj"].pow(2).mean()
    opt.zero_grad()
    loss.backward()
    for stage in (model.backbone.stem, model.backbone.layer1, model.backbone.layer2):
        assert all(p.grad is None for p in stage.parameters())
    opt.step()
    after = model.state_dict()
    for k in before:
        if "running" in k or "num_batches" in k:
            assert torch.equal(before[k], after[k]), k
        elif k.startswith(("backbone.stem", "backbone.layer1", "backbone.layer2")):
            assert torch.equal(before[k], after[k]), k
    bn_affine = [k for k in before if k.startswith(("backbone.layer3", "backbone.layer4"))
                 and ".bn" in k and k.endswith(("weight", "bias"))]
    assert bn_affine and all(not torch.equal(before[k], after[k]) for k in bn_affine)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_no_detach_lets_gradient_reach_stem() -> None:
    model = _tiny_cnn(detach_early=False)
    model(torch.randn(1, 3, 64, 64))["logits"].sum().backward()
    first_conv = next(m for m in model.backbone.stem.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert model.backbone.layer1[0].conv1.weight.grad is not None


# ---------------------------------------------------------------- parameter groups

def test_cnn_param_groups_official_and_fix() -> None:
    model = _tiny_cnn()
    backbone, new = model.param_groups(train_proj=False)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(backbone) == ids(model.backbone.parameters())
    assert ids(new) == {id(model.classifier.weight)}
    assert id(model.proj.weight) not in ids(backbone) | ids(new)  # official: never trained
    _, new_fix = model.param_groups(train_proj=True)
    assert ids(new_fix) == {id(model.classifier.weight), id(model.proj.weight)}


def test_vit_param_groups_official_and_intended() -> None:
    vit = _tiny_vit()
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    every = ids(vit.parameters())
    base, new = vit.param_groups("official")
    assert ids(new) == {id(vit.head.bias), id(vit.proj.weight)}
    assert ids(base) == every - ids(new) and id(vit.head.weight) in ids(base)
    assert {id(vit.vit.cls_token), id(vit.vit.pos_embed)} <= ids(base)
    base_i, new_i = vit.param_groups("intended")
    assert ids(new_i) == {id(vit.head.weight), id(vit.head.bias), id(vit.proj.weight)}
    assert ids(base_i) == every - ids(new_i)
    with pytest.raises(Exception):
        vit.param_groups("other")
