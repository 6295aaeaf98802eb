"""Training under torchrun (DistributedDataParallel, gloo on CPU, 2 processes).

Oracle: the `cam` classifier with frozen batch norm has no cross-sample coupling, and its
loss is a per-sample mean, so with the same global batches the averaged gradients of two
processes equal one process's: the weights after two epochs must agree to float rounding.
The processes must split every global batch of the single-process run (rank r: the r-th
half), and only rank 0 may write: each rank is given its own output folder and rank 1's must
stay empty. IRN and segmentation training run the same engine; they get a one-epoch check.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wsss_core.config import load_config, stage_params
from wsss_core.data.datasets import ClassificationDataset
from wsss_core.data.index import build_index
from wsss_core.engine import DistInfo, FitConfig, _check_global_batch, epoch_loader
from wsss_core.errors import ConfigError
from wsss_core.stages.train_classifier import train_classifier

#: run by torchrun: one stage's `main` with `{rank}` in the arguments replaced by the rank,
#: recording the (epoch, index) of every sample the rank's dataset served
SPY = '''
import importlib, json, os, sys
rank = os.environ["RANK"]
stage, dataset, record = sys.argv[1:4]
argv = [a.replace("{rank}", rank) for a in sys.argv[4:]]
module, name = dataset.rsplit(".", 1)
cls = getattr(importlib.import_module(module), name)
seen, original = [], cls.__getitem__
def spy(self, i):
    seen.append([self.epoch, int(i)])
    return original(self, i)
cls.__getitem__ = spy
code = importlib.import_module(stage).main(argv)
with open(record.replace("{rank}", rank), "w") as f:
    json.dump(seen, f)
sys.exit(code)
'''

METHOD = {"plugin": "cam", "preset": "tiny", "cobra": {},
          "model": {"backbone": "resnet_tiny", "strides": [2, 2, 1, 1], "pretrained": False,
                    "frozen_bn": True, "detach_early": False}}
PARAMS = {"seed": 0, "crop": 48, "batch_size": 4, "epochs": 2, "optimizer": "sgd", "lr": 0.01,
          "weight_decay": 1e-4, "momentum": 0.9, "poly_power": 0.9, "scale_range": [44, 56],
          "precision": "fp32", "num_workers": 0}
#: what a training stage leaves beside its model
OUTPUTS = ["model.pt", "train.log", "train_log.csv"]  # a finished run leaves no checkpoint


def torchrun(tmp: Path, env: dict, stage: str, dataset: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp / "spy.py"
    script.write_text(SPY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--", str(script), f"wsss_core.stages.{stage}", dataset, str(tmp / "seen{rank}.json"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def seen_by_rank(tmp: Path) -> list[list[tuple[int, int]]]:
    return [[tuple(s) for s in json.loads((tmp / f"seen{r}.json").read_text())] for r in (0, 1)]


def assert_only_rank0_wrote(tmp: Path) -> None:
    assert sorted(p.name for p in (tmp / "rank0").iterdir()) == OUTPUTS
    assert not (tmp / "rank1").exists(), list((tmp / "rank1").rglob("*"))


@pytest.fixture(scope="module")
def index_path(toy_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp_index") / "index.json"
    lists = {s: s for s in ("train_aug", "train", "val")}
    path.write_text(json.dumps(build_index("toy_small", "toy", toy_root, lists, progress=False)))
    return path


@pytest.fixture(scope="module")
def classifier_runs(index_path, tmp_path_factory, cli_env):
    """One process in-process and two under torchrun, same config; samples served recorded."""
    single_dir = tmp_path_factory.mktemp("ddp_single")
    served: list[tuple[int, int]] = []
    original = ClassificationDataset.__getitem__

    def spy(self, i):
        served.append((self.epoch, int(i)))
        return original(self, i)

    ClassificationDataset.__getitem__ = spy
    try:
        single = train_classifier(index_path, METHOD, PARAMS, single_dir / "model.pt", threads=2)
    finally:
        ClassificationDataset.__getitem__ = original
    tmp = tmp_path_factory.mktemp("ddp_two")
    result = torchrun(tmp, cli_env, "train_classifier", "wsss_core.data.datasets.ClassificationDataset",
                      "--index", str(index_path), "--method", json.dumps(METHOD),
                      "--params", json.dumps(PARAMS), "--out", str(tmp / "rank{rank}" / "model.pt"),
                      "--log", str(tmp / "rank{rank}" / "train.log"), "--threads", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return single, served, tmp


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one(classifier_runs):
    single, _, tmp = classifier_runs
    a = torch.load(single, weights_only=True)["state"]["cnn"]
    b = torch.load(tmp / "rank0" / "model.pt", weights_only=True)["state"]["cnn"]
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    rows_a = single.with_name("train_log.csv").read_text().splitlines()
    rows_b = (tmp / "rank0" / "train_log.csv").read_text().splitlines()
    assert rows_a[0] == rows_b[0] and len(rows_a) == len(rows_b) == 1 + PARAMS["epochs"]
    loss = rows_a[0].split(",").index("total")
    for ra, rb in zip(rows_a[1:], rows_b[1:]):  # logged loss: the global batch's, not rank 0's
        assert abs(float(ra.split(",")[loss]) - float(rb.split(",")[loss])) < 1e-6


@pytest.mark.slow
def test_each_process_trains_on_its_half_of_every_global_batch(classifier_runs):
    _, served, tmp = classifier_runs
    ranks = seen_by_rank(tmp)
    batch, half = PARAMS["batch_size"], PARAMS["batch_size"] // 2
    assert len(ranks[0]) == len(ranks[1]) == len(served) // 2
    for step in range(len(served) // batch):
        whole = served[step * batch:(step + 1) * batch]
        assert ranks[0][step * half:(step + 1) * half] == whole[:half]
        assert ranks[1][step * half:(step + 1) * half] == whole[half:]


@pytest.mark.slow
def test_only_rank0_writes(classifier_runs):
    _, _, tmp = classifier_runs
    assert_only_rank0_wrote(tmp)
    log = (tmp / "rank0" / "train.log").read_text()
    assert "process 0 of 2 (gloo)" in log and "2 process(es)" in log


@pytest.mark.slow
def test_irn_and_segmentation_train_under_two_processes(classifier_runs, index_path, toy_root,
                                                         repo_root, tmp_path, cli_env):
    from wsss_core.models.irn import load_irn
    from wsss_core.models.segmentation import load_seg_model
    from wsss_core.stages.train_seg import resolve_seg_params

    single, _, _ = classifier_runs
    cfg = load_config(repo_root / "config.yaml")
    labels = toy_root / "SegmentationClassAug"  # ground truth stands in for IR labels and masks
    irn = dict(stage_params(cfg, "toy", "cam", "train_irn"), epochs=1, crop=48, batch_size=4)
    # the encoder starts from the classifier (the tiny preset's start), here its resnet_tiny
    seg = dict(resolve_seg_params(stage_params(cfg, "toy", "cam", "train_seg")), epochs=1,
               crop=64, batch_size=4, encoder="tu-resnet_tiny", encoder_from="classifier")
    runs = {
        "train_irn": ("wsss_core.data.datasets.IRNDataset", irn,
                      ["--labels", str(labels), "--classifier", str(single)]),
        "train_seg": ("wsss_core.data.seg_dataset.SegmentationDataset", seg,
                      ["--masks", str(labels), "--classifier", str(single)]),
    }
    for stage, (dataset, params, extra) in runs.items():
        tmp = tmp_path / stage
        tmp.mkdir()
        result = torchrun(tmp, cli_env, stage, dataset, "--index", str(index_path),
                          "--params", json.dumps(params), "--out", str(tmp / "rank{rank}" / "model.pt"),
                          "--log", str(tmp / "rank{rank}" / "train.log"), "--threads", "2", *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        assert_only_rank0_wrote(tmp)
        ranks = seen_by_rank(tmp)
        steps = 12 // params["batch_size"]  # toy_small: 12 train_aug images
        assert len(ranks[0]) == len(ranks[1]) == steps * params["batch_size"] // 2
        assert not {i for _, i in ranks[0]} & {i for _, i in ranks[1]}
        rows = (tmp / "rank0" / "train_log.csv").read_text().splitlines()
        assert len(rows) == 2 and "total" in rows[0]
        loss = float(rows[1].split(",")[rows[0].split(",").index("total")])
        assert math.isfinite(loss) and 0 < loss < 100
        load = load_irn if stage == "train_irn" else load_seg_model
        load(tmp / "rank0" / "model.pt", "cpu")


def test_one_process_sees_the_batches_of_a_shuffled_loader():
    """The distributed batch sampler, with one process, is DataLoader(shuffle=True): single
    process runs (and their exact resume) are unchanged."""
    data = list(range(37))
    cfg = FitConfig(epochs=1, batch_size=8, seed=3)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + 5)
    plain = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                                             drop_last=True, generator=gen)]
    assert [b.tolist() for b in epoch_loader(data, cfg, 5, True)] == plain
    halves = [[b.tolist() for b in epoch_loader(data, cfg, 5, True, info=DistInfo(r, 2))]
              for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == plain


class _AugmentedSamples(torch.utils.data.Dataset):
    """Each sample one draw of its own (seed, epoch, index) stream, as the training datasets."""

    def __len__(self) -> int:
        return 13

    def __getitem__(self, i: int) -> torch.Tensor:
        from wsss_core.data.datasets import sample_rng
        return torch.tensor(sample_rng(3, 5, i).random())


def test_workers_are_capped_at_the_cpus_and_do_not_change_the_batches(monkeypatch):
    """num_workers 8 on a process allowed one CPU starts one worker; zero, one or two workers
    give the same batches, since augmentation is seeded per sample."""
    from wsss_core import engine
    data = _AugmentedSamples()
    cfg = FitConfig(epochs=1, batch_size=4, seed=3)
    ref = [b.tolist() for b in epoch_loader(data, cfg, 5, False)]
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    capped = epoch_loader(data, FitConfig(epochs=1, batch_size=4, seed=3, num_workers=8), 5, False)
    assert capped.num_workers == 1 and [b.tolist() for b in capped] == ref
    monkeypatch.setattr(engine.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    two = epoch_loader(data, FitConfig(epochs=1, batch_size=4, seed=3, num_workers=2), 5, False)
    assert two.num_workers == 2 and [b.tolist() for b in two] == ref


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(ConfigError, match=r"train_seg\.batch_size: 6 does not split over 4"):
        _check_global_batch(FitConfig(epochs=1, batch_size=6, seed=0, stage="train_seg"), 100, 4)
    with pytest.raises(ConfigError, match=r"batch_size: 16 exceeds the 12 training images"):
        _check_global_batch(FitConfig(epochs=1, batch_size=16, seed=0), 12, 2)
    _check_global_batch(FitConfig(epochs=1, batch_size=6, seed=0), 12, 3)
    _check_global_batch(FitConfig(epochs=1, batch_size=6, seed=0), 4, 1)  # one process: as before
