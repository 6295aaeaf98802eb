"""Stage parameters are checked at the door (issue 32 item 2): a stage's --params against its
schema (schemas/stages/<stage>.schema.yaml) before any work, one line naming the stage and the
key, exit 2; the resolved block is written at the top of the stage log."""
from __future__ import annotations

import json
import subprocess

import pytest

from wsss_core.config import load_config, resolve_seg_params, stage_params, STAGES
from wsss_core.errors import ConfigError
from wsss_core.param_schema import check_stage_params
from wsss_core.stages import eval_seeds, fuse_seeds

SEEDS = {"background": "constant", "agnostic_map": None,
         "thresholds": {"start": 0.1, "stop": 0.5, "step": 0.2},
         "percentiles": {"start": 50, "stop": 90, "step": 20}}


def _eval_seeds(tmp_path, params) -> list[str]:
    return ["--index", str(tmp_path / "index.json"), "--seeds", str(tmp_path / "seeds.h5"),
            "--params", json.dumps(params), "--out", str(tmp_path / "seed_miou.txt"),
            "--log", str(tmp_path / "eval_seeds.log")]


@pytest.mark.parametrize("params, words", [
    ({**SEEDS, "threshold": 0.3}, ("eval_seeds parameter threshold: unknown key", "thresholds")),
    ({k: v for k, v in SEEDS.items() if k != "background"}, ("eval_seeds parameter background: missing",)),
    ({**SEEDS, "thresholds": {"start": 0.1, "stop": 0.5, "step": -0.2}},
     ("eval_seeds parameter thresholds.step:", "-0.2")),
    ({**SEEDS, "background": "median"}, ("eval_seeds parameter background:", "median")),
    ({**SEEDS, "thresholds": {"start": 0.1, "stop": 0.5}}, ("eval_seeds parameter thresholds.step: missing",)),
], ids=["unknown", "missing", "out-of-range", "not-an-option", "nested-missing"])
def test_a_bad_block_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, params, words):
    # no index or seeds exist: the check comes first
    rc = eval_seeds.main(_eval_seeds(tmp_path, params))
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if "wsss: error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "seed_miou.txt").exists()


def test_the_installed_command_says_the_same(tmp_path, cli_env):
    result = subprocess.run(["wsss", "fuse-seeds", "--cams", str(tmp_path / "cams.h5"), "--params",
                             json.dumps({"recipe": "max", "extra": 1}), "--out", str(tmp_path / "s.h5")],
                            env=cli_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "wsss: error:" in line]
    assert errors == [line for line in result.stderr.splitlines() if line.strip()][-1:], result.stderr
    assert "fuse_seeds parameter extra: unknown key" in errors[0]


def test_the_resolved_block_heads_the_log(tmp_path, capsys):
    rc = fuse_seeds.main(["--cams", str(tmp_path / "none.h5"), "--params", json.dumps({"recipe": "max"}),
                          "--out", str(tmp_path / "s.h5"), "--log", str(tmp_path / "fuse.log")])
    assert rc == 2  # no cams.h5: the block was accepted and logged first
    lines = (tmp_path / "fuse.log").read_text().splitlines()
    assert "parameters of fuse_seeds" in lines[0] and "wsss params DATASET METHOD fuse_seeds" in lines[0]
    assert lines[1].endswith('recipe = "max"')


def test_every_block_the_config_resolves_passes(repo_root):
    """What the workflow hands the stages (train_seg: resolved per architecture) passes."""
    cfg = load_config(repo_root / "config.yaml")
    for d in cfg["datasets"]:
        for m in cfg["methods"]:
            for stage in STAGES:
                block = stage_params(cfg, d, m, stage)
                check_stage_params(stage, block)
                if stage == "train_seg":
                    for model in block["encoders"]:
                        check_stage_params(stage, resolve_seg_params(block, model))


def test_a_resolved_train_seg_block_needs_its_encoder(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    flat = resolve_seg_params(stage_params(cfg, "toy", "cam", "train_seg"))
    del flat["encoder"]
    with pytest.raises(ConfigError, match="train_seg parameter encoder: missing"):
        check_stage_params("train_seg", flat)
