"""Tool `convert-coco`: COCO 2014 or 2017 instances JSON + images → a VOC-layout dataset root.

Writes JPEGImages/ (hard links or copies), SegmentationClassAug/ (81-class palette PNGs),
ImageSets/Segmentation/{train_aug,train,val}.txt and class_names.txt; point a `coco` dataset's
root at --out. Crowd regions become 255 (ignore), overlapping instances keep the smaller one
on top, train images without any foreground are dropped and val is kept complete (see
wsss_core/data/coco.py).
"""
from __future__ import annotations

from ..data.coco import convert_coco
from . import common

__all__ = ["convert_coco", "main"]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("convert-coco", __doc__)
    p.add_argument("--train-json", required=True, help="instances_train2014.json")
    p.add_argument("--train-images", required=True, help="folder holding the train2014 images")
    p.add_argument("--val-json", required=True, help="instances_val2014.json")
    p.add_argument("--val-images", required=True, help="folder holding the val2014 images")
    p.add_argument("--out", required=True, help="dataset root to write (replaced as a whole)")
    p.add_argument("--train-eval", type=int, default=None,
                   help="train.txt = the first N ids of train_aug (sorted by id); default all")
    p.add_argument("--workers", type=int, default=1, help="processes rasterising masks")
    args = p.parse_args(argv)
    return common.run_stage(args, convert_coco, train_json=args.train_json,
                            train_images=args.train_images, val_json=args.val_json,
                            val_images=args.val_images, out_dir=args.out,
                            train_eval=args.train_eval, workers=args.workers)


if __name__ == "__main__":
    raise SystemExit(main())
