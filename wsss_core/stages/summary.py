"""`wsss summary DIR`: the metric table of a results folder (results/<dataset>/<method>) in the
terminal: mIoU, split, image count and FP/TP of seeds, IR labels, masks and segmentation,
per-class IoU, and each rule's wall time and peak memory."""
from __future__ import annotations

from pathlib import Path

from ..audit.compare import MethodRecord, class_names_of, summary_table, sweep_cell, timing_table
from ..errors import DataError
from . import common


def summary(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such results folder; give results/<dataset>/<method>")
    record = MethodRecord.read(run_dir)
    names = class_names_of(run_dir.parent.parent, run_dir.parent.name)
    text = f"{run_dir}\n\n" + summary_table(record, names).text()
    if record.sweep:
        s = record.sweep
        text += (f"\nmask sweep ({s['rule']} rule, no CRF): {sweep_cell(s)}, configured "
                 f"{s['configured']:g}\n")
    timing = timing_table(record)
    if timing.rows:
        text += "\n" + timing.text("rule")
    print(text, end="")
    return text


def main(argv: list[str] | None = None) -> int:
    p = common.parser("summary", __doc__)
    p.add_argument("run_dir", metavar="DIR", help="a results folder, results/<dataset>/<method>")
    a = p.parse_args(argv)
    try:
        summary(a.run_dir)
    except DataError as e:
        print(f"wsss: error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
