"""Stage `train_seg`: train a fully supervised segmentation network (smp DeepLabV3+ or
SegFormer) on the train_aug images with the pseudo masks as labels (255 ignored).

Training: random rescale + flip + padded crop (SegTrainAugment), cross-entropy over labelled
pixels, SGD (or AdamW) with the decoder/head at `decoder_lr_mult` x lr and a poly schedule over
all iterations, AMP on CUDA, a checkpoint after every epoch (`checkpoint.pt` beside the model)
and exact resume through the shared `engine.fit` loop.

Parameters: the config block (`train_seg` in a preset) names a default architecture `model`,
an encoder per architecture (`encoders`) and per-architecture overrides (`per_model`);
`resolve_seg_params(block, model)` flattens it into the parameters of one architecture
(`model`, `encoder` and the training keys), which is what the workflow passes to this stage.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_model
from ..config import resolve_seg_params
from ..data.index import DatasetIndex
from ..data.seg_dataset import SegmentationDataset, SegTrainAugment
from ..engine import (batch_note, data_parallel, distributed, finish, fit, fit_config, resume_key,
                      start_files)
from ..errors import ConfigError, DataError
from ..engine import StepContext
from ..methods import classifier_backbone_state
from ..models.backbones import batchnorm_eval
from ..models.segmentation import (
    create_seg_model,
    load_classifier_backbone,
    param_groups,
    segmentation_loss,
)
from ..optim import make_optimizer
from ..precision import place_model
from . import common

log = logging.getLogger("wsss")


def build_seg_model(params: dict, num_classes: int, classifier: str | Path | None) -> nn.Module:
    """The architecture of `params`, its encoder initialised as `encoder_from` says: `weights`
    (the `pretrained` / `pretrained_file` policy) or `classifier` (the trained classifier's CNN
    backbone, for presets without ImageNet weights)."""
    source = params["encoder_from"]
    if source not in ("weights", "classifier"):
        raise ConfigError(f"config key train_seg.encoder_from: {source!r} is not weights or classifier")
    model = create_seg_model(params["model"], params["encoder"], num_classes,
                             params["pretrained"] and source == "weights", params["pretrained_file"]
                             if source == "weights" else None, params["output_stride"])
    if source == "classifier":
        if classifier is None:
            raise ConfigError("config key train_seg.encoder_from: 'classifier' needs the classifier "
                              "model (--classifier classifier/model.pt)")
        load_classifier_backbone(model.encoder, classifier_backbone_state(classifier),
                                 params["encoder"], source=str(classifier))
    return model


def train_seg(index: str | Path, masks_dir: str | Path, params: dict, out: str | Path,
              resume: bool = False, threads: int | None = None,
              classifier: str | Path | None = None) -> Path:
    """Train on train_aug with `masks_dir/<id>.png` as labels; write `out` (model.pt) with
    `train_log.csv` and `checkpoint.pt` beside it."""
    out = Path(out)
    params = resolve_seg_params(params)  # its keys: the stage schema, checked by run_stage
    device = common.start_training(params["seed"], threads)
    idx = DatasetIndex.load(index)
    augment = SegTrainAugment(params["crop"], tuple(params["scale_range"]), flip=params["flip"])
    dataset = SegmentationDataset(idx, "train_aug", masks_dir, augment, seed=params["seed"])
    if len(dataset) < 2:
        raise DataError(f"{index}: train_aug has {len(dataset)} image(s); batch norm needs 2")
    with distributed(device) as dist:
        model = place_model(build_seg_model(params, idx.num_classes, classifier), device)
        # encoder at lr, decoder + head at lr x decoder_lr_mult
        optimizer = make_optimizer(param_groups(model, params["decoder_lr_mult"]), params["lr"],
                                   params["weight_decay"], params["momentum"], params["optimizer"])
        net = data_parallel(model, device)  # training forwards go through it
        log.info("%s/%s on %s: %d images, %d epochs, %s, crop %d, device %s, "
                 "%d process(es)", params["model"], params["encoder"], idx.name, len(dataset),
                 params["epochs"], batch_note(len(dataset), params["batch_size"], dist.world_size),
                 params["crop"], device, dist.world_size)

        def step(batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
            # dropout (DeepLabV3+ ASPP) and stochastic depth (MiT) draw from the global
            # generator; seeding it per step (and rank) makes a resumed run draw what an
            # uninterrupted one would
            torch.manual_seed(params["seed"] * 1_000_003 + ctx.step + 7919 * dist.rank)
            images = batch["image"].to(ctx.device, non_blocking=True)
            masks = batch["mask"].to(ctx.device, dtype=torch.long, non_blocking=True)
            return {"total": segmentation_loss(net(images), masks)}

        cfg = fit_config(params, "train_seg", f"train {params['model']}")
        weights = start_files(params["encoder_from"], classifier,
                              params["pretrained_file"] if params["pretrained"] else None)
        fit(dataset, cfg, step, [optimizer], model.state_dict, model.load_state_dict,
            checkpoint=out.with_name("checkpoint.pt"), log_csv=out.with_name("train_log.csv"),
            device=device, resume=resume, train_mode=lambda: train_mode(model, params["frozen_bn"]),
            fingerprint=resume_key(params, idx.num_classes, dataset.ids,
                                   files=[index, *idx.image_files("train_aug"), *dataset.mask_files(),
                                          *weights]))
        if dist.is_main:
            save_model(out, "segmentation", {k: v.detach().cpu() for k, v in model.state_dict().items()},
                       model=params["model"], encoder=params["encoder"],
                       output_stride=params["output_stride"], num_classes=idx.num_classes,
                       class_names=idx.class_names, params=params)
        finish(out.with_name("checkpoint.pt"))
    return out


def train_mode(model: nn.Module, frozen_bn: bool) -> None:
    """Put `model` in training mode; with `frozen_bn` its encoder's BatchNorm layers stay in
    eval mode, so they normalise with the pretrained running statistics and never update them
    (the affine weights still receive gradients): a batch of 8 crops gives noisy statistics."""
    model.train()
    if frozen_bn:
        batchnorm_eval(model.encoder)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("train-seg", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--masks", required=True, help="folder of pseudo-mask PNGs <id>.png")
    p.add_argument("--params", required=True, type=common.json_arg,
                   help="train_seg parameters (JSON; a config block or resolved for one model)")
    p.add_argument("--model", default=None,
                   help="architecture to resolve a config block for (default: its `model`)")
    p.add_argument("--out", required=True, help="model.pt")
    p.add_argument("--resume", action="store_true", help="continue from the last complete epoch")
    p.add_argument("--classifier", help="classifier model.pt (encoder_from: classifier)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

    def run(**kw) -> Path:
        return train_seg(params=resolve_seg_params(a.params, a.model), **kw)

    return common.run_stage(a, run, stage="train_seg", index=a.index, masks_dir=a.masks, out=a.out,
                            resume=a.resume, threads=a.threads, classifier=a.classifier)


if __name__ == "__main__":
    raise SystemExit(main())
