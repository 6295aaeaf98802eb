"""Issue 28 acceptance: a dataset of photos and a CSV of image-level tags, no masks at all,
runs the whole DAG to a segmentation model, and `wsss predict` segments new photos with it
exactly as the same run with the masks present does (masks must not change training).

One Snakemake call trains `cam` on both datasets (the smoke preset, toy photos), so the two runs
share the machine and the thread count; then both models segment five new toy images.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import copy_workflow
from test_e2e import SMOKE_DATA, smoke_config  # tests/ is on sys.path under pytest

from wsss_core.data.index import build_index
from wsss_core.data.toy import generate_toy
from wsss_core.io import read_label_png
from wsss_core.metrics import read_miou

LISTS = {"train_aug": "train_aug", "train": "train", "val": "val"}


def _label_only_copy(src: Path, dst: Path) -> None:
    """`src` with its masks deleted and its image-level labels written as labels.csv."""
    import shutil
    shutil.copytree(src, dst)
    index = build_index("tmp", "voc", src, LISTS, progress=False)
    names = index["class_names"]
    rows = ["id,classes"] + [f"{i},{';'.join(names[c] for c in v['labels'])}"
                             for i, v in index["images"].items()]
    (dst / "labels.csv").write_text("\n".join(rows) + "\n")
    shutil.rmtree(dst / "SegmentationClassAug")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root, cli_env):
    wd = tmp_path_factory.mktemp("label_only")
    copy_workflow(repo_root, wd)
    toy = {k: v for k, v in SMOKE_DATA.items() if k not in ("kind", "preset")}
    generate_toy(wd / "with_masks", **toy)
    _label_only_copy(wd / "with_masks", wd / "tags_only")
    cfg = smoke_config(repo_root)
    cfg["results"] = str(wd / "results")
    cfg["datasets"] = {
        "masks": {"kind": "voc", "preset": "smoke", "root": str(wd / "with_masks")},
        "tags": {"kind": "voc", "preset": "smoke", "root": str(wd / "tags_only"), "labels": "labels.csv"},
    }
    (wd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    targets = [str(wd / "results" / d / "cam" / f) for d in ("masks", "tags")
               for f in ("seg/model.pt", "seed_miou.txt", "mask_miou.txt", "seg_miou.txt")]
    targets.append(str(wd / "results" / "tags" / "cam" / "audit" / "index.html"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wd / "Snakefile"), "-d", str(wd), "--cores", "2",
           "--configfile", str(wd / "cfg.yaml"), "--", *targets]
    done = subprocess.run(cmd, cwd=wd, env=cli_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    new = wd / "new_photos"
    generate_toy(new, seed=99, image_size=SMOKE_DATA["image_size"], num_train_aug=5, num_train_eval=1,
                 num_val=1)
    return wd, new / "JPEGImages"


def _predict(wd: Path, model: Path, images: Path, out: Path, env: dict) -> list[Path]:
    cmd = ["wsss", "predict", "--model", str(model), "--images", str(images), "--out", str(out)]
    done = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(out.glob("*.png"))


@pytest.mark.slow
def test_tags_only_dataset_trains_the_same_model_and_predicts_the_same_labels(runs, cli_env):
    wd, photos = runs
    five = sorted(photos.glob("*.jpg"))[:5]
    folder = wd / "five"
    folder.mkdir()
    for p in five:
        (folder / p.name).write_bytes(p.read_bytes())
    preds = {d: _predict(wd, wd / "results" / d / "cam" / "seg" / "model.pt", folder, wd / f"pred_{d}", cli_env)
             for d in ("masks", "tags")}
    assert [p.name for p in preds["masks"]] == [p.name for p in preds["tags"]] == [f"{p.stem}.png" for p in five]
    for a, b in zip(preds["masks"], preds["tags"]):
        np.testing.assert_array_equal(read_label_png(a), read_label_png(b))
    tags_index = json.loads((wd / "results" / "tags" / "index.json").read_text()
                            if (wd / "results" / "tags" / "index.json").exists()
                            else (wd / "results" / "tags" / "index" / "train.json").read_text())
    assert not any(v["has_mask"] for v in tags_index["images"].values())


@pytest.mark.slow
def test_tags_only_evaluations_say_no_ground_truth_and_with_masks_score(runs):
    wd, _ = runs
    for name in ("seed", "mask", "seg"):
        text = (wd / "results" / "tags" / "cam" / f"{name}_miou.txt").read_text()
        assert "no ground truth" in text, text
        assert "nan" not in text.lower()
        report = json.loads((wd / "results" / "tags" / "cam" / f"{name}_metrics.json").read_text())
        assert report["miou"] is None and report["no_ground_truth"] is True
        assert 0 <= read_miou(wd / "results" / "masks" / "cam" / f"{name}_miou.txt") <= 100


@pytest.mark.slow
def test_tags_only_audit_shows_the_pictures_without_scores(runs):
    from wsss_core.audit.artifacts import RunArtifacts
    from wsss_core.audit.panels import PanelBuilder
    wd, _ = runs
    run_dir = wd / "results" / "tags" / "cam"
    assert (run_dir / "audit" / "index.html").is_file() and any((run_dir / "audit" / "panels").glob("*.png"))
    run = RunArtifacts(run_dir)
    train_id = run.index.ids("train")[0]
    data = PanelBuilder(run).build(train_id)
    titles = [v.title for v in data.labels]
    assert data.missing == ["ground truth"], data.missing  # the seed is shown, at the IR-label threshold
    assert any(t.startswith("seed (IR-label fg t=") for t in titles), titles
    assert all(v.miou is None for v in data.labels)
