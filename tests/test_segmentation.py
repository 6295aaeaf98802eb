"""Segmentation networks (smp DeepLabV3+ / SegFormer) and their train/inference engine."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_core.data.palette import IGNORE, voc_palette
from wsss_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from wsss_core.errors import ConfigError, WeightsError
from wsss_core.models import segmentation as seg_models
from wsss_core.models.segmentation import (PAPER_ENCODERS, TINY_ENCODERS, create_seg_model,
                                           param_groups)
from wsss_core.optim import make_optimizer, set_lr
from wsss_core.data.seg_dataset import SegTrainAugment
from wsss_core.models.segmentation import segmentation_loss
from wsss_core.seg_inference import predict_multiscale

NUM_CLASSES = 21


def _train_and_predict(name: str, encoder: str, crop: int) -> tuple[float, np.ndarray, float, float]:
    torch.manual_seed(0)
    model = create_seg_model(name, encoder, NUM_CLASSES, pretrained=False)
    optimizer = make_optimizer(param_groups(model), 0.01, 0.0, 0.9, "sgd")
    rng = np.random.default_rng(0)
    augment = SegTrainAugment(crop)
    pairs = [augment(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8),
                     rng.integers(0, NUM_CLASSES, (300, 400), dtype=np.uint8), rng) for _ in range(2)]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    masks = torch.from_numpy(np.stack([p[1] for p in pairs]))
    before = [p.detach().clone() for p in model.parameters()]
    t0 = time.perf_counter()
    model.train()
    optimizer.zero_grad()
    loss_t = segmentation_loss(model(images), masks)
    loss_t.backward()
    optimizer.step()
    loss = float(loss_t.detach())
    step_s = time.perf_counter() - t0
    assert math.isfinite(loss) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    probs = predict_multiscale(model, image, [0.5, 1.0], flip=True, device="cpu")
    pred_s = time.perf_counter() - t0
    return loss, probs, step_s, pred_s


@pytest.mark.parametrize("name", ["deeplabv3plus", "segformer"])
@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_preset_trains_one_step_and_predicts_real_size_image(name, preset):
    encoder = (PAPER_ENCODERS if preset == "paper" else TINY_ENCODERS)[name]
    crop = 256 if preset == "paper" else 96
    _, probs, step_s, pred_s = _train_and_predict(name, encoder, crop)
    print(f"{name}/{encoder}: train step {step_s:.1f}s, predict {pred_s:.1f}s")
    assert probs.shape == (NUM_CLASSES, 375, 500) and probs.dtype == np.float32
    assert probs.min() >= 0
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_deeplab_output_stride_8_and_bad_names():
    model = create_seg_model("deeplabv3plus", "resnet18", 3, pretrained=False, output_stride=8).eval()
    assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ConfigError):
        create_seg_model("unet", "resnet18", 3, pretrained=False)
    with pytest.raises(ConfigError):
        create_seg_model("segformer", "resnet18", 3, pretrained=False)
    with pytest.raises(ConfigError):
        create_seg_model("deeplabv3plus", "resnet18", 3, pretrained=False, output_stride=32)


def test_param_groups_split_encoder_and_decoder():
    model = create_seg_model("segformer", "mit_b0", 5, pretrained=False)
    groups = param_groups(model, decoder_lr_mult=10)
    assert [g["lr_mult"] for g in groups] == pytest.approx([1.0, 10.0])
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == encoder_ids
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters()} - encoder_ids
    assert any(p is model.segmentation_head[0].weight for p in groups[1]["params"])
    optimizer = make_optimizer(groups, 0.01, 1e-4, 0.9, "sgd")
    assert set_lr([optimizer], 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * 0.5 ** 0.9, 0.1 * 0.5 ** 0.9])


def test_loss_matches_per_pixel_oracle_and_respects_ignore():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    masks = torch.randint(0, 4, (2, 3, 5), generator=g)
    masks[0, 1, 1:4] = IGNORE
    masks[1, :, 0] = IGNORE
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            for j in range(5):
                k = int(masks[b, i, j])
                if k == IGNORE:
                    continue
                z = logits[b, :, i, j].tolist()
                total += -(z[k] - math.log(sum(math.exp(v) for v in z)))
                count += 1
    assert float(segmentation_loss(logits, masks)) == pytest.approx(total / count, rel=1e-5)

    everything_ignored = torch.full((2, 3, 5), IGNORE)
    # torch's own mean reduction gives 0/0 = NaN here; ours must not
    assert torch.isnan(F.cross_entropy(logits, everything_ignored, ignore_index=IGNORE))
    assert float(segmentation_loss(logits, everything_ignored)) == 0.0


def test_augment_keeps_image_and_mask_aligned_and_is_deterministic():
    palette = voc_palette().astype(np.float32)
    # 16x16-pixel blocks of labels 0..19 (no 255 in the source, so 255 in the output = padding)
    blocks = np.random.default_rng(1).integers(0, 20, (8, 12))
    label = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)  # 128 x 192
    image = palette[label].astype(np.uint8)
    augment = SegTrainAugment(crop_size=112)
    radius = 3
    saw_padding = False
    for seed in range(12):
        img, mask = augment(image, label, np.random.default_rng(seed))
        img2, mask2 = augment(image, label, np.random.default_rng(seed))
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
        assert img.shape == (3, 112, 112) and img.dtype == np.float32
        assert mask.shape == (112, 112) and mask.dtype == np.int64
        padded = mask == IGNORE
        saw_padding |= bool(padded.any())
        assert np.all(img[:, padded] == 0.0)  # image padding is exactly the normalised mean
        rgb = (img.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
        # away from label edges and the crop border (interpolation blurs edges; a crop may cut
        # next to an edge it no longer shows) the colour must encode the label
        h, w = mask.shape
        uniform = np.ones_like(mask, dtype=bool)
        big = np.pad(mask, radius, constant_values=-1)
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                uniform &= big[radius + dy:radius + dy + h, radius + dx:radius + dx + w] == mask
        check = uniform & ~padded
        assert check.sum() > 1000
        err = np.abs(rgb[check] - palette[mask[check]]).max()
        assert err < 2, (seed, err)
    assert saw_padding


class _PointwiseModel(nn.Module):
    """A 1x1 conv plus an optional horizontal ramp (the ramp breaks flip equivariance)."""

    def __init__(self, classes: int, ramp: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)
        self.ramp = ramp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.ramp:
            xs = torch.linspace(-2, 2, x.shape[-1])
            out = out + xs * torch.arange(out.shape[1], dtype=out.dtype)[:, None, None]
        return out


def _oracle_probs(model: nn.Module, image: np.ndarray, scales, flip: bool) -> np.ndarray:
    """Straightforward multi-scale inference: one forward per (scale, mirror), no padding."""
    h, w = image.shape[:2]
    x = torch.from_numpy(normalize(image).transpose(2, 0, 1).copy())[None]
    acc = 0
    for s in scales:
        size = (round(h * s), round(w * s))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear",
                                                    align_corners=False, antialias=s < 1)
        p = model(xs).softmax(1)
        if flip:
            p = (p + model(xs.flip(-1)).softmax(1).flip(-1)) / 2
        acc = acc + F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
    return (acc / len(scales))[0].detach().numpy()


def test_flip_average_of_equivariant_model_equals_plain_prediction():
    model = _PointwiseModel(4, ramp=False)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with_flip = predict_multiscale(model, image, [1.0], flip=True, device="cpu")
    without = predict_multiscale(model, image, [1.0], flip=False, device="cpu")
    np.testing.assert_allclose(with_flip, without, atol=1e-6)


def test_multiscale_flip_matches_oracle_on_non_equivariant_model():
    model = _PointwiseModel(4, ramp=True)
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # no padding
    got = predict_multiscale(model, image, [1.0], flip=True, device="cpu")
    want = _oracle_probs(model, image, [1.0], True)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - predict_multiscale(model, image, [1.0], False, "cpu")).max() > 1e-2


def test_multiscale_padding_is_cropped_away():
    # a pointwise model sees no padding effect, so odd sizes must equal the unpadded oracle
    model = _PointwiseModel(5, ramp=False)
    image = np.random.default_rng(2).integers(0, 256, (50, 71, 3), dtype=np.uint8)
    got = predict_multiscale(model, image, [0.5, 1.0, 1.5], flip=True, device="cpu")
    want = _oracle_probs(model, image, [0.5, 1.0, 1.5], True)
    assert got.shape == (5, 50, 71)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


def test_crf_hook_receives_image_and_probs():
    model = _PointwiseModel(3, ramp=False)
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    seen = {}

    def crf(img, probs):
        seen["img"], seen["probs"] = img, probs.copy()
        return probs[::-1].copy()

    got = predict_multiscale(model, image, [1.0], flip=True, device="cpu", crf=crf)
    assert seen["img"] is image
    np.testing.assert_array_equal(got, seen["probs"][::-1])


def test_missing_local_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "resnet101_imagenet.pth"
    with pytest.raises(WeightsError, match="resnet101_imagenet.pth"):
        create_seg_model("deeplabv3plus", "resnet101", NUM_CLASSES, pretrained=True,
                         pretrained_file=str(missing))


def test_local_weights_file_round_trip_and_mismatch(tmp_path):
    source = create_seg_model("deeplabv3plus", "resnet18", 3, pretrained=False)
    # a whole-model DataParallel checkpoint with an ImageNet classifier still loads the encoder
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.encoder.fc.weight"] = torch.zeros(1000, 512)
    file = tmp_path / "model.pth"
    torch.save({"state_dict": state}, file)
    model = create_seg_model("deeplabv3plus", "resnet18", 3, pretrained=True, pretrained_file=str(file))
    for k, v in source.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)

    wrong = tmp_path / "mit_b0.pth"
    torch.save(create_seg_model("segformer", "mit_b0", 3, pretrained=False).encoder.state_dict(), wrong)
    with pytest.raises(WeightsError, match="mit_b0.pth"):
        create_seg_model("deeplabv3plus", "resnet18", 3, pretrained=True, pretrained_file=str(wrong))


def test_imagenet_weights_offline_fail_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(seg_models, "_hub_reachable", lambda endpoint: False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"smp-hub/mit_b0\.imagenet/model\.safetensors"):
        create_seg_model("segformer", "mit_b0.imagenet", 3, pretrained=True)
    assert time.perf_counter() - t0 < 10
