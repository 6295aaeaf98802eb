"""`cam`: the IRN-style ResNet CAM baseline (GAP + multilabel soft-margin, ReLU CAMs);
docs/methods/cam.md."""
from __future__ import annotations

import torch
from torch import nn

from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .common import ResNetSettings, merge_flip, multilabel_soft_margin


@register_method
class CAMMethod(Method):
    name = "cam"
    settings_blocks = {"model": ResNetSettings}
    maps = (MapSpec("cam", strided=True),)
    propagate_map = "cam"
    backbone_module = "cnn"
    published = {"seed": 48.8, "mask": 66.3, "seg": None, "source": "IRN, as quoted in CoBra Tab. 1",
                 "protocol": "seed: constant background score 0.15 (IRN's eval_cam.py; the `paper` "
                             "preset reports it, `eval_seeds.official`, the sweep beside it); mask: "
                             "random walk of the CAM, global-max rule with background 0.25, no CRF"}

    def build(self) -> dict[str, nn.Module]:
        return {"cnn": self.blocks["model"].build(self.num_classes - 1, with_background=False)}

    def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
        backbone, new = self.models["cnn"].param_groups()
        return [make_optimizer([{"params": backbone, "lr_mult": 1.0}, {"params": new, "lr_mult": 10.0}],
                               lr, weight_decay, momentum, kind)]

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        loss = multilabel_soft_margin(self.models["cnn"](x)["logits"], y)
        return {"total": loss, "cls": loss}

    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": merge_flip(self.models["cnn"].cam(pair))}
