"""`fbr`: Fine-grained Background Representation on the IRN-style ResNet CAM classifier.

Host A of docs/methods/fbr.md (FBR, IEEE TCSVT 2024, §III): the CAM classifier gets a
foreground and a background 1x1 projection head; from the detached CAM, every batch gets pseudo
labels, class prototypes (top-k weighted means) and a set of uncertain query pixels per class.
Each image's background features are clustered by K-means into NROIs that enter a FIFO memory
bank; the FB loss pulls each query to its prototype against 256 NROIs, the IF loss against 256
pixels of other foreground classes drawn by active sampling. An auxiliary background
segmentation head, a FG/BG decorrelation term and TAP (thresholded average pooling) for the
classification logits complete the training loss. Inference is the plain CAM.

Conventions: feature maps are [B, D, h, w]; image labels [B, C] (foreground classes only);
score maps [B, C+1, h, w] with channel 0 = background; pseudo labels [B, h, w] (long, 0 =
background). Every switch that reproduces the official code (official files `region_utils.py`,
`AMN/region_utils.py`, `network/resnet38_contrast.py`) is named below; defaults follow the paper.
Similarities, softmaxes and normalisations run in fp32 even under autocast.

The network is wsss_core/models/fbr_net.py, the loss terms wsss_core/methods/fbr_losses.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.fbr_net import FBRNet
from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .common import ResNetSettings, merge_flip
from .fbr_losses import (QUERY_MODES, NROIBank, background_target, cap_queries, class_prototypes,
                         decorrelation_loss, fb_loss, gather_from_ranks, host_pseudo_labels,
                         if_loss, image_nrois, query_mask)


# ----------------------------------------------------------------------------- plug-in

@dataclass
class FBRSettings:
    """FBR's own block (`fbr:`): heads, pseudo labels, queries, NROI bank, losses (docs/methods/fbr.md)."""
    proj_dim: int = 128
    tap_threshold: float | None = 0.1  # null: GAP logits (ablation)
    bg_score: float = 0.10  # constant background plane Ŝ_0 (PPC host's bg_thres)
    topk_div: int = 32  # prototypes: k = max(1, h*w // topk_div)
    query_mode: str = "quantile"  # quantile [OFFICIAL] | absolute [paper text] | all
    rho_q: float = 0.4
    rho_e: float = 0.25
    abs_thresh: float = 0.4
    max_queries_per_class: int | None = None
    nroi_k: int = 8
    kmeans_iters: int = 30  # [OFFICIAL] 300 (scikit-learn's max_iter)
    kmeans_inits: int = 1  # [OFFICIAL] 10 starts, the lowest inertia kept (scikit-learn's n_init)
    bank_capacity: int = 50000  # VOC; 200000 for COCO; [OFFICIAL] AMN code 100000
    n_neg: int = 256
    tau_fb: float = 0.5
    tau_if: float = 0.1  # paper; [OFFICIAL] 0.5
    tau_graph: float = 0.5
    bg_seg: bool = True  # auxiliary BG segmentation head (AMN code: off)
    bg_thresh: float = 0.05
    bg_dropout: float = 0.5
    w_fb: float = 0.10  # paper; [OFFICIAL] AMN code 0.05
    w_if: float = 0.05  # paper; [OFFICIAL] AMN code 0.10
    w_seg: float = 0.01
    w_sim: float = 0.10
    detach_anchors: bool = False  # [OFFICIAL] true: queries detached, FB/IF give no gradient
    fb_cosine_axis_bug: bool = False  # [OFFICIAL] true: FB cosine over the key axis


@register_method
class FBRMethod(Method):
    name = "fbr"
    settings_blocks = {"model": ResNetSettings, "fbr": FBRSettings}
    maps = (MapSpec("cam", strided=True),)
    propagate_map = "cam"
    backbone_module = "cnn"
    partial_losses = True  # a step without queries leaves P_f out of FB/IF

    @classmethod
    def check_settings(cls, name: str, settings, where: str) -> None:
        super().check_settings(name, settings, where)
        if name == "fbr" and settings.query_mode not in QUERY_MODES:
            raise ConfigError(f"config key fbr.query_mode: {settings.query_mode!r} unknown "
                              f"({', '.join(QUERY_MODES)})")
        if name == "fbr" and settings.bank_capacity < 1:
            raise ConfigError("config key fbr.bank_capacity: must be ≥ 1")
        if name == "fbr" and (settings.kmeans_inits < 1 or settings.kmeans_iters < 1):
            raise ConfigError(f"config key fbr.kmeans_inits / fbr.kmeans_iters: "
                              f"{settings.kmeans_inits} / {settings.kmeans_iters}, each must be ≥ 1")

    def build(self) -> dict[str, nn.Module]:
        m, s = self.blocks["model"], self.blocks["fbr"]
        self.settings = s
        self.bank = NROIBank(s.bank_capacity)
        self.seed = int(self.train_params.get("seed", 0))
        net = FBRNet(m.backbone, self.num_classes - 1, strides=tuple(m.strides), detach_early=m.detach_early,
                     pretrained=m.pretrained, pretrained_file=m.pretrained_file, frozen_bn=m.frozen_bn,
                     proj_dim=s.proj_dim, tap_threshold=s.tap_threshold, bg_seg=s.bg_seg,
                     bg_dropout=s.bg_dropout)
        return {"cnn": net}

    def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
        net = self.models["cnn"]
        backbone, new = net.param_groups()
        return [make_optimizer([{"params": backbone, "lr_mult": 1.0},
                                {"params": new + net.head_parameters(), "lr_mult": 10.0}],
                               lr, weight_decay, momentum, kind)]

    def _generator(self, ctx: StepContext) -> torch.Generator:
        """The step's own generator: bank/class sampling and K-means are reproducible, also
        after a resume, and differ between processes."""
        rank = tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0
        return torch.Generator(device=ctx.device).manual_seed(
            (self.seed * 1_000_003 + ctx.step) * 64 + rank)

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        out = self.models["cnn"](x)
        with torch.autocast(device_type=ctx.device.type, enabled=False):
            cls = F.multilabel_soft_margin_loss(out["logits"].float(), y.float())
            losses = self.fbr_losses(out, y, self._generator(ctx))
        total = cls + sum(w * losses[k] for k, w in (("fb", s.w_fb), ("if", s.w_if),
                                                      ("bg", s.w_seg), ("sim", s.w_sim)) if k in losses)
        losses.update(total=total, cls=cls)
        return losses

    def fbr_losses(self, out: dict[str, torch.Tensor], labels: torch.Tensor,
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
        """FB, IF, BG-seg and decorrelation terms of one forward pass (fp32); also pushes the
        batch's NROIs into the bank (before the FB loss reads it) and reports the query count."""
        s = self.settings
        cam = out["cam"].detach().float()
        f = out["fg"].float()
        h, w = f.shape[-2:]
        scores, probs, pseudo = host_pseudo_labels(cam, labels, s.bg_score)
        query = query_mask(scores, probs, pseudo, s.query_mode, s.rho_q, s.rho_e, s.abs_thresh)
        if s.max_queries_per_class:
            query = cap_queries(query, pseudo, s.max_queries_per_class, generator)
        protos, _ = class_prototypes(f, scores, pseudo, max(1, h * w // s.topk_div))
        anchors = f.detach() if s.detach_anchors else f
        losses = {"queries": query.sum().float()}
        if s.w_fb:
            bank_feats = F.relu(out["bg_pre"].detach())
            nrois = image_nrois(bank_feats, pseudo, s.nroi_k, s.kmeans_iters, generator, s.kmeans_inits)
            self.bank.push(gather_from_ranks(nrois))
            losses["fb"] = fb_loss(anchors, query, pseudo, protos, self.bank.entries(), s.n_neg, s.tau_fb,
                                   generator, axis_bug=s.fb_cosine_axis_bug)
        if s.w_if:
            losses["if"] = if_loss(anchors, query, pseudo, protos, s.n_neg, s.tau_if, s.tau_graph, generator)
        if s.w_seg and "bg_logit" in out:
            losses["bg"] = F.binary_cross_entropy_with_logits(
                out["bg_logit"].float(), background_target(cam, labels, s.bg_thresh))
        if s.w_sim:
            other = out["bg_post"] if "bg_post" in out else F.relu(out["bg_pre"])  # PPC / AMN form
            losses["sim"] = decorrelation_loss(f, other)
        return losses

    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": merge_flip(self.models["cnn"].cam(pair))}

    def extra_state(self) -> dict:
        return {"nroi_bank": self.bank.contents().detach().cpu().clone()}

    def load_extra_state(self, state: dict) -> None:
        self.bank = NROIBank(self.settings.bank_capacity)
        self.bank.push(state["nroi_bank"])
