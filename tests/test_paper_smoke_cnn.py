"""The `paper` presets of the CNN-CAM methods (cam, cobra, ssc, fbr) end to end on CPU, with
WSSS_PAPER_SMOKE=1 (tests/paper_smoke_run.py says why not in the suite): scripts/paper_smoke.yaml
on real VOC photos at their real sizes, every paper setting but one optimizer step per training
stage, batch 2 and random weights, from dataset_index to seg_miou.txt and audit/index.html in
one Snakemake run (tests/paper_smoke_run.py).

Snakemake benchmarks beside a full suite (2-core machine, 3 workers): cobra export_cams 69 s
(seven scales x flip on ResNet-152 + DeiT), ssc train_classifier 52, each method's train_seg
(DeepLabV3+ ResNet-101, 512 px) 22-37 and eval_seg (six scales x flip + CRF) 19-23, export
21-25, propagate 14-22, train_irn 13-20; cam's whole DAG ~130 job-seconds."""
from __future__ import annotations

import pytest
from paper_smoke_run import OPT_IN, check_overrides, check_run, run_smoke

METHODS = ("cam", "cobra", "ssc", "fbr")


@pytest.fixture(scope="module")
def root(tmp_path_factory, cli_env):
    return run_smoke(tmp_path_factory.mktemp("paper_smoke_cnn"), METHODS, cli_env)


@pytest.mark.parametrize("method", METHODS)
def test_smoke_config_overrides_only_steps_batch_and_weights(method):
    check_overrides(method)


@OPT_IN
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_paper_preset_runs_end_to_end(root, method):
    check_run(root, method)
