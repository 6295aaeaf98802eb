"""BNR / TransCAM: the Conformer host, the attention-refined CAM, the noise loss, the export
normalisation, weight loading and the paper preset (bnr.md "Testable invariants")."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.optim import set_lr
from wsss_core.errors import ConfigError, WeightsError
from wsss_core.methods import StepContext, bnr, create_method
from wsss_core.methods.cobra_losses import multilabel_soft_margin
from wsss_core.models.backbones import create_timm
from wsss_core.models.conformer import HEAD_PREFIXES
from wsss_core.stages.export_cams import image_maps, min_max_normalize, strided_size

VOC = 21
CPU = torch.device("cpu")
TINY = {"plugin": "bnr", "model": {"backbone": "conformer_tiny_toy", "pretrained": False}, "bnr": {}}


@pytest.fixture(scope="module")
def small():
    """Conformer-S with random weights, eval mode (no drop path)."""
    torch.manual_seed(0)
    return create_timm("conformer_small_patch16", num_classes=VOC).eval()


def _tiny_method(**bnr_settings):
    torch.manual_seed(0)
    return create_method(dict(TINY, bnr=bnr_settings), VOC, train_params={"crop": 32})


def _batch(n=2, size=32):
    g = torch.Generator().manual_seed(1)
    y = torch.zeros(n, VOC - 1)
    y[0, 3] = y[1 % n, 14] = 1
    return {"image": torch.randn(n, 3, size, size, generator=g), "label": y}


CTX = StepContext(epoch=0, step=0, max_step=1, epochs=1, device=CPU)


# ----------------------------------------------------------------------------- architecture

def test_conformer_s_shapes_attention_rows_and_stride_16(small):
    """Invariants 1-3 at 64 and 96 px (grids 4x4 and 6x6; 512 px is too slow for CPU CI)."""
    with torch.no_grad():
        for size in (64, 96):
            out = small(torch.randn(2, 3, size, size))
            g = size // 16
            assert out["cam"].shape == (2, VOC, g, g) and out["logits"].shape == (2, VOC)
            assert out["attn"].shape == (2, 12, 1 + g * g, 1 + g * g)
            assert (out["attn"] >= 0).all()
            torch.testing.assert_close(out["attn"].sum(-1), torch.ones(2, 12, 1 + g * g))
        f, tokens, _ = small.forward_features(torch.randn(1, 3, 64, 64))
    assert f.shape == (1, 1024, 4, 4) and tokens.shape == (1, 17, 384)  # last fusion: stride 1
    assert small.output_stride == 16
    assert not any("pos" in name for name, _ in small.named_parameters())
    with pytest.raises(ValueError, match="multiples of 16"):
        small(torch.randn(1, 3, 72, 64))


def test_tiny_conformer_is_stride_8_with_six_blocks():
    net = create_timm("conformer_tiny_toy", num_classes=VOC)
    out = net(torch.randn(1, 3, 32, 48))
    assert net.output_stride == 8 and out["cam"].shape == (1, VOC, 4, 6)
    assert out["attn"].shape == (1, 6, 25, 25)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        create_timm("conformer_tiny_toy.untrained", pretrained=True)


def test_class_token_slot_is_doubled_before_each_coupled_block(monkeypatch):
    """Invariant 5: a coupled block's transformer input is FCUDown(x2, tokens) + tokens, and
    FCUDown carries a copy of the class token, so slot 0 holds 2 x cls."""
    from wsss_core.models import conformer
    calls = []

    def recording(blk, x):
        out = block_forward(blk, x)
        calls.append((x, out[0]))
        return out

    block_forward = conformer.block_forward
    monkeypatch.setattr(conformer, "block_forward", recording)
    net = create_timm("conformer_tiny_toy", num_classes=VOC).eval()
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
    assert len(calls) == 6
    for (_, previous_out), (block_in, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(block_in[:, 0], 2 * previous_out[:, 0])


# ------------------------------------------------------------------------------ weights

def _one_line_weights_error(fn, match):
    with pytest.raises(WeightsError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_official_file_loads_with_strict_key_check(tmp_path):
    """Invariant 4: a Conformer-S state dict with other-sized heads (as the official 1000-class
    file, inside a `model` entry with DataParallel prefixes) loads; only the heads keep their
    initialisation."""
    torch.manual_seed(1)
    src = create_timm("conformer_small_patch16", num_classes=5).state_dict()
    path = tmp_path / "Conformer_small_patch16.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.items()}}, path)
    net = create_timm("conformer_small_patch16", pretrained=True, pretrained_file=str(path),
                      num_classes=VOC)
    loaded = net.state_dict()
    heads = [k for k in loaded if k.startswith(HEAD_PREFIXES)]
    assert sorted(heads) == sorted(f"{h}{p}" for h in HEAD_PREFIXES for p in ("weight", "bias"))
    assert all(torch.equal(loaded[k], src[k]) for k in loaded if k not in heads)
    assert loaded["conv_cls_head.weight"].shape[0] == VOC
    _one_line_weights_error(lambda: create_timm("conformer_small_patch16.in1k", pretrained=True),
                            "pretrained_file")


def test_weight_key_check_errors_are_one_line(tmp_path):
    """Missing, unexpected, mis-shaped keys, a truncated file and an absent file each give
    one line naming the file and the first offending key (checked on the tiny model: the
    loader is the same method)."""
    net = create_timm("conformer_tiny_toy", num_classes=VOC)
    good = create_timm("conformer_tiny_toy", num_classes=3).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(good, path)
    net.load_pretrained(path)
    cases = [
        ({k: v for k, v in good.items() if k != "conv_trans_4.fusion_block.bn2.weight"},
         "missing, first conv_trans_4.fusion_block.bn2.weight"),
        (dict(good, extra_tensor=torch.zeros(1)), "unexpected keys, first extra_tensor"),
        (dict(good, cls_token=torch.zeros(1, 1, 7)), "cls_token has shape"),
    ]
    for state, match in cases:
        torch.save(state, path)
        _one_line_weights_error(lambda: net.load_pretrained(path), f"{path}: .*{match}")
    path.write_bytes(path.read_bytes()[:5000])  # a truncated download
    _one_line_weights_error(lambda: net.load_pretrained(path), "not a readable torch weights file")
    _one_line_weights_error(lambda: net.load_pretrained(tmp_path / "absent.pth"), "not found")


# ------------------------------------------------------------------- attention / CAM algebra

def _random_attention(b, n, blocks, generator, dtype=torch.float64):
    return torch.softmax(torch.randn(b, blocks, n + 1, n + 1, generator=generator, dtype=dtype), -1)


def test_refine_cam_equals_loop_and_uniform_case():
    """Invariants 6-8: row sums of A = blocks; M* = Σ_j A*_ij M_j; uniform attention."""
    g = torch.Generator().manual_seed(0)
    b, c, n, blocks = 2, 5, 6, 12
    attn = _random_attention(b, n, blocks, g)
    a_sum = attn.sum(1)
    torch.testing.assert_close(a_sum.sum(-1), torch.full((b, n + 1), 12.0, dtype=torch.float64))
    assert ((a_sum[:, 1:, 1:].sum(-1) > 0) & (a_sum[:, 1:, 1:].sum(-1) <= 12)).all()
    torch.testing.assert_close(attn.mean(1), a_sum / 12, atol=1e-12, rtol=0)
    cam = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    want = torch.zeros_like(cam)
    for bi in range(b):
        for ci in range(c):
            for i in range(n):
                want[bi, ci, i] = sum(a_sum[bi, 1 + i, 1 + j] * cam[bi, ci, j] for j in range(n))
    torch.testing.assert_close(bnr.refine_cam(a_sum, cam), want)
    uniform = torch.full((1, n + 1, n + 1), 12.0 / (n + 1), dtype=torch.float64)
    torch.testing.assert_close(bnr.refine_cam(uniform, torch.full((1, c, n), 0.7, dtype=torch.float64)),
                               torch.full((1, c, n), 12 * 0.7 * n / (n + 1), dtype=torch.float64))


def test_noise_logits_equals_loop_and_attention_squared_form():
    """Invariant 9: z** = GAP(k Ā*·M*) = GAP((k/12) A*·A*·M); k = 0 gives 0; k = 2 doubles."""
    g = torch.Generator().manual_seed(1)
    b, c, n, blocks = 2, 4, 5, 12
    attn = _random_attention(b, n, blocks, g)
    a_sum, a_mean = attn.sum(1), attn.mean(1)
    cam = torch.randn(b, c, n, generator=g, dtype=torch.float64)
    refined = bnr.refine_cam(a_sum, cam)
    want = torch.zeros(b, c, dtype=torch.float64)
    for bi in range(b):
        for ci in range(c):
            total = 0.0
            for i in range(n):
                total += sum(a_mean[bi, 1 + i, 1 + j] * refined[bi, ci, j] for j in range(n))
            want[bi, ci] = total / n
    got = bnr.noise_logits(a_mean, refined, 1.0)
    assert got.shape == (b, c)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    a_star = a_sum[:, 1:, 1:]
    squared = (a_star @ a_star @ cam.transpose(1, 2)).transpose(1, 2).mean(-1) / 12
    torch.testing.assert_close(got, squared, atol=1e-8, rtol=0)
    assert torch.equal(bnr.noise_logits(a_mean, refined, 0.0), torch.zeros_like(got))
    torch.testing.assert_close(bnr.noise_logits(a_mean, refined, 2.0), 2 * got)


def test_background_channel_gets_no_gradient_and_soft_margin_at_zero():
    """Invariants 10-11."""
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    assert math.isclose(float(multilabel_soft_margin(torch.zeros(2, 5, 1), y)), math.log(2), rel_tol=1e-6)
    z = torch.randn(2, 5, generator=g)
    torch.testing.assert_close(multilabel_soft_margin(z.unsqueeze(-1), y),
                               F.multilabel_soft_margin_loss(z[:, 1:], y))
    cam = torch.randn(2, 5, 9, generator=g, requires_grad=True)
    attn = _random_attention(2, 9, 3, g, torch.float32)
    refined = bnr.refine_cam(attn.sum(1), cam)
    loss = multilabel_soft_margin(cam.mean(-1, keepdim=True), y) + \
        multilabel_soft_margin(bnr.noise_logits(attn.mean(1), refined).unsqueeze(-1), y)
    loss.backward()
    assert torch.equal(cam.grad[:, 0], torch.zeros(2, 9)) and cam.grad[:, 1:].abs().sum() > 0


def test_training_step_losses_sum_of_logits_and_switches():
    """Invariants 12-13: L_cls on GAP(M) + token logits (not a sum of two losses); total =
    L_cls + L_M**; bnr: false is TransCAM (L_cls only); weight, k and the no-noise ablation."""
    batch = _batch()
    m = _tiny_method()
    m.train()
    losses = m.training_step(batch, CTX)
    net, y = m.models["conformer"], batch["label"]
    f, tokens, attn = net.forward_features(batch["image"])
    cam = net.conv_cls_head(f)
    tok = net.trans_cls_head(net.trans_norm(tokens[:, 0]))
    want_cls = F.multilabel_soft_margin_loss((cam.mean((2, 3)) + tok)[:, 1:], y)
    torch.testing.assert_close(losses["cls"], want_cls)
    separate = F.multilabel_soft_margin_loss(cam.mean((2, 3))[:, 1:], y) + \
        F.multilabel_soft_margin_loss(tok[:, 1:], y)
    assert not torch.isclose(losses["cls"], separate)
    z = bnr.noise_logits(attn.mean(1), bnr.refine_cam(attn.sum(1), cam.flatten(2)))
    torch.testing.assert_close(losses["bnr"], F.multilabel_soft_margin_loss(z[:, 1:], y))
    torch.testing.assert_close(losses["total"], losses["cls"] + losses["bnr"])

    off = _tiny_method(bnr=False).training_step(batch, CTX)
    assert "bnr" not in off and torch.equal(off["total"], off["cls"])
    half = _tiny_method(weight=0.5, k_noise=2.0).training_step(batch, CTX)
    z2 = 2 * z
    torch.testing.assert_close(half["bnr"], F.multilabel_soft_margin_loss(z2[:, 1:], y))
    torch.testing.assert_close(half["total"], half["cls"] + 0.5 * half["bnr"])
    no_noise = _tiny_method(noise=False).training_step(batch, CTX)
    z_star = bnr.refine_cam(attn.sum(1), cam.flatten(2)).mean(-1)
    torch.testing.assert_close(no_noise["bnr"], F.multilabel_soft_margin_loss(z_star[:, 1:], y))


def test_noise_loss_alone_reaches_the_last_attention_block():
    """Invariant 14: L_M** alone gives the last block's qkv a gradient; detach_attention
    changes it (only the path through the CNN CAM remains)."""
    batch = _batch()
    grads = []
    for detach in (False, True):
        m = _tiny_method(detach_attention=detach)
        m.train()
        m.training_step(batch, CTX)["bnr"].backward()
        qkv = m.models["conformer"].conv_trans_6.trans_block.attn.qkv.weight
        assert qkv.grad is not None and qkv.grad.abs().sum() > 0
        grads.append(qkv.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_infer_never_builds_the_noise_term_and_unflips(monkeypatch):
    """Invariants 13 and 15: inference is M* only; the mirrored image's map is un-flipped."""
    m = _tiny_method()
    m.eval()
    monkeypatch.setattr(bnr, "noise_logits", lambda *a, **k: pytest.fail("noise at inference"))
    x = torch.randn(3, 40, 56)
    pair = torch.stack([x, x.flip(-1)])
    out = m.infer(pair)
    assert out["cam"].shape == (VOC - 1, 7, 7)  # square: 56 px -> 56 x 56 -> 7 x 7 at stride 8
    assert out["attention"].shape == (1, 7, 7) and (out["attention"] > 0).all()
    swapped = m.infer(pair.flip(0))
    torch.testing.assert_close(swapped["cam"], out["cam"].flip(-1))
    m.settings.infer_shape = "keep"
    assert m.infer(pair)["cam"].shape == (VOC - 1, 5, 7)


def test_min_max_normalize_official_values_and_fix():
    """Invariant 16 with the [FIX]: every entry above min + 1e-5 has TransCAM's value
    (cam - n - 1e-5) / (m - n + 1e-5); the rest (and an all-zero map) is 0, never NaN."""
    g = torch.Generator().manual_seed(3)
    cams = torch.rand(3, 6, 7, generator=g) + torch.tensor([0.0, 0.5, 0.0])[:, None, None]
    cams[2] = 0
    got = min_max_normalize(cams)
    for k in range(3):
        a = cams[k].numpy().astype(np.float64)
        n, m = a.min(), a.max()
        official = np.where(a < n + 1e-5, 0.0, a)
        official = (official - n - 1e-5) / (m - n + 1e-5)
        keep = a >= n + 1e-5
        np.testing.assert_allclose(got[k].numpy()[keep], official[keep], rtol=1e-5, atol=1e-6)
        assert (got[k].numpy()[~keep] == 0).all()
    assert got.max() < 1 and got.min() >= 0 and torch.isfinite(got).all()
    assert float(got[0].max()) == pytest.approx((float(cams[0].max()) - float(cams[0].min()) - 1e-5)
                                                / (float(cams[0].max()) - float(cams[0].min()) + 1e-5))


# ------------------------------------------------------------------------------ presets

@pytest.fixture(scope="module")
def cfg(repo_root):
    c = load_config(repo_root / "config.yaml")
    c["datasets"]["voc"]["root"] = "/nonexistent"
    return c


def test_transcam_entry_is_bnr_without_the_noise_loss(cfg):
    for preset_dataset in ("toy", "voc"):
        b, t = method_params(cfg, preset_dataset, "bnr"), method_params(cfg, preset_dataset, "transcam")
        assert b["plugin"] == t["plugin"] == "bnr" and b["model"] == t["model"]
        assert b["bnr"]["bnr"] is True and t["bnr"]["bnr"] is False


def test_paper_presets_official_epochs_and_color_jitter(cfg):
    """TransCAM's own run trains 20 epochs (train_TransCAM.py --max_epoches), BNR 22 (BNR
    §4.2); both jitter colours as train_TransCAM.py, ColorJitter(0.3, 0.3, 0.3, 0.1)."""
    assert stage_params(cfg, "voc", "transcam", "train_classifier")["epochs"] == 20
    assert stage_params(cfg, "voc", "bnr", "train_classifier")["epochs"] == 22
    for name in ("bnr", "transcam"):
        assert method_params(cfg, "voc", name)["bnr"]["color_jitter"] == [0.3, 0.3, 0.3, 0.1]
        m = create_method(copy.deepcopy(method_params(cfg, "voc", name)) | {"model": TINY["model"]},
                          VOC, train_params=stage_params(cfg, "voc", name, "train_classifier"))
        views = m.train_views()
        assert views.keywords == {"crop": 512, "scale_range": (320, 640), "jitter": (0.3, 0.3, 0.3, 0.1)}


def _photo(h=40, w=56, seed=0):
    g = np.random.default_rng(seed)
    return (g.random((h, w, 3)) * 200 + 20).astype(np.uint8)


def test_transcam_crop_is_torchvision_jitter_between_resize_and_normalise():
    """Loop oracle: the crop equals resize (the sample's draw) → torchvision ColorJitter seeded
    with the spawned seed → normalise → flip → crop, built step by step here; the geometric
    draws are those of the shared crop; the same (seed, epoch, index) stream gives the same
    colours, another stream other colours; the global torch RNG is untouched."""
    from PIL import Image
    from torchvision.transforms import ColorJitter

    from wsss_core.data import transforms as T
    from wsss_core.data.datasets import sample_rng

    img = _photo()
    jitter = (0.3, 0.3, 0.3, 0.1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = bnr.transcam_crop(img, sample_rng(7, 2, 5), 48, (40, 72), jitter)["image"]
    assert torch.equal(torch.get_rng_state(), state)
    rng = sample_rng(7, 2, 5)
    resized, _ = T.random_resize_long(img, None, 40, 72, rng)
    torch.manual_seed(int(rng.spawn(1)[0].integers(2 ** 63)))
    coloured = np.asarray(ColorJitter(*jitter)(Image.fromarray(resized)))
    ref, _ = T.random_crop(*T.random_hflip(T.normalize(coloured), None, rng), 48, rng)
    assert got.shape == (3, 48, 48) and got.dtype == np.float32
    assert np.array_equal(got, T.to_chw(ref))
    plain, _ = T.classification_crop(img, None, 48, (40, 72), sample_rng(7, 2, 5))
    assert not np.allclose(got, T.to_chw(plain), atol=1e-3)  # the colours moved
    assert np.array_equal(bnr.transcam_crop(img, sample_rng(7, 2, 5), 48, (40, 72), (0, 0, 0, 0))["image"],
                          T.to_chw(plain))  # zero jitter: the shared crop, same geometry
    again = bnr.transcam_crop(img, sample_rng(7, 2, 5), 48, (40, 72), jitter)["image"]
    other = bnr.transcam_crop(img, sample_rng(8, 2, 5), 48, (40, 72), jitter)["image"]
    assert np.array_equal(got, again) and not np.array_equal(got, other)


def test_color_jitter_switch_reaches_the_training_batch(toy_index):
    """Off (the default, the tiny preset): no views, the shared crop. On: the dataset's item is
    transcam_crop of the image with the sample's stream; bad values are one-line ConfigErrors."""
    from wsss_core.data.datasets import ClassificationDataset

    assert _tiny_method().train_views() is None
    m = create_method(dict(TINY, bnr={"color_jitter": [0.3, 0.3, 0.3, 0.1]}), VOC,
                      train_params={"crop": 32, "scale_range": [40, 48]})
    ds = ClassificationDataset(toy_index, "train_aug", 32, (40, 48), seed=3, views=m.train_views())
    item = ds[1]
    ref = bnr.transcam_crop(toy_index.image(ds.ids[1]), ds.rng(1), 32, (40, 48), (0.3, 0.3, 0.3, 0.1))
    assert torch.equal(item["image"], torch.as_tensor(ref["image"]))
    for bad in ([0.3, 0.3, 0.3], [0.3, 0.3, -0.1, 0.1], [0.3, 0.3, 0.3, 0.7], "yes"):
        with pytest.raises(ConfigError, match="bnr.color_jitter"):
            create_method(dict(TINY, bnr={"color_jitter": bad}), VOC, train_params={"crop": 32})


def test_tiny_preset_hybrid_starts_from_frozen_imagenet_lite0(cfg):
    """The toy preset's hybrid Conformer: the Lite0 stem carries the offline ImageNet weights,
    stays frozen (no gradient, BN in eval mode while training, left out of the optimiser, not
    changed by a step), the patches come from its stride-16 features (output stride 16)."""
    from wsss_core.models.backbones import cnn_stages
    params = copy.deepcopy(method_params(cfg, "toy", "bnr"))
    assert params["model"]["backbone"] == "conformer_lite0_hybrid"
    torch.manual_seed(0)
    m = create_method(params, VOC)
    net = m.models["conformer"]
    lite0 = cnn_stages("tf_efficientnet_lite0", pretrained=True).state_dict()
    stem = net.stem.state_dict()
    assert stem and all(torch.equal(v, lite0[k]) for k, v in stem.items())
    assert not any(p.requires_grad for p in net.stem.parameters())
    assert net.output_stride == 16 and net.trans_patch_conv.in_channels == 112
    opts = m.optimizers(5e-4, 0.0, 0.9, "adamw")
    optimised = {id(p) for g in opts[0].param_groups for p in g["params"]}
    assert optimised and not optimised & {id(p) for p in net.stem.parameters()}
    m.train()
    assert not any(b.training for b in net.stem.modules() if isinstance(b, torch.nn.BatchNorm2d))
    batch = {"image": torch.randn(2, 3, 64, 64), "label": torch.zeros(2, VOC - 1)}
    batch["label"][:, 3] = 1
    out = net(batch["image"])
    assert out["cam"].shape == (2, VOC, 4, 4) and out["attn"].shape == (2, 6, 17, 17)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m.training_step(batch, CTX)["total"].backward()
    opts[0].step()
    after = net.state_dict()
    assert all(torch.equal(after[f"stem.{k}"], before[f"stem.{k}"]) for k in stem)
    assert not torch.equal(after["conv_cls_head.weight"], before["conv_cls_head.weight"])


def test_hybrid_cnn_branch_at_stride_16_and_identity_attention_start():
    """`hybrid_cnn_stride=16`: the CNN branch starts from the same stride-16 Lite0 features as
    the patches (no coupled block downsamples; the CNN map and the token grid coincide);
    `attn_init="identity"`: query = key = the block's normed input, so each patch's attention
    row is the softmax of its scaled dot products with all tokens (checked against that formula
    for the first block), far from uniform, whereas the random start is near-uniform."""
    from wsss_core.models.conformer import conformer_lite0_hybrid
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    entropy = {}
    for init in ("random", "identity"):
        torch.manual_seed(0)
        net = conformer_lite0_hybrid(num_classes=VOC, hybrid_cnn_stride=16, attn_init=init,
                                     stem_pretrained=False).eval()
        assert net.conv_1.conv1.in_channels == net.trans_patch_conv.in_channels == 112
        assert all(b.cnn_block.conv2.stride == (1, 1) and b.token_stride == 1 for b in net.coupled_blocks())
        with torch.no_grad():
            out = net(x)
        assert out["cam"].shape == (1, VOC, 4, 6) and out["attn"].shape == (1, 6, 25, 25)
        a = out["attn"][0, :, 1:, :]
        entropy[init] = (-(a * a.clamp_min(1e-12).log()).sum(-1)).mean().item() / math.log(25)
        if init == "identity":
            blk = net.trans_1
            with torch.no_grad():
                t = net.trans_patch_conv(net.stem.layer3(net.stem.layer2(net.stem.layer1(net.stem.stem(x)))))
                t = torch.cat([net.cls_token, t.flatten(2).transpose(1, 2)], dim=1)
                z = blk.norm1(t)[0]
            heads, hd = blk.attn.num_heads, z.shape[-1] // blk.attn.num_heads
            want = torch.stack([torch.softmax(z[:, h * hd:(h + 1) * hd] @ z[:, h * hd:(h + 1) * hd].t()
                                              / math.sqrt(hd), dim=-1) for h in range(heads)]).mean(0)
            torch.testing.assert_close(out["attn"][0, 0], want, rtol=1e-4, atol=1e-5)
    assert entropy["random"] > 0.98 and entropy["identity"] < 0.9


@pytest.mark.slow
def test_paper_preset_step_and_export_on_a_375x500_image(cfg):
    """The paper preset (Conformer-S, random weights) runs one AdamW step at constant lr and
    one CAM export of a 375x500 image (scale 0.25 keeps CPU CI short; sizes are not square
    and not multiples of 16)."""
    params = copy.deepcopy(method_params(cfg, "voc", "bnr"))
    params["model"]["pretrained"] = False
    train = stage_params(cfg, "voc", "bnr", "train_classifier")
    assert (train["optimizer"], train["lr"], train["weight_decay"], train["poly_power"]) == \
        ("adamw", 5e-5, 5e-4, 0.0)
    torch.manual_seed(0)
    m = create_method(params, VOC, train_params=train)
    opts = m.optimizers(train["lr"], train["weight_decay"], train["momentum"], train["optimizer"])
    net = m.models["conformer"]
    assert len(opts) == 1 and len(opts[0].param_groups) == 1
    assert len(opts[0].param_groups[0]["params"]) == len(list(net.parameters()))
    assert set_lr(opts, 7, 10, train["poly_power"]) == 5e-5  # invariant 23: constant lr
    assert opts[0].param_groups[0]["weight_decay"] == 5e-4

    h, w = 375, 500
    image = torch.randn(3, h, w)
    crop = 64
    batch = {"image": F.interpolate(image[None], size=(crop, crop), mode="bilinear")[0][None],
             "label": torch.zeros(1, VOC - 1)}
    batch["label"][0, 11] = 1
    m.train()
    before = net.conv_cls_head.weight.clone()
    losses = m.training_step(batch, CTX)
    losses["total"].backward()
    opts[0].step()
    assert {"cls", "bnr", "total"} <= set(losses) and torch.isfinite(losses["total"])
    assert not torch.equal(before, net.conv_cls_head.weight)

    m.eval()
    scaled = [F.interpolate(image[None], scale_factor=0.25, mode="bilinear")[0]]
    maps = image_maps(m, scaled, (h, w), [4, 12], CPU)
    assert maps["cam"].shape == (2, h, w) and maps["cam_s4"].shape == (2,) + strided_size((h, w))
    assert maps["attention"].shape == (h, w)
    assert np.isfinite(maps["cam"]).all() and 0 <= maps["cam"].min() and maps["cam"].max() < 1
