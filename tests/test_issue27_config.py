"""Issue 27 item 3: settings that could only fail inside a training job (after the whole
upstream pipeline) are refused by the config check at Snakemake start, one line naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsss_core import config as wc
from wsss_core.errors import ConfigError

CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


@pytest.fixture()
def cfg() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def _rejected(cfg: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as info:
        wc.validate_config(wc.apply_defaults(cfg), plugins=False)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_seg_batch_of_one_image_per_process_is_refused(cfg):
    """The issue's case: train_seg.processes 2 with batch_size 2 (one image per process)."""
    cfg["resources"]["rules"]["train_seg"]["processes"] = 2
    cfg["presets"]["tiny"]["train_seg"]["batch_size"] = 2
    _rejected(cfg, "config key train_seg.batch_size", "resources.rules.train_seg.processes",
              "1 image per process", "batch norm")
    cfg["presets"]["tiny"]["train_seg"]["batch_size"] = 4
    wc.validate_config(wc.apply_defaults(cfg), plugins=False)  # 2 per process: fine


def test_batch_that_does_not_split_over_the_processes_is_refused(cfg):
    cfg["resources"]["rules"]["train_irn"]["processes"] = 3  # the toy irn batch is 16
    _rejected(cfg, "config key train_irn.batch_size", "does not split over the 3 processes",
              "resources.rules.train_irn.processes")


def test_full_batches_larger_than_train_aug_are_refused(cfg):
    """Several processes drop the incomplete batch: a batch above the toy train_aug count
    would leave no step at all."""
    cfg["datasets"]["toy"]["num_train_aug"] = 8
    cfg["datasets"]["toy"]["num_train_eval"] = 4
    cfg["resources"]["rules"]["train_classifier"]["processes"] = 2
    _rejected(cfg, "config key train_classifier.batch_size", "exceeds the 8 train_aug images")


def test_export_shards_above_the_image_count_are_refused(cfg):
    cfg["datasets"]["toy"]["num_train_aug"] = 8
    cfg["datasets"]["toy"]["num_train_eval"] = 4
    cfg["resources"]["rules"]["export_cams"]["shards"] = 9
    _rejected(cfg, "config key resources.rules.export_cams.shards", "9", "8 train_aug images")


def test_the_shipped_config_passes(cfg):
    wc.validate_config(wc.apply_defaults(cfg), plugins=False)


def test_percentile_background_of_a_method_without_an_agnostic_map_is_refused(cfg):
    """cam exports no class-agnostic map: eval_seeds / ir_labels would fail after training."""
    cfg["methods"]["cam"].setdefault("presets", {}).setdefault("tiny", {})["eval_seeds"] = {
        "background": "percentile"}
    _rejected(cfg, "config key eval_seeds.background", "method cam", "no class-agnostic map", "constant")
    cfg["methods"]["cam"]["presets"]["tiny"]["eval_seeds"] = {}
    cfg["methods"]["cam"]["presets"]["tiny"]["ir_labels"] = {"thresholds": "percentile"}
    _rejected(cfg, "config key ir_labels.thresholds", "method cam", "fixed")


def test_seed_recipe_naming_a_map_the_method_lacks_is_refused(cfg):
    cfg["methods"]["cam"].setdefault("presets", {}).setdefault("tiny", {})["fuse_seeds"] = {"recipe": "vit"}
    _rejected(cfg, "config key fuse_seeds.recipe", "method cam", "'vit'", "['cam']")
