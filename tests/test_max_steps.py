"""`max_steps` (train_classifier, train_irn, train_seg): a capped run stops after exactly that
many optimizer steps and is the uncapped run cut short — same batches, same losses, same
learning rates (the schedule stays the full run's); null (the default) changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset

from wsss_core.config import load_config, stage_params
from wsss_core.engine import FitConfig, fit, fit_config
from wsss_core.optim import make_optimizer
from wsss_core.param_schema import check_stage_params, stage_defaults


class Points(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)}


def _run(tmp_path, max_steps):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = make_optimizer([{"params": list(model.parameters())}], 0.1, 0.0, 0.9, "sgd")
    seen = []

    def step(batch, ctx):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        seen.append((ctx.step, ctx.max_step, opt.param_groups[0]["lr"], float(loss.detach())))
        return {"total": loss}

    cfg = FitConfig(epochs=3, batch_size=3, seed=1, max_steps=max_steps)
    fit(Points(), cfg, step, [opt], model.state_dict, model.load_state_dict,
        checkpoint=tmp_path / f"ck{max_steps}.pt", log_csv=tmp_path / f"log{max_steps}.csv",
        device=torch.device("cpu"))
    return seen, model.state_dict()


@pytest.mark.parametrize("cap", [1, 2, 4])
def test_capped_run_is_the_uncapped_run_cut_short(tmp_path, cap):
    full, _ = _run(tmp_path, None)
    assert len(full) == 9  # 3 steps of 3 per epoch, 3 epochs
    capped, _ = _run(tmp_path, cap)
    assert len(capped) == cap
    assert capped == full[:cap]  # steps, schedule length, learning rates, losses
    assert all(max_step == 9 for _, max_step, _, _ in capped)


def test_a_cap_beyond_the_schedule_is_the_full_run(tmp_path):
    full, w_full = _run(tmp_path, None)
    long, w_long = _run(tmp_path, 100)
    assert long == full and all(torch.equal(w_full[k], w_long[k]) for k in w_full)


def test_max_steps_is_null_by_default_in_every_training_stage(repo_root):
    cfg = load_config(repo_root / "config.yaml")
    for stage in ("train_classifier", "train_irn", "train_seg"):
        params = stage_params(cfg, "toy", "cam", stage)
        # config.yaml leaves it out (cached results keep their Snakemake params); the door fills null
        assert "max_steps" not in params and fit_config(params, stage, "x").max_steps is None
        assert stage_defaults(stage)["max_steps"] is None
        capped = dict(copy.deepcopy(params), max_steps=2)
        assert fit_config(capped, stage, "x").max_steps == 2
        if stage != "train_seg":
            check_stage_params(stage, capped)
        with pytest.raises(Exception, match="max_steps"):
            check_stage_params(stage, dict(params, max_steps=0))
