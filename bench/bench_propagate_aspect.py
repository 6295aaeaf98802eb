"""Peak memory and time of `propagate` (IRN boundary map + random walk) for a square image and
a panorama of the same pixel count, side by side.

    python bench/bench_propagate_aspect.py [--side 1024] [--aspect 4] [--backbone resnet_tiny]
                                           [--threads 2] [--no-square-pad]

Each case runs in a fresh process (peak resident memory is per process): an IRN with random
weights (the cost does not depend on the weights), one class map at stride 4, the boundary map
of the image and its mirror, then the sparse random walk with the propagate stage's defaults
(radius 5, beta 10, 2^8 steps). Besides the current padding (each side padded on its own to
max(crop, ceil16(side))), it also runs the square padding used before issue 11
(`max(crop, ceil16(H), ceil16(W))` on both sides) by passing the long side as the crop, which
makes the two paddings coincide — so the ratios of one run show what the change saves. Sides
shorter than the crop are still padded up to it (the reference's input for small images), so
pick a panorama whose short side is at least the crop to see cost follow the pixel count.
The machine's load inflates the seconds; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time


def run_case(height: int, width: int, crop: int, backbone: str, threads: int) -> dict:
    """One propagate of an image `height x width` in this process → seconds and peak RSS."""
    import torch

    from wsss_core.models.irn import IRN
    from wsss_core.ops.random_walk import random_walk

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = IRN(backbone, strides=(2, 2, 2, 1)).eval()
    image = torch.randn(1, 3, height, width)
    cam = torch.rand(1, (height - 1) // 4 + 1, (width - 1) // 4 + 1)
    start = time.perf_counter()
    with torch.no_grad():
        boundary = model.boundary_map(torch.cat([image, image.flip(-1)]), crop=crop)
        random_walk(cam, boundary, radius=5, beta=10.0, exp_times=8)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=1024, help="side of the square image (pixels)")
    p.add_argument("--aspect", type=int, default=4, help="panorama width / height")
    p.add_argument("--crop", type=int, default=512, help="the IRN training crop (paper: 512)")
    p.add_argument("--backbone", default="resnet_tiny", help="IRN backbone (timm name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-square-pad", action="store_true",
                   help="skip the square padding of before issue 11 (it needs far more memory)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    a = p.parse_args()
    if a.case:
        h, w, crop = (int(v) for v in a.case.split(","))
        print(json.dumps(run_case(h, w, crop, a.backbone, a.threads)))
        return

    area = a.side * a.side
    pano_h = round(math.sqrt(area / a.aspect))
    pano_w = area // pano_h
    cases = [("square", a.side, a.side), ("panorama", pano_h, pano_w)]
    paddings = [("per side", lambda h, w: a.crop)]
    if not a.no_square_pad:
        paddings.append(("square (before)", lambda h, w: max(a.crop, -(-max(h, w) // 16) * 16)))
    rows = []
    for pad_name, crop_of in paddings:
        for name, h, w in cases:
            crop = crop_of(h, w)
            out = subprocess.run([sys.executable, __file__, "--case", f"{h},{w},{crop}",
                                  "--backbone", a.backbone, "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            padded = max(crop, -(-h // 16) * 16) * max(crop, -(-w // 16) * 16)
            rows.append((pad_name, name, h, w, padded, result["seconds"], result["peak_mb"]))
    print(f"propagate of one image, {a.backbone}, crop {a.crop}, {a.threads} thread(s)")
    print(f"{'padding':<16}{'image':<10}{'H x W':>12}{'pixels':>10}{'padded px':>12}"
          f"{'seconds':>10}{'peak MB':>10}")
    for pad_name, name, h, w, padded, seconds, peak in rows:
        print(f"{pad_name:<16}{name:<10}{f'{h}x{w}':>12}{h * w:>10}{padded:>12}{seconds:>10.2f}"
              f"{peak:>10.0f}")
    for pad_name, *_ in paddings:
        sq, pano = [r for r in rows if r[0] == pad_name]
        print(f"{pad_name}: panorama / square  time x{pano[5] / sq[5]:.2f}  "
              f"peak memory x{pano[6] / sq[6]:.2f}")


if __name__ == "__main__":
    main()
