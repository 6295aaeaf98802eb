"""Issue 27 item 2 (no metric file holds NaN; a split whose ground truth is 255 everywhere is
one line, exit 2, no output) and issue 28 (masks optional: every evaluation scores only the
images with a mask; a split without any writes its files saying `no ground truth`, and every
reader of them understands that)."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss_core.audit.compare import MethodRecord, comparison_table, summary_table
from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.palette import IGNORE
from wsss_core.errors import DataError
from wsss_core.io import read_json, save_label_png, write_json
from wsss_core.map_store import MapWriter
from wsss_core.pseudo.masks import pseudo_mask
from wsss_core.metrics import ConfusionMatrix, read_miou, write_metrics
from wsss_core.pseudo.seeds import seed_labels
from wsss_core.stages import eval_masks, eval_seeds, eval_seg, sweep_masks
from wsss_core.stages.audit import audit
from wsss_core.stages.results_table import results_table
from wsss_core.stages.summary import summary

# complete blocks: a stage's --params is checked against its schema (every key, in range)
SEED_PARAMS = {"background": "constant", "agnostic_map": None,
               "thresholds": {"start": 0.1, "stop": 0.5, "step": 0.2},
               "percentiles": {"start": 50, "stop": 90, "step": 20}}
MASK_PARAMS = {"rule": "per_class_alpha", "alpha": 0.3, "bg": 0.25, "crf": False,
               "crf_params": {"gt_prob": 0.7, "gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 50,
                              "bi_srgb": 5, "bi_compat": 4, "iterations": 1},
               "sweep": {"start": 0.1, "stop": 0.5, "step": 0.2}}
EVAL_SEG = {"scales": [1.0], "flip": False, "crf": False,
            "crf_params": {"gauss_sxy": 3, "gauss_compat": 3, "bi_sxy": 50, "bi_srgb": 5,
                           "bi_compat": 4, "iterations": 1}}


def _maps(gt: np.ndarray, keys: list[int]) -> np.ndarray:
    maps = [(gt == k).astype(np.float32) * 0.8 + 0.1 for k in keys]
    return np.stack(maps) if maps else np.zeros((0,) + gt.shape, np.float32)


def _make_artifacts(base: Path, full: DatasetIndex) -> None:
    """seeds.h5, rw.h5, ir_labels/ and masks/ for every train_aug image, from the real GT."""
    with MapWriter(base / "seeds.h5") as seeds, MapWriter(base / "rw.h5") as rw:
        for i in full.ids("train_aug"):
            gt, keys, size = full.mask(i), full.labels(i), full.size(i)
            m = _maps(gt, keys)
            seeds.add(i, keys, size, {"seed": m})
            rw.add(i, keys, size, {"rw": m * 3.0})
            save_label_png(base / "ir_labels" / f"{i}.png", seed_labels(m, np.asarray(keys), 0.3))
            save_label_png(base / "masks" / f"{i}.png",
                           pseudo_mask(None, m * 3.0, np.asarray(keys), MASK_PARAMS, crf=False))


def _index_without_masks(full: DatasetIndex, ids) -> dict:
    data = copy.deepcopy(full.data)
    for i in ids:
        data["images"][i]["has_mask"] = False
    return data


class _Zero(torch.nn.Module):
    """A 'network' predicting background everywhere: [B, 3, h, w] -> [B, C, h, w]."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.c, *x.shape[2:])
        out[:, 0] = 1.0
        return out


@pytest.fixture
def fake_seg_model(monkeypatch):
    def load(model, device, from_method=False):
        return _Zero(9), {"model": "zero", "encoder": "", "num_classes": 9}
    monkeypatch.setattr(eval_seg, "load_predictor", load)


# --------------------------------------------------------------------------- metrics module

def test_write_metrics_refuses_nan_and_writes_no_ground_truth(tmp_path):
    with pytest.raises(ValueError, match="mIoU is nan"):
        write_metrics(tmp_path / "seg_miou.txt", {"miou": float("nan")})
    assert not (tmp_path / "seg_miou.txt").exists() and not (tmp_path / "seg_metrics.json").exists()
    write_metrics(tmp_path / "seg_miou.txt", {"miou": None, "no_ground_truth": True, "split": "val"})
    assert (tmp_path / "seg_miou.txt").read_text() == "no ground truth\n"
    assert read_miou(tmp_path / "seg_miou.txt") is None
    (tmp_path / "x_miou.txt").write_text("nan\n")
    with pytest.raises(DataError, match="not an mIoU"):
        read_miou(tmp_path / "x_miou.txt")


def test_metric_json_writers_write_null_for_nan(tmp_path):
    """Every other metric JSON (mask_sweep.json, ir_label_metrics.json, ir_labels' thresholds.json)
    goes through write_metric_json: strict JSON, NaN and inf as null."""
    from wsss_core.metrics import write_metric_json
    write_metric_json(tmp_path / "t.json", {"a": {"fg": float("nan")}, "b": [float("inf"), 1.5]})
    text = (tmp_path / "t.json").read_text()
    assert json.loads(text) == {"a": {"fg": None}, "b": [None, 1.5]} and "NaN" not in text


def test_report_lists_absent_classes_and_refuses_an_unscorable_matrix():
    cm = ConfusionMatrix(4)
    cm.update(np.array([[0, 1], [3, 1]]), np.array([[0, 1], [1, 1]]))
    rep = cm.report(["bg", "a", "b", "c"])
    assert rep["absent_classes"] == ["b", "c"] and math.isfinite(rep["miou"])
    assert rep["iou"]["b"] is None and rep["iou"]["c"] == 0.0
    empty = ConfusionMatrix(4)
    empty.update(np.zeros((2, 2), np.uint8), np.full((2, 2), IGNORE, np.uint8))
    with pytest.raises(ValueError, match="scorable"):
        empty.report(["bg", "a", "b", "c"])


# --------------------------------------------------------------------------- 255 everywhere

@pytest.fixture(scope="module")
def ignored_run(tmp_path_factory, toy_root, toy_index):
    """A copy of the toy data whose train and val masks are 255 everywhere, with artifacts."""
    root = tmp_path_factory.mktemp("ignored") / "data"
    shutil.copytree(toy_root, root)
    base = root.parent / "run"
    _make_artifacts(base, toy_index)
    for i in toy_index.ids("train") + toy_index.ids("val"):
        save_label_png(root / toy_index.data["mask_dir"] / f"{i}.png",
                       np.full(toy_index.size(i), IGNORE, np.uint8))
    lists = {s: s for s in ("train_aug", "train", "val")}
    write_json(base / "index.json", build_index("ign", "toy", root, lists, progress=False))
    return base, root / toy_index.data["mask_dir"]


def _one_line_error(capsys, *needles) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "wsss: error" in line]
    assert len(errors) == 1 and "Traceback" not in err and "unexpected" not in err, err
    for n in needles:
        assert str(n) in errors[0], errors[0]


def test_eval_seeds_all_ignore_is_one_line(ignored_run, capsys, tmp_path):
    base, mask_dir = ignored_run
    out = tmp_path / "seed_miou.txt"
    rc = eval_seeds.main(["--index", str(base / "index.json"), "--seeds", str(base / "seeds.h5"),
                          "--params", json.dumps(SEED_PARAMS), "--out", str(out)])
    assert rc == 2
    _one_line_error(capsys, "split train", mask_dir)
    assert list(tmp_path.iterdir()) == []


def test_eval_masks_all_ignore_is_one_line(ignored_run, capsys, tmp_path):
    base, mask_dir = ignored_run
    rc = eval_masks.main(["--index", str(base / "index.json"), "--masks", str(base / "masks"),
                          "--ir-labels", str(base / "ir_labels"), "--out", str(tmp_path / "mask_miou.txt"),
                          "--ir-out", str(tmp_path / "ir_label_metrics.json")])
    assert rc == 2
    _one_line_error(capsys, "split train", mask_dir)
    assert list(tmp_path.iterdir()) == []


def test_sweep_masks_all_ignore_is_one_line(ignored_run, capsys, tmp_path):
    base, mask_dir = ignored_run
    rc = sweep_masks.main(["--index", str(base / "index.json"), "--rw", str(base / "rw.h5"),
                           "--params", json.dumps(MASK_PARAMS), "--out", str(tmp_path / "mask_sweep.json")])
    assert rc == 2
    _one_line_error(capsys, "split train", mask_dir)
    assert list(tmp_path.iterdir()) == []


def test_eval_seg_all_ignore_is_one_line(ignored_run, capsys, tmp_path, fake_seg_model):
    base, mask_dir = ignored_run
    rc = eval_seg.main(["--index", str(base / "index.json"), "--model", "m.pt",
                        "--params", json.dumps(EVAL_SEG), "--out", str(tmp_path / "seg_miou.txt"),
                        "--pred", str(tmp_path / "pred")])
    assert rc == 2
    _one_line_error(capsys, "split val", mask_dir)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- masks optional

@pytest.fixture(scope="module")
def nogt_results(tmp_path_factory, toy_index):
    """results/toy/m whose index gives train and val no masks, all evaluations run."""
    results = tmp_path_factory.mktemp("nogt") / "results"
    base = results / "toy" / "m"
    _make_artifacts(base, toy_index)
    index = results / "toy" / "index.json"
    write_json(index, _index_without_masks(toy_index, toy_index.ids("train") + toy_index.ids("val")))
    eval_seeds.eval_seeds(index, base / "seeds.h5", SEED_PARAMS, base / "seed_miou.txt")
    sweep_masks.sweep_masks(index, base / "rw.h5", MASK_PARAMS, base / "mask_sweep.json")
    eval_masks.eval_masks(index, base / "masks", base / "ir_labels", base / "mask_miou.txt",
                          base / "ir_label_metrics.json")
    return results


def test_no_ground_truth_files_say_so(nogt_results, toy_index):
    base = nogt_results / "toy" / "m"
    for name in ("seed", "mask"):
        assert (base / f"{name}_miou.txt").read_text() == "no ground truth\n"
        assert read_miou(base / f"{name}_miou.txt") is None
    for name in ("seed_metrics.json", "mask_metrics.json", "ir_label_metrics.json", "mask_sweep.json"):
        rep = read_json(base / name)
        assert rep["miou"] is None and rep["no_ground_truth"] is True, name
        assert rep["split"] == "train" and rep["split_images"] == len(toy_index.ids("train"))
        assert "NaN" not in (base / name).read_text()


def test_eval_seg_without_ground_truth_writes_predictions_and_says_so(tmp_path, toy_index,
                                                                      fake_seg_model):
    index = tmp_path / "index.json"
    write_json(index, _index_without_masks(toy_index, toy_index.ids("val")))
    rep = eval_seg.eval_seg(index, "m.pt", EVAL_SEG, tmp_path / "seg_miou.txt", tmp_path / "pred")
    assert rep["no_ground_truth"] and rep["miou"] is None
    assert (tmp_path / "seg_miou.txt").read_text() == "no ground truth\n"
    assert read_json(tmp_path / "seg_metrics.json")["split_images"] == len(toy_index.ids("val"))
    assert sorted(p.stem for p in (tmp_path / "pred").iterdir()) == sorted(toy_index.ids("val"))


def test_only_images_with_a_mask_are_scored(tmp_path, toy_index, fake_seg_model):
    """Half the images without a mask: the counts are those of the others, and a seed map
    missing for an image without a mask is not needed."""
    train = toy_index.ids("train")
    index = tmp_path / "index.json"
    without = train[: len(train) // 2]
    write_json(index, _index_without_masks(toy_index, without + toy_index.ids("val")[:3]))
    with MapWriter(tmp_path / "seeds.h5") as seeds:
        for i in train[len(train) // 2:]:
            seeds.add(i, toy_index.labels(i), toy_index.size(i),
                      {"seed": _maps(toy_index.mask(i), toy_index.labels(i))})
    rep = eval_seeds.eval_seeds(index, tmp_path / "seeds.h5", SEED_PARAMS, tmp_path / "seed_miou.txt")
    assert rep["images"] == len(train) - len(without) and rep["split_images"] == len(train)
    rep = eval_seg.eval_seg(index, "m.pt", EVAL_SEG, tmp_path / "seg_miou.txt", tmp_path / "pred")
    assert rep["images"] == len(toy_index.ids("val")) - 3


def test_readers_show_no_ground_truth(nogt_results, capsys):
    table = results_table(nogt_results, "toy", None)
    row = next(line for line in table.splitlines() if line.startswith("| m |"))
    assert row.count("no ground truth") == 3  # seed, IR label, mask; seg not produced
    record = MethodRecord.read(nogt_results / "toy" / "m")
    cmp = comparison_table([record]).markdown()
    assert "| seeds mIoU | no ground truth |" in cmp and "| mask sweep best | no ground truth |" in cmp
    assert "no ground truth" in summary_table(record).text()
    assert "no ground truth" in summary(nogt_results / "toy" / "m")


def test_audit_page_without_ground_truth_shows_pictures_without_scores(nogt_results):
    page = audit(nogt_results / "toy" / "m", {"worst": 1, "best": 1, "random": 2, "val": 0,
                                              "pairs": 2, "seed": 0})
    text = page.read_text()
    assert "no ground truth" in text
    panels = list((page.parent / "panels").glob("*.png"))
    assert len(panels) == 2  # the random sample: no image has a score to rank by


def test_results_table_sums_the_index_parts_wall_time(nogt_results):
    """The index is built as one job per part (dataset_index_train / _val.tsv): the table's
    shared line sums them (it looked for a dataset_index.tsv no run writes, and showed '–')."""
    bench = nogt_results / "toy" / "benchmarks"
    bench.mkdir(parents=True, exist_ok=True)
    head = "s\th:m:s\tmax_rss\n"
    (bench / "dataset_index_train.tsv").write_text(head + "1.24\t0:00:01\t47.3\n")
    (bench / "dataset_index_val.tsv").write_text(head + "2.50\t0:00:02\t40.1\n")
    table = results_table(nogt_results, "toy", None)
    assert "dataset_index 4 s" in table  # 3.74 s, to the second
    for f in bench.glob("dataset_index_*.tsv"):
        f.unlink()
    assert "dataset_index – s" in results_table(nogt_results, "toy", None)


@pytest.mark.parametrize("kind", ["toy", "voc", "coco"])
def test_results_table_names_only_what_the_dataset_kind_has(tmp_path, kind):
    """A COCO table carries no PASCAL VOC paper numbers, and only a toy dataset has a make_toy
    job to time."""
    results = tmp_path / "results"
    (results / "d" / "m").mkdir(parents=True)
    (results / "d" / "m" / "seed_miou.txt").write_text("41.50\n")
    write_json(results / "d" / "index" / "train.json", {"kind": kind, "images": {}})
    table = results_table(results, "d", None)
    assert "| m | 41.50 |" in table
    assert ("PASCAL VOC 2012 numbers" in table) == (kind != "coco")
    assert ("make_toy" in table) == (kind == "toy")
