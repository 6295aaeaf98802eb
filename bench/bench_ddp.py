"""One process against two (torchrun, DistributedDataParallel) training the toy classifier.

    python bench/bench_ddp.py [--method cam] [--epochs N] [--threads 2] [--work DIR]

Generates the default toy dataset (config.yaml's `toy` entry) unless DIR already holds it,
trains the method's classifier with the `tiny` preset once with `wsss train-classifier` and
once with `torchrun --nproc_per_node 2`, both given the same --threads (torchrun's processes
share them), then exports CAMs of the evaluated `train` subset, fuses them with the method's
recipe and evaluates the seeds. Printed side by side: wall time of the training command
(process start-up included), the summed epoch times from train_log.csv, the last epoch's
loss and the seed mIoU. The two runs see the same global batches; they differ by per-process
batch-norm statistics (each process normalises its half batch) and float reduction order.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.data.index import DatasetIndex, build_index
from wsss_core.data.toy import generate_toy
from wsss_core.metrics import read_miou
from wsss_core.stages.eval_seeds import eval_seeds
from wsss_core.stages.export_cams import export_cams
from wsss_core.stages.fuse_seeds import fuse_seeds

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train_aug", "train", "val")


def prepare(work: Path, cfg: dict) -> Path:
    toy = cfg["datasets"]["toy"]
    data = work / "data"
    if not (data / "JPEGImages").is_dir():
        generate_toy(data, seed=toy["seed"], image_size=toy["image_size"],
                     num_train_aug=toy["num_train_aug"], num_train_eval=toy["num_train_eval"],
                     num_val=toy["num_val"])
    index = work / "index.json"
    index.write_text(json.dumps(build_index("toy", "toy", data, {s: s for s in SPLITS}, progress=False)))
    return index


def train(launcher: list[str], index: Path, method: dict, params: dict, out: Path,
          threads: int) -> float:
    cmd = [*launcher, "wsss", "train-classifier", "--index", str(index), "--method", json.dumps(method),
           "--params", json.dumps(params), "--out", str(out), "--threads", str(threads),
           "--log", str(out.with_name("train.log"))]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    return time.perf_counter() - t0


def seed_miou(index: Path, model: Path, cfg: dict, method: str, threads: int) -> float:
    folder = model.parent
    ids = DatasetIndex.load(index).ids("train")
    export_cams(index, model, stage_params(cfg, "toy", method, "export_cams"), folder / "cams.h5",
                threads=threads, ids=ids)
    fuse_seeds(folder / "cams.h5", stage_params(cfg, "toy", method, "fuse_seeds"), folder / "seeds.h5")
    eval_seeds(index, folder / "seeds.h5", stage_params(cfg, "toy", method, "eval_seeds"),
               folder / "seed_miou.txt")
    return read_miou(folder / "seed_miou.txt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="cam")
    p.add_argument("--epochs", type=int, default=None, help="default: the tiny preset's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    a = p.parse_args()
    cfg = load_config(REPO / "config.yaml")
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_ddp."))
    index = prepare(work, cfg)
    method = method_params(cfg, "toy", a.method)
    params = stage_params(cfg, "toy", a.method, "train_classifier")
    if a.epochs:
        params["epochs"] = a.epochs
    runs = {1: [], 2: ["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python", "--"]}
    rows = []
    for processes, launcher in runs.items():
        model = work / f"{processes}proc" / "model.pt"
        wall = train(launcher, index, method, params, model, a.threads)
        with open(model.with_name("train_log.csv")) as f:
            log = list(csv.DictReader(f))
        miou = seed_miou(index, model, cfg, a.method, a.threads)
        rows.append((processes, wall, sum(float(r["seconds"]) for r in log), float(log[-1]["total"]), miou))
    print(f"\n{a.method} classifier on toy ({params['epochs']} epochs, global batch "
          f"{params['batch_size']}, {a.threads} threads in all), work folder {work}")
    print("| processes | wall s | epochs s | last-epoch loss | seed mIoU |")
    print("|---|---|---|---|---|")
    for processes, wall, epochs_s, loss, miou in rows:
        print(f"| {processes} | {wall:.1f} | {epochs_s:.1f} | {loss:.4f} | {miou:.2f} |")


if __name__ == "__main__":
    main()
