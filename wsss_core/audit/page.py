"""The audit page of a run: results/{dataset}/{method}/audit/index.html, static HTML with
relative image links (opens from disk):

- a sample of panels: the worst and best evaluated train images by pseudo-mask IoU, a fixed
  random sample of the other train images, a fixed random sample of val images;
- per-class IoU (and FP/TP) of seeds, IR labels, masks and segmentation side by side;
- the seed background-threshold sweep and the mask alpha / bg sweep;
- the confusion matrices as images;
- the FP/TP confusion ratio of the most co-occurring class pairs (docs/algorithms.md §audit): for the pair
  (a, b), the pixels of ground-truth b predicted as a over a's true positives, and vice versa.
"""
from __future__ import annotations

import html
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.index import DatasetIndex
from ..io import atomic_dir
from ..metrics import ConfusionMatrix
from .artifacts import METRIC_FILES, RunArtifacts
from .compare import MISSING, MethodRecord, Table, fmt, miou_cell, percent, scored, summary_table
from .panels import write_panels
from .plots import plot_confusions, plot_sweeps

DEFAULT_PARAMS = {"worst": 4, "best": 4, "random": 4, "val": 4, "pairs": 5, "seed": 0}


@dataclass(frozen=True)
class SampleItem:
    image_id: str
    group: str  # worst / best / random / val
    score: float | None  # pseudo-mask mIoU of the image (percent), None for val images


def choose_sample(mask_ious: dict[str, float], train_ids: list[str], val_ids: list[str],
                  params: dict) -> list[SampleItem]:
    """Worst and best images by mask IoU (ties broken by id), then seeded random samples."""
    ranked = sorted(mask_ious, key=lambda i: (mask_ious[i], i))
    worst = ranked[: params["worst"]]
    best = [i for i in reversed(ranked) if i not in set(worst)][: params["best"]]
    chosen = set(worst) | set(best)
    rest = [i for i in train_ids if i not in chosen]
    rng = np.random.default_rng(params["seed"])
    random = [rest[k] for k in rng.choice(len(rest), size=min(params["random"], len(rest)), replace=False)]
    val = [val_ids[k] for k in rng.choice(len(val_ids), size=min(params["val"], len(val_ids)), replace=False)]
    return ([SampleItem(i, "worst", mask_ious[i]) for i in worst]
            + [SampleItem(i, "best", mask_ious[i]) for i in best]
            + [SampleItem(i, "random", mask_ious.get(i)) for i in random]
            + [SampleItem(i, "val", None) for i in val])


def cooccurring_pairs(index: DatasetIndex, split: str, top: int) -> list[tuple[int, int, int]]:
    """(a, b, images with both) for the `top` foreground pairs most often labelled together."""
    ids = index.ids(split)
    if not ids or top <= 0:
        return []
    labels = np.stack([index.label_vector(i) for i in ids]).astype(np.int64)  # (N, C-1)
    together = labels.T @ labels
    a, b = np.triu_indices(together.shape[0], k=1)
    counts = together[a, b]
    order = np.lexsort((b, a, -counts))[:top]  # most images first, then by class id
    return [(int(a[k]) + 1, int(b[k]) + 1, int(counts[k])) for k in order if counts[k] > 0]


def confusion_of(report: dict) -> ConfusionMatrix:
    matrix = np.asarray(report["confusion"], dtype=np.int64)
    cm = ConfusionMatrix(matrix.shape[0])
    cm.matrix = matrix
    cm.images = int(report.get("images", 0))
    return cm


def pair_table(pairs: list[tuple[int, int, int]], reports: dict[str, dict | None],
               class_names: list[str]) -> Table:
    present = {k: r for k, r in reports.items() if scored(r) is not None and r.get("confusion")}
    header = ["images with both"]
    for key in present:
        header += [f"{METRIC_FILES[key][1]}: a on b", f"{METRIC_FILES[key][1]}: b on a"]
    table = Table(header)
    cms = {k: confusion_of(r) for k, r in present.items()}
    for a, b, count in pairs:
        cells = [str(count)]
        for cm in cms.values():
            for cls, other in ((a, b), (b, a)):
                v = cm.pair_confusion(cls, other)
                cells.append(fmt(v if np.isfinite(v) else None, 3))
        table.add("pairs", f"a={class_names[a]}, b={class_names[b]}", cells)
    return table


def per_class_table(reports: dict[str, dict | None], class_names: list[str]) -> Table:
    keys = list(METRIC_FILES)
    header = [f"{METRIC_FILES[k][1]} IoU" for k in keys] + [f"{METRIC_FILES[k][1]} FP/TP" for k in keys]
    table = Table(header)
    table.add("mIoU", "mIoU", [miou_cell(reports[k]) for k in keys] +
              [fmt(reports[k].get("fp_tp_overall"), 3) if scored(reports[k]) else MISSING for k in keys])
    for c in class_names:
        table.add("classes", c,
                  [fmt(percent(reports[k]["iou"].get(c))) if scored(reports[k]) else MISSING for k in keys]
                  + [fmt(reports[k]["fp_tp"].get(c), 3) if scored(reports[k]) else MISSING for k in keys])
    return table


PAGE_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; }
td { text-align: right; font-variant-numeric: tabular-nums; }
th { text-align: left; font-weight: normal; }
thead th { font-weight: bold; background: #eee; }
tr.section th { background: #f5f5f5; font-weight: bold; }
img { max-width: 100%; }
figure { margin: 0 0 1.5em; }
figcaption { font-size: 13px; color: #555; }
nav a { margin-right: 1em; }
"""

GROUP_TEXT = {
    "worst": "Worst evaluated train images by pseudo-mask mIoU",
    "best": "Best evaluated train images by pseudo-mask mIoU",
    "random": "Fixed random sample of the other evaluated train images",
    "val": "Fixed random sample of val images (segmentation prediction)",
}


def _img(src: str, alt: str) -> str:
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="eager">'


def page_html(run: RunArtifacts, sample: list[SampleItem], reports: dict[str, dict | None],
              pairs: Table, pair_split: str) -> str:
    names = run.index.class_names
    e = html.escape
    title = f"audit: {run.dataset} / {run.method}"
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{PAGE_CSS}</style></head><body><h1>{e(title)}</h1>",
             '<nav><a href="#metrics">metrics</a><a href="#sweeps">sweeps</a>'
             '<a href="#confusion">confusion</a><a href="#pairs">co-occurrence</a>'
             '<a href="#panels">panels</a></nav>',
             '<h2 id="metrics">Summary</h2>', summary_table(MethodRecord.read(run.dir), names, per_class=False).html(""),
             "<h2>Per-class IoU (%) and FP/TP</h2>",
             "<p>FP/TP: a class's false-positive pixels over its true positives (the confusion "
             "ratio); seeds, IR labels and masks on the evaluated train split, segmentation on val. "
             "The mIoU row's FP/TP is the foreground total.</p>",
             per_class_table(reports, names).html("class"),
             '<h2 id="sweeps">Threshold sweeps</h2>',
             f"<figure>{_img('sweeps.png', 'threshold sweeps')}<figcaption>Left: seed mIoU against "
             "the constant background threshold (red: the one the seeds are scored and drawn at). "
             "Right: pseudo-mask mIoU against the mask rule's threshold, without CRF.</figcaption></figure>",
             '<h2 id="confusion">Confusion matrices</h2>',
             f"<figure>{_img('confusion.png', 'confusion matrices')}<figcaption>Rows: ground truth, "
             "columns: prediction, each row over its pixel count.</figcaption></figure>",
             '<h2 id="pairs">Co-occurring class pairs</h2>',
             f"<p>The class pairs labelled together most often ({e(pair_split)} image labels). "
             "<i>a on b</i>: pixels of ground-truth b predicted as a, over a's true positives "
             "(docs/algorithms.md); high values mean a's activation spills onto its usual companion.</p>",
             pairs.html("pair") if pairs.rows else "<p>No class pair occurs together.</p>",
             '<h2 id="panels">Panels</h2>',
             "<p>Each panel: image, ground truth, fused seed at the evaluated threshold, IR label "
             "(checkerboard: ignore), pseudo mask, segmentation prediction (val), then one row per "
             "exported map with a heat-map per present class (and the random-walk maps). Titles of "
             "label maps give their mIoU on that image.</p>"]
    for group in GROUP_TEXT:
        items = [s for s in sample if s.group == group]
        if not items:
            continue
        parts.append(f"<h3>{e(GROUP_TEXT[group])}</h3>")
        for s in items:
            score = "" if s.score is None else f" — mask mIoU {s.score:.1f}"
            parts.append(f"<figure>{_img(f'panels/{s.image_id}.png', s.image_id)}"
                         f"<figcaption>{e(s.image_id)}{e(score)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_audit(run: RunArtifacts, params: dict, out_dir: str | Path) -> Path:
    """Write the page, its figures, the panels and copies of the metric files into `out_dir`
    (replaced as a whole, so no panel of an older sample is left behind)."""
    params = {**DEFAULT_PARAMS, **params}
    idx = run.index
    split = (run.metrics("mask") or {}).get("split", "train")
    sample = choose_sample(run.mask_ious(split), idx.ids(split), idx.ids("val") if run.has("seg/pred") else [],
                           params)
    reports = {k: run.metrics(k) for k in METRIC_FILES}
    pairs = cooccurring_pairs(idx, "train_aug", params["pairs"])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "panels").mkdir()
        (tmp / "metrics").mkdir()
        for name in [f for f, _ in METRIC_FILES.values()] + ["mask_sweep.json"]:
            if run.has(name):
                shutil.copyfile(run.path(name), tmp / "metrics" / name)
        plot_sweeps(reports["seed"], run.mask_sweep(), reports["mask"], tmp / "sweeps.png")
        plot_confusions({METRIC_FILES[k][1]: r for k, r in reports.items()}, idx.class_names,
                        tmp / "confusion.png")
        notes = [(s.image_id, s.group if s.score is None else f"{s.group}, mask mIoU {s.score:.1f}")
                 for s in sample]
        for _ in write_panels(run, notes, tmp / "panels"):
            pass
        (tmp / "index.html").write_text(
            page_html(run, sample, reports, pair_table(pairs, reports, idx.class_names), "train_aug"))
    return out_dir / "index.html"
