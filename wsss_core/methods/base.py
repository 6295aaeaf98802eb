"""The method plug-in contract (how to write one: docs/plugin_contract.md).

A method supplies:
  * `settings_blocks`: the config blocks it reads (block name → dataclass of defaults); the
    registry assembles the config schema from them and `self.blocks[name]` holds the parsed
    block (the resolved dicts stay in `self.params[name]`);
  * `build`: its model(s) from the resolved config, as named modules (checkpointed by name);
  * `param_groups` / `optimizers`: one or more optimisers over its parameter groups, each group
    carrying a `lr_mult` applied to the stage's base learning rate (and optionally its own
    `weight_decay` and `warmup_steps`);
  * `training_step`: one step on a batch, returning named losses (the one named `total` is
    back-propagated) — state kept across steps (memory queues, EMA teachers) lives on the
    method object and is saved through `extra_state`;
  * `after_step`: hook after the optimiser steps (EMA updates, queue pushes);
  * `infer`: inference on one image at one scale, stacked with its mirror, returning named
    maps (class maps `[C-1, h, w]` without background, class-agnostic maps `[1, h, w]`),
    mirror already merged;
  * the roles of its maps (`map_roles`): the stride-4 class map the random walk propagates,
    the class maps fused into the seed (in order), the class-agnostic map per-image
    thresholds are read from;
  * `backbone_state`: the trained CNN backbone that IRN and segmentation may start from;
  * data hooks: `extra_inputs` / `extra_input_fns` (per-image inputs such as superpixels,
    computed once per image and cached), `train_views` (several augmented views of one image);
  * `frozen_modules` (saved, never optimised: EMA teachers) and `unsaved_modules` (used in
    training, neither optimised nor saved: a fixed perceptual network);
  * `single_stage`: the method predicts segmentation itself (`segment`), so its own head gives
    `seg_miou.txt` and the shared IRN + segmentation-network route is kept for comparison.
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

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine import StepContext  # noqa: F401  (part of the contract; the engine builds it)
from ..errors import ConfigError
from ..map_store import MapRoles  # noqa: F401  (part of the contract; torch-free home)
from ..optim import make_optimizer  # noqa: F401  (methods build their optimisers with it)
from ..precision import place_model
from .common import merge_flip  # noqa: F401  (re-exported: plug-ins written before the kit)


@dataclass
class MapSpec:
    """A map `infer` returns: class maps are per present class; agnostic maps are one channel."""
    name: str
    kind: str = "class"  # "class" | "agnostic"
    # class maps, after summing scales: True divides by the spatial max; "minmax" maps each
    # class's range onto [0, 1] (stages/export_cams.min_max_normalize); False keeps them raw
    normalize: bool | str = True
    strided: bool = False  # also export at stride 4 (for the random walk)

    def __post_init__(self) -> None:
        if self.normalize not in (True, False, "minmax"):
            raise ValueError(f"MapSpec {self.name!r}: normalize={self.normalize!r} is not "
                             f"True, False or 'minmax'")


class Method(ABC):
    name: ClassVar[str]
    #: config blocks this method reads: block name → settings dataclass (unknown keys are
    #: rejected by name when the config is checked). `model` is always passed.
    settings_blocks: ClassVar[dict[str, type]] = {}
    #: maps written to cams.h5
    maps: ClassVar[tuple[MapSpec, ...]] = ()
    #: the stride-4 class map the random walk propagates (default: the first strided class map)
    propagate_map: ClassVar[str] = ""
    #: the class maps seed fusion reads, in order (default: every class map, in `maps` order)
    fuse_maps: ClassVar[tuple[str, ...]] = ()
    #: the class-agnostic map per-image thresholds read (default: the first agnostic map)
    agnostic_map: ClassVar[str] = ""
    #: the named module whose `.backbone` is the CNN backbone IRN / segmentation may start from
    backbone_module: ClassVar[str] = ""
    #: per-image inputs beyond image and label vector (see `extra_input_fns`)
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: named modules saved with the weights but never optimised nor wrapped for DDP (EMA
    #: teachers); their parameters get requires_grad=False
    frozen_modules: ClassVar[tuple[str, ...]] = ()
    #: named modules used in training but neither optimised nor saved (a fixed perceptual
    #: network rebuilt from its own weights by `build`)
    unsaved_modules: ClassVar[tuple[str, ...]] = ()
    #: the method predicts segmentation itself (`segment`); see docs/plugin_contract.md
    single_stage: ClassVar[bool] = False
    #: the paper's PASCAL VOC 2012 numbers, for reference in `wsss results-table`:
    #: {"seed": mIoU, "mask": mIoU, "seg": mIoU or None, "source": "paper, table"}
    published: ClassVar[dict | None] = None
    #: some training steps leave trainable parameters out of the loss (losses that start
    #: later); DistributedDataParallel must then look for unused parameters every step
    partial_losses: ClassVar[bool] = False

    @classmethod
    def check_settings(cls, name: str, settings: Any, where: str) -> None:
        """Checks of one settings block beyond its keys; the default checks backbone names."""
        from .settings import check_backbones
        check_backbones(settings, where)

    def __init__(self, params: dict, num_classes: int, train_params: dict | None = None) -> None:
        self.params = params
        self.num_classes = num_classes  # including background
        self.train_params = train_params or {}
        self.blocks: dict[str, Any] = self.parse_settings(params)
        self.models: dict[str, nn.Module] = self.build()
        for name in (*self.frozen_modules, *self.unsaved_modules):
            self.models[name].requires_grad_(False)

    @classmethod
    def parse_settings(cls, params: dict) -> dict[str, Any]:
        """The declared settings blocks of `params` as dataclasses, each checked beyond its keys
        (`check_settings`: backbone names). Called when the config is checked, before any job
        runs or any output is deleted, so a typo fails there.

        Raises: ConfigError naming the key: an unknown key, or a block the plug-in does not
        declare."""
        from .settings import from_dict
        for name, value in params.items():
            if name not in ("plugin", "preset", "module") and name not in cls.settings_blocks and value:
                raise ConfigError(f"config key {name}: the {cls.name} plug-in has no {name} block "
                                  f"(its blocks: {', '.join(cls.settings_blocks) or 'none'})")
        blocks = {name: from_dict(block_cls, params.get(name), name)
                  for name, block_cls in cls.settings_blocks.items()}
        for name, block in blocks.items():
            cls.check_settings(name, block, name)
        return blocks

    def map_roles(self) -> MapRoles:
        """The role of each exported map (see MapRoles); the defaults follow `maps` order."""
        class_maps = tuple(s.name for s in self.maps if s.kind == "class")
        walk = self.propagate_map or next((s.name for s in self.maps
                                           if s.kind == "class" and s.strided), "")
        agnostic = self.agnostic_map or next((s.name for s in self.maps if s.kind == "agnostic"), "")
        return MapRoles(walk=walk, fuse=self.fuse_maps or class_maps, agnostic=agnostic)

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """State dict of the trained CNN backbone (keys relative to the backbone: `stem.0.`,
        `layer1.` …) for IRN and segmentation encoders started from the classifier.
        ConfigError when the method has none (start those from ImageNet weights instead)."""
        if not self.backbone_module:
            raise ConfigError(f"method {self.name!r} has no CNN backbone to start IRN or the "
                              f"segmentation encoder from; set train_irn.backbone_from / "
                              f"train_seg.encoder_from to imagenet / weights")
        return _plain(self.models[self.backbone_module]).backbone.state_dict()

    def extra_input_fns(self) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """One picklable function per name in `extra_inputs`: uint8 image [H, W, 3] → integer
        map [H, W] (e.g. superpixel ids). The data layer computes it once per image, caches it
        beside the classifier, transforms it with the image like a label map (nearest resize,
        flip, crop padded with 255) and batches it under its name. A function with the attribute
        `needs_image_id = True` is called as `fn(image, image_id=..., root=<dataset root>)`
        instead (a map read from a file per image, e.g. data/superpixels.py's ICDSuperpixels)."""
        return {}

    def train_views(self) -> Callable[[np.ndarray, np.random.Generator], dict[str, Any]] | None:
        """None (one augmented crop per image, the shared recipe) or a picklable callable
        `(uint8 image [H, W, 3], rng) → {name: float32 array [3, h, w] or tensor}` giving
        several views of one image (weak/strong global views, local crops); each name
        becomes a batch entry beside `label` and `index`."""
        return None

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """Single-stage methods: class scores [B, C, h, w] (C with background first, softmaxed
        by the caller) of normalised images [B, 3, h, w]; eval_seg adds scales, flip and CRF."""
        raise NotImplementedError(f"method {self.name!r} is not single-stage")

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
            place_model(m, device)
        return self

    def train(self) -> None:
        """Trained modules in training mode; frozen and unsaved ones stay in eval mode."""
        keep = {*self.frozen_modules, *self.unsaved_modules}
        for name, m in self.models.items():
            m.train(name not in keep)

    def eval(self) -> None:
        for m in self.models.values():
            m.eval()

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each trained module by `wrap(module)` (engine.data_parallel) for training;
        call after `optimizers`. Checkpoints keep the plain modules' state dicts."""
        keep = {*self.frozen_modules, *self.unsaved_modules}
        self.models = {name: m if name in keep else wrap(m) for name, m in self.models.items()}

    def state_dict(self) -> dict[str, Any]:
        out = {name: _plain(m).state_dict() for name, m in self.models.items()
               if name not in self.unsaved_modules}
        extra = self.extra_state()
        if extra:
            out["_extra"] = extra
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, m in self.models.items():
            if name not in self.unsaved_modules:
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
