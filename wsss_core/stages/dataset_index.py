"""Stage `dataset_index`: validate every image and mask of a dataset, write index.json.

The workflow builds the index in two parts, each a job of its own whose parameters hold a
digest of the files it reads (`data.index.files_fingerprint`): `index/train.json` (train_aug and
train: what every training stage reads) and `index/val.json` (val: what the segmentation
evaluation reads), then merges them into `index.json` (the audit's). A corrected val mask
re-runs the val part and the evaluations that read it, not the classifier.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..data.index import PARTS, SPLITS, build_index, merge_index_parts
from ..io import read_json, write_json
from . import common

log = logging.getLogger("wsss")


def dataset_index(name: str, kind: str, root: str, lists: dict[str, str], out: str | Path,
                  num_classes: int | None = None, labels: str | None = None,
                  allow_split_overlap: bool = False, part: str | None = None,
                  long_side: int | None = None) -> dict:
    """Build the index of `part` (a key of PARTS; None: every split) and write it to `out`.
    Raises DataError (one line) for any missing, corrupt or inconsistent dataset file."""
    splits = PARTS[part] if part else SPLITS
    index = build_index(name, kind, root, lists, num_classes=num_classes, labels=labels,
                        allow_split_overlap=allow_split_overlap, splits=splits, long_side=long_side)
    write_json(out, index)
    counts = ", ".join(f"{s} {len(index['splits'][s])}" for s in splits)
    with_mask = sum(1 for v in index["images"].values() if v["has_mask"])
    log.info("%s: %d images (%s), %d classes, labels from %s, %d with a ground-truth mask", name,
             len(index["images"]), counts, index["num_classes"], index["labels_from"], with_mask)
    log.info("classes: %s (%s)", ", ".join(index["class_names"]),
             "class_names.txt" if (Path(root) / "class_names.txt").is_file() else
             "no class_names.txt: VOC's" if index["class_names"][:2] == ["background", "aeroplane"]
             else "no class_names.txt: named by the label table, sorted" if labels else "generic")
    if long_side:
        log.info("working resolution: long side at most %d px (images bilinear, masks nearest)",
                 long_side)
    if index["train_aug_without_foreground"]:
        log.info("%d train_aug images have no foreground class (kept; they train background only)",
                 len(index["train_aug_without_foreground"]))
    return index


def merge(parts: list[str], out: str | Path) -> dict:
    """Merge index parts (files) into one index of every split, written to `out`."""
    index = merge_index_parts([read_json(p) for p in parts])
    write_json(out, index)
    log.info("%s: merged %d index parts (%d images)", index["dataset"], len(parts), len(index["images"]))
    return index


def main(argv: list[str] | None = None) -> int:
    p = common.parser("dataset-index", __doc__)
    p.add_argument("--name", help="dataset name (the {dataset} wildcard); required unless --merge")
    p.add_argument("--kind", choices=["toy", "voc", "coco"], help="required unless --merge")
    p.add_argument("--root", help="dataset root in VOC layout; required unless --merge")
    for split in SPLITS:
        p.add_argument(f"--{split.replace('_', '-')}-list", dest=f"{split}_list", default=split,
                       help=f"list name under ImageSets/Segmentation or a path (default {split})")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--labels", default=None,
                   help="image-level label table (.csv / .json / .txt, relative to the root); "
                        "masks become optional")
    p.add_argument("--allow-split-overlap", action="store_true",
                   help="accept val ids that are also in train_aug or train")
    p.add_argument("--long-side", type=int, default=None, metavar="PX",
                   help="working resolution: every stage reads images and masks with the long "
                        "side shrunk to at most PX pixels (default: the files' size)")
    p.add_argument("--part", choices=sorted(PARTS), default=None,
                   help="index only this part's splits (default: every split)")
    p.add_argument("--merge", nargs="+", metavar="PART_JSON",
                   help="merge index parts into --out instead of reading the dataset")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.merge:
        return common.run_stage(args, merge, parts=args.merge, out=args.out)
    for key in ("name", "kind", "root"):
        if getattr(args, key) is None:
            p.error(f"--{key} is required (unless --merge)")
    lists = {s: getattr(args, f"{s}_list") for s in SPLITS}
    return common.run_stage(args, dataset_index, name=args.name, kind=args.kind, root=args.root,
                            lists=lists, out=args.out, num_classes=args.num_classes,
                            labels=args.labels, allow_split_overlap=args.allow_split_overlap,
                            part=args.part, long_side=args.long_side)


if __name__ == "__main__":
    raise SystemExit(main())
