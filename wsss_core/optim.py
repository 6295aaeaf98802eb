"""Optimisers and learning-rate schedules shared by every training stage (classifier, IRN,
segmentation): one optimiser builder, one schedule.

Parameter groups are dicts `{"params": [...], "lr_mult": m, ...}`: a group's learning rate is
`lr · lr_mult · schedule(step)`. A group may carry its own `weight_decay` and any other torch
option (`betas`, `eps`), and its own linear warm-up (`warmup_steps`, `warmup_ratio`); the
schedule is IRN's poly decay `(1 - t/T)^power` (official `PolyOptimizer`), multiplied during
warm-up by a factor rising linearly from `warmup_ratio` to 1 over `warmup_steps` steps.
"""
from __future__ import annotations

import torch


def poly_factor(step: int, max_step: int, power: float) -> float:
    """(1 - t / T)^power, the lr multiplier before step t (IRN PolyOptimizer); 1 for T = 0."""
    return (1.0 - min(step, max_step) / max_step) ** power if max_step > 0 else 1.0


def lr_factor(step: int, max_step: int, power: float, warmup_steps: int = 0,
              warmup_ratio: float = 0.0) -> float:
    """The schedule's multiplier before step t: poly decay, times a linear warm-up from
    `warmup_ratio` to 1 during the first `warmup_steps` steps."""
    factor = poly_factor(step, max_step, power)
    if step < warmup_steps:
        factor *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return factor


def set_lr(optimizers: list[torch.optim.Optimizer], step: int, max_step: int, power: float,
           warmup_steps: int = 0, warmup_ratio: float = 0.0) -> float:
    """Set every group's lr to `base_lr · lr_factor(step)` (the group's own warm-up settings
    win over the stage's); returns the first group's lr."""
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, max_step, power,
                                               g.get("warmup_steps", warmup_steps),
                                               g.get("warmup_ratio", warmup_ratio))
    return optimizers[0].param_groups[0]["lr"] if optimizers else 0.0


def make_optimizer(groups: list[dict], lr: float, weight_decay: float, momentum: float,
                   kind: str) -> torch.optim.Optimizer:
    """SGD (the IRN recipe; momentum is explicit — official code used 1e-4) or AdamW over the
    trainable parameters of `groups`; each group's `base_lr` = lr · lr_mult, its
    `weight_decay` its own or `weight_decay`. ValueError for another `kind`."""
    groups = [dict(g, lr=lr * g.get("lr_mult", 1.0), weight_decay=g.get("weight_decay", weight_decay))
              for g in groups if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("lr_mult", 1.0)
        g["base_lr"] = g["lr"]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r} (sgd or adamw)")
