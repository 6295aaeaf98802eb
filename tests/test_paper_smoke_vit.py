"""The `paper` presets of the transformer methods (bnr, seco; transcam with WSSS_PAPER_SMOKE=1)
end to end on CPU: scripts/paper_smoke.yaml on real VOC photos at their real sizes, every paper
setting but one optimizer step per training stage, batch 2 and random weights, from
dataset_index to seg_miou.txt and audit/index.html in one Snakemake run
(tests/paper_smoke_run.py); with WSSS_PAPER_SMOKE=1 also bnr's masks through the paper's
SegFormer (MiT-B2). seco is single-stage: its seg_miou.txt is its own head's (the
eval_method_seg rule, which this run found broken: rules/seg.smk).

Snakemake benchmarks on the shared 2-core machine (load average ~5, with transcam and
SegFormer): train_classifier 141 s (seco's ViT-B at 448 px: most of it), export_cams 93,
eval_seg 83, train_seg 54, SegFormer 40, propagate 33, the rest 91."""
from __future__ import annotations

import pytest
from paper_smoke_run import EXTRA, OPT_IN, check_overrides, check_run, run_smoke

IN_SUITE = ("bnr", "seco")
#: transcam: the bnr host with `bnr: false`, no code path of its own
METHODS = (*IN_SUITE, "transcam")
SINGLE_STAGE = {"seco"}
#: the paper's other segmentation network (SegFormer MiT-B2, its AdamW recipe) on bnr's masks
SEGFORMER = "bnr/seg-segformer/seg_miou.txt"


@pytest.fixture(scope="module")
def root(tmp_path_factory, cli_env):
    return run_smoke(tmp_path_factory.mktemp("paper_smoke_vit"), METHODS if EXTRA else IN_SUITE,
                     cli_env, (SEGFORMER,) if EXTRA else ())


@pytest.mark.parametrize("method", METHODS)
def test_smoke_config_overrides_only_steps_batch_and_weights(method):
    check_overrides(method)


@pytest.mark.slow
@pytest.mark.parametrize("method", [*IN_SUITE, pytest.param("transcam", marks=OPT_IN)])
def test_paper_preset_runs_end_to_end(root, method):
    check_run(root, method, single_stage=method in SINGLE_STAGE)


@OPT_IN
@pytest.mark.slow
def test_paper_segformer_runs_end_to_end(root):
    from wsss_core.metrics import read_miou

    assert 0.0 <= read_miou(root / SEGFORMER) <= 100.0
    rows = (root / "bnr" / "seg-segformer" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[1] == "1"  # one step
