"""The paper presets build and run on CPU with random weights (no download): one classifier
training step and one multi-scale CAM export at 224 for cam and cobra; one IRN step and one
pseudo mask on a real-size 375x500 image."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.errors import WeightsError
from wsss_core.models.backbones import create_timm, pretrained_source
from wsss_core.models.segmentation import create_seg_model, pretrained_encoder_source
from wsss_core.pseudo.masks import pseudo_mask
from wsss_core.methods import StepContext, create_method
from wsss_core.models.irn import IRN, affinity_displacement_loss
from wsss_core.ops.path_index import PathIndex, affinity_labels
from wsss_core.ops.random_walk import random_walk, upsample_rw
from wsss_core.stages.export_cams import image_maps, strided_size
from wsss_core.stages.train_seg import resolve_seg_params

VOC_CLASSES = 21


def _random_weights(block):
    """Switch every `pretrained` flag off: tests never fetch ImageNet weights."""
    if isinstance(block, dict):
        if "pretrained" in block:
            block["pretrained"] = False
        for v in block.values():
            _random_weights(v)
    return block


@pytest.fixture(scope="module")
def cfg(repo_root):
    c = load_config(repo_root / "config.yaml")
    c["datasets"]["voc"]["root"] = "/nonexistent"  # only the preset matters here
    return c


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cam", "cobra"])
def test_paper_classifier_step_and_cam_export(cfg, method):
    params = _random_weights(copy.deepcopy(method_params(cfg, "voc", method)))
    train = stage_params(cfg, "voc", method, "train_classifier")
    torch.manual_seed(0)
    m = create_method(params, VOC_CLASSES, train_params=train)
    opts = m.optimizers(train["lr"], train["weight_decay"], train["momentum"], train["optimizer"])
    crop = 224
    batch = {"image": torch.randn(2, 3, crop, crop), "label": torch.zeros(2, VOC_CLASSES - 1)}
    batch["label"][0, 3] = batch["label"][1, 14] = 1
    m.train()
    ctx = StepContext(epoch=train["epochs"] - 1, step=0, max_step=10, epochs=train["epochs"],
                      device=torch.device("cpu"))
    before = {k: v.clone() for k, v in m.models["cnn"].state_dict().items() if "classifier" in k}
    losses = m.training_step(batch, ctx)
    losses["total"].backward()
    for o in opts:
        o.step()
    assert torch.isfinite(losses["total"])
    if method == "cobra":  # the last epoch has every CoBra term switched on
        assert {"cls", "l1", "sap", "cap"} <= set(losses)
    after = m.models["cnn"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    m.eval()
    size = (224, 224)
    scales = stage_params(cfg, "voc", method, "export_cams")["scales"][:2]
    img = torch.randn(3, *size)
    scaled = [torch.nn.functional.interpolate(img[None], scale_factor=s, mode="bilinear")[0] for s in scales]
    maps = image_maps(m, scaled, size, [4, 15], torch.device("cpu"))
    for spec in m.maps:
        arr = maps[spec.name]
        if spec.kind == "class":
            assert arr.shape == (2,) + size and np.isfinite(arr).all()
            assert arr.max() <= 1.0 + 1e-6
        else:
            assert arr.shape == size
        if spec.strided:
            assert maps[spec.name + "_s4"].shape == (2,) + strided_size(size)


@pytest.mark.slow
def test_paper_irn_step_and_one_real_size_mask(cfg):
    p = stage_params(cfg, "voc", "cobra", "train_irn")
    torch.manual_seed(0)
    irn = IRN(p["backbone"], strides=tuple(p["strides"]))
    crop = 128  # a smaller crop keeps the CPU step short; the path index follows the crop
    grid = crop // 4
    pi = PathIndex(p["radius"], (grid, grid))
    label = torch.zeros(1, grid, grid, dtype=torch.long)
    label[:, 8:20, 8:20] = 5
    label[:, 7, :] = 255
    edge, disp = irn(torch.randn(1, 3, crop, crop))
    loss = affinity_displacement_loss(edge, disp, *affinity_labels(label, pi, num_valid=21), pi)["total"]
    loss.backward()
    assert torch.isfinite(loss) and irn.edge6.weight.grad is not None

    irn.eval()
    h, w = 375, 500
    image = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    x = torch.randn(3, h, w)
    boundary = irn.boundary_map(torch.stack([x, x.flip(-1)]), crop=p["crop"])
    assert boundary.shape == (1, 94, 125)
    cam = torch.rand(2, 94, 125)
    prop = stage_params(cfg, "voc", "cobra", "propagate")
    rw = random_walk(cam, boundary, radius=prop["radius"], beta=prop["beta"], exp_times=prop["exp_times"])
    rw_up = upsample_rw(rw, (h, w), mode=prop["upsample"]).numpy()
    mask = pseudo_mask(image, rw_up, np.array([3, 12]), stage_params(cfg, "voc", "cobra", "make_masks"))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 3, 12}


#: the weights the official code loads (docs/methods/cobra.md "Architecture", docs/algorithms.md
#: §irn), as timm tags / smp names, with
#: the file timm or smp downloads for them
OFFICIAL_WEIGHTS = {
    "resnet50.tv_in1k": "resnet50-0676ba61.pth",
    "resnet152.tv_in1k": "resnet152-394f9c45.pth",
    "deit_small_patch16_224.fb_in1k": "deit_small_patch16_224-cd65a155.pth",
    "vit_base_patch16_224.orig_in21k_ft_in1k": "jx_vit_base_p16_224-80ecf9dd.pth",
    # no download exists: the official Conformer_small_patch16.pth comes as model.pretrained_file
    "conformer_small_patch16.in1k": "",
}
SEG_WEIGHTS = {"resnet101.imagenet": "smp-hub/resnet101.imagenet",
               "mit_b2.imagenet": "smp-hub/mit_b2.imagenet"}


def _pretrained_names(cfg, dataset: str) -> dict[str, set[str]]:
    """Every model of a dataset's preset that starts from pretrained weights, by library."""
    timm_names, seg_names = set(), set()
    for method in cfg["methods"]:
        def walk(block):
            if isinstance(block, dict):
                if block.get("pretrained") and "backbone" in block:
                    timm_names.add(block["backbone"])
                for v in block.values():
                    walk(v)
        walk(method_params(cfg, dataset, method)["model"])
        irn = stage_params(cfg, dataset, method, "train_irn")
        if irn["backbone_from"] == "imagenet":
            timm_names.add(irn["backbone"])
        seg = stage_params(cfg, dataset, method, "train_seg")
        for arch in seg["encoders"]:
            flat = resolve_seg_params(seg, arch)
            if flat["encoder_from"] == "weights" and flat["pretrained"]:
                seg_names.add(flat["encoder"])
    return {"timm": timm_names, "smp": seg_names}


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_every_paper_backbone_names_the_official_weights(cfg, dataset):
    """Each pretrained model of the paper presets carries an explicit tag that timm / smp
    resolve (no download) to the weights the official code loads — never a default tag."""
    names = _pretrained_names(cfg, dataset)
    assert names["timm"] == set(OFFICIAL_WEIGHTS)
    for name in names["timm"]:
        arch, tag, source = pretrained_source(name)
        assert f"{arch}.{tag}" == name and source.endswith(OFFICIAL_WEIGHTS[name]), (name, source)
    assert names["smp"] == set(SEG_WEIGHTS)
    for name in names["smp"]:
        assert pretrained_encoder_source(name)[2] == SEG_WEIGHTS[name]


def test_untagged_pretrained_names_are_refused_before_any_download():
    with pytest.raises(WeightsError, match=r"resnet152\.tv_in1k.*resnet152\.a1h_in1k"):
        create_timm("resnet152", pretrained=True)
    with pytest.raises(WeightsError, match="Invalid pretrained tag"):
        pretrained_source("resnet152.no_such_tag")
    with pytest.raises(WeightsError, match=r"resnet101\.imagenet"):
        create_seg_model("deeplabv3plus", "resnet101", VOC_CLASSES, pretrained=True)
    with pytest.raises(WeightsError, match="no weights 'in22k'"):
        create_seg_model("segformer", "mit_b2.in22k", VOC_CLASSES, pretrained=True)


def test_paper_seed_protocol_and_precision(cfg):
    """CoBra's seed number comes from its per-image percentile protocol over θ = 50 … 95, the
    IRN baseline's from IRN's constant 0.15 (the official protocols, issue 31 item 3); every
    paper training stage runs in fp32 as the official code does."""
    cobra = stage_params(cfg, "voc", "cobra", "eval_seeds")
    assert cobra["background"] == "official" and cobra["official"]["rule"] == "percentile"
    assert cobra["percentiles"] == {"start": 50, "stop": 95, "step": 5}
    cam = stage_params(cfg, "voc", "cam", "eval_seeds")
    assert cam["background"] == "official" and cam["official"]["threshold"] == 0.15
    for method in ("cam", "cobra"):
        for stage in ("train_classifier", "train_irn", "train_seg"):
            assert stage_params(cfg, "voc", method, stage)["precision"] == "fp32"
