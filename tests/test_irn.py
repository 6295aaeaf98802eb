"""IRN network, boundary map and affinity/displacement loss (docs/algorithms.md §irn)."""
from __future__ import annotations

import math

import pytest
import torch

from wsss_core.models.irn import IRN, affinity_displacement_loss, pair_displacement
from wsss_core.ops.path_index import PathIndex, affinity_labels

TINY = "resnet_tiny"


@pytest.fixture(scope="module")
def tiny() -> IRN:
    torch.manual_seed(0)
    return IRN(TINY)


def test_shapes_512(tiny):
    tiny.eval()
    with torch.no_grad():
        edge, disp = tiny(torch.randn(1, 3, 512, 512))
    assert edge.shape == (1, 1, 128, 128) and disp.shape == (1, 2, 128, 128)


def test_boundary_map_shapes(tiny):
    tiny.eval()
    b = tiny.boundary_map(torch.randn(2, 3, 375, 500))
    assert b.shape == (1, 94, 125)
    assert float(b.min()) >= 0 and float(b.max()) <= 1
    # images larger than the crop are padded to a multiple of 16, not cropped ([FIX])
    assert tiny.boundary_map(torch.randn(2, 3, 530, 97), crop=128).shape == (1, 133, 25)


def test_boundary_map_matches_reference_recipe(tiny):
    tiny.eval()
    pair = torch.randn(2, 3, 50, 61)
    with torch.no_grad():
        edge, _ = tiny(torch.nn.functional.pad(pair, (0, 64 - 61, 0, 64 - 50)))
    edge = edge[..., :13, :16]  # ⌈50/4⌉, ⌈61/4⌉
    expected = torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2)
    assert torch.allclose(tiny.boundary_map(pair, crop=64), expected, atol=1e-6)


def test_boundary_map_is_mirror_symmetric(tiny):
    tiny.eval()
    img = torch.randn(1, 3, 64, 80)
    pair = torch.cat([img, img.flip(-1)])
    swapped = torch.cat([img.flip(-1), img])
    # σ((e0 + flip e1)/2) of the swapped pair is the mirror of the original map
    assert torch.allclose(tiny.boundary_map(swapped, crop=64),
                          tiny.boundary_map(pair, crop=64).flip(-1), atol=1e-5)


def test_backbone_frozen_and_param_groups(tiny):
    tiny.train()
    assert tiny.training and not tiny.backbone.training
    edge_params, dp_params, backbone_params = tiny.param_groups()
    backbone_ids = {id(p) for p in tiny.backbone.parameters()}
    group_ids = {id(p) for p in edge_params + dp_params}
    assert not backbone_ids & group_ids and backbone_params == []
    trainable = {id(p) for p in tiny.parameters() if p.requires_grad}
    assert trainable == group_ids
    assert len(edge_params) == 17 and len(dp_params) == 22
    # GroupNorm group counts of the official IRN branches
    assert tiny.edge1[1].num_groups == 4 and tiny.dp1[1].num_groups == 8
    assert tiny.dp2[1].num_groups == 16 and tiny.dp7[1].num_groups == 16


def test_mean_shift(tiny):
    tiny.mean_shift.running_mean.copy_(torch.tensor([1.5, -2.0]))
    x = torch.randn(1, 3, 64, 64)
    try:
        tiny.eval()
        with torch.no_grad():
            _, d_eval = tiny(x)
        tiny.train()
        with torch.no_grad():
            _, d_train = tiny(x)
    finally:
        tiny.mean_shift.running_mean.zero_()
    assert torch.allclose(d_train - d_eval, torch.tensor([1.5, -2.0]).view(1, 2, 1, 1), atol=1e-5)


def _oracle_loss(edge_logits, disp, bg_pos, fg_pos, neg, pi: PathIndex) -> dict[str, float]:
    """Per-element loops over the formulas of docs/algorithms.md §irn."""
    eps = 1e-5
    n_b = edge_logits.shape[0]
    g_h, g_w = pi.grid
    c_w, rf = pi.crop[1], pi.radius_floor
    b = torch.sigmoid(edge_logits.double())[:, 0]
    d = disp.double()
    sums = dict(bg=0.0, fg=0.0, neg=0.0, dfg=0.0, dbg=0.0)
    cnt = dict(bg=0.0, fg=0.0, neg=0.0)
    for n in range(n_b):
        for k, path in enumerate(pi.paths):
            dy, dx = path[0]
            for s in range(pi.n_src):
                i, j = s // c_w, rf + s % c_w
                a = 1 - max(float(b[n, i + py, j + px]) for py, px in path)
                lp, ln = -math.log(a + eps), -math.log(1 + eps - a)
                delta = [float(d[n, c, i, j] - d[n, c, i + dy, j + dx]) for c in range(2)]
                if bg_pos[n, k, s]:
                    sums["bg"] += lp
                    cnt["bg"] += 1
                    sums["dbg"] += abs(delta[0]) + abs(delta[1])
                if fg_pos[n, k, s]:
                    sums["fg"] += lp
                    cnt["fg"] += 1
                    sums["dfg"] += abs(delta[0] - dy) + abs(delta[1] - dx)
                if neg[n, k, s]:
                    sums["neg"] += ln
                    cnt["neg"] += 1
    out = dict(pos_bg=sums["bg"] / (cnt["bg"] + eps), pos_fg=sums["fg"] / (cnt["fg"] + eps),
               neg=sums["neg"] / (cnt["neg"] + eps), dp_fg=sums["dfg"] / (2 * cnt["fg"] + eps),
               dp_bg=sums["dbg"] / (2 * cnt["bg"] + eps))
    out["total"] = ((out["pos_bg"] / 2 + out["pos_fg"] / 2) + out["neg"]) / 2 \
        + (out["dp_fg"] + out["dp_bg"]) / 2
    return out


def test_loss_matches_loop_oracle():
    g_h, g_w = 12, 15
    pi = PathIndex(5, (g_h, g_w))
    gen = torch.Generator().manual_seed(3)
    edge = torch.randn(2, 1, g_h, g_w, generator=gen)
    disp = torch.randn(2, 2, g_h, g_w, generator=gen) * 3
    lab = torch.randint(0, 3, (2, g_h, g_w), generator=gen).to(torch.uint8)
    lab[:, :, 5:7] = 255
    masks = affinity_labels(lab, pi)
    got = affinity_displacement_loss(edge, disp, *masks, pi)
    exp = _oracle_loss(edge, disp, *masks, pi)
    assert set(got) == set(exp)
    for key in exp:
        assert got[key].item() == pytest.approx(exp[key], rel=1e-4), key


def test_loss_sanity_values():
    pi = PathIndex(5, (12, 14))
    lab = torch.zeros(1, 12, 14, dtype=torch.uint8)
    lab[0, 3:9, 2:7] = 4
    lab[0, 2:10, 8:13] = 9
    masks = affinity_labels(lab, pi)
    assert all(int(m.sum()) > 0 for m in masks)
    disp = torch.zeros(1, 2, 12, 14)
    # logits 0 → b = 0.5 → ℓ⁺ = ℓ⁻ = −log(0.5 + 1e-5)
    out = affinity_displacement_loss(torch.zeros(1, 1, 12, 14), disp, *masks, pi)
    half = -math.log(0.5 + 1e-5)
    for key in ("pos_bg", "pos_fg", "neg"):
        assert out[key].item() == pytest.approx(half, rel=1e-5)
    # b ≡ 0 → ℓ⁺ ≈ −1e-5, ℓ⁻ = −log(1e-5) ≈ 11.513
    # (float64: in float32, 1 + 1e-5 − 1 rounds to 1.0014e-5 → 11.5116, as in the reference)
    out = affinity_displacement_loss(torch.full((1, 1, 12, 14), -1e4, dtype=torch.float64),
                                     disp.double(), *masks, pi)
    assert out["pos_bg"].item() == pytest.approx(-1e-5, abs=1e-9)
    assert out["neg"].item() == pytest.approx(-math.log(1e-5), abs=1e-6)
    # zero displacement: no background displacement loss
    assert out["dp_bg"].item() == 0.0
    # a perfect centroid field D(p) = c − p gives zero fg displacement loss
    ys, xs = torch.meshgrid(torch.arange(12.), torch.arange(14.), indexing="ij")
    field = torch.stack([5.0 - ys, 6.0 - xs])[None]
    out = affinity_displacement_loss(torch.zeros(1, 1, 12, 14), field, *masks, pi)
    assert out["dp_fg"].item() == pytest.approx(0.0, abs=1e-6)
    pair = pair_displacement(field, pi)
    assert torch.allclose(pair, pi.disp_target().expand_as(pair))


def test_tiny_training_step_updates_heads_only():
    torch.manual_seed(1)
    model = IRN(TINY)
    model.train()
    pi = PathIndex(10, (32, 32))
    img = torch.randn(2, 3, 128, 128)
    lab = torch.zeros(2, 32, 32, dtype=torch.uint8)
    lab[:, 8:24, 6:20] = 12
    lab[:, :, 28:] = 255
    edge_params, dp_params, backbone_params = model.param_groups()
    opt = torch.optim.SGD([dict(params=edge_params, lr=0.1), dict(params=dp_params, lr=1.0)],
                          momentum=0.0, weight_decay=1e-4)
    before_bb = [p.clone() for p in model.backbone.parameters()]
    before_edge = [p.clone() for p in edge_params]
    edge, disp = model(img)
    losses = affinity_displacement_loss(edge, disp, *affinity_labels(lab, pi), pi)
    assert torch.isfinite(losses["total"])
    opt.zero_grad()
    losses["total"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_bb, model.backbone.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_edge, edge_params))


def test_train_backbone_gets_gradients_but_keeps_bn_statistics():
    torch.manual_seed(3)
    model = IRN(TINY, train_backbone=True)
    model.train()
    pi = PathIndex(5, (16, 16))
    lab = torch.zeros(2, 16, 16, dtype=torch.uint8)
    lab[:, 4:12, 3:10] = 7
    edge_params, dp_params, backbone_params = model.param_groups()
    assert {id(p) for p in backbone_params} == {id(p) for p in model.backbone.parameters()}
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    edge, disp = model(torch.randn(2, 3, 64, 64))
    affinity_displacement_loss(edge, disp, *affinity_labels(lab, pi), pi)["total"].backward()
    assert all(p.grad is not None for p in backbone_params)
    assert any(p.grad.abs().sum() > 0 for p in backbone_params)
    after = model.backbone.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())


@pytest.mark.slow
def test_paper_backbone_training_step():
    torch.manual_seed(2)
    model = IRN("resnet152")
    model.train()
    pi = PathIndex(10, (128, 128))
    lab = torch.zeros(1, 128, 128, dtype=torch.uint8)
    lab[0, 30:90, 20:70] = 7
    lab[0, 60:120, 80:125] = 15
    lab[0, :, 70:75] = 255
    edge_params, dp_params, backbone_params = model.param_groups()
    opt = torch.optim.SGD([dict(params=edge_params, lr=0.1), dict(params=dp_params, lr=1.0)],
                          weight_decay=1e-4)
    edge, disp = model(torch.randn(1, 3, 512, 512))
    assert edge.shape == (1, 1, 128, 128) and disp.shape == (1, 2, 128, 128)
    losses = affinity_displacement_loss(edge, disp, *affinity_labels(lab, pi), pi)
    opt.zero_grad()
    losses["total"].backward()
    opt.step()
    assert torch.isfinite(losses["total"])
    assert all(p.grad is not None for p in edge_params + dp_params)
