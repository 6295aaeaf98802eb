"""One audit panel per image: the image, its ground truth, every exported map as a heat-map per
present class, the fused seed at the evaluated threshold, the IR label, the propagated maps,
the pseudo mask and (val images) the segmentation prediction, in the VOC palette with a legend.

Label maps are drawn in the VOC colours; the ignore value 255 is drawn as a grey/white
checkerboard so it can never be mistaken for a class (VOC's own ignore colour is a pale beige
close to several textures). Each label map's title carries its mIoU on this image.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.palette import IGNORE, voc_palette
from ..errors import DataError
from ..io import atomic_path, read_json
from ..map_store import MapReader
from ..pseudo.seeds import seed_labels
from .artifacts import RunArtifacts

#: checkerboard colours of ignore pixels
IGNORE_LIGHT, IGNORE_DARK = (255, 255, 255), (150, 150, 150)
CELL_INCHES = 1.75
TOP_INCHES, LEGEND_INCHES = 0.45, 0.35
#: columns of a panel at least (label maps take the first row, heat-maps wrap below)
MIN_COLUMNS = 6


@dataclass
class LabelView:
    """A label map to draw in the palette; `miou` is its score against this image's GT."""
    title: str
    labels: np.ndarray
    miou: float | None = None


@dataclass
class HeatView:
    """A score map in [0, 1] drawn over the image."""
    title: str
    heat: np.ndarray


@dataclass
class PanelData:
    image_id: str
    split: str
    note: str
    image: np.ndarray
    labels: list[LabelView]
    heat_rows: list[tuple[str, list[HeatView]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def label_rgb(labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: VOC colours, ignore pixels as a checkerboard."""
    rgb = voc_palette()[labels]
    h, w = labels.shape
    cell = max(2, min(h, w) // 32)
    yy, xx = np.indices((h, w))
    checker = ((yy // cell + xx // cell) % 2).astype(bool)
    board = np.where(checker[..., None], np.array(IGNORE_DARK, np.uint8), np.array(IGNORE_LIGHT, np.uint8))
    return np.where((labels == IGNORE)[..., None], board, rgb)


def _unit(arr: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] (class-agnostic maps have no fixed range)."""
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _per_class_max(arr: np.ndarray) -> np.ndarray:
    """Each class map over its own maximum (propagated maps are not normalised)."""
    peak = arr.reshape(arr.shape[0], -1).max(axis=1, initial=0.0)
    return arr / np.where(peak > 0, peak, 1.0)[:, None, None]


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if arr.shape == size:
        return arr
    from skimage.transform import resize
    return resize(arr, size, order=1, mode="edge", anti_aliasing=False, preserve_range=True)


class PanelBuilder:
    """Reads one image's artifacts from a run; opens each map store once for many panels."""

    def __init__(self, run: RunArtifacts) -> None:
        self.run = run
        self._stack = contextlib.ExitStack()
        self.cams = self._open("cams.h5")
        self.seeds = self._open("seeds.h5")
        self.rw = self._open("rw.h5")
        self.threshold = run.seed_threshold()
        # without ground truth no threshold was evaluated: show the seed at the foreground
        # threshold each image's IR label used (ir_labels/thresholds.json)
        ir = run.dir / "ir_labels" / "thresholds.json"
        self.ir_thresholds = read_json(ir) if self.threshold is None and ir.is_file() else {}

    def _open(self, name: str) -> MapReader | None:
        return self._stack.enter_context(MapReader(self.run.path(name))) if self.run.has(name) else None

    def __enter__(self) -> "PanelBuilder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _class_rows(self, reader: MapReader, image_id: str, names: list[str],
                    normalise) -> list[tuple[str, list[HeatView]]]:
        idx = self.run.index
        keys = reader.keys(image_id)
        size = idx.size(image_id)
        rows, agnostic = [], []
        for name in names:
            if not reader.has(image_id, name):
                continue  # e.g. no boundary map for an image without a foreground class
            arr = reader.get(image_id, name)
            if arr.ndim != 3:
                agnostic.append(name)
            if arr.ndim == 3:
                arr = normalise(arr) if arr.shape[0] else arr
                views = [HeatView(f"{name} · {idx.class_names[k]}", np.clip(_resize(m, size), 0, 1))
                         for k, m in zip(keys, arr)]
            else:
                views = [HeatView(name, _unit(_resize(arr, size)))]
            if views:
                rows.append((name, views))
        # per-class maps first, then class-agnostic ones (attention, boundary)
        return sorted(rows, key=lambda row: row[0] in agnostic)

    def build(self, image_id: str, note: str = "") -> PanelData:
        idx = self.run.index
        if image_id not in idx.data["images"]:
            raise DataError(f"{idx.source}: no image {image_id!r} in the dataset index")
        split = next((s for s in ("train", "val", "train_aug") if image_id in set(idx.ids(s))), "?")
        # an image without a ground-truth mask is shown with its labels, without scores
        gt = idx.mask(image_id) if idx.has_mask(image_id) else None
        data = PanelData(image_id, split, note, idx.image(image_id),
                         [] if gt is None else [LabelView("ground truth", gt)])
        if gt is None:
            data.missing.append("ground truth")

        def add_label(title: str, labels: np.ndarray | None) -> None:
            if labels is None:
                if split != "val":  # val images have no seeds or masks by design
                    data.missing.append(title)
            else:
                data.labels.append(LabelView(title, labels, self.run.image_miou(labels, gt)))

        seed = None
        threshold = self.threshold
        if threshold is None and (self.ir_thresholds.get(image_id) or {}).get("fg") is not None:
            threshold = float(self.ir_thresholds[image_id]["fg"])
        if self.seeds is not None and image_id in self.seeds and threshold is not None:
            seed = seed_labels(self.seeds.get(image_id, "seed"), self.seeds.keys(image_id), threshold)
        thr = (f" (t={threshold:g})" if self.threshold is not None else
               f" (IR-label fg t={threshold:g})" if threshold is not None else "")
        add_label(f"seed{thr}", seed)
        add_label("IR label", self.run.label_png("ir_labels", image_id))
        add_label("pseudo mask", self.run.label_png("masks", image_id))
        pred = self.run.label_png("seg/pred", image_id)
        if pred is not None or split == "val":
            add_label("segmentation", pred)

        if self.cams is not None and image_id in self.cams:
            full = [n for n in self.cams.map_names if not n.endswith("_s4")]
            data.heat_rows += self._class_rows(self.cams, image_id, full, lambda a: np.clip(a, 0, 1))
        if self.rw is not None and image_id in self.rw:
            names = [n for n in ("rw", "boundary") if n in self.rw.map_names]
            data.heat_rows += self._class_rows(self.rw, image_id, names, _per_class_max)
        return data


def render_panel(data: PanelData, class_names: list[str], path: str | Path, dpi: int = 100) -> Path:
    """Draw a panel into a PNG (atomically); returns the path."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    heat = [view for _, views in data.heat_rows for view in views]
    cols = max(1 + len(data.labels), MIN_COLUMNS)
    heat_rows = -(-len(heat) // cols)  # the heat-maps wrap onto as many rows as they need
    rows = 1 + heat_rows
    height = rows * CELL_INCHES + TOP_INCHES + LEGEND_INCHES
    fig = Figure(figsize=(cols * CELL_INCHES, height), dpi=dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()

    def small_title(ax, text: str) -> None:
        ax.set_title(text, fontsize=7, pad=2)

    axes[0, 0].imshow(data.image)
    small_title(axes[0, 0], "image")
    present: set[int] = set()
    has_ignore = False
    for ax, view in zip(axes[0, 1:], data.labels):
        ax.imshow(label_rgb(view.labels), interpolation="nearest")
        score = "" if view.miou is None else f" · {view.miou:.1f}"
        small_title(ax, view.title + score)
        values = np.unique(view.labels)
        has_ignore |= bool((values == IGNORE).any())
        present |= {int(v) for v in values if v != IGNORE}
    for ax, view in zip(axes[1:].flat, heat):
        ax.imshow(data.image)
        ax.imshow(view.heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        small_title(ax, view.title)

    pal = voc_palette() / 255.0
    handles = [Patch(facecolor=pal[c], edgecolor="black", linewidth=0.3, label=class_names[c])
               for c in sorted(present) if c < len(class_names)]
    if has_ignore:
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="xxxx", label="ignore (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8) or 1, fontsize=7,
               frameon=False, borderaxespad=0.2)
    title = f"{data.image_id} ({data.split})" + (f" — {data.note}" if data.note else "")
    if data.missing:
        title += f"  [not in this run: {', '.join(data.missing)}]"
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - TOP_INCHES / height,
                        bottom=LEGEND_INCHES / height, wspace=0.06, hspace=0.22)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def write_panel(run: RunArtifacts, image_id: str, path: str | Path, note: str = "") -> Path:
    """One panel for one image of a run (`wsss audit DIR --id ID`)."""
    with PanelBuilder(run) as builder:
        return render_panel(builder.build(image_id, note), run.index.class_names, path)


def write_panels(run: RunArtifacts, items: list[tuple[str, str]], folder: str | Path) -> Iterator[Path]:
    """Panels for (image id, note) pairs into `folder/<id>.png`, reading each store once."""
    folder = Path(folder)
    with PanelBuilder(run) as builder:
        for image_id, note in items:
            yield render_panel(builder.build(image_id, note), run.index.class_names,
                               folder / f"{image_id}.png")
