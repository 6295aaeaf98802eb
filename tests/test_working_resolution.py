"""A dataset's working resolution (`long_side`): every stage reads images and masks through
`DatasetIndex`, shrunk so the long side is at most `long_side` pixels (images bilinear, masks
nearest), so maps, masks and scores all agree on one size; the files stay untouched."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from PIL import Image

from wsss_core import config as wc
from wsss_core.data.index import DatasetIndex, build_index, merge_index_parts, working_size
from wsss_core.errors import ConfigError, DataError
from wsss_core.stages import dataset_index as stage

LISTS = {"train_aug": "train_aug", "train": "train", "val": "val"}


def test_working_size():
    assert working_size((375, 500), 320) == (240, 320)
    assert working_size((500, 375), 320) == (320, 240)
    assert working_size((333, 500), 320) == (213, 320)  # 213.12 rounds down
    assert working_size((200, 300), 320) == (200, 300)  # never enlarged
    assert working_size((375, 500), None) == (375, 500)
    assert working_size((1, 4000), 100) == (1, 100)     # a side never reaches 0


@pytest.fixture(scope="module")
def indexes(toy_root):
    full = DatasetIndex(build_index("toy", "toy", toy_root, LISTS, progress=False))
    small = DatasetIndex(build_index("toy", "toy", toy_root, LISTS, progress=False, long_side=40))
    return full, small


def test_images_and_masks_read_at_the_working_size(indexes):
    full, small = indexes
    assert full.long_side is None and small.long_side == 40
    for image_id in full.mask_ids("train")[:4]:
        h, w = full.size(image_id)
        assert small.file_size(image_id) == (h, w) and max(h, w) > 40
        want = working_size((h, w), 40)
        image, mask = small.image(image_id), small.mask(image_id)
        assert small.size(image_id) == want == image.shape[:2] == mask.shape
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        # the bilinear shrink averages: the mean colour stays within a few levels
        big = full.image(image_id)
        assert np.abs(image.reshape(-1, 3).mean(0) - big.reshape(-1, 3).mean(0)).max() < 4
        # nearest keeps labels: every value is one of the full mask's, at the pixel PIL picks
        gt = full.mask(image_id)
        oracle = np.asarray(Image.fromarray(gt).resize(want[::-1], Image.NEAREST))
        np.testing.assert_array_equal(mask, oracle)
        assert set(np.unique(mask)) <= set(np.unique(gt))
        # the index's labels are the files' (the shrink changes no image-level label)
        assert small.labels(image_id) == full.labels(image_id)


def test_parts_of_different_working_sizes_do_not_merge(toy_root):
    a = build_index("toy", "toy", toy_root, LISTS, progress=False, splits=("val",), long_side=40)
    b = build_index("toy", "toy", toy_root, LISTS, progress=False, splits=("train",))
    with pytest.raises(DataError, match="long_side"):
        merge_index_parts([a, b])
    assert merge_index_parts([a, dict(b, long_side=40)])["long_side"] == 40


def test_stage_cli_writes_it(toy_root, tmp_path):
    out = tmp_path / "index.json"
    assert stage.main(["--name", "toy", "--kind", "toy", "--root", str(toy_root), "--long-side", "48",
                       "--out", str(out), "--log", str(tmp_path / "log.txt")]) == 0
    idx = DatasetIndex.load(out)
    assert idx.long_side == 48 and "working resolution" in (tmp_path / "log.txt").read_text()
    first = idx.ids("train")[0]
    assert max(idx.image(first).shape[:2]) == 48


def test_config_key_checked():
    cfg = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    cfg["datasets"]["voc"]["long_side"] = 320
    assert wc.validate_config(wc.apply_defaults(cfg))["datasets"]["voc"]["long_side"] == 320
    cfg["datasets"]["voc"]["long_side"] = 8
    with pytest.raises(ConfigError, match=r"datasets\.voc\.long_side"):
        wc.validate_config(wc.apply_defaults(cfg))


VOC632 = REPO_ROOT.parent / "shared" / "voc_real" / "voc2012-seg632"


@pytest.mark.skipif(not VOC632.is_dir(), reason="../shared/voc_real/voc2012-seg632 is absent")
def test_voc632_benchmark_config_plans_the_whole_dag_at_320_px(tmp_path, cli_env):
    """scripts/voc632.yaml, as the README runs it (its root relative to the working folder):
    the whole cam DAG is planned and the index is built at its working resolution."""
    import subprocess
    import sys

    wd = tmp_path / "work"
    wd.mkdir()
    (tmp_path / "shared").symlink_to(VOC632.parent.parent, target_is_directory=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "-d", str(wd),
           "--cores", "2", "--configfile", str(REPO_ROOT / "config.yaml"),
           str(REPO_ROOT / "scripts" / "voc632.yaml"), "-n", "-p", "--",
           "results/voc632/cam/seg_miou.txt"]
    done = subprocess.run(cmd, cwd=wd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("--long-side 320") == 2  # both index parts
    for rule in ("train_classifier", "export_cams", "ir_labels", "train_irn", "propagate",
                 "make_masks", "train_seg", "eval_seg"):
        assert f"rule {rule}:" in out, rule


def test_dataset_overrides_win_over_preset_and_method_and_say_so():
    """`datasets.<name>.overrides.<stage>`: that dataset's own stage keys, over the preset's and
    the method's; `wsss explain` / `wsss params` name them as the source; a block that is not a
    stage is one config line."""
    cfg = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())
    cfg["datasets"]["real"] = {"kind": "voc", "preset": "tiny", "root": "x",
                               "overrides": {"train_classifier": {"lr": 3.0e-4, "epochs": 16},
                                             "make_masks": {"alpha": 0.5}}}
    cfg["methods"]["cam"]["presets"]["tiny"]["make_masks"] = {"alpha": 0.7, "bg": 0.3}
    cfg = wc.validate_config(wc.apply_defaults(cfg))
    tiny = cfg["presets"]["tiny"]
    p = wc.stage_params(cfg, "real", "cam", "train_classifier")
    assert (p["lr"], p["epochs"], p["crop"]) == (3.0e-4, 16, tiny["train_classifier"]["crop"])
    m = wc.stage_params(cfg, "real", "cam", "make_masks")
    assert (m["alpha"], m["bg"]) == (0.5, 0.3)           # dataset > method > preset
    assert wc.stage_params(cfg, "toy", "cam", "train_classifier") == tiny["train_classifier"]
    src = wc.stage_params_sources(cfg, "real", "cam", "make_masks")
    assert src["alpha"] == (0.5, "datasets.real.overrides.make_masks.alpha")
    assert src["bg"] == (0.3, "methods.cam.presets.tiny.make_masks.bg")
    assert src["rule"][1] == "presets.tiny.make_masks.rule"
    cfg["datasets"]["real"]["overrides"] = {"cobra": {"tau": 1}}
    with pytest.raises(ConfigError, match=r"datasets\.real\.overrides\.cobra: not a stage"):
        wc.validate_config(cfg)


def test_a_part_from_before_the_key_is_named_not_a_keyerror(toy_root):
    """An index part written before `long_side` existed has no such key: the merge refuses it
    with the one-line DataError, not a KeyError while formatting the message."""
    new = build_index("toy", "toy", toy_root, LISTS, progress=False, splits=("val",), long_side=40)
    old = build_index("toy", "toy", toy_root, LISTS, progress=False, splits=("train",))
    del old["long_side"]
    with pytest.raises(DataError, match=r"long_side \(None vs 40\)"):
        merge_index_parts([new, old])


def test_voc632_levers_change_only_their_lever():
    """scripts/voc632_levers.yaml: each method entry resolves to `cam`'s voc632 parameters except
    the one lever its name says (classifier seed, backbone with the segmentation encoder that
    starts from it, weight decay, the segmentation network's seed, the training scale range
    with a classifier seed), and each dataset entry
    voc632_irnN is voc632 (same photos, size, every stage's parameters) except
    train_irn.epochs N, so docs/results.md's comparisons hold one thing fixed at a time."""
    from wsss_core.config import STAGES, dataset_config, load_config, method_params
    cfg = load_config(REPO_ROOT / "config.yaml", REPO_ROOT / "scripts" / "voc632.yaml",
                      REPO_ROOT / "scripts" / "voc632_levers.yaml")

    def resolved(method, dataset="voc632"):
        stages = {s: wc.stage_params(cfg, dataset, method, s) for s in STAGES}
        return stages, method_params(cfg, dataset, method)["model"]

    base_stages, base_model = resolved("cam")

    def lite_seg(n):  # the segmentation encoder that starts from a Lite<n> classifier
        encoders = base_stages["train_seg"]["encoders"]
        return {"encoders": {**encoders, "deeplabv3plus": f"tu-tf_efficientnet_lite{n}"}}
    expected = {"cam_seed1": ({"train_classifier": {"seed": 1}}, {}),
                "cam_seed2": ({"train_classifier": {"seed": 2}}, {}),
                "cam_lite1": ({"train_seg": lite_seg(1)}, {"backbone": "tf_efficientnet_lite1"}),
                "cam_lite2": ({"train_seg": lite_seg(2)}, {"backbone": "tf_efficientnet_lite2"}),
                "cam_lite2_seed1": ({"train_classifier": {"seed": 1}, "train_seg": lite_seg(2)},
                                    {"backbone": "tf_efficientnet_lite2"}),
                "cam_wd05": ({"train_classifier": {"weight_decay": 0.05}}, {}),
                "cam_segseed1": ({"train_seg": {"seed": 1}}, {}),
                "cam_segseed2": ({"train_seg": {"seed": 2}}, {}),
                **{f"cam_sr{tail}": ({"train_classifier": {"scale_range": [140, 280], **seed}}, {})
                   for tail, seed in (("", {}), ("_seed1", {"seed": 1}), ("_seed2", {"seed": 2}))}}
    levers = yaml.safe_load((REPO_ROOT / "scripts" / "voc632_levers.yaml").read_text())
    assert set(expected) == set(levers["methods"])
    for method, (stage_changes, model_changes) in expected.items():
        stages, model = resolved(method)
        for stage in STAGES:
            assert stages[stage] == {**base_stages[stage], **stage_changes.get(stage, {})}, (method, stage)
        assert model == {**base_model, **model_changes}, method
    assert base_stages["train_irn"]["epochs"] == 8
    base_ds = {k: v for k, v in dataset_config(cfg, "voc632").items() if k != "overrides"}
    assert set(levers["datasets"]) == {"voc632_irn4", "voc632_irn16", "voc632_irn32"}
    for dataset in levers["datasets"]:
        epochs = int(dataset.removeprefix("voc632_irn"))
        assert {k: v for k, v in dataset_config(cfg, dataset).items() if k != "overrides"} == base_ds
        for method in ("cam", "cam_seed1"):
            stages, model = resolved(method, dataset)
            want, want_model = resolved(method)
            for stage in STAGES:
                change = {"epochs": epochs} if stage == "train_irn" else {}
                assert stages[stage] == {**want[stage], **change}, (dataset, method, stage)
            assert model == want_model
