"""The plug-in contract end to end: a method written here, outside wsss_core, registered by
its own module and named in the config (`methods.<key>.module`), runs the whole smoke DAG
(classifier → CAMs → seeds → IR labels → IRN → walk → masks → segmentation → evaluation)
without any shared file knowing it. Also: no plug-in name appears in shared code."""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import copy_workflow

from wsss_core.metrics import read_miou

PLUGIN = textwrap.dedent('''
    """A throwaway method: a ResNet CAM whose map is called `activation`, with its own
    settings blocks, a per-image extra input (a grid of cells) it checks in every step, and a
    segmentation head of its own (single-stage): CAMs against a constant background score."""
    from dataclasses import dataclass, field

    import numpy as np
    import torch

    from wsss_core.methods import Method, register_method
    from wsss_core.methods.base import MapSpec, make_optimizer
    from wsss_core.methods.common import merge_flip, multilabel_soft_margin
    from wsss_core.models.resnet_cam import ResNetCAM


    @dataclass
    class NetSettings:
        backbone: str = "resnet_tiny"
        strides: list = field(default_factory=lambda: [2, 2, 1, 1])


    @dataclass
    class LossSettings:
        weight: float = 1.0
        cell: int = 8


    def cells(image, size=8):
        h, w = image.shape[:2]
        ys, xs = np.mgrid[:h, :w]
        return (ys // size) * ((w + size - 1) // size) + xs // size + 256


    @register_method
    class Throwaway(Method):
        name = "throwaway"
        settings_blocks = {"model": NetSettings, "throwaway": LossSettings}
        maps = (MapSpec("activation", strided=True),)
        backbone_module = "cnn"
        extra_inputs = ("cells",)
        single_stage = True

        def build(self):
            m = self.blocks["model"]
            return {"cnn": ResNetCAM(m.backbone, self.num_classes - 1, with_background=False,
                                     strides=tuple(m.strides), detach_early=False,
                                     pretrained=False, frozen_bn=False)}

        def extra_input_fns(self):
            import functools
            return {"cells": functools.partial(cells, size=self.blocks["throwaway"].cell)}

        def optimizers(self, lr, weight_decay, momentum, kind="sgd"):
            base, new = self.models["cnn"].param_groups()
            return [make_optimizer([{"params": base}, {"params": new, "lr_mult": 10.0}],
                                   lr, weight_decay, momentum, kind)]

        def training_step(self, batch, ctx):
            x = batch["image"].to(ctx.device)
            assert batch["cells"].shape == (x.shape[0],) + x.shape[-2:]
            loss = self.blocks["throwaway"].weight * multilabel_soft_margin(
                self.models["cnn"](x)["logits"], batch["label"].to(ctx.device))
            return {"total": loss, "cls": loss}

        @torch.no_grad()
        def infer(self, pair):
            return {"activation": merge_flip(self.models["cnn"].cam(pair))}

        @torch.no_grad()
        def segment(self, images):
            cam = self.models["cnn"].cam(images)
            cam = cam / (cam.flatten(2).max(-1).values[..., None, None] + 1e-5)
            scores = torch.cat([torch.full_like(cam[:, :1], 0.3), cam], dim=1)
            return torch.nn.functional.interpolate(scores, size=images.shape[-2:], mode="bilinear",
                                                   align_corners=False)
''')

DATA = {"kind": "toy", "preset": "smoke", "seed": 4, "image_size": 48, "num_train_aug": 16,
        "num_train_eval": 6, "num_val": 6}
FAST = {"train_classifier": {"epochs": 1, "crop": 48, "scale_range": [40, 56], "batch_size": 8},
        "export_cams": {"scales": [1.0]}, "train_irn": {"epochs": 1, "crop": 48, "batch_size": 8,
                      "backbone": "resnet_tiny", "backbone_from": "classifier"},
        "train_seg": {"epochs": 1, "crop": 48, "batch_size": 8,
                      "encoders": {"deeplabv3plus": "tu-resnet_tiny", "segformer": "mit_b0"}},  # from the classifier
        "eval_seg": {"scales": [1.0]}}


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory, repo_root, cli_env):
    wd = tmp_path_factory.mktemp("plugin")
    copy_workflow(repo_root, wd)
    (wd / "plugins").mkdir()
    (wd / "plugins" / "throwaway_plugin.py").write_text(PLUGIN)
    cfg = yaml.safe_load((repo_root / "config.yaml").read_text())
    smoke = copy.deepcopy(cfg["presets"]["tiny"])
    for stage, over in FAST.items():
        smoke[stage].update(over)
    extra = {"datasets": {"smoke": DATA}, "presets": {"smoke": smoke},
             "methods": {"toss": {"plugin": "throwaway", "module": "throwaway_plugin",
                                  "presets": {"smoke": {"model": {"backbone": "resnet_tiny"},
                                                        "throwaway": {"cell": 6}}}}}}
    (wd / "plugin.yaml").write_text(yaml.safe_dump(extra))
    env = dict(cli_env, PYTHONPATH=str(wd / "plugins"))
    targets = [f"results/smoke/toss/{f}" for f in ("seed_miou.txt", "mask_miou.txt", "seg_miou.txt",
                                                   "seg-multistage/seg_miou.txt")]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(wd / "Snakefile"), "-d", str(wd), "--cores",
           "2", "--configfile", str(wd / "plugin.yaml"), "--", *targets]
    result = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return wd / "results" / "smoke" / "toss"


@pytest.mark.slow
def test_a_method_defined_outside_the_package_runs_the_smoke_dag(plugin_run):
    base = plugin_run
    for name in ("seed", "mask", "seg", "seg-multistage/seg"):
        assert 0.0 <= read_miou(base / f"{name}_miou.txt") <= 100.0
    # single-stage: seg_miou.txt comes from the method's own head, the shared route has its own
    assert json.loads((base / "seg_metrics.json").read_text())["model"] == "method:throwaway"
    assert json.loads((base / "seg-multistage" / "seg_metrics.json").read_text())["model"] == "deeplabv3plus"
    assert not (base / "seg" / "model.pt").exists()
    with h5py.File(base / "cams.h5", "r") as f:
        assert json.loads(f.attrs["roles"]) == {"walk": "activation", "fuse": ["activation"],
                                                "agnostic": ""}
        assert json.loads(f.attrs["params"])["throwaway"] == {"cell": 6}
    # the extra input was computed once per train_aug image and cached beside the classifier
    cached = list((base / "classifier" / "extra_inputs").glob("*/cells/*.npy"))
    assert len(cached) == DATA["num_train_aug"]
    # IRN (frozen backbone, backbone_from: classifier) started from the classifier's backbone
    # through Method.backbone_state: its convolutions are the classifier's
    import torch
    classifier = torch.load(base / "classifier" / "model.pt", weights_only=True)["state"]["cnn"]
    irn = torch.load(base / "irn" / "model.pt", weights_only=True)["state"]
    convs = [k for k, v in irn.items() if k.startswith("backbone.") and v.ndim == 4]
    assert convs and all(torch.equal(irn[k], classifier[k]) for k in convs)


#: every plug-in name, registered or announced; `cam` is also the field's word for a class
#: activation map (CAM), so it is left out
NAMES = ("cobra", "seco", "bnr", "fbr", "ssc")
SHARED = ("wsss_core", "rules", "Snakefile")


def test_no_plugin_name_in_shared_code(repo_root):
    from wsss_core.methods import list_methods
    names = set(NAMES) | {n for n in list_methods() if n != "cam"}
    word = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b", re.IGNORECASE)
    found = []
    for top in SHARED:
        paths = [repo_root / top] if (repo_root / top).is_file() else sorted((repo_root / top).rglob("*"))
        for path in paths:
            rel = path.relative_to(repo_root)
            if not path.is_file() or rel.parts[:2] == ("wsss_core", "methods") or path.suffix in (".pyc",):
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if word.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found[:40])


_DESCRIBE = textwrap.dedent('''
    import json, sys
    from wsss_core.methods import describe_methods, keep_descriptions
    keep_descriptions(sys.argv[1])
    print(json.dumps({"torch": None, "described": describe_methods()}))
    print(json.dumps({"torch": "torch" in sys.modules}))
''')


def _describe_in_a_new_process(folder: Path) -> tuple[dict, bool]:
    done = subprocess.run([sys.executable, "-c", _DESCRIBE, str(folder)], capture_output=True,
                          text=True, check=True)
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    return first["described"], second["torch"]


def test_plugin_descriptions_are_kept_so_a_workflow_start_imports_no_plugin(tmp_path):
    """Snakemake parses the workflow at every start (twice per cluster job): the second process
    reads what the first learnt from the plug-ins (settings blocks, single-stage flag) and
    imports neither a plug-in nor torch; a damaged description is rebuilt, not trusted."""
    from wsss_core.methods import method_class
    from wsss_core.methods.settings import settings_schema

    folder = tmp_path / "cache"
    built, imported = _describe_in_a_new_process(folder)
    assert imported, "the first process must build the descriptions from the plug-ins"
    kept, imported = _describe_in_a_new_process(folder)
    assert not imported and kept == built
    for name, entry in built.items():
        cls = method_class(name)
        assert entry["single_stage"] == cls.single_stage
        assert list(entry["blocks"]) == list(cls.settings_blocks)
        assert all(entry["blocks"][b] == settings_schema(c) for b, c in cls.settings_blocks.items())
    (stored,) = folder.glob("methods-*.json")
    stored.write_text('{"cam": ')
    rebuilt, imported = _describe_in_a_new_process(folder)
    assert imported and rebuilt == built
