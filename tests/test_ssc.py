"""SSC (docs/methods/ssc.md): the spec's testable invariants, loop oracles for DRS, the
superpixel pooling and the ASM loss, and the paper preset on one 375x500 image (random weights)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import measure

from wsss_core.config import method_params, stage_params
from wsss_core.data.datasets import ClassificationDataset
from PIL import Image

from wsss_core.data.superpixels import (PAD_ID, ICDSuperpixels, decode_rgb_ids, read_icd_superpixels,
                                        superpixels)
from wsss_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, to_chw
from wsss_core.optim import set_lr
from wsss_core.errors import ConfigError, DataError
from wsss_core.methods import StepContext, create_method
from wsss_core.methods.ssc import drs
from wsss_core.methods.ssc_losses import (asm_loss, asm_target, erode, max_norm, perceptual_loss,
                                          superpixel_mean)
from wsss_core.models.drs_cam import CDRDecoder, DRS, FeatureTaps, LayerNormCDR
from wsss_core.stages.export_cams import image_maps

# the paper config (VOC root unset) and the switch that turns every `pretrained` flag off
from test_paper_presets import _random_weights, cfg  # noqa: F401  (cfg is a fixture)

VOC_CLASSES = 21
CPU = torch.device("cpu")


def _ctx(epoch: int, step: int = 0, max_step: int = 10) -> StepContext:
    return StepContext(epoch=epoch, step=step, max_step=max_step, epochs=10, device=CPU)


def _tiny_method(cfg, **ssc):
    params = copy.deepcopy(method_params(cfg, "toy", "ssc"))
    params["ssc"].update(ssc)
    torch.manual_seed(0)
    return create_method(params, VOC_CLASSES, train_params={"crop": 32})


# --- DRS ---------------------------------------------------------------------------------

def test_drs_matches_loop_oracle_and_invariants():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    out = drs(x, 0.55)
    ref = torch.empty_like(x)
    for b in range(2):
        for k in range(3):
            r = [[max(float(v), 0.0) for v in row] for row in x[b, k]]
            m = max(max(row) for row in r)
            ref[b, k] = torch.tensor([[min(v, 0.55 * m) for v in row] for row in r])
    assert torch.allclose(out, ref)
    assert (out >= 0).all()
    relu = F.relu(x)
    cap = 0.55 * relu.amax(dim=(2, 3), keepdim=True)
    assert (out <= cap + 1e-6).all()
    assert torch.equal(out[relu <= cap], relu[relu <= cap])
    assert torch.equal(drs(x, 1.0), relu)
    assert torch.allclose(drs(3.7 * x, 0.55), 3.7 * out)


def test_drs_gradient_reaches_clipped_argmax():
    x = torch.tensor([[[[0.1, 2.0], [0.5, -1.0]]]], requires_grad=True)
    drs(x, 0.55).sum().backward()
    # the arg-max (2.0) is clipped to 1.1, yet receives δ times the gradient of every clipped cell
    assert x.grad[0, 0, 0, 1] == pytest.approx(0.55)
    assert x.grad[0, 0, 1, 1] == 0


# --- classifier -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_cnn():
    torch.manual_seed(0)
    from wsss_core.models.drs_cam import DRSResNetCAM
    return DRSResNetCAM("resnet50", 20, strides=(2, 2, 2, 1), pretrained=False)


def test_classifier_shapes_logits_detach_and_frozen_bn(paper_cnn):
    net = paper_cnn
    assert sum(isinstance(m, DRS) for m in net.backbone.layer4.modules()) == 3
    assert not any(isinstance(m, DRS) for m in net.backbone.layer3.modules())
    bn_stats = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.train()
    x = torch.randn(2, 3, 32, 48)
    out = net(x)
    a = out["logits"]
    assert a.shape == (2, 20, 2, 3)
    w = net.classifier.weight[:, :, 0, 0]
    assert torch.allclose(a.mean(dim=(2, 3)), out["features"].mean(dim=(2, 3)) @ w.T, atol=1e-5)
    net.zero_grad(set_to_none=True)
    a.mean().backward()
    b = net.backbone
    for frozen in (b.stem, b.layer1, b.layer2):
        assert all(p.grad is None for p in frozen.parameters())
    for trained in (b.layer3, b.layer4, net.classifier):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    for k, v in net.state_dict().items():
        if k in bn_stats:
            assert torch.equal(v, bn_stats[k])


def test_train_and_cam_forward_differ_only_by_stage2_drs(paper_cnn):
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        paper_cnn.drs_stage2 = False
        same = F.relu(paper_cnn(x)["logits"])
        paper_cnn.drs_stage2 = True
        train = F.relu(paper_cnn(x)["logits"])
        cam = paper_cnn.cam(x)
    assert torch.allclose(same, cam, atol=1e-6)
    assert not torch.allclose(train, cam, atol=1e-4)


# --- decoder ----------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(2, 2), (2, 3)])
def test_decoder_shape_range_and_gradients(hw):
    torch.manual_seed(0)
    dec = CDRDecoder(20, width=32, upscale=16)
    a = (3 * torch.randn(2, 20, *hw)).requires_grad_()
    out = dec(a)
    assert out.shape == (2, 3, 16 * hw[0], 16 * hw[1])
    assert out.abs().max() <= 1
    out.sum().backward()
    assert a.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dec.parameters())


def test_decoder_layernorm_statistics():
    ln = LayerNormCDR(4)
    assert (ln.gamma >= 0).all() and (ln.gamma < 1).all() and (ln.beta == 0).all()
    with torch.no_grad():
        ln.gamma.fill_(1.0)
    y = ln(5 + 3 * torch.randn(3, 4, 6, 7)).flatten(1)
    assert torch.allclose(y.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std(1, unbiased=True), torch.ones(3), atol=1e-4)


# --- perceptual loss --------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg_taps():
    torch.manual_seed(0)
    return FeatureTaps("vgg19", pretrained=False)


def test_perceptual_loss_invariants(vgg_taps):
    weights = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    assert perceptual_loss(vgg_taps, x, x, weights) == 0
    target = x.clone().requires_grad_()
    rec = torch.tanh(torch.randn(2, 3, 32, 32)).requires_grad_()
    loss = perceptual_loss(vgg_taps, rec, target, weights)
    by_tap = sum(w * (a - b).abs().mean() for w, a, b in zip(weights, vgg_taps(rec), vgg_taps(x)))
    assert loss > 0 and torch.allclose(loss, by_tap)
    assert [f.shape[1] for f in vgg_taps(x)] == [64, 128, 256, 512, 512]
    before = [p.clone() for p in vgg_taps.parameters()]
    loss.backward()
    assert target.grad is None and rec.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in vgg_taps.parameters())
    vgg_taps.train()
    assert not vgg_taps.training
    assert all(torch.equal(a, b) for a, b in zip(before, vgg_taps.parameters()))


def test_tiny_preset_loss_network_taps_lite0_strides(cfg):
    n = method_params(cfg, "toy", "ssc")["ssc"]["loss_net"]
    taps = FeatureTaps(n["name"], n["taps"], pretrained=False)
    feats = taps(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    assert not any(p.requires_grad for p in taps.parameters())


# --- superpixel pooling, normalisation, erosion -------------------------------------------

def _segments(b=2, h=10, w=12, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (b, h, w), generator=g) * 3  # sparse ids: gaps must not matter


def test_superpixel_mean_matches_loop_oracle():
    seg = _segments()
    x = torch.randn(2, 3, 10, 12, generator=torch.Generator().manual_seed(1))
    ref = torch.empty_like(x)
    for b in range(2):
        for s in seg[b].unique().tolist():
            where = seg[b] == s
            for c in range(3):
                ref[b, c][where] = x[b, c][where].sum() / int(where.sum())
    assert torch.allclose(superpixel_mean(x, seg), ref, atol=1e-6)


def test_superpixel_mean_invariants():
    seg = _segments()
    x = torch.randn(2, 3, 10, 12)
    avg = superpixel_mean(x, seg)
    assert torch.allclose(superpixel_mean(avg, seg), avg, atol=1e-6)
    const = torch.full_like(x, 2.5)
    assert torch.allclose(superpixel_mean(const, seg), const)
    one = superpixel_mean(x, torch.zeros_like(seg))
    assert torch.allclose(one, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-6)
    perm = torch.randperm(int(seg.max()) + 1)
    assert torch.allclose(superpixel_mean(x, perm[seg]), avg, atol=1e-6)
    for s in seg[0].unique():
        where = seg[0] == s
        assert torch.allclose(avg[0, :, where].sum(1), x[0, :, where].sum(1), atol=1e-5)
        assert (avg[0, :, where] == avg[0, :, where][:, :1]).all()


def test_max_norm_range():
    x = torch.randn(2, 3, 4, 5)
    x[0, 1] = -torch.rand(4, 5)
    n = max_norm(x)
    assert (n >= 0).all() and (n < 1).all()
    assert (n[0, 1] == 0).all()
    m = F.relu(x[1, 2]).max()
    assert n[1, 2].max() == pytest.approx(float(m / (m + 1e-5)))


def _erode_loop(mask: np.ndarray, k: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            window = [mask[y, x] for y in range(i - k // 2, i + k - k // 2)
                      for x in range(j - k // 2, j + k - k // 2) if 0 <= y < h and 0 <= x < w]
            out[i, j] = float(all(v == 1 for v in window))
    return out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_erosion_opencv_semantics(k):
    g = np.random.default_rng(k)
    masks = (g.random((3, 20, 22)) < 0.8).astype(np.float32)
    out = erode(torch.from_numpy(masks), k).numpy()
    for m, o in zip(masks, out):
        assert np.array_equal(o, _erode_loop(m, k))
        # the same through scipy (a structure of even size is centred at index k // 2)
        ref = ndimage.binary_erosion(m.astype(bool), np.ones((k, k), bool), border_value=1)
        assert np.array_equal(o.astype(bool), ref)
        assert (o <= m).all()
    assert (erode(torch.ones(1, 9, 9), 8) == 1).all()
    assert (erode(torch.zeros(1, 9, 9), 8) == 0).all()


def test_erosion_lone_block_and_thin_blob():
    m = torch.zeros(1, 24, 24)
    m[0, 5:13, 9:17] = 1
    out = erode(m, 8)
    assert out.sum() == 1 and out[0, 9, 13] == 1
    m[0, 5:13, 9:16] = 0  # 8 x 1 left: thinner than the kernel
    assert erode(m, 8).sum() == 0


# --- ASM --------------------------------------------------------------------------------

def _asm_loop(cams, seg, labels, theta, k, use_ras):
    """The loss written out: per image and present class, segment means by loops."""
    segh = seg[:, ::2, ::2]
    h, w = segh.shape[-2:]
    up = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False)
    rows_o, rows_t = [], []
    for b in range(cams.shape[0]):
        for c in range(cams.shape[1]):
            if labels[b, c] == 0:
                continue
            a = up[b, c]
            pooled = torch.zeros(h, w)
            for s in segh[b].unique():
                where = segh[b] == s
                pooled[where] = a[where].mean()
            o = a.clamp_min(0) / (a.clamp_min(0).max() + 1e-5)
            r = pooled.clamp_min(0) / (pooled.clamp_min(0).max() + 1e-5)
            t = r
            if use_ras:
                keep = torch.from_numpy(_erode_loop((o > theta).float().numpy(), k))
                t = torch.maximum(r, o * keep)
            rows_o.append(o)
            rows_t.append(t)
    o, t = torch.stack(rows_o), torch.stack(rows_t)
    return ((o - t) ** 2).mean()


@pytest.mark.parametrize("use_ras", [True, False])
def test_asm_loss_matches_loop_oracle(use_ras):
    torch.manual_seed(0)
    cams = torch.randn(2, 4, 4, 4)
    seg = _segments(2, 16, 16, 6)
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0]])
    loss = asm_loss(cams, seg, labels, theta=0.3, kernel=3, use_ras=use_ras)
    assert loss == pytest.approx(float(_asm_loop(cams, seg, labels, 0.3, 3, use_ras)), rel=1e-5)


def test_asm_target_bounds():
    torch.manual_seed(0)
    own, pooled = torch.rand(3, 12, 12), torch.rand(3, 12, 12)
    t = asm_target(own, pooled, theta=0.3, kernel=3)
    reliable = own * erode((own > 0.3).float(), 3)
    assert (t >= pooled).all() and (t >= reliable).all()
    assert (reliable[own <= 0.3] == 0).all()
    assert torch.equal(asm_target(own, pooled, use_ras=False), pooled)


def test_asm_zero_when_maps_are_constant_on_superpixels():
    seg = torch.arange(16).view(1, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x4 blocks
    # integers: the segment sums and means are exact, so R⁺ equals O⁺ bit for bit
    cams = torch.randint(-4, 5, (1, 3, 4, 4)).float().repeat_interleave(4, 2).repeat_interleave(4, 3)
    loss = asm_loss(cams, seg, torch.tensor([[1, 1, 0]]), kernel=3, half_res=False)
    assert loss == 0


def test_asm_absent_classes_and_gradient_only_to_cams():
    torch.manual_seed(0)
    cams = torch.randn(2, 3, 4, 4)
    seg = _segments(2, 16, 16, 5)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1]])
    base = asm_loss(cams, seg, labels, kernel=3)
    changed = cams.clone()
    changed[0, 1] += 10 * torch.randn(4, 4)
    changed[1, 0] -= 5
    assert asm_loss(changed, seg, labels, kernel=3) == base
    a = cams.clone().requires_grad_()
    asm_loss(a, seg, labels, kernel=3).backward()
    assert a.grad[labels.bool()].abs().sum() > 0 and (a.grad[~labels.bool()] == 0).all()
    no_ras = asm_loss(cams, seg, labels, kernel=3, use_ras=False)
    up = F.interpolate(cams, size=(8, 8), mode="bilinear", align_corners=False) * labels[..., None, None]
    o = max_norm(up)[labels.bool()]
    r = max_norm(superpixel_mean(up, seg[:, ::2, ::2]))[labels.bool()]
    assert no_ras == pytest.approx(float(F.mse_loss(o, r)), rel=1e-6)


# --- superpixels and joint augmentation --------------------------------------------------

def _smooth_image(h, w, seed=0):
    g = np.random.default_rng(seed)
    low = g.random((h // 16 + 1, w // 16 + 1, 3))
    img = np.kron(low, np.ones((16, 16, 1)))[:h, :w]
    return (255 * np.clip(img + 0.05 * g.standard_normal((h, w, 3)), 0, 1)).astype(np.uint8)


@pytest.mark.parametrize("generator", ["fh_ss64", "slic64"])
def test_superpixel_generator_output(generator):
    img = _smooth_image(96, 128)
    seg = superpixels(img, generator, max_segments=64)
    assert seg.shape == (96, 128) and seg.dtype == np.uint8
    s = int(seg.max()) + 1
    assert s <= 64 and np.array_equal(np.unique(seg), np.arange(s))
    for i in range(s):
        assert measure.label(seg == i, connectivity=1).max() == 1  # 4-connected
    assert int(superpixels(img, generator, max_segments=10).max()) + 1 <= 10


def test_joint_augmentation_keeps_segments_aligned():
    g = np.random.default_rng(0)
    seg = g.integers(0, 60, (40, 50)).astype(np.uint8)
    img = np.repeat(seg[..., None] * 4, 3, axis=2).astype(np.uint8)  # paint ids into the image
    ds = ClassificationDataset.__new__(ClassificationDataset)
    ds.crop, ds.scale_range = 64, (50, 50)  # long side kept: no resampling blur
    for i in range(6):
        out, s = ds._augment(img, seg, np.random.default_rng(i))
        red = (out[..., 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255 / 4
        inside = s != PAD_ID
        assert inside.sum() == seg.size and (~inside).any()
        assert np.allclose(red[inside], s[inside], atol=1e-3)
        assert (out[~inside] == 0).all()


def test_superpixels_through_the_extra_input_hook(cfg, toy_index, tmp_path):
    """SSC's superpixels reach the batch through the contract's data hook: computed once per
    image with the configured generator, cached, cropped with the image (PAD_ID padding)."""
    m = _tiny_method(cfg, superpixel_generator="slic64", max_segments=16, recon_loss="pixel_l1")
    assert m.extra_inputs == ("superpixels",) and set(m.extra_input_fns()) == {"superpixels"}
    ds = ClassificationDataset(toy_index, "train_aug", 96, (48, 64), seed=0,
                               extra=m.extra_input_fns(), extra_cache=tmp_path)
    item = ds[0]
    sp = item["superpixels"]
    assert sp.shape == (96, 96) and sp.dtype == torch.int64
    assert (sp == PAD_ID).any() and int(sp[sp != PAD_ID].max()) < 16  # 64 px image in a 96 crop
    image_id = toy_index.ids("train_aug")[0]
    cached = np.load(tmp_path / "superpixels" / f"{image_id}.npy", allow_pickle=False)
    assert np.array_equal(cached, superpixels(toy_index.image(image_id), "slic64", 16))
    plain = ClassificationDataset(toy_index, "train_aug", 96, (48, 64), seed=0)[0]
    assert torch.equal(item["image"], plain["image"])  # the map does not change the image's draw
    off = _tiny_method(cfg, asm=False, cdr=False)
    assert off.extra_inputs == () and off.extra_input_fns() == {} and off.unsaved_modules == ()


# --- ICD's pre-computed superpixels (ssc.superpixel_generator: icd) -----------------------

def _icd_png(path, raw_ids):
    """Write raw ids [H, W] (< 2^24) as ICD stores them: R + 256·G + 65536·B."""
    rgb = np.stack([raw_ids % 256, raw_ids // 256 % 256, raw_ids // 65536], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_icd_png_decodes_to_known_ids(tmp_path):
    """A crafted PNG whose ids use all three channels decodes, pixel by pixel, to the formula's
    ids, renumbered 0..S-1 in increasing order of the stored id."""
    raw_values = [0, 1, 255, 256, 257, 65535, 65536, 70000, 16777215]
    g = np.random.default_rng(0)
    raw = np.array(raw_values)[g.integers(0, len(raw_values), (7, 9))]
    raw[0, :len(raw_values)] = raw_values  # every id present
    _icd_png(tmp_path / "a.png", raw)
    rgb = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    assert np.array_equal(decode_rgb_ids(rgb), raw)
    seg = read_icd_superpixels(tmp_path / "a.png", (7, 9))
    assert seg.dtype == np.uint8 and seg.shape == (7, 9)
    for i in range(7):  # loop oracle: the rank of the stored id among the distinct ids
        for j in range(9):
            r, gg, b = (int(v) for v in rgb[i, j])
            assert seg[i, j] == sorted(raw_values).index(r + 256 * gg + 65536 * b)


def test_icd_missing_or_mismatched_file_is_one_line_data_error(tmp_path):
    missing = tmp_path / "sp" / "2007_000032.png"
    with pytest.raises(DataError, match="2007_000032.png: ICD superpixel file not found") as e:
        ICDSuperpixels(str(tmp_path / "sp"))(np.zeros((4, 5, 3), np.uint8), "2007_000032", "/elsewhere")
    assert "\n" not in str(e.value) and "fh_ss64" in str(e.value) and str(missing) in str(e.value)
    _icd_png(missing, np.zeros((4, 4), np.int64))
    with pytest.raises(DataError, match="size 4x4, its image is 4x5"):
        read_icd_superpixels(missing, (4, 5))
    _icd_png(missing, np.arange(16 * 20).reshape(16, 20))
    with pytest.raises(DataError, match="320 superpixels"):
        read_icd_superpixels(missing)


def test_icd_superpixels_through_the_extra_input_hook(cfg, toy_index, tmp_path):
    """`icd` reads <superpixel_dir>/<id>.png (relative to the dataset root, or absolute) through
    the data hook, and the crop carries the decoded ids; missing files are found when the
    dataset is made; without a folder it is a ConfigError."""
    image_id = toy_index.ids("train_aug")[0]
    h, w = toy_index.image(image_id).shape[:2]
    raw = (np.arange(h)[:, None] // 8 * 1000 + np.arange(w)[None] // 16 * 65536).astype(np.int64)
    _icd_png(tmp_path / "icd" / f"{image_id}.png", raw)
    expect = read_icd_superpixels(tmp_path / "icd" / f"{image_id}.png")
    m = _tiny_method(cfg, superpixel_generator="icd", superpixel_dir=str(tmp_path / "icd"),
                     recon_loss="pixel_l1")
    fn = m.extra_input_fns()["superpixels"]
    assert fn.path(image_id, toy_index.root) == tmp_path / "icd" / f"{image_id}.png"
    assert ICDSuperpixels("icd").path(image_id, tmp_path) == tmp_path / "icd" / f"{image_id}.png"
    ids = toy_index.ids("train_aug")
    # missing files stop the run when the dataset is made (main process: one line), all counted
    n = len(ids)
    with pytest.raises(DataError, match=f"ICD superpixel file not found \\({n - 1} of {n} images"):
        ClassificationDataset(toy_index, "train_aug", 96, (48, 64), extra=m.extra_input_fns())
    for other in ids[1:]:
        _icd_png(tmp_path / "icd" / f"{other}.png", np.zeros(toy_index.image(other).shape[:2], np.int64))
    ds = ClassificationDataset(toy_index, "train_aug", 96, (48, 64), seed=0,
                               extra=m.extra_input_fns(), extra_cache=tmp_path / "cache")
    item = ds[0]
    cached = np.load(tmp_path / "cache" / "superpixels" / f"{image_id}.npy", allow_pickle=False)
    assert np.array_equal(cached, expect)
    _, ref = ds._augment(toy_index.image(image_id), expect.astype(np.int32), ds.rng(0))
    assert np.array_equal(item["superpixels"].numpy(), ref)
    params = copy.deepcopy(method_params(cfg, "toy", "ssc"))
    params["ssc"].update(superpixel_generator="icd")
    with pytest.raises(ConfigError, match="ssc.superpixel_dir"):
        create_method(params, VOC_CLASSES, train_params={"crop": 32})


def test_settings_errors_are_config_errors(cfg):
    for bad, key in (({"superpixel_generator": "watershed"}, "ssc.superpixel_generator"),
                     ({"recon_loss": "ssim"}, "ssc.recon_loss"),
                     ({"max_segments": 300}, "ssc.max_segments"),
                     ({"tap_weights": [1.0]}, "ssc.tap_weights")):
        with pytest.raises(ConfigError, match=key):
            _tiny_method(cfg, **bad)


# --- method: schedules and inference ------------------------------------------------------

def test_asm_absent_in_warmup_and_poly_lr_for_both_optimisers(cfg):
    m = _tiny_method(cfg, asm_start_epoch=2, recon_loss="pixel_l1")
    opts = m.optimizers(0.1, 1e-4, 0.9, "sgd")
    dec = opts[1].param_groups[0]
    assert isinstance(opts[1], torch.optim.Adam) and dec["betas"] == (0.5, 0.999)
    assert dec["weight_decay"] == 0
    set_lr(opts, 7, 20, 0.9)
    factor = (1 - 7 / 20) ** 0.9
    assert opts[1].param_groups[0]["lr"] == pytest.approx(5e-4 * factor)
    assert opts[0].param_groups[1]["lr"] == pytest.approx(1.0 * factor)
    labels = torch.zeros(2, 20)
    labels[0, 0] = labels[1, 1] = 1
    batch = {"image": torch.randn(2, 3, 32, 32), "label": labels}
    m.train()
    assert set(m.training_step(batch, _ctx(1))) == {"cls", "rec", "total"}
    with pytest.raises(Exception, match="superpixels"):
        m.training_step(batch, _ctx(2))
    batch["superpixels"] = _segments(2, 32, 32, 9)
    losses = m.training_step(batch, _ctx(2))
    assert set(losses) == {"cls", "rec", "align", "total"}
    expected = losses["cls"] + losses["rec"] + losses["align"]
    assert torch.allclose(losses["total"], expected)


def test_lite0_layer4_ends_with_drs_of_its_head_activation(cfg):
    """Tiny preset (Lite0): layer 4's output is DRS of the head BN's ReLU6 output."""
    m = _tiny_method(cfg, recon_loss="pixel_l1")
    cnn = m.models["cnn"]
    act = cnn.backbone.layer4[-1].act
    assert isinstance(act[-1], DRS) and sum(isinstance(x, DRS) for x in cnn.modules()) == 1
    seen = {}
    act[0].register_forward_hook(lambda mod, inp, out: seen.update(relu6=out))
    m.train()
    f = cnn(torch.randn(2, 3, 64, 64))["features"]
    assert torch.equal(f, drs(seen["relu6"], 0.55)) and not torch.equal(f, seen["relu6"])


def test_inference_cam_flip_equivariant_and_normalised(cfg):
    m = _tiny_method(cfg)
    m.eval()
    img = torch.randn(3, 64, 96)
    maps = {}
    for name, x in (("plain", img), ("flipped", img.flip(-1))):
        scaled = [x, F.interpolate(x[None], scale_factor=2.0, mode="bilinear")[0]]
        maps[name] = image_maps(m, scaled, (64, 96), [3, 7], CPU)["cam"]
    assert np.allclose(maps["flipped"], maps["plain"][..., ::-1], atol=1e-5)
    cam = maps["plain"]
    assert cam.shape == (2, 64, 96) and (cam >= 0).all()
    assert ((cam.reshape(2, -1).max(1) > 0.99) & (cam.reshape(2, -1).max(1) <= 1)).all()


# --- paper preset ------------------------------------------------------------------------

@pytest.mark.slow
def test_paper_preset_step_and_cam_export_on_a_375x500_image(cfg):
    """Paper model, losses and schedule with random weights; the training crop is 64 instead of
    512 (VGG-19 twice at 512 plus the decoder take a minute on a 2-core CPU); the CAM export
    of the full image runs at the paper's scale 0.5 only (scale 1.0 alone costs 6 s: the
    suite's time budget), its maps at the image's size."""
    params = _random_weights(copy.deepcopy(method_params(cfg, "voc", "ssc")))
    train = dict(stage_params(cfg, "voc", "ssc", "train_classifier"), crop=64)
    assert params["ssc"]["loss_net"]["name"] == "vgg19.tv_in1k" and train["batch_size"] == 6
    torch.manual_seed(0)
    m = create_method(params, VOC_CLASSES, train_params=train)
    opts = m.optimizers(train["lr"], train["weight_decay"], train["momentum"], train["optimizer"])
    img = _smooth_image(375, 500)
    ds = ClassificationDataset.__new__(ClassificationDataset)
    ds.crop, ds.scale_range = train["crop"], (60, 80)
    x, seg = ds._augment(img, superpixels(img, "slic64"), np.random.default_rng(0))
    x = to_chw(x)
    label = torch.zeros(1, VOC_CLASSES - 1)
    label[0, 14] = 1
    batch = {"image": torch.from_numpy(x)[None], "label": label,
             "superpixels": torch.from_numpy(seg.astype(np.int64))[None]}
    assert m.unsaved_modules == ("loss_net",) and "loss_net" not in m.state_dict()
    m.train()
    assert not m.models["loss_net"].training
    before = m.models["decoder"].state_dict()["net.0.1.weight"].clone()
    losses = m.training_step(batch, _ctx(epoch=train["epochs"] - 1))
    assert {"cls", "rec", "align"} <= set(losses) and torch.isfinite(losses["total"])
    losses["total"].backward()
    for o in opts:
        o.step()
    assert not torch.equal(before, m.models["decoder"].state_dict()["net.0.1.weight"])

    m.eval()
    from wsss_core.data.transforms import normalize, resize_image, scaled_size
    scales = [s for s in stage_params(cfg, "voc", "ssc", "export_cams")["scales"] if s == 0.5]
    scaled = [torch.from_numpy(to_chw(normalize(resize_image(img, scaled_size(img.shape[:2], s)))))
              for s in scales]
    keys = list(range(1, VOC_CLASSES))  # random weights: some class maps are all zero
    maps = image_maps(m, scaled, (375, 500), keys, CPU)
    cam = maps["cam"]
    assert cam.shape == (20, 375, 500) and maps["cam_s4"].shape == (20, 94, 125)
    peaks = cam.reshape(20, -1).max(1)
    assert np.isfinite(cam).all() and (cam >= 0).all() and (peaks <= 1).all()
    assert ((peaks == 0) | (peaks > 0.99)).all() and (peaks > 0.99).any()
