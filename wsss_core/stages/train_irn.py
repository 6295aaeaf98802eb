"""Stage `train_irn`: train IRN's boundary and displacement branches on the IR labels.

The backbone is frozen (docs/algorithms.md §irn): ImageNet weights in the paper presets, or — for presets
trained from scratch, where no ImageNet weights exist — the trained classifier's CNN backbone
(`backbone_from: classifier`), so that the boundary branch reads features that mean something.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..data.datasets import IRNDataset
from ..data.index import DatasetIndex
from ..engine import (batch_note, data_parallel, distributed, finish, fit, fit_config, resume_key,
                      start_files)
from ..errors import ConfigError
from ..engine import StepContext
from ..methods import classifier_backbone_state
from ..models.irn import IRN, affinity_displacement_loss
from ..ops.path_index import PathIndex, affinity_labels
from ..optim import make_optimizer
from ..precision import place_model
from . import common

log = logging.getLogger("wsss")


def build_irn(params: dict, classifier: str | Path | None = None) -> IRN:
    source = params["backbone_from"]
    model = IRN(params["backbone"], strides=tuple(params["strides"]),
                pretrained=source == "imagenet", pretrained_file=params.get("pretrained_file"),
                train_backbone=params["train_backbone"])
    if source == "classifier":
        if classifier is None:
            raise ConfigError("config key train_irn.backbone_from: 'classifier' needs the classifier model")
        try:
            model.backbone.load_state_dict(classifier_backbone_state(classifier))
        except RuntimeError as e:
            raise ConfigError(f"config key train_irn.backbone: {params['backbone']!r} does not match "
                              f"the classifier's CNN backbone ({str(e).splitlines()[0]})") from None
    return model


def train_irn(index: str | Path, labels: str | Path, params: dict, out: str | Path,
              classifier: str | Path | None = None, resume: bool = False,
              threads: int | None = None) -> Path:
    out = Path(out)
    device = common.start_training(params["seed"], threads)
    idx = DatasetIndex.load(index)
    with distributed(device) as dist:
        model = place_model(build_irn(params, classifier), device)
        edge, disp, backbone = model.param_groups()
        groups = [{"params": edge, "lr_mult": 1.0}, {"params": disp, "lr_mult": 10.0}]
        if backbone:
            groups.append({"params": backbone, "lr_mult": params["backbone_lr_mult"]})
        opt = make_optimizer(groups, params["lr"], params["weight_decay"], params["momentum"],
                             params["optimizer"])
        net = data_parallel(model, device)  # training forwards go through it
        dataset = IRNDataset(idx, "train_aug", str(labels), params["crop"], params["scale_range"],
                             seed=params["seed"])
        grid = (params["crop"] - 1) // 4 + 1
        path_index = PathIndex(params["radius"], (grid, grid))
        log.info("IRN (%s) on %d images, %s, crop %d, radius %d: %d directions x %d sources, "
                 "%d process(es)", params["backbone"], len(dataset),
                 batch_note(len(dataset), params["batch_size"], dist.world_size), params["crop"],
                 params["radius"], path_index.n_dirs, path_index.n_src, dist.world_size)

        def step(batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
            x = batch["image"].to(ctx.device, non_blocking=True)
            label = batch["label"].to(ctx.device, non_blocking=True)
            bg_pos, fg_pos, neg = affinity_labels(label, path_index, num_valid=idx.num_classes)
            edge_logits, displacement = net(x)
            return affinity_displacement_loss(edge_logits, displacement, bg_pos, fg_pos, neg,
                                              path_index)

        cfg = fit_config(params, "train_irn", "train irn")
        weights = start_files(params["backbone_from"], classifier, params.get("pretrained_file")
                              if params["backbone_from"] == "imagenet" else None)
        fit(dataset, cfg, step, [opt], model.state_dict, model.load_state_dict,
            checkpoint=out.with_name("checkpoint.pt"), log_csv=out.with_name("train_log.csv"),
            device=device, resume=resume, train_mode=model.train,
            fingerprint=resume_key(params, idx.ids("train_aug"),
                                   files=[index, labels, *idx.image_files("train_aug"),
                                          *weights]))
        if dist.is_main:
            save_model(out, "irn", model.state_dict(), params=params)
        finish(out.with_name("checkpoint.pt"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("train-irn", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--labels", required=True, help="ir_labels/ folder")
    p.add_argument("--classifier", help="classifier model.pt (backbone_from: classifier)")
    p.add_argument("--params", required=True, type=common.json_arg)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return common.run_stage(a, train_irn, stage="train_irn",
                            index=a.index, labels=a.labels, params=a.params, out=a.out,
                            classifier=a.classifier, resume=a.resume, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
