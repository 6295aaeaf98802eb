"""Where a training step of the tiny preset's DeepLabV3+ (smp, Lite0 encoder) spends its time,
side by side in one run: the preset (256 decoder channels, output stride 16) against a
128-channel decoder and output stride 8, and the encoder alone.

    python bench/bench_seg_step.py [--threads 2] [--batch 8] [--crop 192] [--repeats 3]

One step = forward, cross-entropy against random labels, backward, on channels-last weights
(`place_model`), random weights (speed does not depend on them); the best of `repeats` timed
steps after one warm-up, the configurations interleaved so that a change in machine load hits
them alike. Printed: seconds per step and the ratio to the preset; for the encoder alone, its
forward + backward (of the mean of every feature map) and its share of the preset's step.
"""
from __future__ import annotations

import argparse
import time

import segmentation_models_pytorch as smp
import torch
from torch import nn

from wsss_core.precision import place_model

CONFIGS = {"preset (256 ch, OS 16)": (256, 16), "decoder 128 ch": (128, 16), "output stride 8": (256, 8)}


def deeplab(channels: int, output_stride: int, classes: int) -> nn.Module:
    """smp DeepLabV3+ on `tu-tf_efficientnet_lite0` with the ASPP rates the project uses."""
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    return smp.DeepLabV3Plus(encoder_name="tu-tf_efficientnet_lite0", encoder_weights=None,
                             encoder_output_stride=output_stride, decoder_atrous_rates=rates,
                             decoder_channels=channels, classes=classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=192)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.crop, a.crop)
    y = torch.randint(0, 9, (a.batch, a.crop, a.crop))
    models = {name: place_model(deeplab(ch, os_, 9), torch.device("cpu")).train()
              for name, (ch, os_) in CONFIGS.items()}

    def step(model: nn.Module) -> float:
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    def encoder_step(model: nn.Module) -> float:
        start = time.perf_counter()
        sum(f.mean() for f in model.encoder(x)).backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in [*CONFIGS, "encoder alone"]}
    for r in range(a.repeats + 1):
        for name, model in models.items():
            times[name].append(step(model))
        times["encoder alone"].append(encoder_step(models[next(iter(CONFIGS))]))
    best = {name: min(t[1:]) for name, t in times.items()}
    base = best[next(iter(CONFIGS))]
    print(f"batch {a.batch}, crop {a.crop}, {a.threads} thread(s), best of {a.repeats}")
    for name, sec in best.items():
        print(f"{name:24s} {sec:7.3f} s/step   x{sec / base:.2f} of the preset")


if __name__ == "__main__":
    main()
