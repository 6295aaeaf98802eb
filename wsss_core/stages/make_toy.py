"""Stage: generate the embedded toy dataset (and optionally a picture of it).

    python -m wsss_core.stages.make_toy --out results/toy/data --seed 0 --image-size 112 \
        --num-train-aug 320 --num-train-eval 100 --num-val 80 [--grid docs/toy_grid.png]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data.palette import IGNORE, voc_palette
from ..data.toy import generate_toy
from ..errors import DataError, WSSSError
from ..io import atomic_path, read_label_png

#: how strongly the class colour covers an object in the grid picture
OVERLAY_ALPHA = 0.55


def run(out_dir: str | os.PathLike, seed: int, image_size: int, num_train_aug: int,
        num_train_eval: int, num_val: int) -> None:
    """Write the toy dataset in VOC layout to `out_dir`."""
    generate_toy(out_dir, seed=seed, image_size=image_size, num_train_aug=num_train_aug,
                 num_train_eval=num_train_eval, num_val=num_val)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with its mask blended in VOC colours; the 255 band is drawn opaque."""
    colours = voc_palette()[mask].astype(np.float32)
    out = image.astype(np.float32)
    fg = (mask != 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * colours, out)
    out[mask == IGNORE] = colours[mask == IGNORE]
    return (out + 0.5).astype(np.uint8)


def write_grid(data_dir: str | os.PathLike, grid_path: str | os.PathLike, n: int = 16,
               columns: int = 4, zoom: int = 2) -> None:
    """A picture of the first `n` train_aug images, each beside its mask overlay, with a legend.

    Tiles are enlarged `zoom` times (nearest neighbour) so the thin ignore band stays visible.
    """
    data_dir = Path(data_dir)
    list_file = data_dir / "ImageSets" / "Segmentation" / "train_aug.txt"
    names_file = data_dir / "class_names.txt"
    for f in (list_file, names_file):
        if not f.is_file():
            raise DataError(f"{f}: missing; generate the toy dataset into {data_dir} first")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()][:n]
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{list_file}: no image ids")

    tiles = []
    for image_id in ids:
        img_path = data_dir / "JPEGImages" / f"{image_id}.jpg"
        mask_path = data_dir / "SegmentationClassAug" / f"{image_id}.png"
        try:
            with Image.open(img_path) as im:
                image = np.asarray(im.convert("RGB"))
            mask = read_label_png(mask_path)
        except (OSError, ValueError) as e:
            raise DataError(f"{e}; regenerate the toy dataset") from None
        tile = np.concatenate([image, np.full((image.shape[0], 2, 3), 255, np.uint8),
                               overlay(image, mask)], axis=1)
        tiles.append(tile.repeat(zoom, axis=0).repeat(zoom, axis=1))

    pad = 6
    cell_h = max(t.shape[0] for t in tiles) + pad
    cell_w = max(t.shape[1] for t in tiles) + pad
    rows = (len(tiles) + columns - 1) // columns
    legend_h = 16
    canvas = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad + legend_h), "white")
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas.paste(Image.fromarray(tile), (pad + c * cell_w, pad + r * cell_h))
    draw = ImageDraw.Draw(canvas)
    palette = voc_palette()
    x, y = pad, rows * cell_h + pad
    for label, name in [*enumerate(names), (IGNORE, "ignore")]:
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(v) for v in palette[label]),
                       outline="black")
        draw.text((x + 13, y + 1), name, fill="black")
        x += 13 + int(draw.textlength(name)) + 10
    with atomic_path(grid_path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wsss_core.stages.make_toy",
                                description="Generate the embedded toy dataset in VOC layout.")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112, help="long side in pixels")
    p.add_argument("--num-train-aug", type=int, default=320)
    p.add_argument("--num-train-eval", type=int, default=100,
                   help="the first ids of train_aug, listed as `train`")
    p.add_argument("--num-val", type=int, default=80)
    p.add_argument("--grid", metavar="PNG", help="also write a picture of images with masks")
    p.add_argument("--grid-n", type=int, default=16, help="images in the picture")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args.out, args.seed, args.image_size, args.num_train_aug, args.num_train_eval,
            args.num_val)
        if args.grid:
            write_grid(args.out, args.grid, n=args.grid_n)
    except WSSSError as e:
        if os.environ.get("WSSS_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
