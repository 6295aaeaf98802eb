"""`wsss results-table`: collect the metric and benchmark files of a results folder into a
Markdown table (seed / IR-label / mask / seg mIoU and each stage's wall time), optionally
written between the markers of a README so the published numbers are never typed by hand."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..audit.artifacts import BENCHMARK_RULES, read_benchmark
from ..audit.compare import NO_GT, dataset_index_data
from ..errors import DataError
from ..io import write_text
from ..metrics import read_miou
from . import common

#: the timed stages of the table: the benchmarked rules but the mask sweep (a diagnostic)
STAGES = tuple(r for r in BENCHMARK_RULES if r != "sweep_masks")


def paper_voc() -> dict[str, dict]:
    """Published VOC 2012 numbers each registered method declares (`Method.published`)."""
    from ..methods import list_methods, method_class
    return {m: method_class(m).published for m in list_methods() if method_class(m).published}


def _miou(path: Path) -> float | str | None:
    """The mIoU of a `*_miou.txt`, NO_GT when it says `no ground truth`, None when absent."""
    if not path.is_file():
        return None
    value = read_miou(path)
    return NO_GT if value is None else value


def _ir_miou(path: Path) -> float | str | None:
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return NO_GT if report.get("no_ground_truth") else report["miou"]


def _seconds(bench: Path) -> float | None:
    record = read_benchmark(bench)
    return None if record is None else record.seconds


def _total_seconds(benches: list[Path]) -> float | None:
    """Summed wall time of a stage run as several jobs (the index's parts and their merge);
    None when none of them was benchmarked."""
    seconds = [t for t in (_seconds(b) for b in benches) if t is not None]
    return sum(seconds) if seconds else None


def methods_with_results(results: Path, dataset: str) -> list[str]:
    """The method folders of results/<dataset> that hold a seed mIoU, sorted."""
    return sorted(p.parent.name for p in (Path(results) / dataset).glob("*/seed_miou.txt"))


def collect(results: Path, dataset: str, methods: list[str] | None) -> list[dict]:
    rows = []
    methods = methods or methods_with_results(results, dataset)
    for m in methods:
        base = results / dataset / m
        if not base.is_dir():
            raise DataError(f"{base}: no results for method {m}; run snakemake {base}/seg_miou.txt")
        row = {"method": m, "seed": _miou(base / "seed_miou.txt"),
               "ir_label": _ir_miou(base / "ir_label_metrics.json"),
               "mask": _miou(base / "mask_miou.txt"), "seg": _miou(base / "seg_miou.txt"),
               "seconds": {s: _seconds(base / "benchmarks" / f"{s}.tsv") for s in STAGES}}
        rows.append(row)
    return rows


def _fmt(v: float | str | None, digits: int = 2) -> str:
    if isinstance(v, str):
        return v
    return "–" if v is None else f"{v:.{digits}f}"


def markdown(rows: list[dict], dataset: str, shared: dict[str, float | None], voc_reference: bool = True) -> str:
    """The table's Markdown; `voc_reference`: append the papers' PASCAL VOC 2012 numbers (left
    out for a COCO dataset, which they do not describe)."""
    lines = ["| method | seed mIoU | IR-label mIoU | mask mIoU | seg mIoU |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_fmt(r['seed'])} | {_fmt(r['ir_label'])} | {_fmt(r['mask'])} "
                     f"| {_fmt(r['seg'])} |")
    lines += ["", "Wall time of each stage in seconds (Snakemake benchmark files):", "",
              "| method | " + " | ".join(STAGES) + " | total |", "|---" * (len(STAGES) + 2) + "|"]
    for r in rows:
        secs = [r["seconds"][s] for s in STAGES]
        total = sum(s for s in secs if s is not None)
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(s, 0) for s in secs) + f" | {total:.0f} |")
    data = ", ".join(f"{k} {_fmt(v, 0)} s" for k, v in shared.items())
    lines += ["", f"Shared by all methods: {data}."]
    if not voc_reference:
        return "\n".join(lines) + "\n"
    lines += ["", "For reference only, the papers' PASCAL VOC 2012 numbers (seeds and masks on `train`, "
              "segmentation DeepLabV3+ ResNet-101 on `val`) — not produced by this repository:", "",
              "| method | seed mIoU | mask mIoU | seg mIoU | source | protocol |", "|---|---|---|---|---|---|"]
    for m, p in paper_voc().items():
        lines.append(f"| {m} (paper) | {_fmt(p['seed'], 1)} | {_fmt(p['mask'], 1)} | {_fmt(p['seg'], 1)} "
                     f"| {p['source']} | {p.get('protocol', '')} |")
    return "\n".join(lines) + "\n"


def results_table(results: str | Path, dataset: str, methods: list[str] | None, out: str | Path | None = None,
                  readme: str | Path | None = None) -> str:
    results = Path(results)
    rows = collect(results, dataset, methods)
    bench = results / dataset / "benchmarks"
    kind = (dataset_index_data(results, dataset) or {}).get("kind")  # toy, voc, coco; None: no index yet
    shared = {"make_toy": _seconds(bench / "make_toy.tsv")} if kind in (None, "toy") else {}
    shared["dataset_index"] = _total_seconds(sorted(bench.glob("dataset_index_*.tsv")))
    table = markdown(rows, dataset, shared, voc_reference=kind != "coco")
    if out:
        write_text(out, table)
    if readme:
        start, end = f"<!-- results:{dataset}:start -->", f"<!-- results:{dataset}:end -->"
        text = Path(readme).read_text()
        if start not in text or end not in text:
            raise DataError(f"{readme}: markers {start} / {end} not found; add them where the table goes")
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{table}{end}", text,
                      flags=re.S)
        write_text(readme, text)
    print(table, end="")
    return table


def main(argv: list[str] | None = None) -> int:
    p = common.parser("results-table", __doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--methods", nargs="+", help="default: every method with results")
    p.add_argument("--out", help="write the Markdown table to this file")
    p.add_argument("--readme", help="replace the table between <!-- results:DATASET:start/end --> markers")
    a = p.parse_args(argv)
    return common.run_stage(a, results_table, results=a.results, dataset=a.dataset, methods=a.methods,
                            out=a.out, readme=a.readme)


if __name__ == "__main__":
    raise SystemExit(main())
