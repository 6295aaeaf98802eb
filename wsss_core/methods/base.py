"""The method plug-in contract.

A method (cam, cobra, and later seco, bnr, fbr, ssc) supplies:
  * `build`: its model(s) from the resolved config, as named modules (checkpointed by name);
  * `param_groups` / `optimizers`: one or more optimisers over its parameter groups, each group
    carrying a `lr_mult` applied to the stage's base learning rate;
  * `training_step`: one step on a batch, returning named losses (the one named `total` is
    back-propagated) — state kept across steps (memory queues, EMA teachers) lives on the
    method object and is saved through `extra_state`;
  * `after_step`: hook after the optimiser steps (EMA updates, queue pushes);
  * `infer`: inference on one image at one scale, stacked with its mirror, returning named
    maps (class maps `[C-1, h, w]` without background, class-agnostic maps `[1, h, w]`),
    mirror already merged;
  * `extra_inputs`: per-image inputs beyond image and label (e.g. superpixels) that the data
    layer must provide.
Training forwards call the named modules (`self.models[name](x)`): under several processes
`distribute` replaces them by DistributedDataParallel wrappers, which average the gradients of
what ran through their forward (a custom method such as `.cam()` would bypass it).
Everything else (data, schedules, logging, checkpointing, CAM export, fusion, refinement,
segmentation, evaluation) is shared.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class StepContext:
    """What a training step may need to know about where it is in the schedule."""
    epoch: int
    step: int
    max_step: int
    epochs: int
    device: torch.device
    autocast: Any = None  # a context-manager factory (mixed precision on CUDA)


@dataclass
class MapSpec:
    """A map `infer` returns: class maps are per present class; agnostic maps are one channel."""
    name: str
    kind: str = "class"  # "class" | "agnostic"
    # class maps, after summing scales: True divides by the spatial max; "minmax" is
    # TransCAM's per-class min-max normalisation (stages/export_cams.min_max_normalize)
    normalize: bool | str = True
    strided: bool = False  # also export at stride 4 (for the random walk)


class Method(ABC):
    name: ClassVar[str]
    #: maps written to cams.h5
    maps: ClassVar[tuple[MapSpec, ...]] = ()
    #: the stride-4 class map the random walk propagates
    propagate_map: ClassVar[str] = ""
    #: per-image inputs beyond image and label vector
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: some training steps leave trainable parameters out of the loss (losses that start
    #: later); DistributedDataParallel must then look for unused parameters every step
    partial_losses: ClassVar[bool] = False

    def __init__(self, params: dict, num_classes: int, train_params: dict | None = None) -> None:
        self.params = params
        self.num_classes = num_classes  # including background
        self.train_params = train_params or {}
        self.models: dict[str, nn.Module] = self.build()

    @abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """Named modules; their state dicts form the checkpoint."""

    @abstractmethod
    def optimizers(self, lr: float, weight_decay: float, momentum: float,
                   kind: str = "sgd") -> list[torch.optim.Optimizer]:
        """Optimisers whose groups carry `lr_mult`; the engine applies the schedule."""

    @abstractmethod
    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Named losses for one batch; `total` is back-propagated by the engine."""

    def after_step(self, ctx: StepContext) -> None:
        """Called after the optimisers stepped (EMA teachers, queues)."""

    @abstractmethod
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps for one scale: `pair` is [2, 3, h, w] (image, mirrored image)."""

    # --- shared helpers -------------------------------------------------------------------
    def to(self, device: torch.device) -> "Method":
        for m in self.models.values():
            m.to(device)
        return self

    def train(self) -> None:
        for m in self.models.values():
            m.train()

    def eval(self) -> None:
        for m in self.models.values():
            m.eval()

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each named module by `wrap(module)` (engine.data_parallel) for training;
        call after `optimizers`. Checkpoints keep the plain modules' state dicts."""
        self.models = {name: wrap(m) for name, m in self.models.items()}

    def state_dict(self) -> dict[str, Any]:
        out = {name: _plain(m).state_dict() for name, m in self.models.items()}
        extra = self.extra_state()
        if extra:
            out["_extra"] = extra
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, m in self.models.items():
            _plain(m).load_state_dict(state[name])
        if "_extra" in state:
            self.load_extra_state(state["_extra"])

    def extra_state(self) -> dict[str, Any]:
        """Tensors/primitives kept across steps (queues, prototypes); saved with the weights."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def _plain(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def make_optimizer(groups: list[dict], lr: float, weight_decay: float, momentum: float,
                   kind: str) -> torch.optim.Optimizer:
    """SGD (the IRN/CoBra recipe; momentum is explicit — official code used 1e-4) or AdamW."""
    groups = [dict(g, lr=lr * g.get("lr_mult", 1.0), weight_decay=weight_decay) for g in groups
              if any(p.requires_grad for p in g["params"])]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("lr_mult", 1.0)
        g["base_lr"] = g["lr"]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r} (sgd or adamw)")


def merge_flip(out: torch.Tensor) -> torch.Tensor:
    """[2, C, h, w] maps of (image, mirrored image) → map(image) + mirror(map(mirror))."""
    return out[0] + out[1].flip(-1)
