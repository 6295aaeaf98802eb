"""`seco`: SeCo, single-stage ViT with decomposition and category tags (docs/methods/seco.md).

One ViT encoder gives a final-layer CAM, an auxiliary CAM (block `aux_layer`) and a
segmentation map (dilated decoder) trained on online PAR-refined pseudo labels. Local crops
cut around uncertain CAM pixels get category tags; their embeddings are contrasted against
class prototypes built from single-label images' class tokens (LiG) and against a reservoir
of an EMA local teacher's embeddings with a tag pool (LiL, with tag rectification). ToCo's
patch-token contrast, the balanced segmentation CE and the dense energy loss complete the
objective, switched on in stages (docs/methods/seco.md "One training step" 7). Defaults reproduce
the official code (SeCo on ToCo).

Plug-in hooks used: `train_views` (the crop, its strong view and a second global view cut
from the full image), `frozen_modules` (the EMA local teacher; the EMA runs inside the step,
before the teacher forward, as the reference does), optimiser groups with their own warm-up,
`extra_state` (prototypes, reservoir) and `single_stage` + `segment` (the decoder gives
`seg_miou.txt`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from ..data import transforms as T
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..models.seco_vit import SeCoEncoder, SeCoNet, SeCoTeacher
from ..ops.par import par_refine
from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .seco_losses import (assign_csc_tags, cam_to_label, dense_energy_loss, lig_loss, lil_loss,
                          ptc_affinity_mask, ptc_loss, refine_cams_with_bkg, seg_loss)


@dataclass
class SeCoModelSettings:
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"
    pretrained: bool = True
    pretrained_file: str | None = None
    patch_size: int | None = None  # with embed_dim, depth, num_heads: a from-scratch ViT
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    hybrid_stem: str | None = None  # a CNN (tf_efficientnet_lite0) as patch embedding: hybrid ViT
    train_stem: bool = False  # hybrid: fine-tune the stem
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
    ptc_box_scaling: str = "official"  # Q5: the pixel box on the token grid | "scaled" [FIX]
    # [OFFICIAL] black padding before normalisation, the crop box marks it 255 in every online
    # label; false: the former mean-colour padding, counted as image (no box)
    crop_box: bool = True
    cam_norm: str = "minmax"  # exported cam / aux: [OFFICIAL] per-class min-max | "max"
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


def loss_weights(s: SeCoSettings, it: int) -> dict[str, float]:
    """The staged loss weights (docs/methods/seco.md "One training step" 7) at iteration `it`
    (0-based)."""
    contrast = it > s.cls_only_until
    late = it > s.contrast_until
    return {"cls": 1.0, "cls_aux": 1.0, "ptc": s.w_ptc if it >= s.ptc_from else 0.0,
            "lig": s.w_lig if contrast and s.use_lig else 0.0,
            "lil": s.w_lil if contrast and s.use_lil else 0.0,
            "seg": s.w_seg if late else 0.0, "reg": s.w_reg if late else 0.0}


@torch.no_grad()
def multi_scale_cam(net: SeCoNet, x: torch.Tensor, scales, keep_stem: bool = False):
    """Training/evaluation CAMs (docs/methods/seco.md "One training step" 1): per scale, [x; flip
    x] → raw CAMs → bilinear to
    (H, W) → max with the un-flipped mirror → ReLU; summed over scales, then per (image,
    channel) min-subtracted and divided by (max + 1e-5). Returns (cams, cams_aux) [B, C, H, W];
    with `keep_stem` also x's frozen-stem features from the scale-1 pass (`stem_features`,
    [B, C', H/16, W/16], or None), which the student forward reuses instead of running the
    stem on the same crop again."""
    B, _, H, W = x.shape
    sums = [0, 0]
    stem = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(s * H), int(s * W)), mode="bilinear",
                                              align_corners=False)
        pair = torch.cat([xs, xs.flip(-1)])
        if keep_stem:
            feats = net.encoder.stem_features(pair)
            if s == 1.0 and feats is not None:
                stem = feats[:B]
            maps = net.cams(pair, feats)
        else:
            maps = net.cams(pair)
        for i, cam in enumerate(maps):
            cam = F.interpolate(cam.float(), size=(H, W), mode="bilinear", align_corners=False)
            sums[i] = sums[i] + F.relu(torch.maximum(cam[:B], cam[B:].flip(-1)))
    out = []
    for cam in sums:
        cam = cam - cam.flatten(2).min(dim=2).values[..., None, None]
        out.append(cam / (cam.flatten(2).max(dim=2).values[..., None, None] + 1e-5))
    return (out[0], out[1], stem) if keep_stem else (out[0], out[1])


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


def box_crop(image: np.ndarray, crop: int, scale_range: tuple[int, int],
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """SeCo's main crop with its box (official `datasets/transforms.py` `random_crop` with
    `mean_rgb` 0, as `datasets/voc.py` calls it): the classifier crop's resize, flip and crop
    (the same `rng` draws as `transforms.classification_crop`), but a side shorter than `crop`
    is padded with black (uint8 0) **before** normalisation. Returns (normalised float32
    [crop, crop, 3], img_box int64 [4] = top, bottom, left, right of the image region inside
    the crop, in crop pixels)."""
    img, _ = T.random_resize_long(image, None, *scale_range, rng)
    img, _ = T.random_hflip(img, None, rng)
    inside = np.ones(img.shape[:2], np.uint8)
    out, inside = T.random_crop(img, inside, crop, rng, img_fill=0, mask_fill=0)
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    box = np.array([rows[0], rows[-1] + 1, cols[0], cols[-1] + 1], dtype=np.int64)
    return T.normalize(out), box


def seco_views(image: np.ndarray, rng: np.random.Generator, crop: int,
               scale_range: tuple[int, int], flip_whole: bool = True,
               crop_box: bool = False) -> dict[str, torch.Tensor]:
    """The training views of one uint8 image [H, W, 3] (docs/methods/seco.md "One training step"
    3-4), each a
    normalised float32 [3, crop, crop]: `image` the shared classifier crop (resize, flip,
    crop); `strong` that crop flipped w.p. 0.5 (Q3) and colour-augmented; `glob` a second
    global view, RandomResizedCrop(scale 0.4-1, ratio 3/4-4/3, bicubic) of the full image,
    flipped w.p. 0.5, colour-augmented with solarize. The colour draws come from a torch
    generator seeded by `rng`, so the views are a function of the dataset's seed.

    `crop_box` (official): the crop is padded black before normalisation (`box_crop`) and
    `img_box` (int64 [4], top, bottom, left, right) is returned with the views; the strong
    view is cut from the same padded crop, as the official `local_view`. Without it the
    padding is the mean colour (0 after normalisation) and there is no box. An image at least
    `crop` on both sides after the resize gives the same `image` either way."""
    g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    if crop_box:
        out, box = box_crop(image, crop, scale_range, rng)
    else:
        out, _ = T.classification_crop(image, None, crop, scale_range, rng)
    x = torch.from_numpy(T.to_chw(out))
    img01 = denormalize(x[None])[0]
    strong = img01.flip(-1) if flip_whole and _u(g) < 0.5 else img01
    full = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
    H, W = full.shape[-2:]
    area = _u(g, 0.4, 1.0) * H * W
    ratio = torch.exp(torch.empty(()).uniform_(-0.2877, 0.2877, generator=g)).item()  # 3/4-4/3
    h = min(H, max(1, round((area / ratio) ** 0.5)))
    w = min(W, max(1, round((area * ratio) ** 0.5)))
    top, left = int(_u(g) * (H - h + 1)), int(_u(g) * (W - w + 1))
    glob = TF.resized_crop(full, top, left, h, w, [crop, crop],
                           interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    if _u(g) < 0.5:
        glob = glob.flip(-1)
    views = {"image": x, "strong": normalize(_color(strong, g, 0.8, 0.2, 0.5, 0.0)),
             "glob": normalize(_color(glob, g, 0.8, 0.2, 0.1, 0.2))}
    if crop_box:
        views["img_box"] = torch.from_numpy(box)
    return views


class Reservoir(nn.Module):
    """FIFO queue of key embeddings [K, D] with a parallel tag pool [K] (docs/methods/seco.md "One
    training step" 6).
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
    otherwise), in batch order, then every row L2-normalised (docs/methods/seco.md "One training
    step" 5). Returns P."""
    for f, c in zip(cls_token, label_idx.tolist()):
        if c > 0:
            prototypes[c - 1] = prototypes[c - 1] * m + (1 - m) * f
    prototypes.copy_(F.normalize(prototypes, p=2, dim=1))
    return prototypes


@register_method
class SeCoMethod(Method):
    name = "seco"
    settings_blocks = {"model": SeCoModelSettings, "seco": SeCoSettings}
    maps = (MapSpec("cam", strided=True), MapSpec("aux"))
    propagate_map = "cam"
    fuse_maps = ("cam",)
    frozen_modules = ("teacher",)
    single_stage = True
    partial_losses = True  # the decoder and projection head get no gradient in early stages
    published = {"seed": 74.8, "mask": 76.5, "seg": 74.0, "source": "SeCo Tab. 1",
                 "protocol": "seed: the final CAM with a background threshold (train); mask: "
                             "SeCo's pseudo masks (train); seg: its own decoder on val"}

    def build(self) -> dict[str, nn.Module]:
        m = self.model_settings = self.blocks["model"]
        s = self.settings = self.blocks["seco"]
        if s.lil_impl not in ("reference", "clean"):
            raise ConfigError(f"config key seco.lil_impl: {s.lil_impl!r} is not reference or clean")
        if s.cam_norm not in ("minmax", "max"):
            raise ConfigError(f"config key seco.cam_norm: {s.cam_norm!r} is not minmax or max")
        if s.ptc_box_scaling not in ("official", "scaled"):
            raise ConfigError(f"config key seco.ptc_box_scaling: {s.ptc_box_scaling!r} is not "
                              f"official or scaled")
        if not isinstance(s.crop_box, bool):
            raise ConfigError(f"config key seco.crop_box: {s.crop_box!r} is not true or false")
        # the exported maps' normalisation (official utils/camutils.py multi_scale_cam2: per
        # class minus the minimum, divided by the maximum + 1e-5), per instance: the class's
        # `maps` is the max-only form the registry describes
        norm = "minmax" if s.cam_norm == "minmax" else True
        self.maps = (MapSpec("cam", strided=True, normalize=norm), MapSpec("aux", normalize=norm))
        crop = int(self.train_params.get("crop", 224))
        enc = SeCoEncoder(m.backbone, aux_layer=m.aux_layer, img_size=crop, patch_size=m.patch_size,
                          embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                          pretrained=m.pretrained, pretrained_file=m.pretrained_file,
                          hybrid_stem=m.hybrid_stem, train_stem=m.train_stem)
        if s.local_crop % enc.patch_size:
            raise ConfigError(f"config key seco.local_crop: {s.local_crop} is not a multiple of the "
                              f"patch size {enc.patch_size}")
        net = SeCoNet(enc, self.num_classes - 1, m.proj_hidden, enc.embed_dim)
        g = torch.Generator().manual_seed(int(self.train_params.get("seed", 0)))
        self.reservoir = Reservoir(s.queue_size, enc.embed_dim, g)
        self.prototypes = torch.randn(self.num_classes - 1, enc.embed_dim, generator=g)
        return {"net": net, "teacher": SeCoTeacher(net)}

    def train_views(self):
        """`seco_views` with the stage's crop and scale range (picklable partial)."""
        return functools.partial(seco_views, crop=int(self.train_params.get("crop", 224)),
                                 scale_range=tuple(self.train_params.get("scale_range", (250, 1000))),
                                 flip_whole=self.settings.strong_flip_whole_image,
                                 crop_box=self.settings.crop_box)

    # --- state beyond the saved modules ------------------------------------------------------
    def to(self, device: torch.device) -> "SeCoMethod":
        super().to(device)
        self.reservoir.to(device)
        self.prototypes = self.prototypes.to(device)
        return self

    def extra_state(self) -> dict:
        return {"reservoir": self.reservoir.state_dict(), "prototypes": self.prototypes}

    def load_extra_state(self, state: dict) -> None:
        self.reservoir.load_state_dict(state["reservoir"])
        self.prototypes = state["prototypes"].to(self.prototypes.device)

    @property
    def net(self) -> SeCoNet:
        m = self.models["net"]
        return m.module if hasattr(m, "module") else m

    # --- optimisation ------------------------------------------------------------------------
    def optimizers(self, lr, weight_decay, momentum, kind="adamw"):
        """AdamW groups of PolyWarmupAdamW (docs/methods/seco.md "Optimiser"): encoder (norm and
        other weights apart),
        CAM/projection heads and decoder at `head_lr_mult`; every group warms up linearly from
        `warmup_ratio` over `warmup_iters` steps (optim.lr_factor)."""
        net, s = self.net, self.settings
        enc = list(net.encoder.named_parameters())
        heads = [net.classifier.weight, net.aux_classifier.weight, *net.proj_head.parameters()]
        warm = {"warmup_steps": s.warmup_iters, "warmup_ratio": s.warmup_ratio}
        return [make_optimizer([
            {"params": [p for n, p in enc if "norm" not in n], "lr_mult": 1.0, **warm},
            {"params": [p for n, p in enc if "norm" in n], "lr_mult": 1.0, **warm},
            {"params": heads, "lr_mult": s.head_lr_mult, **warm},
            {"params": list(net.decoder.parameters()), "lr_mult": s.head_lr_mult, **warm}],
            lr, weight_decay, momentum, kind)]

    # --- one training iteration (docs/methods/seco.md "One training step") -----------------------
    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s, it = self.settings, ctx.step
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        # [B, 4] (top, bottom, left, right) from `seco_views` with crop_box; None without
        img_box = batch.get("img_box")
        if img_box is not None:
            img_box = [[int(v) for v in b] for b in img_box.tolist()]
        single = y.sum(1) == 1
        label_idx = torch.where(single, y.argmax(1) + 1, torch.full_like(single, -1, dtype=torch.long))
        image01 = denormalize(x)
        strong = batch["strong"].to(ctx.device, non_blocking=True)
        glob = batch["glob"].to(ctx.device, non_blocking=True)

        net, teacher = self.net, self.models["teacher"]
        cams, cams_aux, x_stem = multi_scale_cam(net, x, s.cam_scales, keep_stem=True)
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

        out = self.models["net"](x, glob[None], q_crops, stem=x_stem)
        if it >= s.update_prototype:
            update_prototypes(self.prototypes, out["cls_token"].detach(), label_idx, s.proto_m)
        prototypes = self.prototypes.clone()
        with torch.no_grad():
            teacher.ema_encoder(net, s.momentum)
            L, B = k_crops.shape[:2]
            lk = teacher.encoder(k_crops.flatten(0, 1))[0].reshape(L, B, -1).transpose(0, 1)
            teacher.ema_proj(net, s.momentum)
            keys = teacher.proj_head(torch.cat([out["global_tokens"].detach(), lk], 1).flatten(0, 1))
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
                # the tokens wholly inside the box: top/left rounded up, bottom/right down
                box = [[-(-t // p), d // p, -(-l // p), r // p] for t, d, l, r in img_box]
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
        un-flipped mirror, ReLU (docs/methods/seco.md "One training step" 1, for one scale; the
        export sums scales)."""
        h, w = pair.shape[-2:]
        out = {}
        for name, cam in zip(("cam", "aux"), self.net.cams(pair)):
            cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
            out[name] = F.relu(torch.maximum(cam[0], cam[1].flip(-1)))
        return out

    @torch.no_grad()
    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """SeCo's own segmentation (docs/methods/seco.md "Outputs"): the decoder's logits [B, C,
        h, w]
        (background first) of normalised images [B, 3, h, w], bilinear from the patch grid to
        the input size. eval_seg adds scales, flip (summed logits per scale) and CRF."""
        seg = self.net.segment(images)
        return F.interpolate(seg, size=images.shape[-2:], mode="bilinear", align_corners=False)
