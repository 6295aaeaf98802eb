"""`cobra`: CoBra's complementary branches (docs/methods/cobra.md).

CNN branch (class-aware knowledge) + ViT branch (semantic-aware knowledge), trained together:
classification on both, then from `aux_start_epoch` the L1 inter-CAM term, SAP (CNN pseudo
labels → ViT projection) and CAP (ViT attention → CNN projection). Every difference between
the official code and the paper/fix is a switch below; the defaults reproduce the official
code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.vit_cam import ViTCAM, builds_new_blocks, valid_init_values
from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .cobra_losses import cap_loss, cnn_pseudo_labels, l1_intercam, l1_positive_term, sap_loss
from .common import ResNetSettings, merge_flip, multilabel_soft_margin
from .settings import block


@dataclass
class ViTSettings:
    backbone: str = "deit_small_patch16_224.fb_in1k"  # DeiT-S, the official ViT weights
    pretrained: bool = True
    pretrained_file: str | None = None  # fb_in1k: DeiT's deit_small_patch16_224-cd65a155.pth
    patch_size: int | None = None
    embed_dim: int | None = None  # set (with depth, num_heads) for a from-scratch small ViT
    depth: int | None = None
    num_heads: int | None = None
    hybrid_stem: str | None = None  # a CNN (tf_efficientnet_lite0) as patch embedding: hybrid ViT
    train_stem: bool = True  # hybrid: fine-tune the stem (false: no gradient, CPU-cheap)
    # hybrid / from-scratch: start the new blocks as the features they read (vit_cam.start_blocks)
    init_values: float | None = None  # LayerScale γ start (CaiT sec. 3), ≥ 0; null: no LayerScale
    qk_identity: bool = False  # query / key projections start as the identity (feature affinity)


@dataclass
class CobraModelSettings:
    cnn: ResNetSettings = block(ResNetSettings)
    vit: ViTSettings = block(ViTSettings)
    proj_dim: int = 256


@dataclass
class CobraLossSettings:
    """The `cobra:` config block (docs/methods/cobra.md "Losses", "Switches"); defaults are the
    [OFFICIAL] code's values.

    total = cls + l1_weight · L1 + phi_c2t · SAP + phi_t2c · CAP from epoch `aux_start_epoch`.
    `tau` is the temperature of both SAP and CAP; `sap_temperature_bug: true` reproduces the
    official SAP, whose negatives miss the 1/τ (docs/methods/cobra.md "Losses"; false = the [FIX],
    both terms
    scaled by 1/τ). `train_cnn_proj: false` keeps the official frozen random CNN projection
    that CAP trains against; true lets CAP train it ([FIX]). `l1_weight: 0` drops the L1
    inter-CAM term.
    """
    top_bot_k: list[int] = field(default_factory=lambda: [20, 5, 5, 20])  # SAP+, SAP-, CAP+, CAP-
    tau: float = 0.1
    phi_c2t: float = 0.1  # SAP weight
    phi_t2c: float = 0.1  # CAP weight
    l1_weight: float = 0.1
    aux_start_epoch: int = 5  # [OFFICIAL] 0-based epoch where L1/SAP/CAP switch on (paper: 1)
    l1_positive_term: bool = False  # [PAPER] extra positive-class L1 term (official: off)
    pseudo_label_mask: str = "official"  # "official" (absent classes zeroed) | "neginf" [FIX]
    sap_temperature_bug: bool = True  # [OFFICIAL] misplaced temperature on SAP negatives
    train_cnn_proj: bool = False  # [FIX] train the CNN projection conv (official: frozen random)
    vit_head_group: str = "official"  # 10x group: "official" {head.bias, proj} | "intended"
    rw_source: str = "vit"  # stride-4 map the random walk propagates: "vit" [OFFICIAL] | "cnn"


@register_method
class CobraMethod(Method):
    name = "cobra"
    settings_blocks = {"model": CobraModelSettings, "cobra": CobraLossSettings}
    maps = (MapSpec("cnn", strided=True), MapSpec("vit", strided=True),
            MapSpec("attention", kind="agnostic", normalize=False))
    fuse_maps = ("cnn", "vit")  # the seed recipe max_mean_last reads the ViT CAM last
    backbone_module = "cnn"
    published = {"seed": 62.3, "mask": 73.5, "seg": 74.0, "source": "CoBra Tab. 1 / Tab. 2",
                 "protocol": "seed: per image the θ-th percentile of the attention map as background "
                             "score, θ searched (CoBra's eval_cam.py; `eval_seeds.official` rule "
                             "percentile), no CRF; mask: random walk of the ViT CAM, per-class "
                             "0.31·max + min rule + dense CRF (72.5 without); seg: multi-scale "
                             "testing + dense CRF"}
    partial_losses = True  # the projection heads get no gradient before aux_start_epoch

    @classmethod
    def check_settings(cls, name: str, settings, where: str) -> None:
        """Backbone names (Method's check), `cobra.top_bot_k` (four counts) and the ViT block
        start: `model.vit.init_values` null or a number ≥ 0, `model.vit.qk_identity` a boolean,
        either only with new blocks (`hybrid_stem` or `embed_dim` set)."""
        from ..errors import ConfigError
        super().check_settings(name, settings, where)
        if name == "cobra" and len(settings.top_bot_k) != 4:
            raise ConfigError(f"config key {where}.top_bot_k: needs four counts (SAP+, SAP-, CAP+, CAP-)")
        if name == "model":
            v = settings.vit
            iv = v.init_values
            if not valid_init_values(iv):
                raise ConfigError(f"config key {where}.vit.init_values: {iv!r} is not null or a "
                                  f"number ≥ 0 (the LayerScale start, e.g. 1.0e-5)")
            if not isinstance(v.qk_identity, bool):
                raise ConfigError(f"config key {where}.vit.qk_identity: {v.qk_identity!r} is not "
                                  f"true or false")
            if (iv is not None or v.qk_identity) and not builds_new_blocks(v.hybrid_stem, v.embed_dim):
                key = "init_values" if iv is not None else "qk_identity"
                raise ConfigError(f"config key {where}.vit.{key}: starts new transformer blocks, "
                                  f"but {v.backbone} keeps its pretrained ones; set hybrid_stem or "
                                  f"embed_dim, or leave it {'null' if iv is not None else 'false'}")

    def build(self) -> dict[str, nn.Module]:
        self.model_settings = self.blocks["model"]
        self.loss_settings = s = self.blocks["cobra"]
        if len(s.top_bot_k) != 4:
            from ..errors import ConfigError
            raise ConfigError("config key cobra.top_bot_k: needs four counts (SAP+, SAP-, CAP+, CAP-)")
        self.propagate_map = s.rw_source
        m = self.model_settings
        crop = int(self.train_params.get("crop", 224))
        cnn = m.cnn.build(self.num_classes - 1, with_background=True, proj_dim=m.proj_dim)
        v = m.vit
        vit = ViTCAM(v.backbone, self.num_classes - 1, proj_dim=m.proj_dim, img_size=crop,
                     patch_size=v.patch_size, embed_dim=v.embed_dim, depth=v.depth,
                     num_heads=v.num_heads, pretrained=v.pretrained, pretrained_file=v.pretrained_file,
                     hybrid_stem=v.hybrid_stem, train_stem=v.train_stem,
                     init_values=v.init_values, qk_identity=v.qk_identity)
        return {"cnn": cnn, "vit": vit}

    def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
        s = self.loss_settings
        cnn_base, cnn_new = self.models["cnn"].param_groups(train_proj=s.train_cnn_proj)
        vit_base, vit_new = self.models["vit"].param_groups(mode=s.vit_head_group)
        return [
            make_optimizer([{"params": cnn_base, "lr_mult": 1.0}, {"params": cnn_new, "lr_mult": 10.0}],
                           lr, weight_decay, momentum, kind),
            make_optimizer([{"params": vit_base, "lr_mult": 1.0}, {"params": vit_new, "lr_mult": 10.0}],
                           lr, weight_decay, momentum, kind),
        ]

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.loss_settings
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        c = self.models["cnn"](x)
        v = self.models["vit"](x)
        if c["logits"].shape[-2:] != v["logits"].shape[-2:]:
            from ..errors import ConfigError
            raise ConfigError(f"model: CNN grid {tuple(c['logits'].shape[-2:])} != ViT grid "
                              f"{tuple(v['logits'].shape[-2:])}; match the CNN output stride to the "
                              f"ViT patch size")
        cls = multilabel_soft_margin(c["logits"], y) + multilabel_soft_margin(v["logits"], y)
        losses = {"cls": cls}
        total = cls
        if ctx.epoch >= s.aux_start_epoch:
            l1 = l1_intercam(c["logits"], v["logits"], x.shape[-2:])
            if s.l1_positive_term:
                l1 = l1 + l1_positive_term(c["logits"], v["logits"], y, x.shape[-2:])
            pseudo = cnn_pseudo_labels(c["logits"], y, mode=s.pseudo_label_mask)
            k = s.top_bot_k
            sap = sap_loss(c["logits"], pseudo, v["proj"], k[0], k[1], s.tau, s.sap_temperature_bug)
            cap = cap_loss(v["attn"], c["proj"], k[2], k[3], s.tau)
            total = total + s.l1_weight * l1 + s.phi_c2t * sap + s.phi_t2c * cap
            losses.update(l1=l1, sap=sap, cap=cap)
        losses["total"] = total
        return losses

    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        cnn_cam = merge_flip(self.models["cnn"].cam(pair))[1:]
        v = self.models["vit"].infer(pair)
        return {"cnn": cnn_cam, "vit": merge_flip(v["cam"])[1:], "attention": merge_flip(v["attention"])}
