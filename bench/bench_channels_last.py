"""NCHW against channels-last convolution weights (`wsss_core.precision.place_model`) for
the networks of the tiny presets, side by side in one run.

    python bench/bench_channels_last.py [--threads 2] [--batch 16] [--size 224] [--repeats 5]

For each network (timm's EfficientNet-Lite0 trunk, which every tiny preset starts from, and
the DeepLabv3+ on smp's Lite0 encoder, random weights: speed does not depend on them) and each mode (inference under no_grad; training: a
forward and backward of the mean output), the best of `repeats` timed passes after one
warm-up, with the model in NCHW and then placed by `place_model` (inputs stay NCHW, as the
stages feed them). Printed: seconds per pass and the NCHW / channels-last ratio, and the
largest absolute difference of the two inference outputs (float rounding only).
"""
from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
from torch import nn

from wsss_core.models.segmentation import create_seg_model
from wsss_core.precision import place_model


def best_time(model: nn.Module, x: torch.Tensor, train: bool, repeats: int) -> float:
    model.train(train)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        if train:
            out = model(x)
            (out[-1] if isinstance(out, (list, tuple)) else out).float().mean().backward()
        else:
            with torch.no_grad():
                model(x)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    nets = {"lite0 trunk": timm.create_model("tf_efficientnet_lite0", pretrained=False,
                                             num_classes=0, global_pool=""),
            "deeplabv3plus lite0": create_seg_model("deeplabv3plus", "tu-tf_efficientnet_lite0", 9,
                                                    pretrained=False)}
    x = torch.randn(a.batch, 3, a.size, a.size)
    print(f"batch {a.batch} x 3 x {a.size} x {a.size}, {a.threads} threads, best of {a.repeats}")
    print(f"{'network':<22}{'mode':<7}{'NCHW s':>9}{'chan-last s':>13}{'ratio':>7}{'max |diff|':>12}")
    for name, net in nets.items():
        placed = place_model(copy.deepcopy(net), cpu)
        diff = (output(net, x) - output(placed, x)).abs().max().item()
        for mode in ("infer", "train"):
            nchw = best_time(net, x, mode == "train", a.repeats)
            last = best_time(placed, x, mode == "train", a.repeats)
            print(f"{name:<22}{mode:<7}{nchw:>9.3f}{last:>13.3f}{nchw / last:>7.2f}{diff:>12.2e}")


if __name__ == "__main__":
    main()
