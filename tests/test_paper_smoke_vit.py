"""The `paper` presets of the transformer methods (bnr, transcam, seco) end to end on CPU, with
WSSS_PAPER_SMOKE=1 (tests/paper_smoke_run.py says why not in the suite): scripts/paper_smoke.yaml
on real VOC photos at their real sizes, every paper setting but one optimizer step per training
stage, batch 2 and random weights, from dataset_index to seg_miou.txt and audit/index.html in one
Snakemake run (tests/paper_smoke_run.py), and bnr's masks through the paper's SegFormer (MiT-B2).
seco is single-stage: its seg_miou.txt is its own head's (the eval_method_seg rule, which this
run found broken: rules/seg.smk).

Snakemake benchmarks beside a full suite (2-core machine, 3 workers): seco train_classifier
96 s (ViT-B at 448 px), seco export_cams 77 (seven scales + its evaluation view), bnr export 34,
each method's train_seg 24-37 and eval_seg 20-35, train_irn and propagate ~14 each."""
from __future__ import annotations

import pytest
from paper_smoke_run import OPT_IN, check_overrides, check_run, run_smoke

METHODS = ("bnr", "transcam", "seco")
SINGLE_STAGE = {"seco"}
#: the paper's other segmentation network (SegFormer MiT-B2, its AdamW recipe) on bnr's masks
SEGFORMER = "bnr/seg-segformer/seg_miou.txt"


@pytest.fixture(scope="module")
def root(tmp_path_factory, cli_env):
    return run_smoke(tmp_path_factory.mktemp("paper_smoke_vit"), METHODS, cli_env, (SEGFORMER,))


@pytest.mark.parametrize("method", METHODS)
def test_smoke_config_overrides_only_steps_batch_and_weights(method):
    check_overrides(method)


@OPT_IN
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_paper_preset_runs_end_to_end(root, method):
    check_run(root, method, single_stage=method in SINGLE_STAGE)


@OPT_IN
@pytest.mark.slow
def test_paper_segformer_runs_end_to_end(root):
    from wsss_core.metrics import read_miou

    assert 0.0 <= read_miou(root / SEGFORMER) <= 100.0
    rows = (root / "bnr" / "seg-segformer" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[1] == "1"  # one step
