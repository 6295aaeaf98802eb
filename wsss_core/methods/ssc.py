"""`ssc`: Spatial Structure Constraints (docs/methods/ssc.md; paper seed 004, TMM'23).

An IRN ResNet CAM classifier with DRS, trained with three terms (`ssc.*` switches below):
  L = L_cls + λ · L_rec(decoder(A), x) + β · L_align(A, superpixels)   (L_align from
  `asm_start_epoch`), where A [B, C, h, w] is the raw class-map tensor, the CDR decoder rebuilds
  the crop from A (perceptual loss through a frozen loss network, or the pixel L1/L2 ablation)
  and ASM pulls the max-normalised maps towards their superpixel means, kept above the eroded
  reliable activations (RAS). Inference is the plain multi-scale CAM of the trained classifier
  (layer-4 DRS stays, the stage-2 DRS and the decoder are unused).

Every difference between the official code and the paper (or a fix) is a switch; the defaults
reproduce the official code (NUST-Machine-Intelligence-Laboratory/SSC, `step/train_cam.py`).
The ASM term reads `batch["superpixels"]` [B, H, W] int64: the crop's superpixel ids, declared
as the method's extra input (`extra_input_fns`: computed once per image by the shared data
layer, cached beside the classifier, augmented jointly with the image; data/superpixels.py).
The perceptual loss network is an unsaved module: built from its own weights, never trained
nor written to the classifier file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..data.superpixels import ICD, SOURCES, ICDSuperpixels, superpixels
from ..errors import ConfigError, DataError
from ..models.drs_cam import VGG_RELU_K_1, CDRDecoder, DRSResNetCAM, FeatureTaps, drs
from ._registry import register_method
from .base import MapSpec, Method, StepContext, make_optimizer
from .common import ResNetSettings, merge_flip, multilabel_soft_margin
from .settings import block, check_backbone_name
from .ssc_losses import asm_loss, perceptual_loss, pixel_loss

#: the fix every ICD superpixel file error ends with (data/superpixels.py), naming this block's keys
ICD_FIX = ("put ICD's superpixel PNGs (<image id>.png) in ssc.superpixel_dir, or set "
           "ssc.superpixel_generator to fh_ss64 or slic64")


@dataclass
class SSCModelSettings(ResNetSettings):
    drs_delta: float = 0.55
    drs_layer4: bool = True  # [OFFICIAL] DRS after every layer-4 block (train and inference)
    drs_stage2: bool = True  # [OFFICIAL] DRS on the stage-2 output, training forward only

    def build_ssc(self, num_classes: int) -> DRSResNetCAM:
        return DRSResNetCAM(self.backbone, num_classes, strides=tuple(self.strides),
                            detach_early=self.detach_early, pretrained=self.pretrained,
                            pretrained_file=self.pretrained_file, frozen_bn=self.frozen_bn,
                            drs_delta=self.drs_delta, drs_layer4=self.drs_layer4,
                            drs_stage2=self.drs_stage2)


@dataclass
class LossNetSettings:
    name: str = "vgg19.tv_in1k"  # a timm name; VGG is tapped by `features` slices
    # VGG: ends of `features` slices ([OFFICIAL] relu1_1..relu5_1 = 2, 7, 12, 21, 30; the
    # paper's "before each pooling layer" = 4, 9, 18, 27, 36); other nets: features_only indices
    taps: list[int] = field(default_factory=lambda: list(VGG_RELU_K_1))
    pretrained: bool = True
    pretrained_file: str | None = None
    seed: int = 0  # weights of a randomly initialised loss network (pretrained: false)


@dataclass
class SSCLossSettings:
    cdr: bool = True  # the reconstruction branch (off: the "+DRS" ablation)
    decoder_width: int = 256
    decoder_norm: str = "official"  # [OFFICIAL] custom LN (unbiased std, γ~U[0,1)) | "layernorm"
    decoder_lr: float = 5.0e-4  # Adam, poly-decayed like the classifier
    decoder_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    recon_loss: str = "perceptual"  # | "pixel_l1" | "pixel_l2" (Tab. VIII ablation)
    loss_net: LossNetSettings = block(LossNetSettings)
    tap_weights: list[float] = field(default_factory=lambda: [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0])
    # [OFFICIAL] "raw": tanh output vs the ImageNet-normalised crop, as is; [FIX] "imagenet":
    # the decoder output is read as an image in [-1, 1] and ImageNet-normalised first
    recon_range: str = "raw"
    lambda_rec: float = 1.0
    asm: bool = True
    beta_asm: float = 1.0
    asm_start_epoch: int = 2  # [OFFICIAL] 0-based: ASM from the 3rd epoch (paper: from the start)
    theta: float = 0.3
    erode_kernel: int = 8
    use_ras: bool = True  # off: the "ASM w/o RAS" ablation (target = superpixel map only)
    half_res: bool = True  # [OFFICIAL] ASM at half the crop's resolution
    # superpixels (paper §IV-B: ICD's at most 64 merged Felzenszwalb segments; data/superpixels.py)
    superpixel_generator: str = "fh_ss64"  # | "slic64" | "icd" [OFFICIAL]: ICD's own PNGs
    max_segments: int = 64  # fh_ss64 / slic64 only (ICD's files hold what they hold)
    # icd: the folder of <image id>.png (R + 256 G + 65536 B), absolute or under the dataset root
    superpixel_dir: str | None = None


@register_method
class SSCMethod(Method):
    name = "ssc"
    maps = (MapSpec("cam", strided=True),)
    propagate_map = "cam"

    settings_blocks = {"model": SSCModelSettings, "ssc": SSCLossSettings}
    backbone_module = "cnn"

    @classmethod
    def check_settings(cls, name, settings, where) -> None:
        """Backbone names (Method's check) and the `ssc` block's choices and lengths."""
        super().check_settings(name, settings, where)
        if name != "ssc":
            return
        s = settings
        check_backbone_name(s.loss_net.name, "ssc.loss_net.name")
        choices = {"recon_loss": ("perceptual", "pixel_l1", "pixel_l2"),
                   "recon_range": ("raw", "imagenet"), "superpixel_generator": SOURCES}
        for key, allowed in choices.items():
            if getattr(s, key) not in allowed:
                raise ConfigError(f"config key ssc.{key}: {getattr(s, key)!r} is not one of "
                                  f"{', '.join(allowed)}")
        if s.recon_loss == "perceptual" and len(s.tap_weights) != len(s.loss_net.taps):
            raise ConfigError(f"config key ssc.tap_weights: {len(s.tap_weights)} weights for "
                              f"{len(s.loss_net.taps)} taps in ssc.loss_net.taps")
        if not 1 <= s.max_segments <= 254:
            raise ConfigError(f"config key ssc.max_segments: {s.max_segments} is not in 1..254")
        if s.superpixel_generator == ICD and s.asm and not s.superpixel_dir:
            raise ConfigError("config key ssc.superpixel_dir: not set; ssc.superpixel_generator icd "
                              "reads <superpixel_dir>/<image id>.png (absolute, or relative to the "
                              "dataset root)")

    def build(self) -> dict[str, nn.Module]:
        self.model_settings = self.blocks["model"]
        self.loss_settings = s = self.blocks["ssc"]
        # both depend on the settings: no superpixels without ASM, no loss net without it
        self.extra_inputs = ("superpixels",) if s.asm else ()
        perceptual = s.cdr and s.recon_loss == "perceptual"
        self.unsaved_modules = ("loss_net",) if perceptual else ()
        cnn = self.model_settings.build_ssc(self.num_classes - 1)
        models: dict[str, nn.Module] = {"cnn": cnn}
        if s.cdr:
            stride = cnn.output_stride
            crop = int(self.train_params.get("crop", stride))
            if crop % stride:
                raise ConfigError(f"config key train_classifier.crop: {crop} is not a multiple of "
                                  f"the classifier's output stride {stride} (the decoder "
                                  f"rebuilds the crop at {stride}x the CAM size)")
            models["decoder"] = CDRDecoder(self.num_classes - 1, s.decoder_width, stride, s.decoder_norm)
        if perceptual:
            n = s.loss_net
            with torch.random.fork_rng(devices=[]):  # random loss-net weights from their own seed
                torch.manual_seed(n.seed)
                models["loss_net"] = FeatureTaps(n.name, n.taps, n.pretrained, n.pretrained_file)
        return models

    def extra_input_fns(self):
        """`superpixels`: uint8 image [H, W, 3] → superpixel ids [H, W] uint8 (ssc.superpixel_generator,
        ssc.max_segments; `icd` reads ssc.superpixel_dir/<image id>.png instead); none when ASM
        is off."""
        s = self.loss_settings
        if not s.asm:
            return {}
        if s.superpixel_generator == ICD:
            return {"superpixels": ICDSuperpixels(s.superpixel_dir, fix=ICD_FIX)}
        return {"superpixels": partial(superpixels, generator=s.superpixel_generator,
                                       max_segments=s.max_segments)}

    def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
        backbone, new = self.models["cnn"].param_groups()
        opts = [make_optimizer([{"params": backbone, "lr_mult": 1.0}, {"params": new, "lr_mult": 10.0}],
                               lr, weight_decay, momentum, kind)]
        if "decoder" in self.models:
            # [OFFICIAL] Adam: AdamW without weight decay, its own lr, poly-decayed like the rest
            s = self.loss_settings
            opts.append(make_optimizer([{"params": list(self.models["decoder"].parameters()),
                                         "betas": tuple(s.decoder_betas)}],
                                       s.decoder_lr, 0.0, 0.0, "adamw"))
        return opts

    def reconstruction_loss(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = self.loss_settings
        if s.recon_range == "imagenet":
            mean = rec.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = rec.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            rec = ((rec + 1) / 2 - mean) / std
        if s.recon_loss != "perceptual":
            return pixel_loss(rec, x, s.recon_loss)
        return perceptual_loss(self.models["loss_net"], rec, x, s.tap_weights)

    def training_step(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.loss_settings
        x = batch["image"].to(ctx.device, non_blocking=True)
        y = batch["label"].to(ctx.device, non_blocking=True)
        cams = self.models["cnn"](x)["logits"]
        cls = multilabel_soft_margin(cams, y)
        losses = {"cls": cls}
        total = cls
        if s.cdr:
            rec = self.reconstruction_loss(self.models["decoder"](cams), x)
            total = total + s.lambda_rec * rec
            losses["rec"] = rec
        if s.asm and ctx.epoch >= s.asm_start_epoch:
            if "superpixels" not in batch:
                raise DataError("ssc: the training batch has no 'superpixels' (the ASM term needs "
                                "the crop's superpixel ids, extra input of the method); train through "
                                "wsss train-classifier, or set ssc.asm: false")
            seg = batch["superpixels"].to(ctx.device, non_blocking=True)
            align = asm_loss(cams.float(), seg, y, s.theta, s.erode_kernel, s.use_ras, s.half_res)
            total = total + s.beta_asm * align
            losses["align"] = align
        losses["total"] = total
        return losses

    @torch.no_grad()
    def infer(self, pair: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cam": merge_flip(self.models["cnn"].cam(pair))}


__all__ = ["SSCMethod", "drs"]
