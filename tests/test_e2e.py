"""End to end: a smoke-sized toy dataset through every rule to seg_miou.txt and the audit with
Snakemake, for the baseline (IRN mask rule) and for CoBra (CoBra mask rule); every artifact
readable; a second invocation has nothing to do. The run also carries what users' data and
machines bring (issue 11): train images whose mask holds no class, and a working folder,
results root and dataset root whose paths contain spaces; and workflow-level mistakes (a
plug-in typo, a missing dataset root, an unknown name in a target) are one line each.

The `smoke` preset is the `tiny` preset with a few dozen images and one or two epochs per
training stage, built here from config.yaml so it can never drift from the real preset.
"""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import copy_workflow

from wsss_core.data.toy import generate_toy
from wsss_core.io import read_label_png, save_label_png
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


#: train images whose mask holds no foreground class: all background, and all 'ignore' (both
#: happen in users' data and in COCO); every stage and the audit must handle them
NO_CLASS = {0: 0, 1: 255}  # position in the train list → the mask's only value


def smoke_data(folder: Path) -> dict[str, int]:
    """The smoke toy set in VOC layout under `folder`, with the NO_CLASS masks blanked; the
    blanked ids → their value."""
    generate_toy(folder, **{k: v for k, v in SMOKE_DATA.items() if k not in ("kind", "preset")})
    train = (folder / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    blanked = {train[i]: value for i, value in NO_CLASS.items()}
    for image_id, value in blanked.items():
        path = folder / "SegmentationClassAug" / f"{image_id}.png"
        save_label_png(path, np.full_like(read_label_png(path), value))
    return blanked


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root, cli_env):
    # a working folder, a results root and a dataset root whose paths hold spaces
    wd = tmp_path_factory.mktemp("e2e") / "work dir"
    wd.mkdir()
    copy_workflow(repo_root, wd)
    data, results = wd / "my data" / "smoke voc", wd / "my results"
    smoke_data(data)
    cfg = smoke_config(repo_root)
    cfg["datasets"]["smoke"] = {"kind": "voc", "preset": "smoke", "root": str(data)}
    cfg["results"] = str(results)
    # the cam run uses the global-max mask rule, the cobra run the per-class rule: both rules meet the
    # images without a class
    cfg["methods"]["cam"]["presets"]["smoke"]["make_masks"] = {"rule": "global_max"}
    (wd / "smoke.yaml").write_text(yaml.safe_dump(cfg))
    targets = [str(results / "smoke" / m / f) for m in METHODS
               for f in ("seg_miou.txt", "mask_miou.txt", "seed_miou.txt", "mask_sweep.json",
                         "audit/index.html")]

    def snakemake(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(wd / "Snakefile"), "-d", str(wd),
               "--cores", "2", "--configfile", str(wd / "smoke.yaml"), *flags, "--", *targets]
        return subprocess.run(cmd, cwd=wd, env=cli_env, capture_output=True, text=True, timeout=900)

    first = snakemake()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    return results / "smoke", snakemake


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
AFTER_MASKS = {"make_masks", "sweep_masks", "eval_masks", "train_seg", "eval_seg", "audit"}
AFTER_IRN = {"propagate"} | AFTER_MASKS
AFTER_SEEDS = {"fuse_seeds", "eval_seeds", "ir_labels", "train_irn"} | AFTER_IRN


@pytest.mark.slow
@pytest.mark.parametrize("stage, change, expected", [
    ("fuse_seeds", {"recipe": "max"}, AFTER_SEEDS),
    ("propagate", {"beta": 8}, AFTER_IRN),
    ("make_masks", {"alpha": 0.4}, AFTER_MASKS),
    ("train_seg", {"lr": 0.002}, {"train_seg", "eval_seg", "audit"}),
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
    jobs = _dry_run_after_editing(run, "pseudo/masks.py")  # used by make_masks and sweep_masks
    assert {"make_masks", "sweep_masks"} <= jobs
    assert not jobs & {"train_classifier", "export_cams", "ir_labels", "train_irn", "propagate"}


@pytest.mark.slow
def test_editing_an_unrelated_module_reruns_nothing(run):
    assert _dry_run_after_editing(run, "stages/convert_coco.py") == set()


# --- issue 11: images without a class, paths with spaces, one-line workflow errors -------------

@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_images_without_a_class_get_background_masks_through_every_stage_and_the_audit(run, method):
    root, _ = run
    base = root / method
    index = json.loads((root / "index.json").read_text())
    train = index["splits"]["train"]
    no_class = [train[i] for i in NO_CLASS]
    assert set(no_class) <= set(index["train_aug_without_foreground"])
    for image_id in no_class:
        assert index["images"][image_id]["labels"] == []
        assert (read_label_png(base / "masks" / f"{image_id}.png") == 0).all()
        assert (base / "audit" / "panels" / f"{image_id}.png").is_file()
    assert "<html" in (base / "audit" / "index.html").read_text().lower()


@pytest.mark.slow
def test_results_and_dataset_roots_with_spaces(run):
    root, _ = run
    assert " " in str(root) and " " in json.loads((root / "index.json").read_text())["root"]
    for method in METHODS:  # every stage ran on paths with spaces: the last one's output is there
        assert read_miou(root / method / "seg_miou.txt") >= 0.0


@pytest.mark.slow
def test_explain_traces_a_result_to_its_rule_parameters_inputs_code_and_log(run, cli_env):
    """Issue 32 item 1: `wsss explain` on a number of the finished run, from Snakemake's record."""
    import hashlib

    root, _ = run
    wd = root.parent.parent
    target = root / "cobra" / "seed_miou.txt"
    result = subprocess.run(["wsss", "explain", str(target), "--configfile", str(wd / "smoke.yaml")],
                            cwd=root, env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "rule:       eval_seeds (stage module wsss_core.stages.eval_seeds)" in text, text
    assert "code:" in text and "same now" in text, text
    # every key of the block with the config key (and file) its value comes from
    for key in ("background", "agnostic_map", "thresholds.step", "percentiles.stop"):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"{key} "))
        assert f"<- presets.smoke.eval_seeds.{key} (" in line and "smoke.yaml)" in line, line
    for name in ("index/train.json", "cobra/seeds.h5", "cobra/cams.h5"):
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()[:12]
        assert f"{digest}  {root / name}" in text, text
    log = root / "cobra" / "logs" / "eval_seeds.log"
    assert f"log:        {log}" in text and log.is_file()
    assert "parameters of eval_seeds" in log.read_text().splitlines()[0]
    assert f"benchmark:  {root / 'cobra' / 'benchmarks' / 'eval_seeds.tsv'}" in text
    # a file inside a folder output: the folder's record; a method's own value says so
    mask = next((root / "cobra" / "masks").glob("*.png"))
    masks = subprocess.run(["wsss", "explain", str(mask), "--configfile", str(wd / "smoke.yaml")],
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert masks.returncode == 0, masks.stderr[-3000:]
    assert "rule:       make_masks" in masks.stdout
    assert "<- methods.cobra.presets.smoke.make_masks.rule (" in masks.stdout, masks.stdout
    # without the run's --configfile: the record still, and one line on what is missing
    bare = subprocess.run(["wsss", "explain", str(target)], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert "rule:       eval_seeds" in bare.stdout and "pass the run's --configfile" in bare.stdout


def _workflow(run, tmp_path, override: dict | None, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on the run's workflow with `override` merged over its config."""
    root, _ = run
    wd = root.parent.parent
    configs = [str(wd / "smoke.yaml")]
    if override is not None:
        (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
        configs.append(str(tmp_path / "override.yaml"))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wd / "Snakefile"), "-d", str(wd),
           "--cores", "2", "--configfile", *configs, *args]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("WSSS_DEBUG", None)
    return subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=300)


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
def test_missing_dataset_root_is_one_line_naming_the_key(run, tmp_path):
    root, _ = run
    missing = tmp_path / "no such folder"
    result = _workflow(run, tmp_path, {"datasets": {"other": {"kind": "voc", "preset": "smoke",
                                                              "root": str(missing)}}},
                       "-n", "--", str(root.parent / "other" / "index.json"))
    _one_line(result, "config key datasets.other.root", str(missing))


@pytest.mark.slow
@pytest.mark.parametrize("target, words", [
    ("smoke/nomethod/seed_miou.txt", ("nomethod", "cam, cobra")),
    ("nodata/cam/seed_miou.txt", ("nodata", "smoke")),
], ids=["method", "dataset"])
def test_unknown_name_in_a_target_is_one_line_listing_the_known_ones(run, tmp_path, target, words):
    root, _ = run
    _one_line(_workflow(run, tmp_path, None, "-n", "--", str(root.parent / target)), *words)


@pytest.mark.slow
def test_a_failed_job_leaves_no_stale_result_for_the_next_run(run, tmp_path):
    """A parameter change, then a job that fails (here: an unreadable weights file, replaced
    by a good one before the next run). Snakemake deletes the failed job's outputs with their
    provenance and does not remake a deleted intermediate, so the next run would report
    nothing to do and keep the seg_miou.txt of the old parameters; the workflow's `onerror`
    hook removes the out-of-date outputs of every job that did not run."""
    root, snakemake = run
    from wsss_core.models.efficientnet_lite import lite_file

    weights = tmp_path / "encoder.pth"
    weights.write_bytes(b"not a state dict")
    change = {"methods": {"cam": {"presets": {"smoke": {"train_seg": {
        "lr": 0.002, "encoder_from": "weights", "pretrained_file": str(weights)}}}}}}
    seg_miou = root / "cam" / "seg_miou.txt"
    assert seg_miou.is_file()
    failed = _workflow(run, tmp_path, change, "--", str(seg_miou))
    assert failed.returncode != 0 and "encoder.pth" in failed.stdout + failed.stderr
    assert not seg_miou.exists() and not (root / "cam" / "seg_metrics.json").exists()
    shutil.copy(lite_file(), weights)  # the cause is gone; the change stays
    assert _jobs(_workflow(run, tmp_path, change, "-n", "--", str(seg_miou))) == {
        "train_seg", "eval_seg"}
    # the module's later tests expect the finished run of the unchanged config
    again = snakemake()
    assert again.returncode == 0, again.stderr[-3000:]


@contextmanager
def _edited(path: Path, edit):
    """`edit(path)` for the duration of the block; then the file's bytes and time as they were
    (the module's other tests expect the finished run's dataset)."""
    original, st = path.read_bytes(), path.stat()
    try:
        edit(path)
        yield
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _smoke_data_root(run) -> Path:
    root, _ = run
    return Path(json.loads((root / "index.json").read_text())["root"])


@pytest.mark.slow
def test_a_replaced_train_aug_photo_reruns_the_train_index_and_every_stage_after_it(run):
    root, snakemake = run
    index = json.loads((root / "index.json").read_text())
    photos = _smoke_data_root(run) / "JPEGImages"
    other = (photos / f"{index['splits']['val'][0]}.jpg").read_bytes()
    with _edited(photos / f"{index['splits']['train_aug'][-1]}.jpg", lambda p: p.write_bytes(other)):
        jobs = _jobs(snakemake("-n"))
    assert jobs == {"dataset_index", "dataset_index_merge", "train_classifier", "export_cams"} | AFTER_SEEDS


@pytest.mark.slow
def test_val_ids_in_train_aug_stop_the_workflow_at_start_with_one_line(run):
    """Issue 27.4: scores on val measured on training images; refused before any job runs."""
    root, snakemake = run
    index = json.loads((root / "index.json").read_text())
    lists = _smoke_data_root(run) / "ImageSets" / "Segmentation"
    shared = index["splits"]["val"][:2]
    with _edited(lists / "train_aug.txt", lambda p: p.write_text(p.read_text() + "\n".join(shared) + "\n")):
        result = snakemake("-n")
    assert result.returncode == 2
    _one_line(result, "val.txt", "train_aug.txt", ", ".join(shared), "allow_split_overlap")


@pytest.mark.slow
def test_a_corrected_val_mask_reruns_the_val_index_and_the_evaluations_only(run):
    """Issue 27.1: a val mask corrected after a complete run (a class added) re-runs the val part
    of the index and what reads it, not the classifier; the run then scores the new mask. Late
    in the module: the mask is put back, but the run's val results stay those of the edit."""
    root, snakemake = run
    val = json.loads((root / "index.json").read_text())["splits"]["val"]
    path = _smoke_data_root(run) / "SegmentationClassAug" / f"{val[0]}.png"
    mask = read_label_png(path)
    added = next(c for c in range(1, 9) if c not in mask)

    def add_class(p: Path) -> None:
        edited = mask.copy()
        edited[:4, :4] = added
        save_label_png(p, edited)

    with _edited(path, add_class):
        assert _jobs(snakemake("-n")) == {"dataset_index", "dataset_index_merge", "eval_seg", "audit"}
        done = snakemake()
        assert done.returncode == 0, done.stderr[-3000:]
        assert added in json.loads((root / "index" / "val.json").read_text())["images"][val[0]]["labels"]
        assert added in json.loads((root / "index.json").read_text())["images"][val[0]]["labels"]


@pytest.mark.slow
def test_plugin_block_typo_fails_at_load_and_deletes_nothing(run, tmp_path):
    """Last in this module: on a workflow without the check it would delete the classifier."""
    root, _ = run
    model = root / "cam" / "classifier" / "model.pt"
    before = model.stat().st_mtime_ns
    result = _workflow(run, tmp_path, {"methods": {"cam": {"presets": {"smoke": {
        "model": {"backbon": "resnet_tiny"}}}}}}, "--forcerun", "train_classifier", "--", str(model))
    _one_line(result, "config key methods.cam.presets.smoke.model.backbon")
    assert model.stat().st_mtime_ns == before
