"""Training precision (`precision: fp32 | bf16 | fp16`, a key of every training stage).

fp32 trains in full precision, as the official code of the implemented papers does. bf16 and fp16 run the
forward under `torch.autocast` with that dtype (on CUDA, or on the CPU where the CPU supports
it); fp16 on CUDA also scales the loss (`torch.amp.GradScaler`), bf16 needs no scaling.

Losses whose value hinges on small differences of large numbers — the cosine similarity,
softmax / log-sum-exp and normalisation parts of every contrastive loss — compute in fp32
under any setting: wrap them in `float32` (autocast off, floating inputs cast up).

Every stage places its networks with `place_model`: convolution weights in channels-last
layout, which oneDNN (CPU) and cuDNN run faster than NCHW (measured on CPU, 2 threads, batch
16 at 224 px: EfficientNet-Lite0 1.35x training / 1.74x inference, DeepLabV3+ on it 1.46x /
1.52x; `bench/bench_channels_last.py`); the values are those of NCHW up to float rounding.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

import torch
from torch import nn

from .errors import ConfigError

#: config name → autocast dtype (None: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

F = TypeVar("F", bound=Callable)
_LOW = (torch.float16, torch.bfloat16)


def _dtype(precision: str) -> torch.dtype | None:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ConfigError(f"config key precision: {precision!r} is not one of "
                          f"{', '.join(PRECISIONS)}") from None


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the context a training forward runs in: `torch.autocast(device.type,
    dtype)` for bf16 / fp16, a null context for fp32. Raises ConfigError for another name."""
    dtype = _dtype(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs on CUDA (its gradients underflow otherwise); None otherwise."""
    if _dtype(precision) is torch.float16 and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def float32(fn: F) -> F:
    """Run `fn` in (at least) fp32 whatever autocast region it is called from: autocast is
    switched off for the call and every fp16 / bf16 tensor argument is cast to float32 (fp32
    and fp64 tensors and integer indices pass unchanged). Gradients flow back to the inputs in
    their own dtype."""

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in _LOW else x

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def place_model(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` moved to `device` (in place, returned), its 4-D parameters and buffers
    (convolution weights) in channels-last memory format; inputs may stay NCHW, the
    convolutions then return channels-last outputs. Code after a convolution must therefore
    use `reshape` / `flatten`, not `view`, on feature maps."""
    return module.to(device=device, memory_format=torch.channels_last)
