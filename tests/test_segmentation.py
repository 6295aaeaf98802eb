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
from wsss_core.optim import lr_factor, make_optimizer, set_lr
from wsss_core.seg_engine import SegTrainAugment, predict_multiscale, segmentation_loss

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
