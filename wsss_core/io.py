"""Atomic file output and the label-map PNG format.

Every artifact is written under a temporary name in its destination folder and renamed into
place only when complete, so an interrupted job never leaves a file that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .data.palette import voc_palette


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def label_image(labels: np.ndarray) -> Image.Image:
    """A uint8 label map as a palette ('P' mode) image in VOC colours."""
    if labels.dtype != np.uint8:
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError("label values must lie in 0..255")
        labels = labels.astype(np.uint8)
    img = Image.fromarray(labels, mode="P")
    img.putpalette(voc_palette().reshape(-1).tolist())
    return img


def save_label_png(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label map as a palette PNG (readable by every VOC tool), atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        label_image(labels).save(tmp, format="PNG")


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read a palette PNG as its raw indices (uint8), never converting colours."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: label PNG must be palette or greyscale, not {img.mode}")
        return np.asarray(img, dtype=np.uint8).copy()
