"""SeCo as the official code runs it (issue 31 items 1, 2 and SeCo's part of 6): the crop box,
the min-max seed map and the own-head evaluation protocol, each against a loop oracle written
from the official formula (docs/methods/seco.md "Switches")."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.data import transforms as T
from wsss_core.methods import create_method, seco as seco_mod
from wsss_core.methods.base import StepContext
from wsss_core.methods.seco import denormalize, seco_views

TINY_VIT = dict(backbone="seco_vit_test", pretrained=False, patch_size=8, embed_dim=32, depth=3,
                num_heads=2, proj_hidden=48)
#: every loss on from step 0, tiny local crops and reservoir
ALL_ON = dict(local_crop=16, num_local=3, queue_size=60, cls_only_until=-1, contrast_until=-1,
              update_prototype=0, cam_scales=[1.0, 0.5], warmup_iters=0, par_dilations=[1, 2],
              par_iterations=2, ptc_box_scaling="scaled")


def _small_image(seed: int = 0) -> np.ndarray:
    """A 20x28 uint8 image with bright content, so black padding stands out."""
    rng = np.random.default_rng(seed)
    return (64 + rng.random((20, 28, 3)) * 191).astype(np.uint8)


# --- item 1: the crop box ----------------------------------------------------------------------

def test_crop_box_pads_black_before_normalisation_and_keeps_the_draws():
    img = _small_image()
    for k in range(5):
        new = seco_views(img, np.random.default_rng(k), 32, (20, 24), crop_box=True)
        old = seco_views(img, np.random.default_rng(k), 32, (20, 24), crop_box=False)
        assert "img_box" not in old and new["img_box"].dtype == torch.int64
        t, d, l, r = new["img_box"].tolist()
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t:d, l:r] = True
        assert 0 < d - t < 32 and 0 < r - l < 32  # the image is smaller than the crop
        # the image region is the former crop's (same rng draws), the padding black (uint8 0)
        torch.testing.assert_close(new["image"][:, inside], old["image"][:, inside])
        assert torch.all(denormalize(new["image"][None])[0][:, ~inside] == 0)
        assert torch.all(denormalize(new["image"][None])[0][:, inside] > 0)
        # the former padding: 0 after normalisation = the mean colour
        assert torch.all(old["image"][:, ~inside] == 0)


def test_crop_box_is_the_full_crop_for_a_large_image():
    img = np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    new = seco_views(img, np.random.default_rng(0), 32, (60, 90), crop_box=True)
    old = seco_views(img, np.random.default_rng(0), 32, (60, 90), crop_box=False)
    assert new["img_box"].tolist() == [0, 32, 0, 32]
    assert all(torch.equal(new[k], old[k]) for k in old)


def _spy(monkeypatch, name: str, seen: dict, keep=lambda a, kw: a):
    """Wrap seco_mod.<name>: record what `keep` picks of its arguments, then call it."""
    fn = getattr(seco_mod, name)

    def wrapped(*a, **kw):
        seen[name] = keep(a, kw)
        return fn(*a, **kw)
    monkeypatch.setattr(seco_mod, name, wrapped)


@pytest.mark.parametrize("crop_box", [True, False])
def test_no_online_label_sees_a_padded_pixel(monkeypatch, crop_box):
    """A training step (every loss on) on the views of two images smaller than the crop: the
    segmentation label, the ROI mask the tags and local crops come from, the dense-energy ROI
    and label, and the PTC pairs treat every padded pixel as ignored (with crop_box false, the
    former behaviour, the padding is image and this fails: the last assertion says so)."""
    seco = {**ALL_ON, "crop_box": crop_box}
    m = create_method({"plugin": "seco", "model": TINY_VIT, "seco": seco}, 5,
                      {"crop": 32, "scale_range": (20, 24)})
    views = m.train_views()
    items = [views(_small_image(k), np.random.default_rng(k)) for k in (0, 1)]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch["label"] = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    # where the padding is, whatever the switch (the same draws give the same boxes)
    boxes = [seco_views(_small_image(k), np.random.default_rng(k), 32, (20, 24),
                        crop_box=True)["img_box"].tolist() for k in (0, 1)]
    pad = torch.ones(2, 32, 32, dtype=torch.bool)
    for b, (t, d, l, r) in enumerate(boxes):
        pad[b, t:d, l:r] = False
    seen: dict = {}
    _spy(monkeypatch, "seg_loss", seen, lambda a, kw: a[1])
    _spy(monkeypatch, "assign_csc_tags", seen, lambda a, kw: a[1])
    _spy(monkeypatch, "ptc_loss", seen, lambda a, kw: a[1])
    _spy(monkeypatch, "dense_energy_loss", seen, lambda a, kw: (a[2], a[3]))
    ctx = StepContext(epoch=0, step=0, max_step=10, epochs=1, device=torch.device("cpu"))
    losses = m.training_step(batch, ctx)
    assert torch.isfinite(losses["total"])
    seg_label, roi = seen["seg_loss"], seen["assign_csc_tags"]
    energy_label, energy_roi = seen["dense_energy_loss"]
    # PTC: a token is padded unless its 8x8 cell lies wholly inside the box
    cells = pad.view(2, 4, 8, 4, 8).any(dim=4).any(dim=2).flatten(1)  # [B, 16]
    aff = seen["ptc_loss"]
    padded_pair = cells[:, :, None] | cells[:, None, :]
    checks = {"segmentation label": bool(torch.all(seg_label[pad] == 255)),
              "ROI / tags": bool(torch.all(roi[pad] == 255)),
              "energy label": bool(torch.all(energy_label[pad] == 255)),
              "energy ROI": energy_roi is not None and bool(torch.all(energy_roi[pad] == 0)),
              "PTC pairs": bool(torch.all(aff[padded_pair] == 255))}
    if crop_box:
        assert all(checks.values()), checks
        assert energy_roi is not None and torch.all(energy_roi[~pad] == 1)
        # the box leaves the image itself labelled somewhere (not everything ignored)
        assert (seg_label[~pad] != 255).any() or (roi[~pad] != 255).any()
    else:
        assert not any(checks.values()), f"the former crop ignores the padding now: {checks}"


# --- item 2: the seed map, min-max per class -----------------------------------------------------

def _export_loop(m, scaled, size, keys):
    """The official map (utils/camutils.py multi_scale_cam2, per class): per scale the flip-max
    CAM bilinear to the image size, ReLU, summed over scales; then per present class minus its
    minimum, divided by (its maximum + 1e-5)."""
    out = {}
    for name in ("cam", "aux"):
        total = torch.zeros(len(keys), *size, dtype=torch.float64)
        for img in scaled:
            cam = m.infer(torch.stack([img, img.flip(-1)]))[name]
            for i, k in enumerate(keys):
                one = F.interpolate(cam[None, k - 1:k].float(), size=size, mode="bilinear",
                                    align_corners=False)[0, 0]
                total[i] += one.double()
        for i in range(len(keys)):
            lo = total[i].min()
            shifted = total[i] - lo
            total[i] = shifted / (shifted.max() + 1e-5)
        out[name] = total
    return out


@pytest.mark.parametrize("cam_norm", ["minmax", "max"])
def test_exported_seed_map_is_min_max_per_class(monkeypatch, cam_norm):
    """export_cams.image_maps on SeCo's maps against the loop; the maps are lifted by +1 (and a
    ramp) so every class's minimum is well above 0 and max-only differs from min-max."""
    from wsss_core.stages.export_cams import image_maps
    m = create_method({"plugin": "seco", "model": TINY_VIT, "seco": {"cam_norm": cam_norm}}, 5,
                      {"crop": 32})
    m.eval()
    infer = m.infer

    def lifted(pair):
        return {k: v + 1.0 + torch.linspace(0, 1, v.shape[-1]) for k, v in infer(pair).items()}
    monkeypatch.setattr(m, "infer", lifted)
    torch.manual_seed(0)
    scaled = [torch.randn(3, 16, 24), torch.randn(3, 24, 36)]
    keys = [1, 3]
    got = image_maps(m, scaled, (16, 24), keys, torch.device("cpu"))
    want = _export_loop(m, scaled, (16, 24), keys)
    for name in ("cam", "aux"):
        g = torch.from_numpy(got[name]).double()
        assert g.shape == (2, 16, 24)
        # export_cams.min_max_normalize subtracts a further 1e-5 and clamps at 0
        # (an absolute difference of at most 1e-5 / (max - min) here)
        close = torch.allclose(g, want[name], atol=2e-5)
        assert close == (cam_norm == "minmax"), (name, (g - want[name]).abs().max())
    assert "cam_s4" in got


# --- item 6 (SeCo's part): the own head as tools/infer_seg_voc.py evaluates it -------------------

class _PositionNet(torch.nn.Module):
    """A small network whose logits depend on content, position and input size (so a resize,
    a padding, the flip or a different scale fusion changes its output): [B, 3, h, w] →
    [B, 4, h, w]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(5, 4, 5, padding=2)

    def forward(self, x):
        B, _, h, w = x.shape
        yy = torch.linspace(-1, 1, h)[:, None].expand(h, w)
        xx = torch.linspace(-1, 1, w)[None].expand(h, w) ** 2 + 0.3 * torch.linspace(-1, 1, w)[None]
        pos = torch.stack([yy, xx])[None].expand(B, -1, -1, -1)
        return 3 * self.conv(torch.cat([x, pos], 1))


@torch.no_grad()
def _official_head_loop(net, image_uint8, square, scales):
    """tools/infer_seg_voc.py `_validate`, from its formula: per scale s the normalised image
    bilinear to int(square·s)²; logits of [x; flip x], each bilinear to H×W, summed (the mirror
    un-flipped); element-wise max over scales; softmax."""
    h, w = image_uint8.shape[:2]
    x = torch.from_numpy(T.to_chw(T.normalize(image_uint8)))[None]
    fused = None
    for s in scales:
        side = int(square * s)
        xs = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        segs = net(torch.cat([xs, xs.flip(-1)]))
        segs = F.interpolate(segs, size=(h, w), mode="bilinear", align_corners=False)
        seg = segs[:1] + segs[1:].flip(-1)
        if fused is None:
            fused = seg
        else:  # the max, one element at a time
            out = fused.clone()
            for c in range(seg.shape[1]):
                for i in range(h):
                    for j in range(w):
                        out[0, c, i, j] = max(float(fused[0, c, i, j]), float(seg[0, c, i, j]))
            fused = out
    return fused[0].softmax(0).numpy()


def test_own_head_official_protocol_matches_the_loop():
    from wsss_core.seg_inference import predict_multiscale
    img = np.random.default_rng(0).integers(0, 255, (21, 30, 3), dtype=np.uint8)
    net = _PositionNet()
    want = _official_head_loop(net, img, 40, [1.0, 1.25, 1.5])
    got = predict_multiscale(net, img, [1.0, 1.25, 1.5], True, "cpu", square=40, fuse="max")
    assert got.shape == (4, 21, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the shared protocol (own size, padded to 32, softmax averaged) is another number
    old = predict_multiscale(net, img, [1.0, 1.25, 1.5], True, "cpu")
    assert np.abs(old - want).max() > 1e-2


def test_eval_seg_applies_own_head_only_to_a_single_stage_method(monkeypatch):
    """eval_seg's own_head block replaces the shared keys for --from-method only; the SeCo
    paper preset carries the official protocol (scales, max fusion, CRF), the tiny preset none."""
    from wsss_core.config import load_config, stage_params
    from wsss_core.stages.eval_seg import head_params
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    cfg["datasets"]["toy_paper"] = dict(cfg["datasets"]["toy"], preset="paper")
    paper = stage_params(cfg, "toy_paper", "seco", "eval_seg")
    head = head_params(paper, from_method=True)
    assert head["square"] == 448 and head["scales"] == [1.0, 1.25, 1.5] and head["fuse"] == "max"
    assert head["flip"] and head["crf"]
    assert head["crf_params"] == {"gauss_sxy": 1, "gauss_compat": 1, "bi_sxy": 121, "bi_srgb": 5,
                                  "bi_compat": 4, "iterations": 10}
    shared = head_params(paper, from_method=False)  # seg-multistage/: the DeepLab protocol
    assert shared["square"] is None and shared["fuse"] == "mean"
    assert shared["scales"] == paper["scales"] and shared["crf_params"] == paper["crf_params"]
    tiny = stage_params(cfg, "toy", "seco", "eval_seg")
    assert tiny.get("own_head") is None
    shared_keys = ("scales", "flip", "crf", "crf_params")
    assert head_params(tiny, True) == {**{k: tiny[k] for k in shared_keys},
                                       "square": None, "fuse": "mean"}


def test_presets_select_the_switches():
    """paper: the official crop box and min-max maps (the settings' defaults); tiny: the
    former crop and max-only maps (docs/methods/seco.md "Switches" says why)."""
    from pathlib import Path
    from wsss_core.config import load_config, method_params
    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    cfg["datasets"]["toy_paper"] = dict(cfg["datasets"]["toy"], preset="paper")
    want = {"toy_paper": (True, "minmax", "official", "minmax"),
            "toy": (False, "max", "official", True)}
    for dataset, (box, norm, ptc, spec) in want.items():
        seco = method_params(cfg, dataset, "seco")["seco"]
        m = create_method({"plugin": "seco", "model": TINY_VIT, "seco": seco}, 5, {"crop": 32})
        s = m.settings
        assert (s.crop_box, s.cam_norm, s.ptc_box_scaling) == (box, norm, ptc), dataset
        assert [x.normalize for x in m.maps] == [spec, spec]
        assert m.train_views().keywords["crop_box"] is box
    with pytest.raises(Exception, match="seco.cam_norm"):
        create_method({"plugin": "seco", "model": TINY_VIT, "seco": {"cam_norm": "mean"}}, 5,
                      {"crop": 32})


def test_predict_takes_the_own_head_block_of_eval_seg():
    """`wsss predict` receives the (dataset, method)'s eval_seg block: its own_head block is
    kept for the own head (--from-method) and dropped for a segmentation network."""
    from wsss_core.stages.eval_seg import head_params
    from wsss_core.stages.predict import resolve_params
    own = {"square": 448, "scales": [1.0, 1.25, 1.5], "fuse": "max"}
    p = resolve_params({"scales": [1.0], "own_head": own})
    assert p["own_head"] == own
    head = head_params(p, from_method=True)
    assert (head["square"], head["scales"], head["fuse"], head["flip"]) == (
        448, [1.0, 1.25, 1.5], "max", True)
    net = head_params(p, from_method=False)
    assert (net["square"], net["scales"], net["fuse"]) == (None, [1.0], "mean")
