"""config.yaml and its schema: what validates, what is rejected, and how stage params resolve."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from wsss_core import config as wc
from wsss_core.errors import ConfigError
from wsss_core.methods.settings import block, from_dict

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.yaml"
SCHEMA = REPO / "wsss_core" / "schemas" / "config.schema.yaml"


@pytest.fixture()
def cfg() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def check(cfg: dict) -> dict:
    return wc.validate_config(wc.apply_defaults(cfg))


def rejected(cfg: dict, key_path: str, *words: str) -> str:
    """Validation fails with a one-line ConfigError naming `key_path` (and `words`)."""
    with pytest.raises(ConfigError) as info:
        check(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    assert f"config key {key_path}" in message, message
    for w in words:
        assert w in message, message
    return message


# ------------------------------------------------------------------------------ valid configs

def test_repo_config_validates(cfg):
    check(cfg)
    loaded = wc.load_config(CONFIG)
    assert set(loaded["datasets"]) >= {"toy", "voc"}
    assert loaded["datasets"]["toy"]["kind"] == "toy"


def test_assembled_schema_lists_registered_plugins_and_their_blocks(cfg):
    schema = wc.config_schema(cfg)
    plugin = schema["properties"]["methods"]["additionalProperties"]["properties"]["plugin"]
    assert {"cam", "cobra"} <= set(plugin["enum"])
    blocks = schema["$defs"]["stage_blocks"]["properties"]
    assert "tau" in blocks["cobra"]["properties"] and blocks["cobra"]["additionalProperties"] is False
    assert "cobra" not in yaml.safe_load(SCHEMA.read_text())["$defs"]["stage_blocks"]["properties"]


def test_unknown_key_in_a_methods_settings_block_is_rejected_by_name(cfg):
    cfg["methods"]["cobra"]["presets"]["tiny"]["cobra"]["tua"] = 0.1
    with pytest.raises(ConfigError, match=r"methods\.cobra\.presets\.tiny\.cobra\b.*tua"):
        check(cfg)
    del cfg["methods"]["cobra"]["presets"]["tiny"]["cobra"]["tua"]
    cfg["methods"]["cam"]["presets"]["tiny"]["model"]["strieds"] = [2, 2, 1, 1]
    with pytest.raises(ConfigError, match=r"methods\.cam\.presets\.tiny\.model\.strieds"):
        check(cfg)


def test_unknown_plugin_is_rejected(cfg):
    cfg["methods"]["cam"]["plugin"] = "nonesuch"
    with pytest.raises(ConfigError, match="methods.cam.plugin"):
        check(cfg)


def test_second_toy_dataset_gets_defaults(cfg):
    cfg["datasets"]["toy2"] = {"kind": "toy", "seed": 7}
    check(cfg)
    toy2 = cfg["datasets"]["toy2"]
    schema_toy = yaml.safe_load(SCHEMA.read_text())["$defs"]["toy_dataset"]["properties"]
    assert toy2["seed"] == 7 and toy2["preset"] == "tiny"
    for key in ("image_size", "num_train_aug", "num_train_eval", "num_val"):
        assert toy2[key] == schema_toy[key]["default"]
    # every method's stage params resolve for the new dataset
    for method in cfg["methods"]:
        assert wc.stage_params(cfg, "toy2", method, "train_classifier")["epochs"] >= 1


def test_extra_config_file_merges_over_the_main_one(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("datasets:\n  toy2: {kind: toy, seed: 7, num_train_aug: 12, "
                     "num_train_eval: 4, num_val: 4}\n  toy: {image_size: 64}\n")
    cfg = wc.load_config(CONFIG, extra)
    assert cfg["datasets"]["toy2"]["num_train_aug"] == 12
    assert cfg["datasets"]["toy"]["image_size"] == 64
    assert cfg["datasets"]["toy"]["num_val"] == 80  # untouched keys survive the merge


def test_voc_defaults(cfg):
    cfg["datasets"]["myvoc"] = {"kind": "voc", "root": "/data/VOC2012"}
    check(cfg)
    assert cfg["datasets"]["myvoc"]["preset"] == "paper"
    assert cfg["datasets"]["myvoc"]["lists"] == {"train_aug": "train_aug", "train": "train",
                                                 "val": "val"}


# ------------------------------------------------------------------------------ unknown keys

def test_unknown_top_level_key(cfg):
    cfg["colour"] = "red"
    rejected(cfg, "<top level>", "colour")


@pytest.mark.parametrize("dataset", ["toy", "voc"])
def test_unknown_dataset_key(cfg, dataset):
    cfg["datasets"][dataset]["colour"] = "red"
    rejected(cfg, f"datasets.{dataset}", "colour")


def test_unknown_voc_list(cfg):
    cfg["datasets"]["voc"]["lists"]["test"] = "test"
    rejected(cfg, "datasets.voc.lists", "test")


def test_unknown_stage_key(cfg):
    cfg["presets"]["tiny"]["train_classifier"]["foo"] = 1
    rejected(cfg, "presets.tiny.train_classifier", "foo")


def test_unknown_stage(cfg):
    cfg["presets"]["tiny"]["train_clasifier"] = {}
    rejected(cfg, "presets.tiny", "train_clasifier")


def test_unknown_key_in_a_methods_preset_block(cfg):
    cfg["methods"]["cam"]["presets"]["tiny"]["train_classifier"] = {"foo": 1}
    rejected(cfg, "methods.cam.presets.tiny.train_classifier", "foo")
    cfg["methods"]["cam"]["presets"]["tiny"].pop("train_classifier")
    cfg["methods"]["cam"]["presets"]["tiny"]["bogus"] = {}
    rejected(cfg, "methods.cam.presets.tiny", "bogus")


def test_unknown_method_key_and_plugin(cfg):
    cfg["methods"]["cam"]["colour"] = 1
    rejected(cfg, "methods.cam", "colour")
    del cfg["methods"]["cam"]["colour"]
    cfg["methods"]["cam"]["plugin"] = "nope"
    rejected(cfg, "methods.cam.plugin", "nope")


def test_unknown_preset_name(cfg):
    cfg["presets"]["huge"] = {}
    rejected(cfg, "presets", "huge")


# ------------------------------------------------------------------------------ bad values

@pytest.mark.parametrize("mutate, key_path", [
    (lambda c: c["datasets"]["toy"].update(image_size=5), "datasets.toy.image_size"),
    (lambda c: c["datasets"]["toy"].update(seed=-1), "datasets.toy.seed"),
    (lambda c: c["datasets"]["toy"].update(num_val="many"), "datasets.toy.num_val"),
    (lambda c: c["datasets"]["voc"].update(root=3), "datasets.voc.root"),
    (lambda c: c["datasets"]["voc"].update(num_classes=1), "datasets.voc.num_classes"),
    (lambda c: c["presets"]["tiny"]["train_classifier"].update(lr=-1),
     "presets.tiny.train_classifier.lr"),
    (lambda c: c["presets"]["tiny"]["train_classifier"].update(epochs=-3),
     "presets.tiny.train_classifier.epochs"),
    (lambda c: c["methods"]["cobra"]["presets"]["paper"]["train_classifier"].update(epochs=0),
     "methods.cobra.presets.paper.train_classifier.epochs"),
    (lambda c: c["datasets"]["toy"].update(num_train_eval=400), "datasets.toy.num_train_eval"),
    (lambda c: c.update(threads=0), "threads"),
])
def test_out_of_range_values(cfg, mutate, key_path):
    mutate(cfg)
    rejected(cfg, key_path)


def test_processes_and_shards_belong_to_the_rules_that_use_them(cfg):
    rules = cfg["resources"]["rules"]
    assert rules["export_cams"]["shards"] == 1
    assert all(rules[r]["processes"] == 1 for r in ("train_classifier", "train_irn", "train_seg"))
    rules["train_seg"]["processes"] = 0
    rejected(cfg, "resources.rules.train_seg.processes")
    rules["train_seg"]["processes"] = 4
    rules["export_cams"]["processes"] = 2  # the export is split by shards, not processes
    rejected(cfg, "resources.rules.export_cams", "processes")
    del rules["export_cams"]["processes"]
    rules["propagate"]["shards"] = 2
    rejected(cfg, "resources.rules.propagate", "shards")
    del rules["propagate"]["shards"]
    rules["export_cams"]["shards"] = 0
    rejected(cfg, "resources.rules.export_cams.shards")
    rules["export_cams"]["shards"] = 3
    check(cfg)


def test_num_train_eval_above_num_train_aug_with_defaults(cfg):
    cfg["datasets"]["toy2"] = {"kind": "toy", "num_train_aug": 8}   # default num_train_eval 100
    rejected(cfg, "datasets.toy2.num_train_eval", "num_train_aug")


def test_dataset_kind_errors(cfg):
    cfg["datasets"]["toy2"] = {"kind": "tyo"}
    rejected(cfg, "datasets.toy2.kind", "tyo")
    cfg["datasets"]["toy2"] = {"seed": 1}
    rejected(cfg, "datasets.toy2", "kind")


def test_dataset_name_must_be_a_plain_word(cfg):
    cfg["datasets"]["my/toy"] = {"kind": "toy"}
    rejected(cfg, "datasets", "my/toy")


def test_preset_without_block(cfg):
    cfg["datasets"]["toy"]["preset"] = "smoke"
    rejected(cfg, "datasets.toy.preset", "presets.smoke")


def test_missing_stage_parameter(cfg):
    del cfg["presets"]["tiny"]["train_classifier"]["lr"]
    rejected(cfg, "presets.tiny.train_classifier.lr", "missing")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        wc.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        wc.load_config(bad)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ resolution

def test_stage_params_merge_preset_and_method_override(cfg):
    check(cfg)
    base = cfg["presets"]["paper"]["train_classifier"]
    cam = wc.stage_params(cfg, "voc", "cam", "train_classifier")
    cobra = wc.stage_params(cfg, "voc", "cobra", "train_classifier")
    assert cam == base
    override = cfg["methods"]["cobra"]["presets"]["paper"]["train_classifier"]
    assert cobra == {**base, **override}
    assert cobra["crop"] == override["crop"] and cobra["optimizer"] == base["optimizer"]
    # the resolved block is a copy: changing it does not touch the config
    cobra["lr"] = 123.0
    assert wc.stage_params(cfg, "voc", "cobra", "train_classifier")["lr"] == override["lr"]


def test_stage_params_deep_merge_of_nested_blocks(cfg):
    cfg["presets"]["tiny"]["model"] = {"vit": {"depth": 4, "num_heads": 3}, "proj_dim": 32}
    cfg["methods"]["cam"]["presets"]["tiny"]["model"] = {"vit": {"depth": 2}}
    wc.validate_config(wc.apply_defaults(cfg), plugins=False)  # merging only: cam has no vit
    resolved = wc.stage_params(cfg, "toy", "cam", "model")
    assert resolved == {"vit": {"depth": 2, "num_heads": 3}, "proj_dim": 32}


def test_method_params_and_unknown_names(cfg):
    check(cfg)
    params = wc.method_params(cfg, "toy", "cobra")
    assert params["plugin"] == "cobra" and params["preset"] == "tiny"
    assert params["model"] == cfg["methods"]["cobra"]["presets"]["tiny"]["model"]
    with pytest.raises(ConfigError, match="datasets.nope"):
        wc.stage_params(cfg, "nope", "cam", "train_classifier")
    with pytest.raises(ConfigError, match="methods.nope"):
        wc.method_params(cfg, "toy", "nope")


# ------------------------------------------------------------------------------ plug-in blocks

@dataclasses.dataclass
class _Inner:
    depth: int = 2


@dataclasses.dataclass
class _Settings:
    backbone: str = "resnet50"
    pretrained: bool = True
    vit: _Inner = block(_Inner)


def test_plugin_settings_reject_unknown_keys():
    s = from_dict(_Settings, {"backbone": "resnet10t", "vit": {"depth": 4}}, "methods.x.model")
    assert s == _Settings("resnet10t", True, _Inner(4))
    assert from_dict(_Settings, None, "m") == _Settings()
    with pytest.raises(ConfigError) as info:
        from_dict(_Settings, {"backbon": "resnet10t"}, "methods.x.presets.tiny.model")
    assert "config key methods.x.presets.tiny.model.backbon" in str(info.value)
    with pytest.raises(ConfigError) as info:
        from_dict(_Settings, {"vit": {"dpth": 4}}, "model")
    assert "config key model.vit.dpth" in str(info.value)
    assert "depth" in str(info.value)  # lists what is allowed


def test_real_plugin_model_blocks_in_config_are_accepted(cfg):
    """The model blocks of config.yaml parse with their plug-in's settings; a typo does not."""
    cam = pytest.importorskip("wsss_core.methods.cam")
    if not hasattr(cam, "ResNetSettings"):
        pytest.skip("cam plug-in has no ResNetSettings")
    check(cfg)
    for preset in ("tiny", "paper"):
        block_ = copy.deepcopy(cfg["methods"]["cam"]["presets"][preset]["model"])
        from_dict(cam.ResNetSettings, block_, f"methods.cam.presets.{preset}.model")
        block_["strdes"] = [2, 2, 2, 1]
        with pytest.raises(ConfigError, match=f"methods.cam.presets.{preset}.model.strdes"):
            from_dict(cam.ResNetSettings, block_, f"methods.cam.presets.{preset}.model")


def test_a_config_that_passed_is_not_checked_again_and_a_changed_one_is(cfg, tmp_path, monkeypatch):
    """With a cache folder (the Snakefile's), a config that passed is recorded and the same
    config is not checked again; a changed config, or one naming a plug-in module outside the
    package (code that is not fingerprinted), is checked."""
    cache = tmp_path / "cache"
    good = wc.apply_defaults(copy.deepcopy(cfg))
    wc.validate_config(copy.deepcopy(good), cache=cache)
    assert len(list(cache.glob("config-passed-*-plugins"))) == 1

    def no_check(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(wc, "config_schema", no_check)
    wc.validate_config(copy.deepcopy(good), cache=cache)
    wc.validate_config(copy.deepcopy(good), plugins=False, cache=cache)  # covered by the check with plug-ins
    monkeypatch.undo()
    bad = copy.deepcopy(good)
    bad["presets"]["tiny"]["train_classifier"]["epochs"] = 0
    with pytest.raises(ConfigError, match="epochs"):
        wc.validate_config(bad, cache=cache)
    outside = copy.deepcopy(good)
    outside["methods"]["cam"]["module"] = "wsss_core.methods.cam"
    monkeypatch.setattr(wc, "config_schema", no_check)
    with pytest.raises(AssertionError, match="checked again"):
        wc.validate_config(outside, cache=cache)


def test_workflow_cache_folder_is_the_shared_one_when_set(tmp_path, monkeypatch):
    monkeypatch.delenv(wc.CACHE_ENV, raising=False)
    assert wc.workflow_cache_folder(tmp_path) == tmp_path / ".snakemake" / "wsss-config-cache"
    monkeypatch.setenv(wc.CACHE_ENV, str(tmp_path / "shared"))
    assert wc.workflow_cache_folder(tmp_path) == tmp_path / "shared"


def test_partial_config_from_another_folder_is_one_line_naming_config_yaml(tmp_path, cli_env):
    """Snakemake skips the Snakefile's `configfile: "config.yaml"` when the working directory has
    none and --configfile is given: a run there with only scripts/voc632.yaml stops at start with
    one line naming the folder and the --configfile that fixes it (it said "'results' is a
    required property"); with the checkout's config.yaml the same folder dry-runs."""
    import subprocess
    import sys

    def snakemake(*configs: Path, target: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
               "--cores", "1", "-n", "--configfile", *map(str, configs), "--", target]
        return subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)

    partial = snakemake(REPO / "scripts" / "voc632.yaml", target="results/voc632/index.json")
    text = partial.stdout + partial.stderr
    errors = [line for line in text.splitlines() if line.startswith("wsss: error:")]
    assert partial.returncode == 2 and "Traceback" not in text, text[-2000:]
    assert len(errors) == 1 and str(tmp_path) in errors[0], text[-2000:]
    assert f"--configfile {REPO / 'config.yaml'}" in errors[0]
    assert not (tmp_path / "results").exists()
    full = snakemake(CONFIG, target="results/toy/index.json")
    assert full.returncode == 0, (full.stdout + full.stderr)[-2000:]
