"""Reader for datasets in PASCAL VOC layout (VOC 2012, COCO converted to VOC, the toy set).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClassAug/<id>.png   (or SegmentationClass/)
    <root>/ImageSets/Segmentation/<list>.txt
    <root>/class_names.txt                 (optional; VOC's 21 names otherwise)

List files hold one id per line or the two-column WSSS form
`/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`. Image-level labels are derived from the
masks, or read from a label table (`data/labels.py`) for datasets whose masks nobody drew;
then masks are optional, image by image.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..io import read_user_text
from .palette import IGNORE, VOC_CLASSES

MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
#: photo formats read: `<id>.jpg` as VOC names them, else the first of these that exists
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_id(image_id: str, source: str | os.PathLike) -> str:
    """Reject ids that could escape the dataset folder or are not plain file stems."""
    if (not image_id or "/" in image_id or "\\" in image_id or ".." in image_id
            or not _ID_RE.match(image_id)):
        raise DataError(f"{source}: invalid image id {image_id!r} (ids are plain file stems "
                        f"without path separators or '..'); fix the list file")
    return image_id


def read_list(path: str | os.PathLike) -> list[str]:
    """Ids of a list file in either the one-id or the two-column form; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: list file not found; create it or fix the list name in config.yaml")
    ids: list[str] = []
    for lineno, raw in enumerate(read_user_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        if "/" in first and first.lower().endswith((".jpg", ".jpeg", ".png")):
            first = Path(first).stem  # two-column form
        ids.append(check_id(first, f"{path}:{lineno}"))
    if not ids:
        raise DataError(f"{path}: list file is empty; it must name at least one image id")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise DataError(f"{path}: id {i} is listed twice; remove the duplicate line")
        seen.add(i)
    return ids


def read_class_names(root: Path, num_classes: int | None = None) -> list[str]:
    f = root / "class_names.txt"
    if f.is_file():
        names = [line.strip() for line in read_user_text(f).splitlines() if line.strip()]
        if len(names) < 2:
            raise DataError(f"{f}: needs background plus at least one class, one name per line")
        seen: dict[str, int] = {}
        for n, name in enumerate(names, 1):
            if name.lower() in seen:
                raise DataError(f"{f}: class {name!r} is named twice (lines {seen[name.lower()]} and "
                                f"{n}); class ids are line numbers, so each name must be unique")
            seen[name.lower()] = n
        return names
    if num_classes is None or num_classes == len(VOC_CLASSES):
        return list(VOC_CLASSES)
    return ["background"] + [f"class{i}" for i in range(1, num_classes)]


class VocLayout:
    """Paths and validated reads for one dataset root in VOC layout.

    Args:
        root: the dataset folder (JPEGImages/, SegmentationClassAug/ or SegmentationClass/,
            ImageSets/Segmentation/).
        num_classes: C with background, when there is no class_names.txt (default VOC's 21).
        require_masks: a mask folder must exist (labels come from the masks); False for
            datasets whose image-level labels come from a table (masks then optional, per image).
        class_names: the classes when the caller knows them (a label table's), else read from
            class_names.txt.

    Raises:
        DataError: the root, JPEGImages/ or (with `require_masks`) the mask folder is missing.
    """

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None,
                 require_masks: bool = True, class_names: list[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found; set datasets.<name>.root in "
                            f"config.yaml to a folder holding JPEGImages/ and SegmentationClassAug/")
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root / 'JPEGImages'}: folder missing; the root must be in VOC "
                            f"layout (JPEGImages/, SegmentationClassAug/, ImageSets/Segmentation/)")
        self.mask_dir: str | None = next((d for d in MASK_DIRS if (self.root / d).is_dir()), None)
        if self.mask_dir is None and require_masks:
            raise DataError(f"{self.root}: neither SegmentationClassAug/ nor SegmentationClass/ "
                            f"found; add the masks (labels are derived from them), or give the "
                            f"image-level labels as a table (datasets.<name>.labels)")
        self.class_names = (list(class_names) if class_names is not None
                            else read_class_names(self.root, num_classes))
        self.num_classes = len(self.class_names)

    def list_path(self, name: str) -> Path:
        return list_file(self.root, name)

    def image_path(self, image_id: str) -> Path:
        return find_image(self.root / "JPEGImages", image_id)

    def mask_path(self, image_id: str) -> Path:
        return self.root / (self.mask_dir or MASK_DIRS[0]) / f"{image_id}.png"

    def has_mask(self, image_id: str) -> bool:
        """Whether the image's ground-truth mask file exists."""
        return self.mask_dir is not None and self.mask_path(image_id).is_file()

    def read_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def read_mask(self, image_id: str, expect_size: tuple[int, int] | None = None) -> np.ndarray:
        path = self.mask_path(image_id)
        mask = read_mask(path)
        if expect_size is not None and mask.shape != tuple(expect_size):
            raise DataError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its "
                            f"image {expect_size[1]}x{expect_size[0]}; re-export the mask at image size")
        bad = (mask >= self.num_classes) & (mask != IGNORE)
        if bad.any():
            v = int(mask[bad][0])
            raise DataError(f"{path}: mask value {v} outside 0..{self.num_classes - 1} and {IGNORE}; "
                            f"fix the mask or the dataset's class list")
        return mask


def find_image(folder: Path, image_id: str) -> Path:
    """The photo of `image_id` in `folder`: `<id>.jpg` (one stat when it is there, as in VOC),
    else `<id>` with the first of IMAGE_SUFFIXES (lower or upper case) that exists, else the
    `.jpg` path (whose read then names what is missing)."""
    jpg = folder / f"{image_id}.jpg"
    if jpg.is_file():
        return jpg
    for suffix in IMAGE_SUFFIXES[1:] + tuple(s.upper() for s in IMAGE_SUFFIXES):
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return jpg


def list_file(root: str | os.PathLike, name: str) -> Path:
    """A list given by name (<root>/ImageSets/Segmentation/<name>.txt) or by path."""
    p = Path(name).expanduser()
    if p.suffix == ".txt" and (p.is_absolute() or p.exists()):
        return p
    return Path(root).expanduser() / "ImageSets" / "Segmentation" / f"{name}.txt"


def read_image(path: str | os.PathLike) -> np.ndarray:
    """RGB uint8 [H, W, 3]; a missing or corrupt file raises a DataError naming it."""
    return _decode(path, "image", "restore it or remove its id from the list",
                   lambda img: np.asarray(img.convert("RGB"), dtype=np.uint8))


def _decode(path: str | os.PathLike, what: str, fix: str,
            to_array: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """`to_array` of the fully decoded image file `path`: a missing file (`_not_found` with
    `fix`) or one PIL cannot decode raises a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise _not_found(path, what, fix)
    try:
        with Image.open(path) as img:
            img.load()
            return to_array(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable or corrupt {what} ({e}); replace the file") from None


def _not_found(path: Path, what: str, fix: str) -> DataError:
    """A missing image or mask; when the same id is there with another extension or case
    (`<id>.JPG`, `<id>.png` where `<id>.jpg` is read), the error names that file."""
    folder = path.parent
    stem = path.stem.lower()
    there = sorted(p.name for p in folder.iterdir()
                   if p.stem.lower() == stem and p.is_file()) if folder.is_dir() else []
    if there:
        return DataError(f"{path}: {what} not found, but {folder / there[0]} is there; wsss reads "
                         f"{what}s named exactly <id>{path.suffix}: rename it to {path.name} (convert "
                         f"it first if it is not a {path.suffix[1:].upper()} file)")
    return DataError(f"{path}: {what} not found; {fix}")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of an image, decoding it fully so corrupt files are caught up front."""
    img = read_image(path)
    return img.shape[0], img.shape[1]


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Class indices uint8 [H, W] of a palette or greyscale PNG."""
    def indices(img: Image.Image) -> np.ndarray:
        if img.mode not in ("P", "L"):
            raise DataError(f"{path}: mask must be a palette or greyscale PNG of class "
                            f"indices, not mode {img.mode}")
        return np.asarray(img, dtype=np.uint8).copy()

    return _decode(path, "mask", "add it (labels come from the masks)", indices)


def labels_from_mask(mask: np.ndarray, num_classes: int) -> list[int]:
    """Foreground class ids (1..C-1) present in a mask, ignoring 255."""
    present = np.unique(mask)
    return [int(c) for c in present if 0 < c < num_classes]


def multi_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Image-level label vector over the C-1 foreground classes (index c-1 for class c)."""
    v = np.zeros(num_classes - 1, dtype=np.float32)
    for c in labels:
        v[c - 1] = 1.0
    return v
