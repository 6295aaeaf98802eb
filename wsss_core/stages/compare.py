"""Stage `compare`: results/{dataset}/comparison.md (+ .html): for every method, seed / IR-label
/ mask / segmentation mIoU, per-class IoU, and each rule's wall time and peak memory, in one
table with one column per method. Numbers are read from the metric and benchmark files."""
from __future__ import annotations

import logging
from pathlib import Path

from ..audit.compare import class_names_of, collect, comparison_html, comparison_markdown, comparison_table
from ..errors import DataError
from ..io import write_text
from . import common

log = logging.getLogger("wsss")


def compare(results: str | Path, dataset: str, methods: list[str] | None, out: str | Path,
            html_out: str | Path | None = None) -> str:
    from .results_table import methods_with_results
    methods = methods or methods_with_results(Path(results), dataset)
    missing = [m for m in methods if not (Path(results) / dataset / m).is_dir()]
    if missing:
        raise DataError(f"{Path(results) / dataset / missing[0]}: no results for method {missing[0]}; "
                        f"run snakemake {Path(results) / dataset}/comparison.md")
    table = comparison_table(collect(results, dataset, methods), class_names_of(results, dataset))
    text = comparison_markdown(dataset, table)
    write_text(out, text)
    if html_out:
        write_text(html_out, comparison_html(dataset, table))
    log.info("comparison of %s: %s", ", ".join(methods), out)
    return text


def main(argv: list[str] | None = None) -> int:
    p = common.parser("compare", __doc__)
    p.add_argument("--results", default="results")
    p.add_argument("--dataset", default="toy")
    p.add_argument("--methods", nargs="+", help="default: every method with results")
    p.add_argument("--out", help="Markdown file (default RESULTS/DATASET/comparison.md)")
    p.add_argument("--html", help="HTML file (default: the Markdown path with .html)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.results) / a.dataset / "comparison.md"
    html_out = Path(a.html) if a.html else out.with_suffix(".html")
    return common.run_stage(a, compare, results=a.results, dataset=a.dataset, methods=a.methods,
                            out=out, html_out=html_out)


if __name__ == "__main__":
    raise SystemExit(main())
