"""Stage `dataset_index`: validate every image and mask of a dataset, write index.json."""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.index import SPLITS, build_index
from ..io import write_json
from . import common

log = logging.getLogger("wsss")


def dataset_index(name: str, kind: str, root: str, lists: dict[str, str], out: str | Path,
                  num_classes: int | None = None) -> dict:
    index = build_index(name, kind, root, lists, num_classes=num_classes)
    write_json(out, index)
    counts = ", ".join(f"{s} {len(index['splits'][s])}" for s in SPLITS)
    log.info("%s: %d images (%s), %d classes", name, len(index["images"]), counts, index["num_classes"])
    if index["train_aug_without_foreground"]:
        log.info("%d train_aug images have no foreground class (kept; they train background only)",
                 len(index["train_aug_without_foreground"]))
    return index


def main(argv: list[str] | None = None) -> int:
    p = common.parser("dataset-index", __doc__)
    p.add_argument("--name", required=True, help="dataset name (the {dataset} wildcard)")
    p.add_argument("--kind", required=True, choices=["toy", "voc", "coco"])
    p.add_argument("--root", required=True, help="dataset root in VOC layout")
    for split in SPLITS:
        p.add_argument(f"--{split.replace('_', '-')}-list", dest=f"{split}_list", default=split,
                       help=f"list name under ImageSets/Segmentation or a path (default {split})")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    lists = {s: getattr(args, f"{s}_list") for s in SPLITS}
    return common.run_stage(args, dataset_index, name=args.name, kind=args.kind, root=args.root,
                            lists=lists, out=args.out, num_classes=args.num_classes)


if __name__ == "__main__":
    raise SystemExit(main())
