"""Image-level labels from a table: what a weakly supervised dataset really ships.

A dataset entry may name a label table (`datasets.<name>.labels`, a path relative to the
dataset root or absolute) instead of deriving each image's classes from its mask. Three
formats, chosen by the file's extension:

- ``.csv``: ``id,classes`` per row; the classes separated by ``;`` or ``|`` (a comma is the
  column separator), each a class name of ``class_names.txt`` or a class id. A header
  row such as ``id,classes`` is skipped.
- ``.json``: ``{"<id>": ["dog", "person"], ...}`` (names or class ids).
- ``.txt``: the community's ``cls_labels`` text form: ``<id> <class id> <class id> ...`` per
  line, whitespace separated.

Class ids are the ids of the masks and of ``class_names.txt``: background is 0, so foreground
classes count from 1 (VOC: 1 aeroplane … 20 tvmonitor). Background is never a label. Every
bad row (an unknown name, an id out of range, background as a label, an empty label set, a
duplicate id, an unreadable row) stops with one line naming the file, the line and the fix.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from pathlib import Path

from ..errors import DataError
from ..io import read_user_text
from .voc import check_id

LABEL_FORMATS = (".csv", ".json", ".txt")
_CLASS_SEP = re.compile(r"[;|]")
#: a CSV's first row is a header when its cells are one of these (case-insensitive)
_HEADER_IDS = ("id", "image", "image_id", "filename", "file", "name")
_HEADER_CLASSES = ("classes", "class", "labels", "label", "tags")


def label_table_path(root: str | os.PathLike, name: str) -> Path:
    """The table a dataset entry names: relative to the dataset root, or absolute."""
    p = Path(name).expanduser()
    return p if p.is_absolute() else Path(root).expanduser() / p


def read_label_rows(path: str | os.PathLike) -> tuple[tuple[str, str, tuple], ...]:
    """The raw rows of a label table: (where, image id, classes as written), where = `file:line`
    (JSON: `file: entry 'id'`). Raises DataError for a missing file, an unknown format or a
    malformed row.

    A workflow start checks the table for both index parts (class names, labels, coverage):
    the parse is kept per (file, size, modification time), so the table is read once."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is None or not path.is_file():
        raise DataError(f"{path}: label table not found; fix datasets.<name>.labels (a path "
                        f"relative to the dataset root, or absolute)")
    return _parse_rows(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parse_rows(file: str, size: int, mtime_ns: int) -> tuple[tuple[str, str, tuple], ...]:
    """`read_label_rows` of an unchanged file (size and mtime are the cache key)."""
    path = Path(file)
    suffix = path.suffix.lower()
    if suffix not in LABEL_FORMATS:
        raise DataError(f"{path}: unknown label table format {path.suffix!r}; use .csv "
                        f"(id,classes), .json ({{id: [classes]}}) or .txt (id class-id ...)")
    text = read_user_text(path)
    if suffix == ".json":
        rows = _json_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        rows = [(f"{path}:{n}", parts[0], parts[1:]) for n, line in enumerate(text.splitlines(), 1)
                if (parts := line.split()) and not parts[0].startswith("#")]
    if not rows:
        raise DataError(f"{path}: label table has no rows; add one row per image")
    return tuple((where, image_id, tuple(classes)) for where, image_id, classes in rows)


def table_class_names(path: str | os.PathLike) -> list[str] | None:
    """The classes a table names when the dataset has no class_names.txt: VOC's 21 when every
    name is a VOC class, else background + the names sorted (so adding rows never renumbers
    classes); None when the table gives class ids only (then VOC's names apply)."""
    from .palette import VOC_CLASSES
    names = sorted({str(c).strip() for _, _, classes in read_label_rows(path) for c in classes
                    if not isinstance(c, int) and not str(c).strip().isdigit()})
    if not names:
        return None
    voc = {n.lower() for n in VOC_CLASSES}
    if all(n.lower() in voc for n in names):
        return list(VOC_CLASSES)
    return ["background"] + sorted({n.lower(): n for n in names}.values(), key=str.lower)


def read_label_table(path: str | os.PathLike, class_names: list[str]) -> dict[str, list[int]]:
    """Image id → sorted foreground class ids (1..C-1) from a label table.

    Args:
        path: a ``.csv``, ``.json`` or ``.txt`` table (format by extension, see the module doc).
        class_names: the dataset's C class names, background first.

    Returns:
        dict in the table's row order; every label set non-empty.

    Raises:
        DataError: one line naming the file (and line) and the fix, for a missing file, an
            unknown format, a malformed row, an unknown class, background as a label, an
            empty label set or a duplicate id.
    """
    table: dict[str, list[int]] = {}
    first_line: dict[str, str] = {}
    for where, image_id, classes in read_label_rows(path):
        check_id(image_id, where)
        if image_id in table:
            raise DataError(f"{where}: image {image_id} is listed twice (first at "
                            f"{first_line[image_id]}); keep one row per image")
        ids = sorted({_class_id(where, c, class_names) for c in classes})
        if not ids:
            raise DataError(f"{where}: image {image_id} has no class; give it at least one "
                            f"foreground class, or leave it out of the table and the lists")
        table[image_id] = ids
        first_line[image_id] = where
    return table


def _json_rows(path: Path, text: str) -> list[tuple[str, str, list]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); the table is "
                        f"{{\"<id>\": [\"<class>\", ...]}}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a JSON label table is an object {{\"<id>\": [\"<class>\", ...]}}, "
                        f"not a {type(data).__name__}")
    # a JSON object keeps no line numbers: the key names the row
    rows = []
    for image_id, classes in data.items():
        if not isinstance(classes, list):
            raise DataError(f"{path}: entry {image_id!r} is {type(classes).__name__}, not a list of "
                            f"class names or ids")
        rows.append((f"{path}: entry {image_id!r}", image_id, classes))
    # duplicate keys: json keeps the last silently; detect them from the text
    keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text)
    seen: set[str] = set()
    for k in keys:
        if k in seen and k in data:
            raise DataError(f"{path}: image {k} is listed twice; keep one entry per image")
        seen.add(k)
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, str, list]]:
    rows = []
    reader = csv.reader(io.StringIO(text))
    for cells in reader:
        n = reader.line_num
        cells = [c.strip() for c in cells]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if len(cells) != 2:
            raise DataError(f"{path}:{n}: {len(cells)} columns; a row is `id,classes` with the "
                            f"classes separated by ';' or '|' (e.g. 2007_000032,aeroplane;person)")
        image_id, field = cells
        if not rows and image_id.lower() in _HEADER_IDS and field.lower() in _HEADER_CLASSES:
            continue
        rows.append((f"{path}:{n}", image_id, [c.strip() for c in _CLASS_SEP.split(field) if c.strip()]))
    return rows


def _class_id(where: str, value, class_names: list[str]) -> int:
    """A class given by name (case-insensitive) or id → its id in 1..C-1."""
    c = len(class_names)
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit():
        k = int(text)
        if k == 0:
            raise DataError(f"{where}: class id 0 is the background, never an image label; class "
                            f"ids count from 1 as in the masks ({class_names[1]} is 1)")
        if not 0 < k < c:
            raise DataError(f"{where}: class id {k} outside 1..{c - 1} (the dataset has {c} classes "
                            f"with background); fix the row or class_names.txt")
        return k
    lower = [n.lower() for n in class_names]
    if text.lower() == lower[0]:
        raise DataError(f"{where}: {text!r} is the background class (the first name of "
                        f"class_names.txt), never an image label; remove it, or put the "
                        f"background first in class_names.txt")
    if text.lower() not in lower:
        raise DataError(f"{where}: unknown class {text!r}; use a name of class_names.txt "
                        f"({', '.join(class_names[1:4])}, ...) or a class id 1..{c - 1}")
    return lower.index(text.lower())
