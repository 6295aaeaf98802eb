"""Metric tables of results folders: one method (`wsss summary`) or all methods of a dataset
(results/{dataset}/comparison.md / .html).

Every number is the metric file's own value with two decimals (the `*_miou.txt` format), so
a table can be checked against the files it was read from; per-class IoU is shown in percent.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from ..io import read_json
from .artifacts import BENCHMARK_RULES, METRIC_FILES, Benchmark, read_benchmark

MISSING = "–"
#: the cell of a metric whose split has no ground-truth mask (the `no ground truth` of *_miou.txt)
NO_GT = "no ground truth"


def scored(report: dict | None) -> dict | None:
    """`report` when it holds scores, None when absent or written for a split without ground
    truth (`"no_ground_truth": true`, `"miou": null`)."""
    return None if not report or report.get("no_ground_truth") or report.get("miou") is None else report


def miou_cell(report: dict | None) -> str:
    """The mIoU cell of a metric report: two decimals, `no ground truth`, or `–` (not produced)."""
    if report is None:
        return MISSING
    return NO_GT if report.get("no_ground_truth") else fmt(report.get("miou"))


def sweep_cell(sweep: dict | None) -> str:
    """`alpha=0.3: 61.20` for a mask sweep's arg-max, `no ground truth`, or `–`."""
    if sweep is None:
        return MISSING
    if sweep.get("no_ground_truth") or sweep.get("best") is None:
        return NO_GT
    return f"{sweep['parameter']}={sweep['best']:g}: {sweep['best_miou']:.2f}"


@dataclass
class MethodRecord:
    """What one results/{dataset}/{method} folder holds: metric reports and benchmarks."""
    method: str
    metrics: dict[str, dict | None]
    benchmarks: dict[str, Benchmark | None]
    sweep: dict | None = None

    @classmethod
    def read(cls, run_dir: str | Path) -> "MethodRecord":
        run_dir = Path(run_dir)

        def load(name: str) -> dict | None:
            path = run_dir / name
            return read_json(path) if path.is_file() else None

        return cls(run_dir.name, {k: load(f) for k, (f, _) in METRIC_FILES.items()},
                   {r: read_benchmark(run_dir / "benchmarks" / f"{r}.tsv") for r in BENCHMARK_RULES},
                   load("mask_sweep.json"))

    def class_names(self) -> list[str]:
        for report in self.metrics.values():
            if scored(report) is not None and "iou" in report:
                return list(report["iou"])
        return []


def fmt(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> float | None:
    return None if value is None else value * 100


@dataclass
class Table:
    """Rows of (section, label, cells); `header` names the cell columns."""
    header: list[str]
    rows: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def add(self, section: str, label: str, cells: list[str]) -> None:
        self.rows.append((section, label, cells))

    def markdown(self, first: str = "quantity") -> str:
        lines = ["| " + " | ".join([first, *self.header]) + " |",
                 "|" + "---|" * (len(self.header) + 1)]
        lines += ["| " + " | ".join([label, *cells]) + " |" for _, label, cells in self.rows]
        return "\n".join(lines) + "\n"

    def text(self, first: str = "") -> str:
        """Aligned plain text with a blank line between sections (for the terminal)."""
        cols = [[first, *self.header]] + [[label, *cells] for _, label, cells in self.rows]
        widths = [max(len(r[i]) for r in cols) for i in range(len(cols[0]))]

        def line(cells: list[str]) -> str:
            return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])])

        out = [line(cols[0]), "  ".join("-" * w for w in widths)]
        previous = None
        for section, label, cells in self.rows:
            if previous is not None and section != previous:
                out += ["", section]
            out.append(line([label, *cells]))
            previous = section
        return "\n".join(out) + "\n"

    def html(self, first: str = "quantity") -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in [first, *self.header])
        body, previous = [], None
        for section, label, cells in self.rows:
            if section != previous:
                body.append(f'<tr class="section"><th colspan="{len(self.header) + 1}">'
                            f"{html.escape(section)}</th></tr>")
                previous = section
            tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            body.append(f"<tr><th>{html.escape(label)}</th>{tds}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def miou_label(key: str) -> str:
    return f"{METRIC_FILES[key][1]} mIoU"


def iou_label(key: str, class_name: str) -> str:
    return f"{METRIC_FILES[key][1]} IoU {class_name}"


def comparison_table(records: list[MethodRecord], class_names: list[str] | None = None) -> Table:
    """One table, one column per method: mIoU of each stage, per-class IoU of each stage, and
    each rule's wall time and peak memory."""
    names = class_names or next((r.class_names() for r in records if r.class_names()), [])
    table = Table([r.method for r in records])

    def metric(r: MethodRecord, key: str) -> dict | None:
        return r.metrics.get(key)

    for key in METRIC_FILES:
        table.add("mIoU (%)", miou_label(key),
                  [miou_cell(metric(r, key)) for r in records])
    table.add("mIoU (%)", "seed threshold",
              [fmt(m.get("threshold")) if (m := scored(metric(r, "seed"))) else MISSING for r in records])
    table.add("mIoU (%)", "mask sweep best",
              [sweep_cell(r.sweep) for r in records])
    for key in METRIC_FILES:
        for c in names:
            table.add(f"{METRIC_FILES[key][1]}: per-class IoU (%)", iou_label(key, c),
                      [fmt(percent(m["iou"].get(c))) if (m := scored(metric(r, key))) else MISSING
                       for r in records])
    for rule in BENCHMARK_RULES:
        table.add("wall time (s)", f"time {rule} (s)",
                  [fmt(b.seconds) if (b := r.benchmarks.get(rule)) else MISSING for r in records])
    table.add("wall time (s)", "time total (s)",
              [fmt(sum(b.seconds for b in r.benchmarks.values() if b and b.seconds is not None))
               for r in records])
    for rule in BENCHMARK_RULES:
        table.add("peak memory (MB)", f"peak memory {rule} (MB)",
                  [fmt(b.max_rss_mb, 1) if (b := r.benchmarks.get(rule)) else MISSING for r in records])
    return table


def collect(results: str | Path, dataset: str, methods: list[str]) -> list[MethodRecord]:
    return [MethodRecord.read(Path(results) / dataset / m) for m in methods]


def dataset_index_data(results: str | Path, dataset: str) -> dict | None:
    """The JSON of results/<dataset>'s index (the merged index.json, else its train part
    index/train.json; both hold the dataset's kind and class names); None before either exists."""
    for index in (Path(results) / dataset / "index.json", Path(results) / dataset / "index" / "train.json"):
        if index.is_file():
            return read_json(index)
    return None


def class_names_of(results: str | Path, dataset: str) -> list[str] | None:
    data = dataset_index_data(results, dataset)
    return None if data is None else list(data["class_names"])


COMPARISON_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 2px 8px; }
td { text-align: right; font-variant-numeric: tabular-nums; }
th { text-align: left; font-weight: normal; }
thead th { font-weight: bold; background: #eee; }
tr.section th { background: #f5f5f5; font-weight: bold; }
"""


def comparison_markdown(dataset: str, table: Table) -> str:
    methods = ", ".join(table.header)
    return (f"# {dataset}: comparison of {methods}\n\n"
            "mIoU and per-class IoU in percent (seeds, IR labels and masks on the evaluated train "
            "split, segmentation on val), read from each method's `*_metrics.json`; wall time and "
            "peak resident memory of each rule from its Snakemake benchmark file "
            "(`benchmarks/<rule>.tsv`). `–`: not produced.\n\n" + table.markdown())


def comparison_html(dataset: str, table: Table) -> str:
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(dataset)}: method comparison</title>"
            f"<style>{COMPARISON_CSS}</style></head><body>"
            f"<h1>{html.escape(dataset)}: comparison of {html.escape(', '.join(table.header))}</h1>"
            "<p>mIoU and per-class IoU in percent (seeds, IR labels and masks on the evaluated train "
            "split, segmentation on val); wall time and peak memory from the Snakemake benchmark "
            "files. &ndash;: not produced.</p>" + table.html() + "</body></html>\n")


def summary_table(record: MethodRecord, class_names: list[str] | None = None,
                  per_class: bool = True) -> Table:
    """One method: stages as columns (`wsss summary`)."""
    keys = list(METRIC_FILES)
    table = Table([METRIC_FILES[k][1] for k in keys])
    reports = [record.metrics.get(k) for k in keys]
    names = class_names or record.class_names()

    def row(label: str, section: str, value) -> None:
        table.add(section, label, [value(r) if r else MISSING for r in reports])

    table.add("summary", "mIoU (%)", [miou_cell(r) for r in reports])
    row("split", "summary", lambda r: str(r.get("split", MISSING)))
    row("images", "summary", lambda r: str(r.get("images", MISSING)))
    row("FP/TP (foreground)", "summary", lambda r: fmt(r.get("fp_tp_overall")))
    for c in names if per_class else []:
        row(c, "per-class IoU (%)", lambda r, c=c: fmt(percent((r.get("iou") or {}).get(c))))
    return table


def timing_table(record: MethodRecord) -> Table:
    table = Table(["wall time (s)", "peak memory (MB)"])
    for rule, b in record.benchmarks.items():
        if b is not None:
            table.add("benchmarks", rule, [fmt(b.seconds), fmt(b.max_rss_mb, 1)])
    return table
