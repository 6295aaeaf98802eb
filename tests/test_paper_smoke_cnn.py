"""The `paper` presets of the CNN-CAM methods (cam, cobra, ssc, fbr) end to end on CPU:
scripts/paper_smoke.yaml on real VOC photos at their real sizes, every paper setting but one
optimizer step per training stage, batch 2 and random weights, from dataset_index to
seg_miou.txt and audit/index.html in one Snakemake run (tests/paper_smoke_run.py).

Duration on the shared 2-core machine: 624 s (load average ~7: beside the ViT file and other
suites), far above the ~90 s a suite file should take. The jobs run one after another; their
Snakemake benchmarks: export_cams 184 s (cobra: seven scales x flip on ResNet-152 + DeiT),
train_classifier 132, train_seg 87 (DeepLabV3+ ResNet-101, 512 px), eval_seg 81 (six scales x
flip + CRF), train_irn 44, propagate 42, the rest 41; ~300 CPU-seconds in all."""
from __future__ import annotations

import pytest
from paper_smoke_run import check_overrides, check_run, run_smoke

METHODS = ("cam", "cobra", "ssc", "fbr")


@pytest.fixture(scope="module")
def root(tmp_path_factory, cli_env):
    return run_smoke(tmp_path_factory.mktemp("paper_smoke_cnn"), METHODS, cli_env)


@pytest.mark.parametrize("method", METHODS)
def test_smoke_config_overrides_only_steps_batch_and_weights(method):
    check_overrides(method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_paper_preset_runs_end_to_end(root, method):
    check_run(root, method)
