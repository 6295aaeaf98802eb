"""The `wsss` command: one sub-command per pipeline stage plus tools.

Each sub-command is a module with a `main(argv)` entry; Snakemake rules call the same entries,
so a stage behaves identically inside and outside the workflow.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

#: sub-command → (module, one-line help); listed only when the module exists
COMMANDS: dict[str, tuple[str, str]] = {
    "make-toy": ("wsss_core.stages.make_toy", "generate the embedded toy dataset in VOC layout"),
    "dataset-index": ("wsss_core.stages.dataset_index", "validate a dataset and write index.json"),
    "convert-coco": ("wsss_core.stages.convert_coco", "convert COCO 2014 instances JSON + images to the VOC layout"),
    "train-classifier": ("wsss_core.stages.train_classifier", "train a method's classifier"),
    "export-cams": ("wsss_core.stages.export_cams", "multi-scale + flip CAMs to HDF5"),
    "merge-cams": ("wsss_core.stages.merge_cams", "join the shards of a sharded CAM export"),
    "fuse-seeds": ("wsss_core.stages.fuse_seeds", "fuse exported maps into seeds (HDF5)"),
    "eval-seeds": ("wsss_core.stages.eval_seeds", "seed mIoU with a background-threshold sweep"),
    "ir-labels": ("wsss_core.stages.ir_labels", "IR labels (strict/lenient passes + dense CRF)"),
    "train-irn": ("wsss_core.stages.train_irn", "train the IRN boundary/displacement network"),
    "propagate": ("wsss_core.stages.propagate", "random-walk propagation of CAMs (HDF5)"),
    "make-masks": ("wsss_core.stages.make_masks", "pseudo masks from propagated maps (+ CRF)"),
    "eval-masks": ("wsss_core.stages.eval_masks", "mask and IR-label mIoU"),
    "sweep-masks": ("wsss_core.stages.sweep_masks", "mask threshold (alpha / bg) sweep without CRF"),
    "train-seg": ("wsss_core.stages.train_seg", "train the segmentation network on pseudo masks"),
    "eval-seg": ("wsss_core.stages.eval_seg", "multi-scale segmentation evaluation on val"),
    "predict": ("wsss_core.stages.predict", "segment new images (file, folder or list) with a trained model"),
    "export-model": ("wsss_core.stages.export_model", "export a segmentation model.pt to TorchScript + ONNX"),
    "results-table": ("wsss_core.stages.results_table", "collect metric files into a table"),
    "audit": ("wsss_core.stages.audit", "audit page of a results folder, or one image's panel"),
    "summary": ("wsss_core.stages.summary", "print the metric table of a results folder"),
    "compare": ("wsss_core.stages.compare", "compare the methods of a dataset (Markdown + HTML)"),
    "explain": ("wsss_core.stages.explain", "what made a result: rule, parameters and their sources, inputs, code, log"),
    "params": ("wsss_core.stages.params", "a (dataset, method)'s resolved parameters with their sources"),
}


def available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def usage() -> str:
    cmds = available()
    width = max(len(c) for c in cmds)
    lines = ["usage: wsss <command> [options]   (wsss <command> --help for its options)", "",
             "commands:"]
    lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in cmds.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    cmds = available()
    if cmd not in cmds:
        print(f"wsss: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(cmds[cmd][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
