"""SeCo (docs/methods/seco.md): loop oracles for the tag assignment, LiG, LiL and the bilateral
filter; the testable invariants of docs/methods/seco.md; the paper preset on CPU with random
weights."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.methods import create_method
from wsss_core.methods.base import StepContext
from wsss_core.methods.seco import (Reservoir, SeCoSettings, loss_weights, multi_scale_cam,
                                    seco_views, update_prototypes)
from wsss_core.optim import set_lr
from wsss_core.methods.seco_losses import (assign_csc_tags, bilateral_filter, cam_to_label,
                                           lig_loss, lil_loss, ptc_affinity_mask, ptc_loss,
                                           refine_cams_with_bkg, seg_loss)
from wsss_core.models.seco_vit import SeCoEncoder, SeCoNet, SeCoTeacher

TINY_VIT = dict(backbone="seco_vit_test", pretrained=False, patch_size=8, embed_dim=32, depth=3,
                num_heads=2, proj_hidden=48)


def _tiny_net(num_classes: int = 4) -> SeCoNet:
    torch.manual_seed(0)
    enc = SeCoEncoder("t", aux_layer=-2, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    return SeCoNet(enc, num_classes, proj_hidden=48, proj_dim=32)


# --- loop oracles ------------------------------------------------------------------------------

def _tags_loop(roi, num_crops, crop, thr, proportion="weighted"):
    """Tags and corners, one crop and one pixel at a time, from docs/methods/seco.md "One training
    step" 3."""
    B, H, W = roi.shape
    half = crop // 2
    tags, corners = [], []
    for b in range(B):
        r0 = [[0 if int(roi[b, i, j]) == 255 else int(roi[b, i, j]) for j in range(W)] for i in range(H)]
        r1 = [[max(v, 0) for v in row] for row in r0]
        ru = [[r1[i][j] + (r0[i][j] == -1) for j in range(W)] for i in range(H)]
        if proportion == "count":
            ru = [[int(v > 0) for v in row] for row in ru]
        cand = [(i - half, j - half) for i in range(half, H - half) for j in range(half, W - half)
                if r0[i][j] == -1]
        if len(cand) < num_crops:
            cand = [(i, j) for i in range(H - crop) for j in range(W - crop)]
        present = sorted({v for row in r1 for v in row if v})
        if len(present) >= 2:
            row_tags = [-1.0, -1.0]
        elif len(present) == 1:
            row_tags = [float(present[0])] * 2
            r1 = [[present[0] if r0[i][j] == -1 else r1[i][j] for j in range(W)] for i in range(H)]
        else:
            row_tags = [1.0, 1.0]
        perm = torch.randperm(len(cand), generator=torch.Generator().manual_seed(0))[:num_crops]
        pos = [cand[k] for k in perm.tolist()]
        for y, x in pos:
            rho = sum(ru[i][j] for i in range(y, y + crop) for j in range(x, x + crop)) / crop ** 2
            cls = {r1[i][j] for i in range(y, y + crop) for j in range(x, x + crop)} - {0}
            row_tags.append(0.0 if rho <= thr else (float(cls.pop()) if len(cls) == 1 else -1.0))
        tags.append(row_tags)
        corners.append(pos)
    return torch.tensor(tags), corners


@pytest.mark.parametrize("proportion", ["weighted", "count"])
def test_tag_assignment_matches_loop(proportion):
    g = torch.Generator().manual_seed(3)
    roi = torch.randint(0, 4, (3, 20, 22), generator=g)
    roi[roi == 3] = -1
    roi[0, :, 15:] = 255
    roi[1] = torch.where(roi[1] == 2, torch.ones_like(roi[1]), roi[1])  # one class + uncertain
    roi[2, 4:16, 4:18] = 0  # few uncertain pixels inside the window → random positions
    roi[2][roi[2] == -1] = 0
    img = torch.arange(3 * 3 * 20 * 22, dtype=torch.float).reshape(3, 3, 20, 22)
    (crops,), tags = assign_csc_tags([img], roi, num_crops=4, crop=6, threshold=0.2,
                                     proportion=proportion)
    want, corners = _tags_loop(roi, 4, 6, 0.2, proportion)
    torch.testing.assert_close(tags, want)
    assert crops.shape == (4, 3, 3, 6, 6)
    for b in range(3):
        for j, (y, x) in enumerate(corners[b]):
            torch.testing.assert_close(crops[j, b], img[b, :, y:y + 6, x:x + 6])


def _lig_loop(q, protos, tags, tau=0.1):
    C = protos.shape[0]
    present = {int(t) for t in tags if t > 0}
    total, count = 0.0, 0
    for i in range(q.shape[0]):
        t = int(tags[i])
        if t <= 0:
            continue
        count += 1
        s = [float(q[i] @ protos[c]) / tau for c in range(C)]
        total += s[t - 1] - math.log(sum(math.exp(s[c - 1]) for c in present))
    return -total / count if count else 0.0


def test_lig_matches_loop_and_has_no_prototype_gradient():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    protos = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    tags = torch.tensor([1, 3, -1, 0, 3, 4, 1, 0, -1, 4, 4, 1], dtype=torch.float64)
    loss = lig_loss(q, protos, tags)
    assert float(loss.detach()) == pytest.approx(_lig_loop(q.detach(), protos.detach(), tags), rel=1e-10)
    loss.backward()
    assert q.grad is not None and protos.grad is None  # invariant 22


def _lil_loop(q, bank, tags, bank_tags, tau=0.08):
    """docs/methods/seco.md "LiL" (rectification), one row and one column at a time."""
    n, m = q.shape[0], bank.shape[0]
    tags = [float(t) for t in tags]
    S = [[float(q[i] @ bank[j]) / tau for j in range(m)] for i in range(n)]
    L = [[S[i][j] - max(S[i]) for j in range(m)] for i in range(n)]
    P = [[float(tags[i] == float(bank_tags[j])) for j in range(m)] for i in range(n)]
    for i in range(n):
        if tags[i] == -1:
            P[i] = [0.0] * m
            L[i] = [0.0] * m
    Fp = [[L[i][j] * P[i][j] for j in range(m)] for i in range(n)]
    for i in range(n):
        mu = sum(Fp[i]) / m
        a = sum(1 for v in Fp[i] if v >= mu)
        b = sum(1 for v in Fp[i] if v < mu)
        if b / (a + 1e-6) > 10:
            tags[i] = 0.0
            Fp[i] = [0.0] * m
    for j in range(m):
        if float(bank_tags[j]) == -1:
            for i in range(n):
                L[i][j] = 0.0
    Z = sum(1 for row in Fp for v in row if v != 0)
    total = 0.0
    for i in range(n):
        E = [math.exp(v) if math.exp(v) != 1.0 else 0.0 for v in L[i]]
        D = sum(E)
        r = sum(Fp[i]) - m * math.log(D + 1e-12)
        if Z > 0 and D > 0 and r < 0:
            total += r / Z
    return -total / n, tags


def test_lil_reference_matches_loop():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1)
    tags = torch.tensor([1, 2, -1, 0, 2, 1, 3, 0], dtype=torch.float64)
    bank_tags = torch.randint(-1, 4, (40,), generator=g).double()
    # the anchor tagged 3 meets 38 same-tag entries all far below its row mean → rectified
    bank_tags[:38] = 3
    bank[:38] = F.normalize(-q[6] + 0.05 * torch.randn(38, 6, generator=g, dtype=torch.float64), dim=1)
    loss, revised = lil_loss(q, bank, tags, bank_tags)
    want, want_tags = _lil_loop(q, bank, tags, bank_tags)
    assert float(loss) == pytest.approx(want, rel=1e-10)
    assert revised.tolist() == want_tags
    assert want_tags != tags.tolist()  # the case exercises rectification


def test_bilateral_filter_matches_loop():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64) * 255
    v = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64)
    got = bilateral_filter(img, v, sigma_rgb=15.0, sigma_xy=3.0, chunk=7)
    want = torch.zeros_like(v)
    for b in range(2):
        for i in range(5):
            for j in range(6):
                for y in range(5):
                    for x in range(6):
                        d = ((i - y) ** 2 + (j - x) ** 2) / (2 * 3.0 ** 2) \
                            + float(((img[b, :, i, j] - img[b, :, y, x]) ** 2).sum()) / (2 * 15.0 ** 2)
                        want[b, :, i, j] += math.exp(-d) * v[b, :, y, x]
    torch.testing.assert_close(got, want)
    # float32 on saturated colours (most pairs below float32's normal range, floored there)
    # against the float64 filter, whose kernel has no floor that matters (exp(−708))
    img = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    img[0, 0, :, ::2] = 255
    img[0, 1, ::3] = 255
    v = torch.rand(1, 2, 12, 12, generator=g, dtype=torch.float64)
    want = bilateral_filter(img, v, sigma_rgb=5.0, sigma_xy=4.0)
    got = bilateral_filter(img.float(), v.float(), sigma_rgb=5.0, sigma_xy=4.0, chunk=50)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=0)


# --- invariants: backbone and heads ("Network") -------------------------------------

def test_encoder_shapes_frozen_pos_embed_and_identity_resize():
    net = _tiny_net()
    enc = net.encoder
    cls, tok, aux = enc(torch.randn(2, 3, 48, 40))
    assert cls.shape == (2, 32) and tok.shape == (2, 30, 32) and aux.shape == (2, 30, 32)
    assert enc(torch.randn(3, 3, 32, 32))[1].shape == (3, 16, 32)
    torch.testing.assert_close(enc.pos_embed(enc.pos_grid), enc.vit.pos_embed, atol=1e-5, rtol=0)
    assert not enc.vit.pos_embed.requires_grad
    m = create_method({"plugin": "seco", "model": TINY_VIT}, 5, {"crop": 32})
    opt = m.optimizers(1e-2, 0.01, 0.9, "adamw")[0]
    assert all(p is not m.net.encoder.vit.pos_embed for g in opt.param_groups for p in g["params"])


def test_cam_logits_decoder_and_projection():
    net = _tiny_net()
    x = torch.randn(2, 3, 32, 40)
    out = net(x)
    _, tok, _ = net.features(x)
    cam, _ = net.cams(x)
    torch.testing.assert_close(cam, torch.einsum("cd,bdhw->bchw", net.classifier.weight[:, :, 0, 0], tok))
    torch.testing.assert_close(out["cls"], net.classifier(tok.amax(dim=(2, 3), keepdim=True)).flatten(1))
    assert out["seg"].shape == (2, 5, 4, 5)
    torch.testing.assert_close(out["seg"], sum(c(tok) for c in net.decoder.branches))
    q = net.proj_head(torch.randn(7, 32))
    torch.testing.assert_close(q.norm(dim=1), torch.ones(7), atol=1e-6, rtol=0)
    # the first global view is x itself: its class token is the main pass's, as a second pass
    views, local = torch.randn(1, 2, 3, 32, 40), torch.randn(3, 2, 3, 16, 16)
    out = net(x, views, local)
    assert out["global_tokens"].shape == (2, 2, 32) and out["q"].shape == (2 * 5, 32)
    torch.testing.assert_close(out["global_tokens"][:, 0], net.encoder(x)[0])
    torch.testing.assert_close(out["global_tokens"][:, 1], net.encoder(views[0])[0])


def _hybrid_encoder(**kw) -> SeCoEncoder:
    """A hybrid SeCo encoder on a random-weight Lite0 stem whose BatchNorms carry random
    statistics and affine terms, so folding them is not the identity."""
    torch.manual_seed(0)
    enc = SeCoEncoder("h", aux_layer=-1, img_size=32, embed_dim=16, depth=2, num_heads=2,
                      hybrid_stem="tf_efficientnet_lite0", **kw)
    with torch.no_grad():
        for m in enc.vit.patch_embed.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return enc.train()  # the stem's BatchNorms stay in eval mode (frozen statistics)


def test_folded_frozen_stem_matches_the_stem_and_is_reused():
    """Oracle: the stem module itself (BatchNorm in eval mode). The folded, chunked stem gives
    its features up to float rounding; forward with precomputed stem features gives the plain
    forward; the fold is rebuilt when a stem weight changes (the teacher's EMA)."""
    from wsss_core.models import seco_vit
    enc = _hybrid_encoder()
    stem = enc.vit.patch_embed.backbone
    x = torch.randn(5, 3, 48, 32)
    with torch.no_grad():
        want = stem(x)
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in stem.modules())
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc._folded_stem().modules())
        torch.testing.assert_close(enc.stem_features(x), want, rtol=1e-4, atol=1e-4)
        # odd sizes: TF "SAME" padding with the odd pixel at the bottom / right; NCHW and
        # channels-last inputs
        odd = torch.randn(2, 3, 45, 37)
        for inp in (odd, odd.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(enc._folded_stem()(inp), stem(odd), rtol=1e-4, atol=1e-4)
        old = seco_vit.STEM_CHUNK_PIXELS
        seco_vit.STEM_CHUNK_PIXELS = 2 * 48 * 32  # chunks of two images
        try:
            torch.testing.assert_close(enc.stem_features(x), want, rtol=1e-4, atol=1e-4)
        finally:
            seco_vit.STEM_CHUNK_PIXELS = old
    feats = enc.stem_features(x)
    assert not feats.requires_grad
    for a, b in zip(enc(x, feats), enc(x)):
        torch.testing.assert_close(a, b)
    folded = enc._folded_stem()
    with torch.no_grad():
        stem.cnn.stem[0].weight.mul_(0.5)  # in place, as the EMA
        assert enc._folded_stem() is not folded
        torch.testing.assert_close(enc.stem_features(x), stem(x), rtol=1e-4, atol=1e-4)
    # a trained stem is not folded: the forward runs it with gradients
    trained = _hybrid_encoder(train_stem=True)
    assert trained.stem_features(x) is None
    trained(x)[0].sum().backward()
    assert trained.vit.patch_embed.backbone.cnn.stem[0].weight.grad is not None


def test_hybrid_cams_on_sizes_that_are_not_multiples_of_16():
    """The hybrid stem pads to whole patches (⌈H/16⌉ × ⌈W/16⌉ tokens): the CAM export of a
    168x224 toy image (once a reshape error)."""
    net = SeCoNet(_hybrid_encoder(), 3, proj_hidden=8, proj_dim=16).eval()
    cam, aux = net.cams(torch.randn(2, 3, 168, 150))
    assert cam.shape == aux.shape == (2, 3, 11, 10)
    assert net.encoder.encode(torch.randn(1, 3, 168, 150))[3] == (11, 10)


def test_multi_scale_cam_keeps_the_stem_features_of_the_scale_one_pass():
    enc = _hybrid_encoder()
    net = SeCoNet(enc, 3, proj_hidden=8, proj_dim=16)
    x = torch.randn(2, 3, 64, 96)
    cams, aux, stem = multi_scale_cam(net, x, [0.5, 1.0], keep_stem=True)
    want = multi_scale_cam(net, x, [0.5, 1.0])
    torch.testing.assert_close((cams, aux), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stem, enc.vit.patch_embed.backbone(x), rtol=1e-4, atol=1e-4)
    out, ref = net(x, stem=stem), net(x)
    for k in ("cls", "cls_aux", "seg", "cls_token"):
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-4)


# --- CAM and labels ("One training step" 1-2) -----------------------------------------------------

def test_multi_scale_cam_is_min_max_normalised():
    net = _tiny_net()
    cams, aux = multi_scale_cam(net, torch.randn(2, 3, 32, 32), [1.0, 0.5, 1.5])
    for c in (cams, aux):
        assert c.shape == (2, 4, 32, 32) and c.min() >= 0 and c.max() < 1
        torch.testing.assert_close(c.flatten(2).min(2).values, torch.zeros(2, 4))


def test_flip_fusion_is_identity_for_a_flip_equivariant_model():
    class PixelCAM:  # CAM = the first two image channels: flip-equivariant
        def cams(self, x):
            return x[:, :2], x[:, 1:3]

    x = torch.randn(2, 3, 8, 10)
    cams, _ = multi_scale_cam(PixelCAM(), x, [1.0])
    want = F.relu(x[:, :2])
    want = want - want.flatten(2).min(2).values[..., None, None]
    torch.testing.assert_close(cams, want / (want.flatten(2).max(2).values[..., None, None] + 1e-5))


def test_cam_to_label_and_roi_mask():
    cams = torch.zeros(1, 3, 2, 3)
    cams[0, 1, 0, 0], cams[0, 1, 0, 1], cams[0, 1, 0, 2] = 0.8, 0.5, 0.2
    cams[0, 2, 1, :] = 0.9  # absent class: never wins
    y = torch.tensor([[1.0, 1.0, 0.0]])
    _, lab = cam_to_label(cams, y, 0.7, 0.25, 0.5)
    assert lab[0, 0].tolist() == [2, 255, 0] and lab[0, 1].tolist() == [0, 0, 0]
    _, roi = cam_to_label(cams, y, 0.7, 0.25, 0.5, img_box=[[0, 1, 0, 2]], mid_value=-1)
    assert roi[0, 0].tolist() == [2, -1, 255] and roi[0, 1].tolist() == [255, 255, 255]
    _, hard = cam_to_label(cams, y, 0.7, 0.25, 0.5, ignore_mid=False)
    assert hard[0, 0].tolist() == [2, 0, 0]


def test_refine_cams_with_bkg_uniform_cases():
    img = torch.full((1, 3, 16, 16), 0.5)
    y = torch.tensor([[0.0, 1.0, 0.0]])
    for value, want in ((0.0, 0), (0.5, 255), (0.9, 2)):
        cam = torch.zeros(1, 3, 16, 16)
        cam[0, 1] = value
        lab = refine_cams_with_bkg(img, cam * y[:, :, None, None], y, 0.7, 0.25)
        assert (lab == want).all(), value


def _refine_loop(image01, valid_cam, y, high, low, refine):
    """docs/methods/seco.md "One training step" 2, one image and one background level at a time:
    the kept channels only."""
    B, C, H, W = valid_cam.shape
    half = (H // 2, W // 2)
    images = F.interpolate(image01, size=half, mode="bilinear", align_corners=False)
    out = torch.empty(2, B, H, W, dtype=torch.long)
    for i, t in enumerate((high, low)):
        cams = torch.cat([torch.full_like(valid_cam[:, :1], t), valid_cam], dim=1)
        cams = F.interpolate(cams, size=half, mode="bilinear", align_corners=False)
        for b in range(B):
            keep = [0] + [c + 1 for c in range(C) if y[b, c] > 0]
            ref = refine(images[b:b + 1], cams[b:b + 1, keep].softmax(dim=1))
            ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)[0]
            for p in range(H):
                for q in range(W):
                    out[i, b, p, q] = keep[int(ref[:, p, q].argmax())]
    label = torch.where(out[0] == 0, 255, out[0])
    return torch.where((out[0] == 0) & (out[1] == 0), 0, label)


def test_refine_cams_with_bkg_matches_per_image_loop():
    """The batched form (channels packed to the most classes, padding at −inf) against the
    per-image loop, with images of 0, 1 and 3 classes in one batch."""
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([[0.0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]])
    img = torch.rand(3, 3, 20, 24, generator=g, dtype=torch.float64)
    cam = torch.rand(3, 4, 20, 24, generator=g, dtype=torch.float64) * y[:, :, None, None]
    from wsss_core.ops.par import par_refine

    def refine(im, m):
        return par_refine(im, m, (1, 2), 3)

    got = refine_cams_with_bkg(img, cam, y, 0.7, 0.25, refine=refine)
    want = _refine_loop(img, cam, y, 0.7, 0.25, refine)
    assert torch.equal(got, want)
    assert {0, 255} <= set(got.unique().tolist()) and len(got.unique()) >= 4


def test_first_argmax_is_argmax_with_ties():
    from wsss_core.methods.seco_losses import _first_argmax
    x = torch.randint(0, 3, (2, 4, 5, 6)).float()  # many ties
    assert torch.equal(_first_argmax(x.unbind(1)), x.argmax(dim=1))


def test_ptc_loss_and_affinity_mask():
    t = torch.ones(1, 4, 2, 2)
    aff = torch.ones(1, 4, 4, dtype=torch.long)
    aff[0, torch.arange(4), torch.arange(4)] = 255
    assert float(ptc_loss(t, aff)) == pytest.approx(0.5 * (1 - 12 / 13))
    cams = torch.zeros(1, 2, 16, 16)
    cams[0, 0, :, :8] = 0.9
    cams[0, 1, :, 8:] = 0.5
    a = ptc_affinity_mask(cams, torch.ones(1, 2), (2, 2), 0.7, 0.25)
    assert a.shape == (1, 4, 4) and (a.diagonal(dim1=1, dim2=2) == 255).all()
    assert a[0, 0, 2] == 1 and (a[0, :, 1] == 255).all()  # tokens 1, 3 are in the middle band


def test_seg_loss_balanced_and_all_ignored():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    label = torch.randint(0, 4, (2, 5, 5), generator=g)
    label[0, 0] = 255
    ce = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    bg, fg = label == 0, (label > 0) & (label < 255)
    want = 0.5 * (ce[bg].mean() + ce[fg].mean())
    torch.testing.assert_close(seg_loss(logits, label), want)
    assert float(seg_loss(logits, torch.full_like(label, 255))) == 0.0


# --- tags ("One training step" 3) ----------------------------------------------------------------

def test_tags_synthetic_masks():
    img = torch.randn(1, 3, 128, 128)
    run = lambda roi: assign_csc_tags([img], roi[None], 10, 64, 0.2)[1][0].tolist()  # noqa: E731
    assert run(torch.zeros(128, 128, dtype=torch.long))[2:] == [0.0] * 10
    assert run(torch.full((128, 128), 5, dtype=torch.long)) == [5.0] * 12
    two = torch.full((128, 128), 3, dtype=torch.long)
    two[:, 64:] = 7
    tags = run(two)
    assert tags[:2] == [-1.0, -1.0]
    # no uncertain pixel: random corners; a crop inside one class gets it, a straddling one −1
    want = [3.0 if x + 64 <= 64 else 7.0 if x >= 64 else -1.0
            for _, x in _tags_loop(two[None], 10, 64, 0.2)[1][0]]
    assert tags[2:] == want and -1.0 in want
    unc = torch.zeros(128, 128, dtype=torch.long)
    pts = [(40 + 3 * k, 50 + 2 * k) for k in range(12)]
    for y, x in pts:
        unc[y, x] = -1
    (crops,), _ = assign_csc_tags([torch.arange(128 * 128.0).reshape(1, 1, 128, 128).expand(1, 3, -1, -1)],
                                  unc[None], 10, 64, 0.2)
    centres = {(int(c[0, 0, 32, 32]) // 128, int(c[0, 0, 32, 32]) % 128) for c in crops}
    assert centres <= set(pts) and len(centres) == 10


def test_tags_weighted_proportion_quirk():
    for cls, want in ((1, 0.0), (15, 15.0)):
        roi = torch.zeros(1, 96, 96, dtype=torch.long)
        roi[0, :, 16:22] = cls  # 9.4 % of the crop around (48, 48); class-id weighted: 0.094·c
        roi[0, 48, 48] = -1
        tags = assign_csc_tags([torch.zeros(1, 3, 96, 96)], roi, 1, 64, 0.2)[1]
        assert tags[0, 2] == want


def test_tag_positions_ignore_global_rng_and_image():
    roi = torch.randint(-1, 3, (1, 100, 100), generator=torch.Generator().manual_seed(0))
    a = torch.arange(3 * 100 * 100.0).reshape(1, 3, 100, 100)
    torch.manual_seed(123)
    (c1, c2), _ = assign_csc_tags([a, -a], roi, 10, 64, 0.2)
    torch.manual_seed(999)
    (c3,), _ = assign_csc_tags([a], roi, 10, 64, 0.2)
    torch.testing.assert_close(c1, -c2)
    torch.testing.assert_close(c1, c3)


# --- teachers, prototypes, queue ("One training step" 5-6) ---------------------------------------

def test_ema_teacher():
    net = _tiny_net().double()
    teacher = SeCoTeacher(net)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.encoder.parameters()]
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(1.0)
    teacher.ema_encoder(net, 0.999)
    for b, t, s in zip(before, teacher.encoder.parameters(), net.encoder.parameters()):
        torch.testing.assert_close(t, 0.999 * b + 0.001 * s, rtol=0, atol=1e-12)


def test_prototype_update():
    P = torch.randn(4, 6)
    raw = P.clone()
    f = torch.randn(3, 6) * 10
    update_prototypes(P, f, torch.tensor([-1, 2, -1]), 0.9)
    torch.testing.assert_close(P.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(P[[0, 2, 3]], F.normalize(raw[[0, 2, 3]], dim=1))
    torch.testing.assert_close(P[1], F.normalize(0.9 * raw[1] + 0.1 * f[1], dim=0))


def test_reservoir_fifo():
    r = Reservoir(4608, 4)
    keys = []
    for k in range(100):
        kb = torch.full((48, 4), float(k))
        r.push(kb, torch.full((48,), float(k % 5)))
        keys.append(kb)
        assert int(r.ptr) == (48 * (k + 1)) % 4608
    torch.testing.assert_close(r.feats, torch.cat(keys[4:100]).roll(4 * 48, dims=0))
    torch.testing.assert_close(r.tags, r.feats[:, 0] % 5)
    with pytest.raises(Exception, match="multiple"):
        Reservoir(100, 4).push(torch.zeros(48, 4), torch.zeros(48))


# --- losses ("LiL", "LiG", "The others") ---------------------------------------------------------

def test_lig_equal_similarities():
    q = torch.zeros(6, 4)
    q[:, 0] = 1
    P = torch.zeros(5, 4)
    P[:, 0] = 1
    tags = torch.tensor([1, 2, 4, 0, -1, 2.0])
    assert float(lig_loss(q, P, tags)) == pytest.approx(math.log(3), rel=1e-6)
    assert float(lig_loss(q, P, torch.tensor([2, 2, 0, -1, 2, 0.0]))) == pytest.approx(0, abs=1e-6)


def test_lil_equal_similarities_and_uncertain_rows():
    q = F.normalize(torch.ones(4, 3), dim=1)
    bank = F.normalize(torch.ones(20, 3), dim=1)
    tags = torch.tensor([1, 2, -1, 0.0])
    bank_tags = torch.tensor([1.0] + [2.0] * 9 + [0.0] * 5 + [-1.0] * 5)
    loss, revised = lil_loss(q, bank, tags, bank_tags)
    assert float(loss) == 0.0 and revised.tolist() == tags.tolist()
    one = torch.tensor([1, 2, 0.0])
    clean, _ = lil_loss(q[:3], bank[:3], one, torch.tensor([1, 2, 0.0]), impl="clean")
    assert float(clean) == pytest.approx(math.log(3), rel=1e-6)


def test_lil_uncertain_columns_and_anchors_do_not_count():
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(6, 5, generator=g), dim=1)
    bank = F.normalize(torch.randn(30, 5, generator=g), dim=1)
    bank[:6] = q  # every row maximum sits on its own copy: moved columns cannot shift it
    tags = torch.tensor([1, 2, 0, 1, 2, 0.0])
    bt = torch.randint(0, 3, (30,), generator=g).float()
    bt[25:] = -1
    base, _ = lil_loss(q, bank, tags, bt)
    moved = bank.clone()
    moved[25:] = F.normalize(torch.randn(5, 5, generator=g), dim=1)
    torch.testing.assert_close(lil_loss(q, moved, tags, bt)[0], base)
    t2 = torch.cat([tags, torch.tensor([-1.0])])
    q2 = torch.cat([q, F.normalize(torch.randn(1, 5, generator=g), dim=1)])
    loss2, rev2 = lil_loss(q2, bank, t2, bt)
    assert rev2[-1] == -1
    torch.testing.assert_close(loss2 * 7, base * 6)  # same sum, one more row in the mean


def test_lil_rectifies_a_far_anchor_to_background():
    q = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[1.0, 0.0]])
    far = F.normalize(torch.tensor([[-1.0, 0.05]]), dim=1).expand(95, 2)
    other = torch.tensor([[0.0, 1.0]]).expand(4, 2)
    bank = torch.cat([near, far, other])
    bt = torch.cat([torch.tensor([3.0]), torch.full((95,), 3.0), torch.zeros(4)])
    _, revised = lil_loss(q, bank, torch.tensor([3.0]), bt)
    assert revised.tolist() == [0.0]


def test_loss_and_lr_schedules():
    s = SeCoSettings()
    assert loss_weights(s, 1000)["lig"] == 0 and loss_weights(s, 1001)["lig"] == 0.5
    assert loss_weights(s, 1001)["lil"] == 0.5 and loss_weights(s, 2000)["seg"] == 0
    assert loss_weights(s, 2001)["seg"] == 0.12 and loss_weights(s, 2001)["reg"] == 0.05
    # "Optimiser" through the shared schedule: every group warms up from 1e-6 over 1500 steps
    m = create_method({"plugin": "seco", "model": TINY_VIT, "seco": {"local_crop": 16}}, 5, {"crop": 32})
    opts = m.optimizers(6e-5, 0.01, 0.9, "adamw")
    assert [g["lr_mult"] for g in opts[0].param_groups] == [1.0, 1.0, 10.0, 10.0]
    f = lambda g: set_lr(opts, g, 20000, 0.9) / 6e-5  # noqa: E731
    assert f(0) == pytest.approx(1e-6)
    assert f(750) == pytest.approx(0.5 * (1 - 750 / 20000) ** 0.9, abs=1e-6)
    assert f(1500) == pytest.approx(0.925 ** 0.9)
    assert 6e-5 * f(10000) == pytest.approx(3.216e-5, rel=1e-3)
    assert opts[0].param_groups[2]["lr"] == pytest.approx(10 * 3.216e-5, rel=1e-3)


def test_views_deterministic_shapes_and_global_view_from_full_image():
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 255  # a white right half: a global view of the full image may show both halves
    views = [seco_views(img, np.random.default_rng(k), 24, (20, 30)) for k in (0, 0, 1)]
    assert set(views[0]) == {"image", "strong", "glob"}
    assert all(v.shape == (3, 24, 24) and v.dtype == torch.float32 for v in views[0].values())
    assert all(torch.equal(views[0][k], views[1][k]) for k in views[0])
    assert not torch.equal(views[0]["glob"], views[2]["glob"])


# --- the method end to end ---------------------------------------------------------------------

def _step(m, x, y, step=0, max_step=10, glob=None, update=True):
    """One training step on x (strong view: x mirrored; global view: `glob` or x upside down);
    `update` false stops after the backward pass (the optimiser update is the engine's)."""
    opts = m.optimizers(6e-5, 0.01, 0.9, "adamw")
    ctx = StepContext(epoch=0, step=step, max_step=max_step, epochs=1, device=torch.device("cpu"))
    glob = x.flip(-2) if glob is None else glob
    losses = m.training_step({"image": x, "label": y, "strong": x.flip(-1), "glob": glob}, ctx)
    losses["total"].backward()
    for o in opts if update else ():
        o.step()
    return losses


def test_tiny_method_step_state_roundtrip_and_segmentation():
    seco = dict(local_crop=16, queue_size=48, cls_only_until=-1, contrast_until=-1,
                update_prototype=0, cam_scales=[1.0, 0.5], warmup_iters=0)
    m = create_method({"plugin": "seco", "model": TINY_VIT, "seco": seco}, 5, {"crop": 32})
    y = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    pe = m.net.encoder.vit.pos_embed.clone()
    losses = _step(m, torch.randn(2, 3, 32, 32), y)
    assert {"cls", "cls_aux", "lig", "lil", "ptc", "seg", "reg"} <= set(losses)
    assert torch.equal(pe, m.net.encoder.vit.pos_embed)
    assert int(m.reservoir.ptr) == 24
    # invariant 20: queries carry gradients into the projection head, keys and teacher none
    assert m.net.proj_head.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in m.models["teacher"].parameters())
    assert not m.reservoir.feats.requires_grad
    state = m.state_dict()
    m2 = create_method({"plugin": "seco", "model": TINY_VIT, "seco": seco}, 5, {"crop": 32})
    m2.load_state_dict(state)
    torch.testing.assert_close(m2.reservoir.feats, m.reservoir.feats)
    torch.testing.assert_close(m2.prototypes, m.prototypes)
    torch.testing.assert_close(m2.models["teacher"].state_dict(), m.models["teacher"].state_dict())
    # the data loader's spawned workers receive it by reference: a partial of a function
    # importable by its module and qualified name, with plain keyword values
    views = m.train_views()
    assert getattr(importlib.import_module(views.func.__module__), views.func.__qualname__) is views.func
    assert views.args == () and views.keywords == {
        "crop": 32, "scale_range": (250, 1000), "flip_whole": True, "crop_box": True}
    m.eval()
    assert m.single_stage
    seg = m.segment(torch.randn(2, 3, 20, 28))
    assert seg.shape == (2, 5, 20, 28)


@pytest.mark.slow
def test_paper_preset_step_and_cam_export_on_cpu(repo_root):
    """ViT-B/16 with random weights, built once: one step on one 448 crop (every loss on), the
    CAMs of one 375x500 image at one scale."""
    from wsss_core.config import load_config, method_params
    cfg = load_config(repo_root / "config.yaml")
    cfg["datasets"]["toy"]["preset"] = "paper"
    params = method_params(cfg, "toy", "seco")
    params["model"]["pretrained"] = False
    # one CAM scale (the paper's four cost 4x), two local crops, the loss stages all on, the
    # dense energy filter on a 1/8 grid, the second global view at 224 and no optimiser update
    # (AdamW over 86M parameters is the engine's): the test checks wiring and shapes
    params["seco"].update(cam_scales=[1.0], num_local=2, queue_size=8, cls_only_until=-1,
                          contrast_until=-1, update_prototype=0, par_iterations=2,
                          energy_scale=0.125)
    torch.manual_seed(0)
    m = create_method(params, 21, {"crop": 448, "seed": 0})
    assert m.net.encoder.embed_dim == 768 and len(m.net.encoder.vit.blocks) == 12
    assert m.net.encoder.patch_size == 16 and m.settings.local_crop == 64
    y = torch.zeros(1, 20)
    y[0, 14] = 1
    losses = _step(m, torch.randn(1, 3, 448, 448), y, step=0, max_step=20000,
                   glob=torch.randn(1, 3, 224, 224), update=False)
    assert {"lig", "lil", "seg", "reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    grads = [m.net.encoder.vit.blocks[0].attn.qkv.weight.grad, m.net.decoder.branches[0].weight.grad,
             m.net.proj_head.mlp[0].weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    m.eval()
    img = torch.randn(3, 375, 500)
    maps = m.infer(torch.stack([img, img.flip(-1)]))
    assert maps["cam"].shape == (20, 375, 500) and maps["aux"].shape == (20, 375, 500)
    assert maps["cam"].min() >= 0
