"""The `precision` setting of the training stages (wsss_core/precision.py) and its use by the
shared training loop."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from wsss_core.engine import FitConfig, fit
from wsss_core.errors import ConfigError
from wsss_core.precision import autocast_factory, float32, grad_scaler

CPU = torch.device("cpu")


def test_autocast_factory_and_scaler_per_precision():
    x = torch.randn(4, 4)
    with autocast_factory("fp32", CPU)():
        assert (x @ x).dtype == torch.float32
    with autocast_factory("bf16", CPU)():
        assert (x @ x).dtype == torch.bfloat16
    assert grad_scaler("fp16", CPU) is None  # loss scaling is a CUDA fp16 matter
    assert grad_scaler("bf16", torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="precision: 'fp8'"):
        autocast_factory("fp8", CPU)


def test_float32_region_inside_autocast():
    @float32
    def gram(e, idx):
        assert not torch.is_autocast_enabled("cpu") and idx.dtype == torch.long
        return e @ e.T

    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram(x, torch.zeros(2, dtype=torch.long)).dtype == torch.float32
        assert gram(x.bfloat16(), torch.zeros(2, dtype=torch.long)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")  # restored after the call
    assert gram(x.double(), torch.zeros(2, dtype=torch.long)).dtype == torch.float64


class _Ones(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"x": torch.ones(3)}


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fit_runs_the_step_in_the_configured_precision(tmp_path, precision, dtype):
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": layer.parameters(), "base_lr": 0.1}], lr=0.1)
    seen = []

    def step(batch, ctx):
        y = layer(batch["x"])
        seen.append(y.dtype)
        return {"total": y.float().pow(2).mean()}

    cfg = FitConfig(epochs=1, batch_size=2, seed=0, precision=precision)
    fit(_Ones(), cfg, step, [opt], layer.state_dict, layer.load_state_dict,
        checkpoint=tmp_path / "checkpoint.pt", log_csv=tmp_path / "log.csv", device=CPU)
    assert seen == [dtype, dtype]
