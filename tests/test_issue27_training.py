"""Issue 27 items 5 and 7: a diverging run is one wsss line (exit 2) naming the learning rate,
with 1-based epochs, the last finite epoch's checkpoint kept aside and never resumed; a
training log states the batch actually used."""
from __future__ import annotations

import json

import pytest
import torch

from wsss_core.engine import FitConfig, fit
from wsss_core.errors import ConfigError

CPU = torch.device("cpu")


class _Ones(torch.utils.data.Dataset):
    def __init__(self, n: int = 4) -> None:
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": torch.ones(3)}


def _run(tmp_path, nan_at_step: int | None, resume: bool = False, epochs: int = 3):
    """fit over 4 images, batch 2 (2 steps per epoch); the loss is NaN at global step `nan_at_step`."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": layer.parameters(), "base_lr": 0.1}], lr=0.1)
    steps = []

    def step(batch, ctx):
        steps.append(ctx.step)
        loss = layer(batch["x"]).pow(2).mean()
        return {"total": loss * float("nan") if ctx.step == nan_at_step else loss}

    cfg = FitConfig(epochs=epochs, batch_size=2, seed=0, stage="train_seg", precision="fp32")
    fit(_Ones(), cfg, step, [opt], layer.state_dict, layer.load_state_dict,
        checkpoint=tmp_path / "checkpoint.pt", log_csv=tmp_path / "log.csv", device=CPU,
        resume=resume, fingerprint="same")
    return steps


def test_divergence_is_a_config_error_with_one_based_epochs(tmp_path):
    # global step 3 (0-based) is the second step of the second epoch
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, nan_at_step=3)
    msg = str(e.value)
    assert msg.startswith("config key train_seg.lr: training diverged")
    assert "at epoch 2/3, step 2 (step 4 of 6" in msg and "\n" not in msg
    kept = tmp_path / "diverged_checkpoint.pt"
    assert str(kept) in msg and kept.is_file() and not (tmp_path / "checkpoint.pt").exists()
    assert torch.load(kept, weights_only=True)["epoch"] == 1  # the last finite epoch
    assert not (tmp_path / "log.csv").exists()  # no declared output of a failed run


def test_diverged_checkpoint_is_never_resumed(tmp_path):
    with pytest.raises(ConfigError):
        _run(tmp_path, nan_at_step=3)
    steps = _run(tmp_path, nan_at_step=None, resume=True)
    assert steps[0] == 0  # started over, not after epoch 1


def test_divergence_before_any_epoch_keeps_nothing(tmp_path):
    (tmp_path / "diverged_checkpoint.pt").write_bytes(b"an older run's")
    with pytest.raises(ConfigError, match="at epoch 1/3, step 1 .*no epoch had finished"):
        _run(tmp_path, nan_at_step=0)
    assert not (tmp_path / "diverged_checkpoint.pt").exists()


def test_train_classifier_divergence_is_exit_2(repo_root, toy_root, tmp_path, capsys, monkeypatch):
    """A stage: the loss turned NaN is one line under the stage's key, never 'a bug'."""
    from wsss_core.config import load_config, method_params, stage_params
    from wsss_core.data.index import build_index
    from wsss_core.stages import train_classifier

    cfg = load_config(repo_root / "config.yaml")
    index = tmp_path / "index.json"
    index.write_text(json.dumps(build_index("toy_small", "toy", toy_root,
                                            {s: s for s in ("train_aug", "train", "val")}, progress=False)))
    params = dict(stage_params(cfg, "toy", "cam", "train_classifier"), epochs=1, crop=32,
                  scale_range=[32, 40], batch_size=4, precision="fp32")
    method = method_params(cfg, "toy", "cam")
    import wsss_core.engine as engine

    def nan_fit(dataset, cfg, step_fn, *args, **kwargs):
        def step(batch, ctx):  # the second step's loss is NaN, as a too-high lr gives
            out = step_fn(batch, ctx)
            return {**out, "total": out["total"] * float("nan")} if ctx.step == 1 else out
        return engine.fit(dataset, cfg, step, *args, **kwargs)
    monkeypatch.setattr(train_classifier, "fit", nan_fit)
    rc = train_classifier.main(["--index", str(index), "--method", json.dumps(method),
                                "--params", json.dumps(params), "--out", str(tmp_path / "model.pt")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if "wsss: error" in line]
    assert len(lines) == 1 and "config key train_classifier.lr: training diverged" in lines[0], err
    assert "at epoch 1/1, step 2" in lines[0] and "unexpected" not in err
    assert not (tmp_path / "model.pt").exists()


def test_log_states_the_batch_actually_used(repo_root, toy_root, tmp_path, capsys):
    """12 train_aug images, batch_size 64: one step of 12 per epoch, and the log says so."""
    from wsss_core.engine import batch_note
    assert batch_note(100, 64) == "batch 64"
    assert batch_note(16, 64) == "batch 16 (batch_size 64 exceeds the 16 images: one step of 16 per epoch)"
    assert batch_note(64, 8, world_size=2) == "batch 8, 4 per process"

    from wsss_core.config import load_config, method_params, stage_params
    from wsss_core.data.index import build_index
    from wsss_core.stages import train_classifier

    cfg = load_config(repo_root / "config.yaml")
    index = tmp_path / "index.json"
    index.write_text(json.dumps(build_index("toy_small", "toy", toy_root,
                                            {s: s for s in ("train_aug", "train", "val")}, progress=False)))
    params = dict(stage_params(cfg, "toy", "cam", "train_classifier"), epochs=1, crop=32,
                  scale_range=[32, 40], batch_size=64, precision="fp32")
    method = json.dumps(method_params(cfg, "toy", "cam"))
    rc = train_classifier.main(["--index", str(index), "--method", method,
                                "--params", json.dumps(params), "--out", str(tmp_path / "model.pt")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "batch 12 (batch_size 64 exceeds the 12 images: one step of 12 per epoch)" in err
    assert "batch 64," not in err
