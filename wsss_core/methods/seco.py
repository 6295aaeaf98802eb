"""`seco`: SeCo, single-stage ViT with decomposition and category tags (docs/methods/seco.md).

One ViT encoder gives a final-layer CAM, an auxiliary CAM (block `aux_layer`) and a
segmentation map (dilated decoder) trained on online PAR-refined pseudo labels. Local crops
cut around uncertain CAM pixels get category tags; their embeddings are contrasted against
class prototypes built from single-label images' class tokens (LiG) and against a reservoir
of an EMA local teacher's embeddings with a tag pool (LiL, with tag rectification). ToCo's
patch-token contrast, the balanced segmentation CE and the dense energy loss complete the
objective, switched on in stages (§15). Defaults reproduce the official code (SeCo on ToCo).

Under the current plug-in contract the method makes its own views from the batch's crop
(strong view; a second global view by a random resized crop of the crop, not of the full
image), sets its own warm-up learning rate inside the step, runs the EMA inside the step
(before the teacher forward, as the reference does) and keeps teacher, prototypes and
reservoir in `extra_state`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..models.seco_vit import SeCoEncoder, SeCoNet, SeCoTeacher
from ..ops.par import par_refine
from . import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .seco_losses import (assign_csc_tags, cam_to_label, dense_energy_loss, lig_loss, lil_loss,
                          ptc_affinity_mask, ptc_loss, refine_cams_with_bkg, seg_loss)
from .settings import from_dict


@dataclass
class SeCoModelSettings:
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"
    pretrained: bool = True
    pretrained_file: str | None = None
    patch_size: int | None = None  # with embed_dim, depth, num_heads: a from-scratch ViT
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    aux_layer: int = -3
    proj_hidden: int = 2048  # the projection's output is the encoder width (prototypes are class tokens)


@dataclass
class SeCoSettings:
    local_crop: int = 64
    num_local: int = 10  # ncrops − 2
    tag_threshold: float = 0.2
    tag_proportion: str = "weighted"  # [OFFICIAL] class-id weighted (Q1) | "count"
    queue_size: int = 4608
    momentum: float = 0.999  # local teacher EMA
    proto_m: float = 0.9
    update_prototype: int = 600
    cam2mask: int = 10000  # tags from the aux CAM before this iteration, final CAM after
    temp_lig: float = 0.1
    temp_lil: float = 0.08
    w_lig: float = 0.5
    w_lil: float = 0.5
    w_ptc: float = 0.3
    w_seg: float = 0.12
    w_reg: float = 0.05
    # stage ends (0-based iteration `it`): it ≤ cls_only_until → cls + aux + ptc; then LiG/LiL;
    # it > contrast_until → + seg + reg
    ptc_from: int = 0
    cls_only_until: int = 1000
    contrast_until: int = 2000
    high_thre: float = 0.7
    low_thre: float = 0.25
    bkg_thre: float = 0.5
    cam_scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.75, 1.5])
    lil_impl: str = "reference"  # [OFFICIAL] | "clean" [FIX]
    strong_flip_whole_image: bool = True  # [OFFICIAL] Q3
    ptc_box_scaling: str = "official"  # Q5 (only matters when the data layer gives img_box)
    par_dilations: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 24])
    par_iterations: int = 10
    energy_weight: float = 1e-7
    energy_sigma_rgb: float = 15.0
    energy_sigma_xy: float = 100.0
    energy_scale: float = 0.5
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    head_lr_mult: float = 10.0
    use_lig: bool = True  # ablation switches (seed mIoU without LiG / LiL)
    use_lil: bool = True


def seco_lr_factor(step: int, max_step: int, warmup_iters: int, warmup_ratio: float,
                   power: float) -> float:
    """PolyWarmupAdamW (seco.md §16): linear warm-up from `warmup_ratio` over `warmup_iters`
    steps, then (1 − g/max)^power (not re-based after warm-up)."""
    if step < warmup_iters:
        return 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return (1 - step / max_step) ** power if step < max_step else 0.0


def loss_weights(s: SeCoSettings, it: int) -> dict[str, float]:
    """The staged weights of §15 at iteration `it` (0-based)."""
    contrast = it > s.cls_only_until
    late = it > s.contrast_until
    return {"cls": 1.0, "cls_aux": 1.0, "ptc": s.w_ptc if it >= s.ptc_from else 0.0,
            "lig": s.w_lig if contrast and s.use_lig else 0.0,
            "lil": s.w_lil if contrast and s.use_lil else 0.0,
            "seg": s.w_seg if late else 0.0, "reg": s.w_reg if late else 0.0}


@torch.no_grad()
def multi_scale_cam(net: SeCoNet, x: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Training/evaluation CAMs (seco.md §6): per scale, [x; flip x] → raw CAMs → bilinear to
    (H, W) → max with the un-flipped mirror → ReLU; summed over scales, then per (image,
    channel) min-subtracted and divided by (max + 1e-5). Returns (cams, cams_aux) [B, C, H, W]."""
    B, _, H, W = x.shape
    sums = [0, 0]
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * H), int(s * W)), mode="bilinear",
                                              align_corners=False)
        for i, cam in enumerate(net.cams(torch.cat([xs, xs.flip(-1)]))):
            cam = F.interpolate(cam.float(), size=(H, W), mode="bilinear", align_corners=False)
            sums[i] = sums[i] + F.relu(torch.maximum(cam[:B], cam[B:].flip(-1)))
    out = []
    for cam in sums:
        cam = cam - cam.flatten(2).min(dim=2).values[..., None, None]
        out.append(cam / (cam.flatten(2).max(dim=2).values[..., None, None] + 1e-5))
    return out[0], out[1]


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised [B, 3, H, W] → [0, 1], quantised to uint8 levels as the reference."""
    mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = x.new_tensor(IMAGENET_STD)[:, None, None]
    return ((x * std + mean) * 255).clamp(0, 255).to(torch.uint8).float() / 255


def normalize(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - x01.new_tensor(IMAGENET_MEAN)[:, None, None]) / x01.new_tensor(IMAGENET_STD)[:, None, None]


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g))


def _color(img: torch.Tensor, g: torch.Generator, p_jitter: float, p_gray: float, p_blur: float,
           p_solarize: float) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) w.p. p_jitter, grayscale, Gaussian blur (σ ~ U(0.1, 2)),
    solarize (threshold 0.5) on one [3, H, W] image in [0, 1] (torchvision functional ops)."""
    if _u(g) < p_jitter:
        ops = [lambda t: TF.adjust_brightness(t, _u(g, 0.6, 1.4)),
               lambda t: TF.adjust_contrast(t, _u(g, 0.6, 1.4)),
               lambda t: TF.adjust_saturation(t, _u(g, 0.8, 1.2)),
               lambda t: TF.adjust_hue(t, _u(g, -0.1, 0.1))]
        for k in torch.randperm(4, generator=g).tolist():
            img = ops[k](img)
    if _u(g) < p_gray:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if _u(g) < p_blur:
        sigma = _u(g, 0.1, 2.0)
        k = 2 * int(3 * sigma + 0.5) + 1
        img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    if p_solarize and _u(g) < p_solarize:
        img = TF.solarize(img, 0.5)
    return img


def make_views(image01: torch.Tensor, g: torch.Generator, flip_whole: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(strong view, second global view), both normalised [B, 3, H, W] (seco.md §3 steps 4-5;
    the global view is a RandomResizedCrop(0.4-1) of the crop: the data layer has no full image)."""
    strong, glob = [], []
    H, W = image01.shape[-2:]
    for img in image01:
        s = img.flip(-1) if flip_whole and _u(g) < 0.5 else img
        strong.append(_color(s, g, 0.8, 0.2, 0.5, 0.0))
        area = _u(g, 0.4, 1.0) * H * W
        ratio = torch.exp(torch.empty(()).uniform_(-0.2877, 0.2877, generator=g)).item()  # 3/4-4/3
        h = min(H, max(1, round((area / ratio) ** 0.5)))
        w = min(W, max(1, round((area * ratio) ** 0.5)))
        top, left = int(_u(g) * (H - h + 1)), int(_u(g) * (W - w + 1))
        v = TF.resized_crop(img, top, left, h, w, [H, W],
                            interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        if _u(g) < 0.5:
            v = v.flip(-1)
        glob.append(_color(v, g, 0.8, 0.2, 0.1, 0.2))
    return normalize(torch.stack(strong)), normalize(torch.stack(glob))


class Reservoir(nn.Module):
    """FIFO queue of key embeddings [K, D] with a parallel tag pool [K] (seco.md §11).
    Initialised N(0, 1) normalised per feature column (official quirk Q9), tags 0."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("feats", F.normalize(torch.randn(size, dim, generator=generator), dim=0))
        self.register_buffer("tags", torch.zeros(size))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor, tags: torch.Tensor) -> None:
        n, size = keys.shape[0], self.feats.shape[0]
        if size % n:
            raise ConfigError(f"seco.queue_size {size}: must be a multiple of the keys per step "
                              f"({n} = 12 x batch size x processes)")
        p = int(self.ptr)
        self.feats[p:p + n] = keys.detach()
        self.tags[p:p + n] = tags.reshape(-1)
        self.ptr.fill_((p + n) % size)


@torch.no_grad()
def update_prototypes(prototypes: torch.Tensor, cls_token: torch.Tensor, label_idx: torch.Tensor,
                      m: float) -> torch.Tensor:
    """In place: P_c ← m P_c + (1 − m) f_b for every single-label image b (label_idx 1..C, −1
    otherwise), in batch order, then every row L2-normalised (seco.md §10). Returns P."""
    for f, c in zip(cls_token, label_idx.tolist()):
        if c > 0:
            prototypes[c - 1] = prototypes[c - 1] * m + (1 - m) * f
    prototypes.copy_(F.normalize(prototypes, p=2, dim=1))
    return prototypes


@register_method
class SeCoMethod(Method):
    name = "seco"
    maps = (MapSpec("cam", strided=True), MapSpec("aux"))
    propagate_map = "cam"
    partial_losses = True  # the decoder and projection head get no gradient in early stages

    def build(self) -> dict[str, nn.Module]:
        self.model_settings = m = from_dict(SeCoModelSettings, self.params.get("model"), "model")
        self.settings = s = from_dict(SeCoSettings, self.params.get("seco"), "seco")
        if s.lil_impl not in ("reference", "clean"):
            raise ConfigError(f"config key seco.lil_impl: {s.lil_impl!r} is not reference or clean")
        crop = int(self.train_params.get("crop", 224))
        enc = SeCoEncoder(m.backbone, aux_layer=m.aux_layer, img_size=crop, patch_size=m.patch_size,
                          embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                          pretrained=m.pretrained, pretrained_file=m.pretrained_file)
        if s.local_crop % enc.patch_size:
            raise ConfigError(f"config key seco.local_crop: {s.local_crop} is not a multiple of the "
                              f"patch size {enc.patch_size}")
        net = SeCoNet(enc, self.num_classes - 1, m.proj_hidden, enc.embed_dim)
        g = torch.Generator().manual_seed(int(self.train_params.get("seed", 0)))
        self.teacher = SeCoTeacher(net)
        self.reservoir = Reservoir(s.queue_size, enc.embed_dim, g)
        self.prototypes = torch.randn(self.num_classes - 1, enc.embed_dim, generator=g)
        self.view_seed = int(self.train_params.get("seed", 0))
        return {"net": net}

    # --- state beyond the optimised modules --------------------------------------------------
    def to(self, device: torch.device) -> "SeCoMethod":
        super().to(device)
        self.teacher.to(device)
        self.reservoir.to(device)
        self.prototypes = self.prototypes.to(device)
        return self

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "reservoir": self.reservoir.state_dict(),
                "prototypes": self.prototypes}

    def load_extra_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.reservoir.load_state_dict(state["reservoir"])
        self.prototypes = state["prototypes"].to(self.prototypes.device)

    @property
    def net(self) -> SeCoNet:
        m = self.models["net"]
        return m.module if hasattr(m, "module") else m

    # --- optimisation ------------------------------------------------------------------------
    def optimizers(self, lr, weight_decay, momentum, kind="adamw"):
        net, mult = self.net, self.settings.head_lr_mult
        enc = list(net.encoder.named_parameters())
        heads = [net.classifier.weight, net.aux_classifier.weight, *net.proj_head.parameters()]
        self._optimizers = [make_optimizer([
            {"params": [p for n, p in enc if "norm" not in n], "lr_mult": 1.0},
            {"params": [p for n, p in enc if "norm" in n], "lr_mult": 1.0},
            {"params": heads, "lr_mult": mult},
            {"params": list(net.decoder.parameters()), "lr_mult": mult}],
            lr, weight_decay, momentum, kind)]
        return self._optimizers

    def _set_warmup_lr(self, ctx: StepContext) -> None:
        """The engine set poly lr; SeCo's schedule has a linear warm-up first (§16)."""
        s = self.settings
        power = float(self.train_params.get("poly_power", 0.9))
        factor = seco_lr_factor(ctx.step, ctx.max_step, s.warmup_iters, s.warmup_ratio, power)
        for opt in self._optimizers:
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * factor

    # --- one training iteration (seco.md §15.1) --------------------------------------------
    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, it = self.settings, ctx.step
        if getattr(self, "_optimizers", None):
            self._set_warmup_lr(ctx)
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        img_box = batch.get("img_box")
        single = y.sum(1) == 1
        label_idx = torch.where(single, y.argmax(1) + 1, torch.full_like(single, -1, dtype=torch.long))
        image01 = denormalize(x)
        g = torch.Generator().manual_seed(self.view_seed * 1_000_003 + it)
        strong, glob = make_views(image01, g, s.strong_flip_whole_image)

        net = self.net
        cams, cams_aux = multi_scale_cam(net, x, s.cam_scales)
        valid_cam, _ = cam_to_label(cams, y, s.high_thre, s.low_thre, s.bkg_thre, img_box)
        refine = lambda im, m: par_refine(im, m, s.par_dilations, s.par_iterations)  # noqa: E731
        with torch.no_grad():
            seg_label = refine_cams_with_bkg(image01, valid_cam, y, s.high_thre, s.low_thre,
                                             img_box, refine)
        roi = cam_to_label(cams_aux if it < s.cam2mask else cams, y, s.high_thre, s.low_thre,
                           s.bkg_thre, img_box, mid_value=-1)[1]
        (q_crops, k_crops), tags = assign_csc_tags([x, strong], roi, s.num_local, s.local_crop,
                                                  s.tag_threshold, s.tag_proportion)
        tags = tags.reshape(-1)

        out = self.models["net"](x, torch.stack([x, glob]), q_crops)
        if it >= s.update_prototype:
            update_prototypes(self.prototypes, out["cls_token"].detach(), label_idx, s.proto_m)
        prototypes = self.prototypes.clone()
        with torch.no_grad():
            self.teacher.ema_encoder(net, s.momentum)
            L, B = k_crops.shape[:2]
            lk = self.teacher.encoder(k_crops.flatten(0, 1))[0].reshape(L, B, -1).transpose(0, 1)
            self.teacher.ema_proj(net, s.momentum)
            keys = self.teacher.proj_head(torch.cat([out["global_tokens"].detach(), lk], 1).flatten(0, 1))
            self.reservoir.push(keys, tags)
            bank = torch.cat([keys, self.reservoir.feats])
            bank_tags = torch.cat([tags, self.reservoir.tags])

        w = loss_weights(s, it)
        # the losses run in float32 even when the encoder ran under fp16 autocast: the energy
        # sums over every pixel pair and LiL's exp(L) != 1 filter is precision-sensitive
        out = {k: v.float() for k, v in out.items()}
        bank = bank.float()
        with torch.autocast(x.device.type, enabled=False):
            losses = {"cls": F.multilabel_soft_margin_loss(out["cls"], y),
                      "cls_aux": F.multilabel_soft_margin_loss(out["cls_aux"], y)}
            losses["lil"], revised = lil_loss(out["q"], bank, tags, bank_tags, s.temp_lil,
                                              s.temp_lil, s.lil_impl)
            losses["lig"] = lig_loss(out["q"], prototypes, revised, s.temp_lig, s.temp_lig)
            grid = tuple(out["tokens"].shape[-2:])
            box = img_box
            if img_box is not None and s.ptc_box_scaling == "scaled":
                p = net.encoder.patch_size
                box = [[v // p for v in b] for b in img_box]
            aff = ptc_affinity_mask(cams_aux, y, grid, s.high_thre, s.low_thre, box)
            losses["ptc"] = ptc_loss(out["tokens"], aff)
            seg = F.interpolate(out["seg"], size=x.shape[-2:], mode="bilinear", align_corners=False)
            losses["seg"] = seg_loss(seg, seg_label)
            if w["reg"] > 0:  # the dense filter is the costliest term: skipped while its weight is 0
                roi_mask = None
                if img_box is not None:
                    roi_mask = torch.zeros_like(seg_label, dtype=seg.dtype)
                    for b, (t, d, l, r) in enumerate(img_box):
                        roi_mask[b, t:d, l:r] = 1
                losses["reg"] = dense_energy_loss(
                    image01 * 255, seg.softmax(1), seg_label, roi_mask, s.energy_weight,
                    s.energy_sigma_rgb, s.energy_sigma_xy, s.energy_scale)
        total = sum(w[k] * v for k, v in losses.items())
        losses["total"] = total
        losses["tags_rectified"] = ((revised == 0) & (tags != 0)).float().sum()
        return losses

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final-layer and aux CAM [C, h, w] at input resolution: bilinear, max with the
        un-flipped mirror, ReLU (seco.md §6 for one scale; the export sums scales)."""
        h, w = pair.shape[-2:]
        out = {}
        for name, cam in zip(("cam", "aux"), self.net.cams(pair)):
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            out[name] = F.relu(torch.maximum(cam[0], cam[1].flip(-1)))
        return out


@torch.no_grad()
def predict_segmentation(method: SeCoMethod, image: torch.Tensor, scales=(1.0, 1.25, 1.5),
                         base_size: tuple[int, int] | None = (448, 448)) -> torch.Tensor:
    """SeCo's own segmentation (seco.md §17.3): image [3, H, W] normalised → logits
    [C+1, H, W]. Per scale s the image is resized to s·base_size (VOC) or s·(H, W) when
    `base_size` is None (COCO); [x; flip x] → decoder → bilinear to (H, W) → logits + the
    un-flipped mirror's; scales fused by element-wise max. Argmax (or CRF on the softmax) gives
    the prediction."""
    H, W = image.shape[-2:]
    base = base_size or (H, W)
    fused = None
    for s in scales:
        x = F.interpolate(image[None], size=(int(base[0] * s), int(base[1] * s)), mode="bilinear",
                          align_corners=False)
        seg = method.net.segment(torch.cat([x, x.flip(-1)]))
        seg = F.interpolate(seg, size=(H, W), mode="bilinear", align_corners=False)
        logits = seg[0] + seg[1].flip(-1)
        fused = logits if fused is None else torch.maximum(fused, logits)
    return fused
