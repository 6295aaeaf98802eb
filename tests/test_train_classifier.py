"""Classifier training: an interrupted run resumed from its last complete epoch ends with the
same weights as an uninterrupted one (CPU), the CSV log has a row per epoch, and a bad
parameter block fails with one line."""
from __future__ import annotations

import copy

import pytest
import torch

from wsss_core.config import load_config, method_params, stage_params
from wsss_core.data.datasets import ClassificationDataset
from wsss_core.data.index import build_index
from wsss_core.errors import ConfigError
from wsss_core.stages.train_classifier import train_classifier


@pytest.fixture(scope="module")
def setup(repo_root, toy_root, tmp_path_factory):
    cfg = load_config(repo_root / "config.yaml")
    index_path = tmp_path_factory.mktemp("idx") / "index.json"
    import json
    index_path.write_text(json.dumps(build_index("toy_small", "toy", toy_root,
                                                 {s: s for s in ("train_aug", "train", "val")}, progress=False)))
    params = dict(stage_params(cfg, "toy", "cobra", "train_classifier"), epochs=2, crop=48,
                  scale_range=[44, 56], batch_size=4)
    method = method_params(cfg, "toy", "cobra")
    method["cobra"] = dict(method["cobra"], aux_start_epoch=1,
                           top_bot_k=[3, 1, 1, 3])  # both epoch kinds; a 48-px crop is a 3x3 grid at stride 16
    return index_path, method, params


def _weights(path):
    return torch.load(path, weights_only=True)["state"]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(setup, tmp_path, monkeypatch):
    index_path, method, params = setup
    full = train_classifier(index_path, method, params, tmp_path / "full" / "model.pt", threads=1)

    real_set_epoch = ClassificationDataset.set_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("simulated kill")
        real_set_epoch(self, epoch)

    monkeypatch.setattr(ClassificationDataset, "set_epoch", crash_in_second_epoch)
    out = tmp_path / "resumed" / "model.pt"
    with pytest.raises(KeyboardInterrupt):
        train_classifier(index_path, method, params, out, threads=1)
    # killed midway: the checkpoint is there, but no declared output (model, epoch log)
    assert not out.exists() and (out.parent / "checkpoint.pt").is_file()
    assert not (out.parent / "train_log.csv").exists()
    monkeypatch.setattr(ClassificationDataset, "set_epoch", real_set_epoch)
    train_classifier(index_path, method, params, out, resume=True, threads=1)

    a, b = _weights(full), _weights(out)
    for branch in a:
        for k in a[branch]:
            assert torch.equal(a[branch][k], b[branch][k]), (branch, k)
    rows = (out.parent / "train_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + params["epochs"] and "sap" in rows[0]

    # a finished run leaves no checkpoint a later run could resume: when Snakemake deletes the
    # outputs and re-runs the job (e.g. after a code change) it trains afresh, to the same weights
    assert not (out.parent / "checkpoint.pt").exists()
    (out.parent / "train_log.csv").unlink()
    out.unlink()
    train_classifier(index_path, method, params, out, resume=True, threads=1)
    assert all(torch.equal(v, _weights(out)["cnn"][k]) for k, v in a["cnn"].items())


def test_unknown_plugin_key_is_one_line_config_error(setup, tmp_path):
    index_path, method, params = setup
    bad = copy.deepcopy(method)
    bad["cobra"]["tau_typo"] = 0.1
    with pytest.raises(ConfigError, match=r"cobra\.tau_typo"):
        train_classifier(index_path, bad, params, tmp_path / "m.pt", threads=1)
