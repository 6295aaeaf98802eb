"""End to end on what users' data and machines bring (issue 11): images whose mask holds no
foreground class, through every stage and the audit, under each pseudo-mask rule; a results
root and a dataset root whose paths contain spaces; and workflow-level mistakes (a plug-in
typo, a missing dataset root, an unknown method or dataset in a target) that must be one line
naming what to fix, before any job runs or any output is deleted.

One smoke-sized DAG run covers the first two: the `smoke` preset of test_e2e on a small VOC-
layout copy of the toy set, with the `cam` plug-in twice, once per mask rule.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_e2e import smoke_config  # tests/ is on sys.path under pytest

from wsss_core.data.toy import generate_toy
from wsss_core.io import read_label_png, save_label_png
from wsss_core.metrics import read_miou

EDGE_DATA = dict(seed=11, image_size=64, num_train_aug=12, num_train_eval=6, num_val=4)
#: the cam plug-in under each mask rule (the classifier and IRN are the same small ones)
RULES = {"cam": "cobra", "cam_irn": "irn"}
OUTPUTS = ("seed_miou.txt", "mask_miou.txt", "mask_sweep.json", "seg_miou.txt", "audit/index.html")


def edge_config(repo_root: Path, data_root: Path, results: Path) -> dict:
    cfg = smoke_config(repo_root)
    cam = cfg["methods"]["cam"]["presets"]["smoke"]
    cfg["methods"] = {name: {"plugin": "cam", "presets": {"smoke": copy.deepcopy(cam)}}
                      for name in RULES}
    for name, rule in RULES.items():
        cfg["methods"][name]["presets"]["smoke"]["make_masks"] = {"rule": rule}
    cfg["presets"]["smoke"]["train_classifier"]["epochs"] = 1
    cfg["presets"]["smoke"]["make_masks"]["crf_params"]["iterations"] = 2
    cfg["datasets"] = {"edge": {"kind": "voc", "preset": "smoke", "root": str(data_root)}}
    cfg["results"] = str(results)
    cfg["default_target"] = {"dataset": "edge", "method": "cam"}
    return cfg


@pytest.fixture(scope="module")
def edge(tmp_path_factory, repo_root, cli_env):
    wd = tmp_path_factory.mktemp("edge") / "work dir"
    data = wd / "my data" / "toy voc"
    generate_toy(data, **EDGE_DATA)
    train = (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    # no foreground class: all background, and all 'ignore' (both happen in users' data and COCO)
    no_class = {train[0]: 0, train[1]: 255}
    for image_id, value in no_class.items():
        mask = read_label_png(data / "SegmentationClassAug" / f"{image_id}.png")
        save_label_png(data / "SegmentationClassAug" / f"{image_id}.png", np.full_like(mask, value))
    config = wd / "edge config.yaml"
    config.write_text(yaml.safe_dump(edge_config(repo_root, data, wd / "my results")))
    shutil.copy(repo_root / "config.yaml", wd / "config.yaml")

    def snakemake(*args: str, configs: tuple[Path, ...] = (config,)) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "-d", str(wd),
               "--cores", "2", "--configfile", *map(str, configs), *args]
        return subprocess.run(cmd, cwd=wd, env=cli_env, capture_output=True, text=True, timeout=900)

    targets = [str(wd / "my results" / "edge" / m / f) for m in RULES for f in OUTPUTS]
    first = snakemake("--", *targets)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return {"wd": wd, "results": wd / "my results" / "edge", "no_class": no_class,
            "snakemake": snakemake, "config": config}


@pytest.mark.slow
@pytest.mark.parametrize("method", RULES)
def test_images_without_a_class_get_background_masks_through_every_stage_and_the_audit(edge, method):
    base = edge["results"] / method
    index = json.loads((edge["results"] / "index.json").read_text())
    assert set(edge["no_class"]) <= set(index["train_aug_without_foreground"])
    for image_id in edge["no_class"]:
        assert index["images"][image_id]["labels"] == []
        mask = read_label_png(base / "masks" / f"{image_id}.png")
        assert (mask == 0).all()
        assert (base / "audit" / "panels" / f"{image_id}.png").is_file()
    for name in ("seed", "mask", "seg"):
        assert 0.0 <= read_miou(base / f"{name}_miou.txt") <= 100.0
    assert json.loads((base / "mask_sweep.json").read_text())["curve"]
    assert "<html" in (base / "audit" / "index.html").read_text().lower()


@pytest.mark.slow
def test_results_and_dataset_roots_with_spaces_work(edge):
    assert " " in str(edge["results"]) and " " in json.loads(
        (edge["results"] / "index.json").read_text())["root"]
    for method in RULES:
        assert read_miou(edge["results"] / method / "seg_miou.txt") >= 0.0


def _one_line(result: subprocess.CompletedProcess, *must: str) -> str:
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "Traceback" not in text and "Exception" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("wsss: error:")]
    assert len(errors) == 1, text[-3000:]
    for word in must:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_plugin_typo_fails_at_load_and_deletes_nothing(edge, tmp_path):
    model = edge["results"] / "cam" / "classifier" / "model.pt"
    before = model.stat().st_mtime_ns
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"methods": {"cam": {"presets": {"smoke": {
        "model": {"backbon": "resnet_tiny"}}}}}}))
    result = edge["snakemake"]("--forcerun", "train_classifier", "--", str(model),
                               configs=(edge["config"], bad))
    _one_line(result, "config key methods.cam.presets.smoke.model.backbon")
    assert model.stat().st_mtime_ns == before


@pytest.mark.slow
def test_missing_dataset_root_is_one_line_naming_the_key(edge, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": {"other": {"kind": "voc", "preset": "smoke",
                                                          "root": str(tmp_path / "no such")}}}))
    result = edge["snakemake"]("-n", "--", "results/other/index.json", configs=(edge["config"], bad))
    _one_line(result, "datasets.other.root", str(tmp_path / "no such"))


@pytest.mark.slow
@pytest.mark.parametrize("target, words", [
    ("{results}/edge/nomethod/seed_miou.txt", ("nomethod", "cam, cam_irn")),
    ("{results}/nodata/cam/seed_miou.txt", ("nodata", "edge")),
], ids=["method", "dataset"])
def test_unknown_name_in_a_target_is_one_line_listing_the_known_ones(edge, target, words):
    result = edge["snakemake"]("-n", "--", target.format(results=edge["results"].parent))
    _one_line(result, *words)
