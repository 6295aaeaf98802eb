"""Stage `audit`: the audit page of a results folder, or one panel for one image.

    wsss audit results/toy/METHOD                 # results/toy/METHOD/audit/index.html + PNGs
    wsss audit results/toy/METHOD --id toy_00012  # one panel: results/toy/METHOD/audit/toy_00012.png
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..audit.artifacts import RunArtifacts
from ..audit.page import DEFAULT_PARAMS, build_audit
from ..audit.panels import write_panel
from . import common

log = logging.getLogger("wsss")


def audit(run_dir: str | Path, params: dict | None = None, out: str | Path | None = None,
          index: str | Path | None = None) -> Path:
    """Write the audit page of `run_dir` (results/{dataset}/{method}) into `out` (default
    `run_dir/audit`); returns the page's path."""
    run = RunArtifacts(run_dir, index)
    page = build_audit(run, dict(params or {}), Path(out) if out else run.dir / "audit")
    log.info("audit page: %s", page)
    return page


def audit_panel(run_dir: str | Path, image_id: str, out: str | Path | None = None,
                index: str | Path | None = None) -> Path:
    """One panel for one image (default `run_dir/audit/<id>.png`); returns its path."""
    run = RunArtifacts(run_dir, index)
    path = write_panel(run, image_id, Path(out) if out else run.dir / "audit" / f"{image_id}.png")
    log.info("panel: %s", path)
    print(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = common.parser("audit", __doc__)
    p.add_argument("run_dir", metavar="DIR", help="a results folder, results/<dataset>/<method>")
    p.add_argument("--id", dest="image_id", help="write one panel for this image id only")
    p.add_argument("--params", type=common.json_arg, default=dict(DEFAULT_PARAMS),
                   help="audit parameter block as JSON (worst, best, random, val, pairs, seed)")
    p.add_argument("--out", help="page folder (default DIR/audit), or with --id the panel PNG")
    p.add_argument("--index", help="dataset index (default DIR/../index.json)")
    a = p.parse_args(argv)
    if a.image_id:
        return common.run_stage(a, audit_panel, run_dir=a.run_dir, image_id=a.image_id, out=a.out,
                                index=a.index)
    return common.run_stage(a, audit, stage="audit",
                            run_dir=a.run_dir, params=a.params, out=a.out, index=a.index)


if __name__ == "__main__":
    raise SystemExit(main())
