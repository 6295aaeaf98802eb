"""The shared training loop: poly schedule (with optional linear warm-up; schedules and
optimisers come from `optim`), the stage's `precision` (fp32, or bf16 / fp16 autocast;
wsss_core/precision.py), per-epoch checkpoints with exact resume, a CSV log and a progress bar.
Classifier, IRN and segmentation training all use it.

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
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from tqdm import tqdm

from .checkpoint import load_checkpoint, resume_key, save_checkpoint  # noqa: F401  (re-exported)
from .errors import ConfigError, DataError
from .io import atomic_path
from .optim import set_lr
from .precision import autocast_factory, grad_scaler

log = logging.getLogger("wsss")


@dataclass
class StepContext:
    """What a training step may need to know about where it is in the schedule: `fit` builds one
    per step and hands it to the method's `training_step` / `after_step` (re-exported by
    `wsss_core.methods.base`, part of the plug-in contract)."""
    epoch: int
    step: int
    max_step: int
    epochs: int
    device: torch.device
    autocast: Any = None  # a context-manager factory: the stage's `precision` region


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
    warmup_steps: int = 0  # linear warm-up of every group without its own (optim.lr_factor)
    warmup_ratio: float = 0.0
    # stop after this many optimizer steps (None: the full run); the LR schedule and every
    # step-dependent switch stay the full run's, so the first steps equal an uncapped run's
    max_steps: int | None = None


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
    some trainable parameters out in some steps (projection heads before auxiliary
    losses start: `Method.partial_losses`)."""
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


def loader_workers(requested: int) -> int:
    """DataLoader worker processes to start: `requested` (the stage's `num_workers`), at most the
    CPUs this process may run on (`os.sched_getaffinity`), since more workers than CPUs only
    contend with the training threads (and torch warns). The batches do not change with the
    count: every sample's augmentation is seeded by (seed, epoch, index), not by its worker."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


def epoch_loader(dataset: Dataset, cfg: FitConfig, epoch: int, drop_last: bool,
                 collate_fn: Callable | None = None, info: DistInfo = DistInfo()) -> DataLoader:
    """The batches of `epoch` for this process: the shuffle is seeded by (seed, epoch), in the
    same generator order as DataLoader(shuffle=True), so one process sees exactly the batches
    it always did."""
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    batches = BatchSampler(RandomSampler(dataset, generator=gen), cfg.batch_size, drop_last)
    return DataLoader(dataset, batch_sampler=RankBatches(batches, info.rank, info.world_size),
                      num_workers=loader_workers(cfg.num_workers), generator=gen,
                      collate_fn=collate_fn, persistent_workers=False)


def batch_used(n: int, batch_size: int) -> int:
    """Images per step actually trained on: `batch_size`, or all `n` images in one step per
    epoch when there are fewer of them (fit keeps the incomplete batch then)."""
    return batch_size if n >= batch_size else n


def batch_note(n: int, batch_size: int, world_size: int = 1) -> str:
    """What a training log says of its batch: `batch 16`, or for 16 images and batch_size 64
    `batch 16 (batch_size 64 exceeds the 16 images: one step of 16 per epoch)`; with several
    processes each one's share too."""
    used = batch_used(n, batch_size)
    text = f"batch {used}"
    if used != batch_size:
        text += f" (batch_size {batch_size} exceeds the {n} images: one step of {used} per epoch)"
    if world_size > 1:
        text += f", {used // world_size} per process"
    return text


#: name of the checkpoint a diverged run leaves for inspection (beside checkpoint.pt; never resumed)
DIVERGED_CHECKPOINT = "diverged_checkpoint.pt"


def _diverged(cfg: FitConfig, value: float, epoch: int, epoch_step: int, step: int, max_step: int,
              checkpoint: Path, info: DistInfo) -> ConfigError:
    """The error of a non-finite loss. The last complete epoch's checkpoint is moved aside to
    DIVERGED_CHECKPOINT (kept for inspection; a re-run never resumes a diverged run)."""
    kept = checkpoint.with_name(DIVERGED_CHECKPOINT)
    if info.is_main:
        if checkpoint.is_file():
            os.replace(checkpoint, kept)
        else:
            kept.unlink(missing_ok=True)  # an older run's: not this run's last finite epoch
    if kept.is_file():
        last = f"the checkpoint of the last finite epoch is kept at {kept} for inspection (never resumed)"
    else:
        last = "no epoch had finished, so no checkpoint is kept"
    fp16 = " or train in bf16 / fp32 (precision)" if cfg.precision == "fp16" else ""
    return ConfigError(
        f"config key {cfg.stage}.lr: training diverged: the loss became {value} at epoch "
        f"{epoch + 1}/{cfg.epochs}, step {epoch_step + 1} (step {step + 1} of {max_step}, "
        f"precision {cfg.precision}); lower the learning rate{fp16}; {last}")


def _finite_everywhere(total: torch.Tensor, info: DistInfo) -> bool:
    """Whether the loss is finite on every process (all stop together, none waits forever)."""
    ok = torch.isfinite(total.detach()).to(torch.float32).reshape(1)
    if info.world_size > 1:
        tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    return bool(ok.item() > 0)


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
    """Train for cfg.epochs (or until cfg.max_steps optimizer steps: the run is cut there, its
    schedule stays the full run's); checkpoint after every epoch; write the CSV log.

    Raises ConfigError (one line naming `<stage>.lr`) when the loss becomes NaN or infinite:
    the checkpoint of the last complete epoch is moved to DIVERGED_CHECKPOINT beside
    `checkpoint`, kept for inspection and never resumed."""
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
    stop = max_step if cfg.max_steps is None else min(max_step, cfg.max_steps)
    if stop < max_step:
        log.info("max_steps %d: training stops after %d of the schedule's %d steps", cfg.max_steps,
                 stop, max_step)
    workers = loader_workers(cfg.num_workers)
    if workers < cfg.num_workers:
        log.info("num_workers %d: %d DataLoader workers, one per CPU this process may use",
                 cfg.num_workers, workers)
    scaler = grad_scaler(cfg.precision, device)
    autocast = autocast_factory(cfg.precision, device)
    for epoch in range(start_epoch, cfg.epochs):
        if step >= stop:
            break
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = epoch_loader(dataset, cfg, epoch, drop_last, collate_fn, info)
        if train_mode is not None:
            train_mode()
        sums: dict[str, float] = {}
        count = 0  # steps of this epoch
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2.0,
                   disable=not info.is_main)
        for batch in bar:
            lr = set_lr(optimizers, step, max_step, cfg.poly_power, cfg.warmup_steps, cfg.warmup_ratio)
            ctx = StepContext(epoch=epoch, step=step, max_step=max_step, epochs=cfg.epochs,
                              device=device, autocast=autocast)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with autocast():
                losses = step_fn(batch, ctx)
            total = losses["total"]
            if not _finite_everywhere(total, info):
                raise _diverged(cfg, float(total.detach()), epoch, count, step, max_step,
                                checkpoint, info)
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
            if step >= stop:
                break
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


# --- what the training stages share ------------------------------------------------------------

def fit_config(params: dict, stage: str, desc: str) -> FitConfig:
    """The FitConfig of a training stage's resolved parameter block (the schedule keys every
    training stage's schema has: epochs, batch_size, seed, poly_power, num_workers, precision,
    and max_steps, whose default null is the full run)."""
    return FitConfig(epochs=params["epochs"], batch_size=params["batch_size"], seed=params["seed"],
                     poly_power=params["poly_power"], num_workers=params["num_workers"],
                     desc=desc, stage=stage, precision=params["precision"],
                     max_steps=params.get("max_steps"))


def start_files(source: str, classifier: str | Path | None,
                pretrained_file: str | None) -> list[str | Path]:
    """The weight files a network starts from, part of its resume fingerprint: the trained
    classifier when `source` is "classifier", else the local `pretrained_file` it loads (None:
    no file, e.g. weights from a download cache or random)."""
    if source == "classifier":
        return [classifier] if classifier else []
    return [pretrained_file] if pretrained_file else []
