"""The shared training loop: poly schedule, AMP on CUDA, per-epoch checkpoints with exact
resume, a CSV log and a progress bar. Classifier, IRN and segmentation training all use it.

Determinism: the shuffling of epoch e comes from a generator seeded with (seed, e), and each
sample's augmentation from (seed, e, index), so an interrupted run resumed from its last
complete epoch ends with the same weights on CPU as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .io import atomic_path
from .methods.base import StepContext

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


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


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
    n = len(dataset)
    drop_last = n >= cfg.batch_size
    steps_per_epoch = n // cfg.batch_size if drop_last else 1
    max_step = steps_per_epoch * cfg.epochs
    start_epoch, step, rows = 0, 0, []
    ck = load_checkpoint(checkpoint) if resume and checkpoint.is_file() else None
    if ck is not None and ck.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was written with other settings", checkpoint)
        ck = None
    if ck is not None:
        set_state(ck["state"])
        for opt, s in zip(optimizers, ck["optimizers"]):
            opt.load_state_dict(s)
        start_epoch, step, rows = int(ck["epoch"]), int(ck["step"]), list(ck.get("log", []))
        log.info("resuming after epoch %d (step %d of %d)", start_epoch, step, max_step)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext
    for epoch in range(start_epoch, cfg.epochs):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=drop_last,
                            num_workers=cfg.num_workers, generator=gen, collate_fn=collate_fn,
                            persistent_workers=False)
        if train_mode is not None:
            train_mode()
        sums: dict[str, float] = {}
        count = 0
        t0 = time.perf_counter()
        bar = tqdm(loader, desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False, mininterval=2.0)
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
            bar.set_postfix(loss=f"{float(total.detach()):.4f}")
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "seconds": round(time.perf_counter() - t0, 2)}
        row.update({k: v / max(count, 1) for k, v in sums.items()})
        rows.append(row)
        log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs,
                 "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "step")))
        save_checkpoint(checkpoint, {"state": get_state(), "optimizers": [o.state_dict() for o in optimizers],
                                     "epoch": epoch + 1, "step": step, "log": rows,
                                     "fingerprint": fingerprint})
        write_csv(log_csv, rows)
    # also when resuming a finished run: Snakemake deletes a job's outputs before re-running it
    write_csv(log_csv, rows)


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
