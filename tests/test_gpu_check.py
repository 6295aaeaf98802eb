"""bench/gpu_check.py cannot rot: its `--device cpu --tiny` run (the code path of the GPU check,
on a few photos) trains, exports, walks, masks and evaluates with cam's paper preset in fp32
and bf16, and reports throughput, FLOPs and the mixed-precision comparison; the card table and
the toy-photo fallback are checked without a run."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cards_and_peaks(gpu_check):
    assert gpu_check.card_of("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_check.card_of("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_check.card_of("NVIDIA H200") == "H200"
    assert gpu_check.card_of("NVIDIA H100 NVL") is None
    assert gpu_check.card_of("NVIDIA A100-SXM4-80GB") is None
    for peaks in gpu_check.PEAKS.values():
        assert peaks["bf16"] > peaks["tf32"] > peaks["fp32"] > 0


def test_tiny_falls_back_to_toy_photos(gpu_check, tmp_path):
    args = gpu_check.argparse.Namespace(data=str(tmp_path / "absent"), tiny=True)
    root, note = gpu_check.prepare_data(args, tmp_path)
    assert "toy" in note and len(list((root / "JPEGImages").glob("*.jpg"))) == 4
    with pytest.raises(SystemExit, match="no VOC folder"):
        gpu_check.prepare_data(gpu_check.argparse.Namespace(data=str(tmp_path / "absent"), tiny=False),
                               tmp_path)


@pytest.mark.slow
def test_tiny_cpu_run(gpu_check, tmp_path, capsys):
    """In this process (the imports are the suite's already): main() puts WSSS_DEVICE and
    torch's threads back."""
    out = tmp_path / "out"
    threads, device = torch.get_num_threads(), os.environ.get("WSSS_DEVICE")
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--methods", "cam", "--out", str(out),
                         "--work", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    assert torch.get_num_threads() == threads and os.environ.get("WSSS_DEVICE") == device
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["all_finite"] and report["device"] == "cpu"
    rows = {(r["stage"], r.get("precision")): r for r in report["stages"]}
    for stage in ("train_classifier", "train_irn", "train_seg"):
        for precision in ("fp32", "bf16"):
            r = rows[(stage, precision)]
            assert r["status"] == "ok" and r["finite"] and r["steps_done"] == 1, r
            assert r["gflop_per_step"] > 0 and r["images_per_s"] > 0 and r["peak_gib"] is None
            assert r["mfu"] is None  # no peak table for a CPU
    assert rows[("train_classifier", "fp32")]["loss_terms"] == ["cls", "total"]
    for stage in ("export_cams", "propagate", "make_masks", "eval_seg"):
        assert rows[(stage, None)]["status"] == "ok" and rows[(stage, None)]["images_per_s"] > 0
    mixed = {m["stage"]: m for m in report["mixed_precision"]}
    assert set(mixed) == {"train_classifier", "train_irn", "train_seg"}
    assert all(m["speedup"] > 0 and math.isfinite(m["loss_diff"]) for m in mixed.values())
    table = (out / "gpu_check.md").read_text()
    assert "| cam | train_seg | bf16 |" in table and "Mixed precision" in table


def test_instant_stage_has_a_rate_or_none(gpu_check):
    """A per-image stage that ends inside 5 ms (two tiny photos on a fast machine) once divided
    by its rounded 0.00 s; its rate now comes from the unrounded time, and a zero span is
    "unknown" (None), never a ZeroDivisionError that kills the whole check."""
    check = object.__new__(gpu_check.Check)
    check.a = gpu_check.argparse.Namespace(budget=60.0, stage_timeout=30.0)
    check.start, check.rows, check.failed = gpu_check.time.perf_counter(), [], False
    check.images, check.device = ["a", "b"], torch.device("cpu")
    assert check.per_image("cam", "make_masks", lambda: 7, needs=[], ticked=False) == 7
    row = check.rows[-1]
    assert row["status"] == "ok" and row["seconds"] == 0.0
    assert row["images_per_s"] > 0 and math.isfinite(row["images_per_s"])
    assert gpu_check.rate(3, 0.0) is None and gpu_check.rate(3, 1.5) == 2.0
