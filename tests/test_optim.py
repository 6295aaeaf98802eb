"""The shared schedule and optimiser builder (wsss_core/optim.py): poly decay, linear warm-up,
per-group settings."""
from __future__ import annotations

import pytest
import torch

from wsss_core.optim import lr_factor, make_optimizer, set_lr


def _oracle(step: int, max_step: int, power: float, warmup: int, ratio: float) -> float:
    """The schedule written out: poly decay of the clamped step, times the warm-up ramp."""
    t = min(step, max_step)
    poly = (1 - t / max_step) ** power
    ramp = ratio + (1 - ratio) * step / warmup if step < warmup else 1.0
    return poly * ramp


@pytest.mark.parametrize("warmup,ratio", [(0, 0.0), (10, 0.0), (10, 0.1), (3, 0.5)])
def test_lr_factor_matches_the_written_schedule(warmup, ratio):
    for step in range(0, 130, 7):
        assert lr_factor(step, 100, 0.9, warmup, ratio) == pytest.approx(_oracle(step, 100, 0.9, warmup, ratio))
    assert lr_factor(0, 100, 0.9, 10, 0.0) == 0.0  # warm-up from zero starts at zero
    assert lr_factor(0, 0, 0.9) == 1.0  # no steps: no decay


def test_groups_keep_their_own_warmup_and_weight_decay():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    opt = make_optimizer([{"params": [a], "lr_mult": 1.0},
                          {"params": [b], "lr_mult": 10.0, "weight_decay": 0.05, "warmup_steps": 4},
                          {"params": [frozen]}], 0.01, 1e-4, 0.9, "adamw")
    assert len(opt.param_groups) == 2  # a group without trainable parameters is dropped
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.05]
    set_lr([opt], 2, 100, 1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.98)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.98 * 0.5)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer([{"params": [a]}], 0.01, 0.0, 0.9, "lamb")
