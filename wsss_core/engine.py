"""The shared training loop: poly schedule, the stage's `precision` (fp32, or bf16 / fp16
autocast; wsss_core/precision.py), per-epoch checkpoints with exact
resume, a CSV log and a progress bar. Classifier, IRN and segmentation training all use it.

Determinism: the shuffling of epoch e comes from a generator seeded with (seed, e), and each
sample's augmentation from (seed, e, index), so an interrupted run resumed from its last
complete epoch ends with the same weights on CPU as an uninterrupted one.

Several processes (torchrun, WORLD_SIZE > 1): a stage joins the process group with
`distributed(device)` and routes its training forwards through `data_parallel(module)`
(DistributedDataParallel: gradients are averaged over the processes). Every process draws the
same shuffled global batches of `batch_size` images and trains on its contiguous slice of
`batch_size / world_size`, so the global batch, the schedule and the augmentation of every
sample are those of a single-process run. Batch norm keeps per-process statistics (the DDP
default; no SyncBatchNorm), so weights are close to, not equal to, a single-process run's.
Only rank 0 writes checkpoints, the CSV log and the progress bar.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm

from .errors import ConfigError, DataError
from .io import atomic_path
from .methods.base import StepContext
from .precision import autocast_factory, grad_scaler

log = logging.getLogger("wsss")


def poly_factor(step: int, max_step: int, power: float) -> float:
    """(1 - t / T)^power, the lr multiplier before step t (IRN/CoBra PolyOptimizer)."""
    return (1.0 - min(step, max_step) / max_step) ** power if max_step > 0 else 1.0


def set_poly_lr(optimizers: list[torch.optim.Optimizer], step: int, max_step: int, power: float) -> float:
    factor = poly_factor(step, max_step, power)
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
    return optimizers[0].param_groups[0]["lr"] if optimizers else 0.0


@dataclass
class FitConfig:
    epochs: int
    batch_size: int
    seed: int
    poly_power: float = 0.9
    num_workers: int = 0
    desc: str = "train"
    stage: str = "train"  # config block named in error messages
    precision: str = "fp32"  # fp32 | bf16 | fp16 (wsss_core.precision)


# --- several processes (torchrun) ---------------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    """This process's place among the training processes (rank 0 of 1 outside torchrun)."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size())
    return DistInfo()


def launched_processes() -> int:
    """How many processes torchrun started for this job (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistInfo]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU) when it started
    more than one process; a no-op otherwise. On success every process waits for the others
    at the end, so rank 0 has written the outputs when the job ends."""
    if launched_processes() <= 1 or (tdist.is_available() and tdist.is_initialized()):
        yield dist_info()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        info = dist_info()
        log.info("process %d of %d (%s)", info.rank, info.world_size, tdist.get_backend())
        yield info
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def data_parallel(module: nn.Module, device: torch.device,
                  find_unused_parameters: bool = False) -> nn.Module:
    """`module` wrapped in DistributedDataParallel inside a process group, `module` itself
    otherwise. Training forwards must go through the returned module: DDP averages the
    gradients of what ran through it. `find_unused_parameters` for models whose loss leaves
    some trainable parameters out in some steps (CoBra's projection heads before its
    auxiliary losses start)."""
    if dist_info().world_size == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


class RankBatches(Sampler[list[int]]):
    """This process's slice of every global batch: all processes draw the same global batches
    (same seeded generator) and process r takes the r-th of `world_size` equal contiguous
    slices. With one process it yields the global batches unchanged."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batches)


def epoch_loader(dataset: Dataset, cfg: FitConfig, epoch: int, drop_last: bool,
                 collate_fn: Callable | None = None, info: DistInfo = DistInfo()) -> DataLoader:
    """The batches of `epoch` for this process: the shuffle is seeded by (seed, epoch), in the
    same generator order as DataLoader(shuffle=True), so one process sees exactly the batches
    it always did."""
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    batches = BatchSampler(RandomSampler(dataset, generator=gen), cfg.batch_size, drop_last)
    return DataLoader(dataset, batch_sampler=RankBatches(batches, info.rank, info.world_size),
                      num_workers=cfg.num_workers, generator=gen, collate_fn=collate_fn,
                      persistent_workers=False)


def _check_global_batch(cfg: FitConfig, n: int, world_size: int) -> None:
    if world_size == 1:
        return
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"config key {cfg.stage}.batch_size: {cfg.batch_size} does not split over "
            f"{world_size} processes; set it to a multiple of {world_size} or change "
            f"resources.rules.{cfg.stage}.processes")
    if n < cfg.batch_size:
        raise ConfigError(
            f"config key {cfg.stage}.batch_size: {cfg.batch_size} exceeds the {n} training "
            f"images, and {world_size} processes need full batches; lower it or run one process")


def _check_in_sync(optimizers: list[torch.optim.Optimizer], epoch: int) -> None:
    """Every process must hold the same weights after an epoch (DDP keeps them equal); a step
    that called a module directly instead of through `data_parallel` would let them drift."""
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    total = sum((p.detach().double().sum() for p in params), torch.zeros((), dtype=torch.float64,
                                                                          device=device))
    spread = torch.stack([total, -total])
    tdist.all_reduce(spread, op=tdist.ReduceOp.MAX)
    if float(spread[0] + spread[1]) != 0.0:
        raise RuntimeError(f"training processes hold different weights after epoch {epoch + 1}: "
                           f"a training step bypassed engine.data_parallel (a bug)")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically. Raises DataError when the disk refuses the write
    (torch reports it as a RuntimeError without the path)."""
    try:
        with atomic_path(path, suffix=".pt") as tmp:
            torch.save(payload, tmp)
    except RuntimeError as e:
        if "write" not in str(e).lower():
            raise
        raise DataError(f"{path}: cannot write ({str(e).splitlines()[0][:200]}); free space in "
                        f"{path.parent} and re-run") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", stage: str | None = None) -> dict:
    """The dict a `save_checkpoint` wrote (weights only, no pickled code). Every reader of a
    checkpoint or model file goes through here, so a missing, truncated or foreign file is one
    line naming it and the stage that writes it (`stage`; None for a file the user supplies).

    Raises: DataError (missing, unreadable or not a dict)."""
    path = Path(path)
    fix = f"re-run the {stage} stage" if stage else "replace the file"
    if not path.is_file():
        raise DataError(f"{path}: model file not found; {fix}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, bit rot: torch raises many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path}: unreadable or damaged model file ({reason}); delete it and "
                        f"{fix}") from None
    if not isinstance(ck, dict):
        raise DataError(f"{path}: not a wsss model file (holds a {type(ck).__name__}); {fix}")
    return ck


def resume_key(*parts: Any, files: Sequence[str | os.PathLike] = ()) -> str:
    """SHA-256 naming exactly what a training run is made from: the JSON-able `parts`
    (parameters, ids) and the content of every file it reads (`files`: files, or folders whose
    files are read in name order), by content, not by path. A checkpoint is resumed only when
    its key equals the current one, so a change to any upstream output (IR labels, a
    classifier, masks, images) starts the run afresh.

    Raises: DataError for a listed path that does not exist."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for item in files:
        item = Path(item)
        if item.is_dir():
            members = sorted(p for p in item.rglob("*") if p.is_file())
        elif item.is_file():
            members = [item]
        else:
            raise DataError(f"{item}: input not found")
        for member in members:
            digest.update(str(member.relative_to(item) if item.is_dir() else member.name).encode() + b"\0")
            with open(member, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def fit(
    dataset: Dataset,
    cfg: FitConfig,
    step_fn: Callable[[dict, StepContext], dict[str, torch.Tensor]],
    optimizers: list[torch.optim.Optimizer],
    get_state: Callable[[], dict],
    set_state: Callable[[dict], None],
    checkpoint: Path,
    log_csv: Path,
    device: torch.device,
    resume: bool = False,
    after_step: Callable[[StepContext], None] | None = None,
    collate_fn: Callable | None = None,
    train_mode: Callable[[], None] | None = None,
    fingerprint: str = "",
) -> None:
    """Train for cfg.epochs; checkpoint after every epoch; write the CSV log."""
    info = dist_info()
    n = len(dataset)
    _check_global_batch(cfg, n, info.world_size)
    drop_last = n >= cfg.batch_size
    steps_per_epoch = n // cfg.batch_size if drop_last else 1
    max_step = steps_per_epoch * cfg.epochs
    start_epoch, step, rows = 0, 0, []
    ck = _resumable(checkpoint, fingerprint) if resume else None
    if ck is not None:
        set_state(ck["state"])
        for opt, s in zip(optimizers, ck["optimizers"]):
            opt.load_state_dict(s)
        start_epoch, step, rows = int(ck["epoch"]), int(ck["step"]), list(ck.get("log", []))
        log.info("resuming after epoch %d (step %d of %d)", start_epoch, step, max_step)
    scaler = grad_scaler(cfg.precision, device)
    autocast = autocast_factory(cfg.precision, device)
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = epoch_loader(dataset, cfg, epoch, drop_last, collate_fn, info)
        if train_mode is not None:
            train_mode()
        sums: dict[str, float] = {}
        count = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2.0,
                   disable=not info.is_main)
        for batch in bar:
            lr = set_poly_lr(optimizers, step, max_step, cfg.poly_power)
            ctx = StepContext(epoch=epoch, step=step, max_step=max_step, epochs=cfg.epochs,
                              device=device, autocast=autocast)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with autocast():
                losses = step_fn(batch, ctx)
            total = losses["total"]
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss became {total.item()} at epoch {epoch} step {step}; "
                                         f"lower the learning rate")
            if scaler is not None:
                scaler.scale(total).backward()
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
            else:
                total.backward()
                for opt in optimizers:
                    opt.step()
            if after_step is not None:
                after_step(ctx)
            step += 1
            count += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(total.detach()):.4f}", refresh=False)  # redrawn at mininterval
        if info.world_size > 1:
            sums = _mean_over_processes(sums, device)
            _check_in_sync(optimizers, epoch)
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "seconds": round(time.perf_counter() - t0, 2)}
        row.update({k: v / max(count, 1) for k, v in sums.items()})
        rows.append(row)
        log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "step")))
        if info.is_main:
            save_checkpoint(checkpoint, {"state": get_state(), "optimizers": [o.state_dict() for o in optimizers],
                                         "epoch": epoch + 1, "step": step, "log": rows,
                                         "fingerprint": fingerprint})
    # once, at the end: a job killed midway must leave no declared output behind; the
    # per-epoch rows live in the checkpoint and the stage log
    if info.is_main:
        write_csv(log_csv, rows)


def finish(checkpoint: Path) -> None:
    """Remove the per-epoch checkpoint once the stage has written its model: a finished run
    leaves nothing that a later run with other inputs could resume."""
    if dist_info().is_main:
        checkpoint.unlink(missing_ok=True)


def _resumable(checkpoint: Path, fingerprint: str) -> dict | None:
    """The checkpoint of an interrupted run made from exactly the current inputs, else None
    (a damaged checkpoint, as a kill during its write can leave on some file systems, is
    ignored too: it only saves time)."""
    if not checkpoint.is_file():
        return None
    try:
        ck = load_checkpoint(checkpoint)
    except DataError as e:
        log.info("ignoring %s", e)
        return None
    if ck.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was made from other inputs or settings", checkpoint)
        return None
    return ck


def _mean_over_processes(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-process loss sums → their mean over processes (the logged loss is the global batch's)."""
    keys = list(sums)  # the same order on every process: the same step code made them
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    tdist.all_reduce(values)
    return dict(zip(keys, (values / tdist.get_world_size()).tolist()))


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buf.getvalue())
