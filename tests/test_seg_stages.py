"""Stages train_seg / eval_seg on a small toy dataset with the ground truth as pseudo masks."""
from __future__ import annotations

import copy
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core import engine
from wsss_core.config import load_config, method_params, stage_params, validate_config
from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.palette import IGNORE
from wsss_core.data.toy import generate_toy
from wsss_core.errors import ConfigError, DataError
from wsss_core.io import read_label_png, write_json
from wsss_core.param_schema import stage_schema
from wsss_core.ops.crf import crf_from_probs
from wsss_core.seg_inference import predict_multiscale
from wsss_core.stages import train_seg as train_seg_module
from wsss_core.stages.eval_seg import eval_seg
from wsss_core.models.segmentation import load_seg_model
from wsss_core.stages.train_seg import resolve_seg_params, train_seg

REPO = Path(__file__).resolve().parents[1]

TRAIN_PARAMS = dict(model="deeplabv3plus", encoder="resnet18", encoder_from="weights", pretrained=False,
                    pretrained_file=None, output_stride=16, crop=64, batch_size=8, epochs=1,
                    optimizer="sgd", lr=0.01, decoder_lr_mult=10.0, momentum=0.9,
                    weight_decay=1e-4, poly_power=0.9, scale_range=[0.5, 2.0], flip=True, frozen_bn=False,
                    precision="fp32", seed=0, num_workers=0)
EVAL_PARAMS = dict(scales=[1.0, 0.75], flip=True, crf=False,
                   crf_params=dict(gauss_sxy=1, gauss_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4,
                                   iterations=5))


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """24 train_aug + 6 val images of 64 px; SegmentationClassAug (the GT) is the mask folder."""
    base = tmp_path_factory.mktemp("segtoy")
    root = base / "data"
    generate_toy(root, seed=3, image_size=64, num_train_aug=24, num_train_eval=4, num_val=6)
    index = base / "index.json"
    write_json(index, build_index("toy", "toy", root, {}, progress=False))
    return {"root": root, "index": index, "masks": root / "SegmentationClassAug"}


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "seg" / "model.pt"
    train_seg(toy["index"], toy["masks"], TRAIN_PARAMS, out, threads=1)
    return out


def _independent_miou(pred_dir: Path, gt_dir: Path, ids: list[str], num_classes: int) -> float:
    """mIoU from the PNGs with per-class pixel counts (no ConfusionMatrix): GT 255 ignored, a
    class counts when it occurs in the prediction or the GT."""
    inter = np.zeros(num_classes, dtype=np.int64)
    union = np.zeros(num_classes, dtype=np.int64)
    for image_id in ids:
        pred = read_label_png(pred_dir / f"{image_id}.png")
        gt = read_label_png(gt_dir / f"{image_id}.png")
        valid = gt != IGNORE
        for c in range(num_classes):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += int(np.sum(p & g))
            union[c] += int(np.sum(p | g))
    present = union > 0
    return float(np.mean(inter[present] / union[present]) * 100)


def test_train_then_eval_end_to_end_and_miou_rescored_from_pngs(toy, trained, tmp_path):
    record = torch.load(trained, map_location="cpu", weights_only=True)
    assert record["model"] == "deeplabv3plus" and record["encoder"] == "resnet18"
    assert record["num_classes"] == 9 and record["params"]["epochs"] == 1
    with open(trained.with_name("train_log.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and np.isfinite(float(rows[0]["total"]))
    assert not trained.with_name("checkpoint.pt").exists()  # finished: nothing to resume

    miou_path, pred_dir = tmp_path / "seg_miou.txt", tmp_path / "seg" / "pred"
    eval_seg(toy["index"], trained, EVAL_PARAMS, miou_path, pred_dir, threads=1)
    val_ids = json.loads(toy["index"].read_text())["splits"]["val"]
    assert sorted(p.stem for p in pred_dir.glob("*.png")) == sorted(val_ids)
    assert not list(tmp_path.glob("seg/.*"))  # no temporary folder left behind
    rescored = _independent_miou(pred_dir, toy["masks"], val_ids, 9)
    assert float(miou_path.read_text()) == pytest.approx(rescored, abs=0.005)
    metrics = json.loads((tmp_path / "seg_metrics.json").read_text())
    assert metrics["images"] == len(val_ids) and metrics["split"] == "val"
    assert metrics["scales"] == [1.0, 0.75] and metrics["flip"] is True and metrics["crf"] is False
    assert metrics["miou"] == pytest.approx(rescored, abs=1e-6)


def test_eval_with_crf_in_a_process_pool_matches_a_direct_computation(toy, trained, tmp_path):
    params = dict(EVAL_PARAMS, crf=True)
    pred_dir = tmp_path / "pred"
    report = eval_seg(toy["index"], trained, params, tmp_path / "seg_miou.txt", pred_dir, threads=2)
    assert report["crf"] is True and report["crf_params"] == params["crf_params"]
    net, _ = load_seg_model(trained, "cpu")
    image_id = json.loads(toy["index"].read_text())["splits"]["val"][0]
    image = DatasetIndex.load(toy["index"]).image(image_id)
    probs = predict_multiscale(net, image, params["scales"], True, "cpu")
    expected = np.argmax(crf_from_probs(np.array(image), probs, **params["crf_params"]), axis=0)
    np.testing.assert_array_equal(read_label_png(pred_dir / f"{image_id}.png"), expected)
    # the same in this process (one thread)
    inline_dir = tmp_path / "pred_inline"
    inline = eval_seg(toy["index"], trained, params, tmp_path / "inline" / "seg_miou.txt",
                      inline_dir, threads=1)
    assert inline["miou"] == report["miou"]
    np.testing.assert_array_equal(read_label_png(inline_dir / f"{image_id}.png"), expected)


def test_resume_after_interruption_gives_the_same_weights(toy, tmp_path, monkeypatch):
    params = dict(TRAIN_PARAMS, epochs=2, batch_size=6)
    whole = tmp_path / "whole" / "model.pt"
    train_seg(toy["index"], toy["masks"], params, whole, threads=1)

    resumed = tmp_path / "resumed" / "model.pt"
    real_save = engine.save_checkpoint

    def interrupt(path, payload):  # killed right after the epoch-1 checkpoint is written
        real_save(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_seg(toy["index"], toy["masks"], params, resumed, threads=1)
    monkeypatch.setattr(engine, "save_checkpoint", real_save)
    assert not resumed.exists() and not resumed.with_name("train_log.csv").exists()
    assert torch.load(resumed.with_name("checkpoint.pt"), weights_only=True)["epoch"] == 1
    train_seg(toy["index"], toy["masks"], params, resumed, resume=True, threads=1)

    a = torch.load(whole, weights_only=True)["state"]
    b = torch.load(resumed, weights_only=True)["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(resumed.with_name("train_log.csv")) as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_missing_mask_is_a_one_line_data_error_naming_the_file(toy, tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(toy["masks"], masks)
    victim = json.loads(toy["index"].read_text())["splits"]["train_aug"][5]
    (masks / f"{victim}.png").unlink()
    with pytest.raises(DataError) as err:
        train_seg(toy["index"], masks, TRAIN_PARAMS, tmp_path / "seg" / "model.pt")
    message = str(err.value)
    assert str(masks / f"{victim}.png") in message and "\n" not in message
    code = train_seg_module.main(["--index", str(toy["index"]), "--masks", str(masks),
                                  "--params", json.dumps(TRAIN_PARAMS),
                                  "--out", str(tmp_path / "seg" / "model.pt")])
    assert code == 2 and not (tmp_path / "seg" / "model.pt").exists()


def test_mask_with_a_label_outside_the_classes_is_rejected(toy, tmp_path):
    from wsss_core.data.seg_dataset import read_seg_mask
    from wsss_core.io import save_label_png
    bad = np.zeros((10, 12), dtype=np.uint8)
    bad[3, 4] = 9
    save_label_png(tmp_path / "x.png", bad)
    with pytest.raises(DataError, match="label 9 outside"):
        read_seg_mask(tmp_path / "x.png", (10, 12), 9)
    with pytest.raises(DataError, match="10x12 but its image is 10x13"):
        read_seg_mask(tmp_path / "x.png", (10, 13), 9)


def test_resolve_params_per_architecture_and_config_presets():
    cfg = load_config(REPO / "config.yaml")
    for dataset in ("toy", "voc"):
        block = stage_params(cfg, dataset, "cobra", "train_seg")
        default = resolve_seg_params(block)
        assert default["model"] == block["model"]
        assert default["encoder"] == block["encoders"][block["model"]]
        assert set(default) == set(stage_schema("train_seg", resolved=True)["required"])
        other = resolve_seg_params(block, "segformer")
        assert other["encoder"].startswith("mit_b")
        for key, value in block["per_model"].get("segformer", {}).items():
            assert other[key] == value
        assert resolve_seg_params(default) == default  # already resolved: unchanged
    paper = resolve_seg_params(stage_params(cfg, "voc", "cobra", "train_seg"))
    assert (paper["encoder"], paper["lr"], paper["decoder_lr_mult"], paper["crop"],
            paper["batch_size"], paper["scale_range"]) == ("resnet101.imagenet", 0.01, 10, 512, 16, [0.5, 2.0])
    with pytest.raises(ConfigError, match="unknown"):
        resolve_seg_params(block, "unet")
    bad = copy.deepcopy(cfg)
    bad["presets"]["tiny"]["train_seg"]["per_model"] = {"segformer": {"lr_typo": 1.0}}
    with pytest.raises(ConfigError, match="per_model"):
        validate_config(bad)


def test_the_schema_names_exactly_the_buildable_architectures():
    """resolve_seg_params (torch-free, run at every workflow start) checks names against the
    train_seg schema; the builders live in models/segmentation.py."""
    from wsss_core.config import SCHEMA_DIR, _load_schema
    from wsss_core.models.segmentation import SEG_MODELS

    schema = _load_schema(SCHEMA_DIR / "stages" / "train_seg.schema.yaml")["properties"]
    assert sorted(schema["model"]["enum"]) == sorted(SEG_MODELS)


def test_snakemake_dry_run_schedules_default_and_other_architecture(tmp_path):
    results = tmp_path / "results"
    (results / "toy" / "cobra" / "masks").mkdir(parents=True)
    targets = [results / "toy/cobra/seg_miou.txt", results / "toy/cobra/seg-segformer/seg_miou.txt"]
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--config",
         f"results={results}", "--", *map(str, targets)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    for rule in ("train_seg", "train_seg_model", "eval_seg", "eval_seg_model"):
        assert f"rule {rule}:" in log
    assert '"encoder": "mit_b0"' in log and '"model": "segformer"' in log
    assert f"--pred {results}/toy/cobra/seg/pred" in log
    assert f"--pred {results}/toy/cobra/seg-segformer/pred" in log


def _classifier_file(tmp_path_factory, backbone: str) -> Path:
    """A model.pt as train_classifier writes it, with a random `backbone` CAM network."""
    from wsss_core.checkpoint import save_model
    from wsss_core.methods import create_method
    cfg = load_config(REPO / "config.yaml")
    torch.manual_seed(4)
    params = method_params(cfg, "toy", "cam")  # the tiny preset's Lite0, or resnet_tiny in its place
    params["model"] = dict(params["model"], backbone=backbone, pretrained=False)
    train = stage_params(cfg, "toy", "cam", "train_classifier")
    method = create_method(params, 9, train_params=train)
    path = tmp_path_factory.mktemp("cls") / "model.pt"
    save_model(path, "classifier", method.state_dict(), method=params, num_classes=9, train_params=train)
    return path


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    return _classifier_file(tmp_path_factory, "resnet_tiny")


def _resnet_timm_name(key: str) -> str:
    """ResNetStages: stem.0 is timm's conv1, stem.1 its bn1; the layers keep their names."""
    return key.replace("stem.0.", "conv1.", 1).replace("stem.1.", "bn1.", 1)


def _efficientnet_timm_name(key: str) -> str | None:
    """EfficientNetStages, as its docstring splits timm's EfficientNet: stem = conv_stem, bn1,
    blocks.0, blocks.1.0; layer1 = blocks.1.1..; layer2 = blocks.2; layer3 = blocks.3, blocks.4;
    layer4 = blocks.5, blocks.6, conv_head, bn2 (the last two are not in an smp encoder)."""
    stage, index, rest = key.split(".", 2)
    index = int(index)
    if stage == "stem":
        return ["conv_stem.", "bn1.", "blocks.0.", "blocks.1.0."][index] + rest
    if stage == "layer1":
        return f"blocks.1.{index + 1}.{rest}"
    if stage == "layer2":
        return f"blocks.2.{index}.{rest}"
    if stage == "layer3":
        return f"blocks.{3 + index}.{rest}"
    return f"blocks.{5 + index}.{rest}" if index < 2 else None


@pytest.mark.parametrize("backbone, timm_name", [("resnet_tiny", _resnet_timm_name),
                                                 ("tf_efficientnet_lite0", _efficientnet_timm_name)])
def test_encoder_from_classifier_copies_every_backbone_tensor(tmp_path_factory, backbone, timm_name):
    classifier = _classifier_file(tmp_path_factory, backbone)
    params = dict(TRAIN_PARAMS, encoder=f"tu-{backbone}", encoder_from="classifier")
    model = train_seg_module.build_seg_model(params, 9, classifier)
    state = torch.load(classifier, weights_only=True)["state"]["cnn"]
    encoder = model.encoder.state_dict()
    copied = 0
    for key, value in state.items():
        if not key.startswith("backbone."):
            continue
        name = timm_name(key[len("backbone."):])
        if name is None:
            continue
        assert torch.equal(encoder["model." + name], value), key
        copied += 1
    assert copied == len(encoder) and copied > 50


def test_encoder_from_classifier_needs_a_matching_timm_encoder(tiny_classifier):
    with pytest.raises(ConfigError, match="encoder_from: 'classifier' needs the encoder tu-"):
        train_seg_module.build_seg_model(dict(TRAIN_PARAMS, encoder_from="classifier"), 9, tiny_classifier)
    with pytest.raises(ConfigError, match="classifier's CNN backbone is not resnet18; set "
                                          "train_seg.encoders to tu-<the classifier's backbone>"):
        train_seg_module.build_seg_model(dict(TRAIN_PARAMS, encoder="tu-resnet18", encoder_from="classifier"),
                                         9, tiny_classifier)
    with pytest.raises(ConfigError, match="needs the classifier model"):
        train_seg_module.build_seg_model(dict(TRAIN_PARAMS, encoder="tu-resnet_tiny", encoder_from="classifier"),
                                         9, None)


@pytest.mark.parametrize("frozen_bn", [False, True])
def test_frozen_bn_keeps_the_encoder_statistics_and_trains_the_rest(frozen_bn):
    from wsss_core.models.segmentation import create_seg_model
    torch.manual_seed(0)
    model = create_seg_model("deeplabv3plus", "resnet18", 4, pretrained=False)
    bns = lambda part: [m for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before_enc = [m.running_mean.clone() for m in bns(model.encoder)]
    before_dec = [m.running_mean.clone() for m in bns(model.decoder)]
    train_seg_module.train_mode(model, frozen_bn)
    out = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    out.mean().backward()
    moved_enc = [not torch.equal(a, m.running_mean) for a, m in zip(before_enc, bns(model.encoder))]
    moved_dec = [not torch.equal(a, m.running_mean) for a, m in zip(before_dec, bns(model.decoder))]
    assert all(moved_dec) and model.decoder.training
    assert (not any(moved_enc)) if frozen_bn else all(moved_enc)
    # the affine weights still learn either way
    assert all(m.weight.grad is not None for m in bns(model.encoder))
