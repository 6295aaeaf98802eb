"""Stage `train_classifier`: train a method's classifier on train_aug with image labels."""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.datasets import ClassificationDataset
from ..data.index import DatasetIndex
from ..checkpoint import fingerprint, pretrained_blocks, save_model
from ..engine import batch_note, data_parallel, distributed, finish, fit, fit_config, resume_key
from ..methods import create_method
from . import common

log = logging.getLogger("wsss")


def train_classifier(index: str | Path, method: dict, params: dict, out: str | Path,
                     resume: bool = False, threads: int | None = None) -> Path:
    """Train and write `out` (model.pt) with `train_log.csv` and `checkpoint.pt` beside it.
    Under torchrun each process trains on its share of every batch; rank 0 writes."""
    out = Path(out)
    device = common.start_training(params["seed"], threads)
    idx = DatasetIndex.load(index)
    with distributed(device) as dist:
        model = create_method(method, idx.num_classes, train_params=params).to(device)
        optimizers = model.optimizers(params["lr"], params["weight_decay"], params["momentum"],
                                      params["optimizer"])
        model.distribute(lambda m: data_parallel(m, device, model.partial_losses))
        extra = model.extra_input_fns()
        if set(extra) != set(model.extra_inputs):
            raise ValueError(f"method {model.name!r}: extra_input_fns gives {sorted(extra)}, "
                             f"extra_inputs declares {sorted(model.extra_inputs)} (a bug in the plug-in)")
        # computed once per image, beside the model, under the settings they were made with
        cache = out.parent / "extra_inputs" / fingerprint(method)[:16] if extra else None
        dataset = ClassificationDataset(idx, "train_aug", params["crop"], params["scale_range"],
                                        seed=params["seed"], extra=extra, extra_cache=cache,
                                        views=model.train_views())
        log.info("%s on %s: %d images, %d epochs, %s, device %s, %d process(es)",
                 method["plugin"], idx.name, len(dataset), params["epochs"],
                 batch_note(len(dataset), params["batch_size"], dist.world_size), device, dist.world_size)
        cfg = fit_config(params, "train_classifier", f"train {method['plugin']}")
        fit(dataset, cfg, model.training_step, optimizers, model.state_dict, model.load_state_dict,
            checkpoint=out.with_name("checkpoint.pt"), log_csv=out.with_name("train_log.csv"),
            device=device, resume=resume, after_step=model.after_step, train_mode=model.train,
            fingerprint=resume_key(method, params, idx.ids("train_aug"),
                                   files=[index, *idx.image_files("train_aug"),
                                          *_weight_files(method)]))
        if dist.is_main:
            save_model(out, "classifier", model.state_dict(), method=method,
                       num_classes=idx.num_classes, train_params=params)
        finish(out.with_name("checkpoint.pt"))
    return out


def _weight_files(method: dict) -> list[str]:
    """ImageNet weight files a method's blocks name (`pretrained_file`): the run starts from them."""
    return [b["pretrained_file"] for b in pretrained_blocks(method)
            if b.get("pretrained") and b.get("pretrained_file")]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("train-classifier", __doc__)
    p.add_argument("--index", required=True)
    p.add_argument("--method", required=True, type=common.json_arg, help="resolved method block (JSON)")
    p.add_argument("--params", required=True, type=common.json_arg, help="stage parameters (JSON)")
    p.add_argument("--out", required=True, help="model.pt")
    p.add_argument("--resume", action="store_true", help="continue from the last complete epoch")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    return common.run_stage(a, train_classifier, stage="train_classifier",
                            index=a.index, method=a.method, params=a.params,
                            out=a.out, resume=a.resume, threads=a.threads)


if __name__ == "__main__":
    raise SystemExit(main())
