"""Atomic file output and the label-map PNG format.

Every artifact is written under a temporary name in its destination folder and renamed into
place only when complete, so an interrupted job never leaves a file that looks finished.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .data.palette import voc_palette
from .errors import DataError


def output_mode(folder: bool = False) -> int:
    """The permission bits a plain `open()` (or `mkdir`) would give under the user's umask:
    mkstemp/mkdtemp create 0600/0700, which colleagues on a shared cluster cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def temporary_names(path: str | os.PathLike) -> re.Pattern:
    """The names `atomic_path`, `atomic_dir` and MapWriter give the temporaries of `path`."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.[A-Za-z0-9_]{{8}}\.tmp")


_ANY_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete temporaries of `path` left by a killed earlier run (one output is written by one
    job at a time, so any temporary of it found when the job starts is stale)."""
    path = Path(path)
    if not path.parent.is_dir() or _ANY_TEMPORARY.match(path.parent.name):
        return  # a temporary folder of this run (one PNG of thousands) holds nothing stale
    pattern = temporary_names(path)
    for stale in path.parent.iterdir():
        if pattern.match(stale.name):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def temporary_file(path: Path, suffix: str = "") -> Path:
    """A new empty temporary file beside `path` (stale ones of earlier runs removed first), with
    the permissions the umask gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.fchmod(fd, output_mode())
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    tmp_path = temporary_file(Path(path), suffix)
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
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(output_mode(folder=True))
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


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def read_user_text(path: str | os.PathLike) -> str:
    """A text file a user wrote (id lists, class names, configs): UTF-8, or the encoding its
    byte-order mark names (UTF-8 with BOM, Notepad's default; UTF-16/32), newlines universal.
    Raises DataError naming the file when it is not text in one of those encodings."""
    data = Path(path).read_bytes()
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not readable as {encoding.upper()} text (byte {e.start}: "
                        f"{e.reason}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


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
