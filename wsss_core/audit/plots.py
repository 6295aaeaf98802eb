"""The page's figures: threshold sweeps and confusion matrices (matplotlib, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_path


def _save(fig, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _curve(curve: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    pairs = sorted((float(k), float("nan") if v is None else float(v)) for k, v in curve.items())
    x, y = zip(*pairs) if pairs else ((), ())
    return np.asarray(x), np.asarray(y)


def plot_sweeps(seed_report: dict | None, mask_sweep: dict | None, mask_report: dict | None,
                path: str | Path) -> Path:
    """Seed mIoU against the background threshold, mask mIoU against alpha / bg."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    left, right = fig.subplots(1, 2)
    if seed_report and seed_report.get("no_ground_truth"):
        left.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=left.transAxes)
    elif seed_report and seed_report.get("curve"):
        x, y = _curve(seed_report["curve"])
        left.plot(x, y, marker=".", color="tab:blue")
        t = seed_report["threshold"]
        left.axvline(t, color="tab:red", linestyle="--", linewidth=1)
        left.annotate(f"t={t:g}: {seed_report['miou']:.2f}", (t, seed_report["miou"]),
                      textcoords="offset points", xytext=(5, -12), fontsize=8, color="tab:red")
    else:
        left.text(0.5, 0.5, "no seed_metrics.json", ha="center", va="center", transform=left.transAxes)
    left.set(title="seeds: background threshold", xlabel="threshold", ylabel="mIoU (%)")
    if mask_sweep and mask_sweep.get("no_ground_truth"):
        right.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=right.transAxes)
        right.set(title="pseudo masks: threshold sweep")
    elif mask_sweep and mask_sweep.get("curve"):
        x, y = _curve(mask_sweep["curve"])
        name = mask_sweep.get("parameter", "threshold")
        right.plot(x, y, marker=".", color="tab:green", label="sweep (no CRF)")
        right.axvline(mask_sweep["best"], color="tab:red", linestyle="--", linewidth=1,
                      label=f"best {name}={mask_sweep['best']:g}: {mask_sweep['best_miou']:.2f}")
        if mask_sweep.get("configured") is not None:
            right.axvline(mask_sweep["configured"], color="grey", linestyle=":", linewidth=1,
                          label=f"configured {name}={mask_sweep['configured']:g}")
        if mask_report is not None and mask_report.get("miou") is not None:
            right.axhline(mask_report["miou"], color="tab:purple", linewidth=1,
                          label=f"written masks: {mask_report['miou']:.2f}")
        right.legend(fontsize=7, loc="lower center")
        right.set(title=f"pseudo masks: {name} ({mask_sweep.get('rule', '')} rule)", xlabel=name)
    else:
        right.text(0.5, 0.5, "no mask_sweep.json", ha="center", va="center", transform=right.transAxes)
        right.set(title="pseudo masks: threshold sweep")
    right.set_ylabel("mIoU (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each ground-truth row over its pixel count (rows without pixels stay zero)."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    return m / np.where(rows > 0, rows, 1.0)


def plot_confusions(reports: dict[str, dict | None], class_names: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrices (ground truth × prediction) side by side."""
    from matplotlib.figure import Figure

    present = {k: r for k, r in reports.items()
               if r is not None and r.get("confusion") and r.get("miou") is not None}
    c = len(class_names)
    ncols = min(max(len(present), 1), 2)
    nrows = -(-max(len(present), 1) // ncols)
    cell = max(3.6, 0.24 * c + 1.8)
    fig = Figure(figsize=(cell * ncols + 1.0, cell * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes:
        ax.set_axis_off()
    if not present:
        no_gt = any(r is not None and r.get("no_ground_truth") for r in reports.values())
        axes[0].text(0.5, 0.5, "no ground truth" if no_gt else "no metric reports", ha="center",
                     va="center")
    image = None
    for k, (ax, (label, report)) in enumerate(zip(axes, present.items())):
        ax.set_axis_on()
        m = row_normalised(np.asarray(report["confusion"]))
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"{label} ({report.get('split', '')}, mIoU {report['miou']:.2f})", fontsize=9)
        ax.set_xticks(range(c), class_names, rotation=90, fontsize=6)
        ax.set_yticks(range(c), class_names if k % ncols == 0 else [], fontsize=6)
        ax.set_xlabel("prediction", fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("ground truth", fontsize=8)
        if c <= 12:  # the numbers stay readable only on small label sets
            for (i, j), v in np.ndenumerate(m):
                if v >= 0.005:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                            color="black" if v > 0.6 else "white")
    if image is not None:
        fig.colorbar(image, ax=list(axes), shrink=0.6, label="fraction of the GT row")
    return _save(fig, path)
