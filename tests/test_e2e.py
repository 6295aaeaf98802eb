"""End to end: a smoke-sized toy dataset through every rule to seg_miou.txt with Snakemake,
for the baseline and for CoBra; every artifact readable; a second invocation has nothing to do.

The `smoke` preset is the `tiny` preset with a few dozen images and one or two epochs per
training stage, built here from config.yaml so it can never drift from the real preset.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from wsss_core.io import read_label_png
from wsss_core.metrics import read_miou

SMOKE_DATA = {"kind": "toy", "preset": "smoke", "seed": 3, "image_size": 64, "num_train_aug": 24,
              "num_train_eval": 8, "num_val": 8}
SMOKE_EPOCHS = {"train_classifier": {"epochs": 2, "crop": 64, "scale_range": [56, 72]},
                "export_cams": {"scales": [1.0, 0.5]},
                "train_irn": {"epochs": 1, "crop": 64}, "train_seg": {"epochs": 1, "crop": 64}}
METHODS = ("cam", "cobra")


def smoke_config(repo_root: Path) -> dict:
    cfg = yaml.safe_load((repo_root / "config.yaml").read_text())
    smoke = copy.deepcopy(cfg["presets"]["tiny"])
    for stage, over in SMOKE_EPOCHS.items():
        smoke[stage].update(over)
    methods = {m: {"presets": {"smoke": copy.deepcopy(cfg["methods"][m]["presets"]["tiny"])}}
               for m in METHODS}
    for m in METHODS:
        methods[m]["presets"]["smoke"].pop("train_classifier", None)
    # 64-px crops give 4x4 patch grids: k ~ 10 % of them, as the tiny preset's 20 of 14x14
    methods["cobra"]["presets"]["smoke"]["cobra"]["top_bot_k"] = [2, 1, 1, 2]
    return {"datasets": {"smoke": SMOKE_DATA}, "presets": {"smoke": smoke}, "methods": methods}


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root, cli_env):
    wd = tmp_path_factory.mktemp("e2e")
    # a copy of the workflow, so tests may edit its sources (the stages' code fingerprints are
    # read beside the Snakefile; the commands themselves run the installed package)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo_root / name, wd / name)
    for folder in ("rules", "wsss_core"):
        shutil.copytree(repo_root / folder, wd / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (wd / "smoke.yaml").write_text(yaml.safe_dump(smoke_config(repo_root)))
    targets = [f"results/smoke/{m}/{f}" for m in METHODS
               for f in ("seg_miou.txt", "mask_miou.txt", "seed_miou.txt", "mask_sweep.json")]

    def snakemake(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(wd / "Snakefile"), "-d", str(wd),
               "--cores", "2", "--configfile", str(wd / "smoke.yaml"), *flags, "--", *targets]
        return subprocess.run(cmd, cwd=wd, env=cli_env, capture_output=True, text=True, timeout=900)

    first = snakemake()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return wd / "results" / "smoke", snakemake


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_artifact_exists_and_reads(run, method):
    root, _ = run
    base = root / method
    index = json.loads((root / "index.json").read_text())
    train_aug = index["splits"]["train_aug"]
    for name in ("seed", "mask", "seg"):
        value = read_miou(base / f"{name}_miou.txt")
        metrics = json.loads((base / f"{name}_metrics.json").read_text())
        assert 0.0 <= value <= 100.0 and abs(metrics["miou"] - value) < 0.006
    assert json.loads((base / "ir_label_metrics.json").read_text())["images"] == len(index["splits"]["train"])
    assert json.loads((base / "mask_sweep.json").read_text())["curve"]
    for store in ("cams.h5", "seeds.h5", "rw.h5"):
        with h5py.File(base / store, "r") as f:
            assert f.attrs["complete"] and sorted(f.keys()) == sorted(train_aug)
            first = f[train_aug[0]]
            for ds in first.values():
                assert np.isfinite(np.asarray(ds, dtype=np.float32)).all()
    for folder in ("ir_labels", "masks"):
        pngs = sorted(p.stem for p in (base / folder).glob("*.png"))
        assert pngs == sorted(train_aug)
        assert read_label_png(base / folder / f"{train_aug[0]}.png").ndim == 2
    preds = sorted(p.stem for p in (base / "seg" / "pred").glob("*.png"))
    assert preds == sorted(index["splits"]["val"])
    for model in ("classifier", "irn", "seg"):
        import torch
        ck = torch.load(base / model / "model.pt", weights_only=True)
        assert ck["state"]
        assert (base / model / "train_log.csv").read_text().count("\n") >= 2
    logs = {p.stem for p in (base / "logs").glob("*.log")}
    assert {"train_classifier", "export_cams", "fuse_seeds", "eval_seeds", "ir_labels", "train_irn",
            "propagate", "make_masks", "sweep_masks", "eval_masks", "train_seg", "eval_seg"} <= logs


@pytest.mark.slow
def test_second_invocation_has_nothing_to_do(run):
    _, snakemake = run
    dry = snakemake("-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-2000:]


def _jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:", 1)[1].splitlines()
    jobs = set()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        jobs.add(parts[0])
    return jobs - {"total"}


def _dry_run_with(run, tmp_path, override: dict) -> set[str]:
    root, snakemake = run
    extra = tmp_path / "override.yaml"
    extra.write_text(yaml.safe_dump(override))
    result = snakemake("-n", "--configfile", str(root.parent.parent / "smoke.yaml"), str(extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return _jobs(result)


#: what follows each stage in the DAG of one method (the e2e targets)
AFTER_MASKS = {"make_masks", "sweep_masks", "eval_masks", "train_seg", "eval_seg"}
AFTER_IRN = {"propagate"} | AFTER_MASKS
AFTER_SEEDS = {"fuse_seeds", "eval_seeds", "ir_labels", "train_irn"} | AFTER_IRN


@pytest.mark.slow
@pytest.mark.parametrize("stage, change, expected", [
    ("fuse_seeds", {"recipe": "max"}, AFTER_SEEDS),
    ("propagate", {"beta": 8}, AFTER_IRN),
    ("make_masks", {"alpha": 0.4}, AFTER_MASKS),
    ("train_seg", {"lr": 0.002}, {"train_seg", "eval_seg"}),
], ids=["fusion-recipe", "irn-beta", "alpha", "seg-lr"])
def test_changing_one_stage_parameter_reruns_exactly_it_and_what_follows(run, tmp_path, stage, change,
                                                                         expected):
    jobs = _dry_run_with(run, tmp_path, {"methods": {"cobra": {"presets": {"smoke": {stage: change}}}}})
    assert jobs == expected


@pytest.mark.slow
def test_seed_miou_equals_recomputation(run):
    """seed_miou.txt from seeds.h5, the reported threshold and the GT PNGs, with a per-pixel
    confusion count written here (not the package's metric code)."""
    root, _ = run
    base = root / "cobra"
    index = json.loads((root / "index.json").read_text())
    t = json.loads((base / "seed_metrics.json").read_text())["threshold"]
    n = index["num_classes"]
    conf = np.zeros((n, n), dtype=np.int64)
    with h5py.File(base / "seeds.h5", "r") as f:
        for image_id in index["splits"]["train"]:
            g = f[image_id]
            seed = np.asarray(g["seed"], dtype=np.float32)
            keys = np.concatenate([[0], g.attrs["keys"]])
            scores = np.concatenate([np.full((1,) + seed.shape[1:], t, np.float32), seed])
            pred = keys[scores.argmax(0)]
            gt = read_label_png(Path(index["root"]) / "SegmentationClassAug" / f"{image_id}.png")
            valid = gt != 255
            np.add.at(conf, (gt[valid].astype(int), pred[valid].astype(int)), 1)
    assert abs(_miou_of(conf) - read_miou(base / "seed_miou.txt")) < 0.006


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_mask_miou_equals_recomputation(run, method):
    root, _ = run
    index = json.loads((root / "index.json").read_text())
    n = index["num_classes"]
    conf = np.zeros((n, n), dtype=np.int64)
    for image_id in index["splits"]["train"]:
        pred = read_label_png(root / method / "masks" / f"{image_id}.png")
        gt = read_label_png(Path(index["root"]) / "SegmentationClassAug" / f"{image_id}.png")
        valid = gt != 255
        np.add.at(conf, (gt[valid].astype(int), np.where(pred == 255, 0, pred)[valid].astype(int)), 1)
    assert abs(_miou_of(conf) - read_miou(root / method / "mask_miou.txt")) < 0.006


def _miou_of(conf: np.ndarray) -> float:
    ious = []
    for c in range(conf.shape[0]):
        union = conf[c, :].sum() + conf[:, c].sum() - conf[c, c]
        if union:
            ious.append(conf[c, c] / union)
    return float(np.mean(ious) * 100)


def _dry_run_after_editing(run, module: str) -> set[str]:
    """Jobs a dry run schedules after appending a comment to `module` of the workflow copy."""
    root, snakemake = run
    path = root.parent.parent / "wsss_core" / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        result = snakemake("-n")
    finally:
        path.write_bytes(original)
    assert result.returncode == 0, result.stderr[-3000:]
    return _jobs(result)


@pytest.mark.slow
def test_editing_a_stage_module_reruns_it_and_what_follows(run):
    jobs = _dry_run_after_editing(run, "stages/make_masks.py")
    assert {"make_masks", "eval_masks", "train_seg", "eval_seg"} <= jobs
    assert not jobs & {"make_toy", "dataset_index", "train_classifier", "export_cams", "fuse_seeds",
                       "eval_seeds", "ir_labels", "train_irn", "propagate", "sweep_masks"}


@pytest.mark.slow
def test_editing_shared_mask_code_reruns_its_users_only(run):
    jobs = _dry_run_after_editing(run, "masks.py")  # used by make_masks and sweep_masks
    assert {"make_masks", "sweep_masks"} <= jobs
    assert not jobs & {"train_classifier", "export_cams", "ir_labels", "train_irn", "propagate"}


@pytest.mark.slow
def test_editing_an_unrelated_module_reruns_nothing(run):
    assert _dry_run_after_editing(run, "stages/convert_coco.py") == set()
