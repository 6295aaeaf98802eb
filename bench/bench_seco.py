"""CPU time of SeCo's PAR refinement and LiL loss (vectorised vs loop forms, side by side) and
of one training step of the tiny preset, per part.

    python bench/bench_seco.py [ops|step|all] [--size 112] [--anchors 48] [--queue 4608]
                               [--dim 768] [--repeats 3] [--it 130] [--batch 16]
                               [--seco KEY=YAML ...] [--precision fp32|bf16] [--profile]

PAR: `wsss_core.ops.par.par_refine` (every neighbour a shifted view of one padded copy) against the formula
looped per pixel and neighbour, and the official structure (one replicate pad + one conv per
dilation: vectorised over pixels, looped over dilations).
LiL: `lil_loss` (reference variant) against the formula looped per anchor and bank entry, and
the official per-row structure (the similarity matmul vectorised; one Python iteration per
anchor for the rectification and another for the loss, the global count recomputed in each).
The formula loops run on a smaller problem (--loop-size, --loop-queue) that the vectorised
form also runs for the ratio. Forms are checked to agree before timing; medians of
interleaved runs.

Step (`step`): the tiny SeCo preset built from config.yaml as `train_classifier` builds it
(`method_params` + `stage_params` for the toy dataset, `create_method`, its AdamW groups),
a batch of `--batch` toy images (`wsss_core.data.toy.synthesize` at 224 px through the
method's own `train_views`) and one step at iteration `--it` (default 130: every loss on).
Each part is timed by wrapping the function the step calls (wall clock, medians over
`--repeats` steps after one warm-up step); nested parts are indented under their parent.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from wsss_core.methods.seco_losses import lil_loss
from wsss_core.ops.par import (COLOR_TEMP, POSITION_WEIGHT, neighbour_distances, neighbour_offsets,
                               par_refine)

DILATIONS = (1, 2, 4, 8, 12, 24)


def par_pixel_loop(image, masks, dilations=DILATIONS, iterations=10):
    """The formula, one pixel and one neighbour at a time (Python floats)."""
    _, _, h, w = image.shape
    masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=True)
    img = image[0].tolist()
    offs = neighbour_offsets(dilations)
    n = len(offs)
    dist = neighbour_distances(dilations)
    pos = (POSITION_WEIGHT * torch.softmax(-(dist / (dist.std() + 1e-8) / COLOR_TEMP) ** 2, 0)).tolist()
    nbrs, weights = {}, {}
    for i in range(h):
        for j in range(w):
            nb = [(min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)) for dy, dx in offs]
            kappa = [0.0] * n
            for c in range(3):
                vals = [img[c][y][x] for y, x in nb]
                mean = sum(vals) / n
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
                for k in range(n):
                    kappa[k] -= (abs(vals[k] - img[c][i][j]) / (std + 1e-8) / COLOR_TEMP) ** 2 / 3
            top = max(kappa)
            e = [math.exp(v - top) for v in kappa]
            z = sum(e)
            nbrs[i, j] = nb
            weights[i, j] = [e[k] / z + pos[k] for k in range(n)]
    out = masks[0].tolist()
    for _ in range(iterations):
        prev = out
        out = [[[sum(a * prev[c][y][x] for a, (y, x) in zip(weights[i, j], nbrs[i, j]))
                 for j in range(w)] for i in range(h)] for c in range(len(prev))]
    return torch.tensor(out, dtype=image.dtype)[None]


def par_dilation_loop(image, masks, dilations=DILATIONS, iterations=10):
    """The official structure: per dilation, replicate pad and an 8-kernel conv."""
    kernel = torch.zeros(8, 1, 3, 3, dtype=image.dtype)
    for n, (dy, dx) in enumerate(((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))):
        kernel[n, 0, dy, dx] = 1

    def nbrs(x):
        b, c, h, w = x.shape
        outs = []
        for d in dilations:
            p = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            outs.append(F.conv2d(p, kernel, dilation=d).view(b, c, 8, h, w))
        return torch.cat(outs, 2)

    masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
    nb = nbrs(image)
    col = (-((nb - image[:, :, None]).abs() / (nb.std(2, keepdim=True) + 1e-8) / COLOR_TEMP) ** 2).mean(1, keepdim=True)
    dist = neighbour_distances(dilations).to(image.dtype)
    pos = torch.softmax(-(dist / (dist.std() + 1e-8) / COLOR_TEMP) ** 2, 0)[None, None, :, None, None]
    aff = col.softmax(2) + POSITION_WEIGHT * pos
    for _ in range(iterations):
        masks = (nbrs(masks) * aff).sum(2)
    return masks


def lil_entry_loop(q, bank, tags, bank_tags, tau=0.08):
    """The formula (docs/methods/seco.md "LiL"), one anchor and one bank entry at a time."""
    n, m = q.shape[0], bank.shape[0]
    qs, bs = q.tolist(), bank.tolist()
    tags, bt = tags.tolist(), bank_tags.tolist()
    S = [[sum(a * b for a, b in zip(qs[i], bs[j])) / tau for j in range(m)] for i in range(n)]
    L = [[v - max(row) for v in row] for row in S]
    Fp = [[L[i][j] if tags[i] != -1 and tags[i] == bt[j] else 0.0 for j in range(m)] for i in range(n)]
    for i in range(n):
        if tags[i] == -1:
            L[i] = [0.0] * m
        mu = sum(Fp[i]) / m
        above = sum(1 for v in Fp[i] if v >= mu)
        if (m - above) / (above + 1e-6) > 10:
            tags[i], Fp[i] = 0.0, [0.0] * m
    z = sum(1 for row in Fp for v in row if v != 0)
    total = 0.0
    for i in range(n):
        d = sum(math.exp(L[i][j]) for j in range(m) if bt[j] != -1 and math.exp(L[i][j]) != 1.0)
        r = sum(Fp[i]) - m * math.log(d + 1e-12)
        if z > 0 and d > 0 and r < 0:
            total += r / z
    return torch.tensor(-total / n), torch.tensor(tags)


def lil_row_loop(q, bank, tags, bank_tags, tau=0.08):
    """The official `LIL_Loss` structure: row loops for the rectification and the loss."""
    tags = tags.clone()
    logits = q @ bank.T / tau
    logits = logits - logits.max(1, keepdim=True).values.detach()
    pos = tags[:, None] == bank_tags[None]
    unc = torch.where(tags == -1)[0]
    pos[unc] = False
    logits[unc] = 0
    fpos = logits * pos
    for i in range(len(tags)):
        mean = fpos[i].mean()
        if (fpos[i] < mean).sum() / ((fpos[i] >= mean).sum() + 1e-6) > 10:
            tags[i] = 0
            fpos[i] = 0
    logits[:, torch.where(bank_tags == -1)[0]] = 0
    e = logits.exp()
    e = e * (e != 1)
    log_prob = fpos - torch.log(e.sum(1, keepdim=True) + 1e-12)
    loss = torch.zeros(())
    for i in range(fpos.shape[0]):
        z = torch.nonzero(fpos).size(0)
        d = e.sum(1, keepdim=True)
        if z > 0 and d[i] > 0 and log_prob[i].sum() < 0:
            loss = loss + log_prob[i].sum() / z
    return -loss / fpos.shape[0], tags


def _median_times(fns, repeats):
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


class PartTimer:
    """Wall-clock time per named part of a step, nested: `wrap(name, fn)` returns fn timed
    under `name`, keyed by the path of the parts it runs inside ("student forward/encoder")."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.step: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.order: list[str] = []

    @contextlib.contextmanager
    def part(self, name: str):
        key = "/".join([*self.stack, name])
        if key not in self.order:
            self.order.append(key)
        self.stack.append(name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.step[key] += time.perf_counter() - t
            self.stack.pop()

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            with self.part(label):
                return fn(*args, **kwargs)
        return timed

    def end_step(self) -> None:
        self.steps.append(dict(self.step))
        self.step.clear()

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(s.get(k, 0.0) for s in self.steps) for k in self.order}


def tiny_seco(batch_size: int, seed: int = 0, overrides: dict | None = None,
              precision: str | None = None):
    """The tiny SeCo method, its optimisers and one batch, as `train_classifier` builds them
    for the toy dataset: (method, optimizers, batch dict, stage params). `overrides` replace
    keys of the method's `seco` block, `precision` the stage's."""
    import numpy as np

    from wsss_core.config import load_config, method_params, stage_params
    from wsss_core.data import toy
    from wsss_core.methods import create_method

    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    params = stage_params(cfg, "toy", "seco", "train_classifier")
    if precision is not None:
        params["precision"] = precision
    method = method_params(cfg, "toy", "seco")
    method["seco"].update(overrides or {})
    ds = cfg["datasets"]["toy"]
    torch.manual_seed(seed)
    # .to places the networks as every stage does (channels-last convolution weights)
    m = create_method(method, 1 + len(toy.DEFAULT_CONFIG.class_names),
                      train_params=params).to(torch.device("cpu"))
    opts = m.optimizers(params["lr"], params["weight_decay"], params["momentum"], params["optimizer"])
    views = m.train_views()
    items, labels = [], []
    for i in range(batch_size):
        sample = toy.synthesize(toy.image_rng(ds["seed"], toy.SPLIT_TRAIN_AUG, i), ds["image_size"])
        items.append(views(sample.image, np.random.default_rng([seed, i])))
        y = torch.zeros(m.num_classes - 1)
        for c in set(sample.object_labels):
            y[c - 1] = 1
        labels.append(y)
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    batch["label"] = torch.stack(labels)
    params["max_step"] = ds["num_train_aug"] // params["batch_size"] * params["epochs"]
    return m, opts, batch, params


def instrument(m, timer: PartTimer) -> None:
    """Wrap the functions and modules one SeCo step calls with `timer` parts."""
    from wsss_core.methods import seco, seco_losses
    for name in ("multi_scale_cam", "cam_to_label", "refine_cams_with_bkg", "par_refine",
                 "assign_csc_tags", "update_prototypes", "lil_loss", "lig_loss",
                 "ptc_affinity_mask", "ptc_loss", "seg_loss", "dense_energy_loss"):
        setattr(seco, name, timer.wrap(name, getattr(seco, name)))
    seco_losses.bilateral_filter = timer.wrap("bilateral_filter", seco_losses.bilateral_filter)
    net, teacher = m.net, m.models["teacher"]

    def by_size(prefix):
        return lambda x, *a, **k: f"{prefix} {x.shape[0]}x{x.shape[-2]}x{x.shape[-1]}"

    net.forward = timer.wrap("student forward", net.forward)
    if hasattr(net.encoder, "encode"):  # what the student's features call
        net.encoder.encode = timer.wrap(by_size("encoder"), net.encoder.encode)
    else:
        net.encoder.forward = timer.wrap(by_size("encoder"), net.encoder.forward)
    teacher.encoder.forward = timer.wrap(by_size("teacher encoder"), teacher.encoder.forward)
    for enc in (net.encoder, teacher.encoder):
        if hasattr(enc, "stem_features"):
            enc.stem_features = timer.wrap("frozen stem", enc.stem_features)
        elif enc.hybrid:  # before the stem was folded
            stem = enc.vit.patch_embed.backbone
            stem.forward = timer.wrap("frozen stem", stem.forward)
    teacher.ema_encoder = timer.wrap("EMA encoder", teacher.ema_encoder)
    teacher.ema_proj = timer.wrap("EMA projection", teacher.ema_proj)
    teacher.proj_head.forward = timer.wrap("teacher projection", teacher.proj_head.forward)
    m.reservoir.push = timer.wrap("reservoir push", m.reservoir.push)


def step_main(a) -> None:
    import yaml

    from wsss_core.methods.base import StepContext
    from wsss_core.precision import autocast_factory

    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.seco)}
    m, opts, batch, params = tiny_seco(a.batch, overrides=overrides, precision=a.precision)
    autocast = autocast_factory(params["precision"], torch.device("cpu"))
    timer = PartTimer()
    instrument(m, timer)
    m.train()
    epochs, max_step = params["epochs"], params["max_step"]
    print(f"tiny SeCo step: batch {a.batch}, crop {params['crop']}, iteration {a.it} "
          f"(weights {seco_weights(m, a.it)}), {params['precision']}, "
          f"{torch.get_num_threads()} thread(s){', seco ' + str(overrides) if overrides else ''}")
    for r in range(max(a.repeats, 1) + 1):  # the first is a warm-up
        ctx = StepContext(epoch=0, step=a.it, max_step=max_step, epochs=epochs,
                          device=torch.device("cpu"))
        for o in opts:
            o.zero_grad(set_to_none=True)
        with timer.part("step"):
            with timer.part("forward (training_step)"), autocast():
                losses = m.training_step(batch, ctx)
            with timer.part("backward"):
                losses["total"].backward()
            with timer.part("optimiser step"):
                for o in opts:
                    o.step()
        timer.end_step()
        if r == 0:  # warm-up step: allocator, oneDNN kernels
            timer.steps.clear()
    med = timer.medians()
    total = med["step"]
    print(f"{'part':<58} {'ms':>10} {'share':>7}")
    for key, t in med.items():
        depth = key.count("/")
        print(f"{'  ' * depth + key.rsplit('/', 1)[-1]:<58} {t * 1e3:10.1f} {t / total:7.1%}")
    if a.profile:
        with torch.profiler.profile() as prof:
            losses = m.training_step(batch, ctx)
            losses["total"].backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def seco_weights(m, it: int) -> str:
    from wsss_core.methods.seco import loss_weights
    return " ".join(f"{k} {v:g}" for k, v in loss_weights(m.settings, it).items() if v)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("ops", "step", "all"), default="all")
    p.add_argument("--it", type=int, default=130, help="step: iteration (0-based; 130 = every loss on)")
    p.add_argument("--batch", type=int, default=16, help="step: batch size")
    p.add_argument("--profile", action="store_true", help="step: add a torch.profiler op table")
    p.add_argument("--seco", action="append", default=[], metavar="KEY=YAML",
                   help="step: override a key of the tiny preset's seco block (repeatable)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="step: the stage's precision (default: the preset's)")
    p.add_argument("--size", type=int, default=112, help="PAR image side (pixels), official form")
    p.add_argument("--loop-size", type=int, default=48, help="PAR image side for the formula loop")
    p.add_argument("--classes", type=int, default=3, help="PAR mask channels")
    p.add_argument("--anchors", type=int, default=48, help="LiL anchors (12 x batch)")
    p.add_argument("--queue", type=int, default=4608)
    p.add_argument("--loop-queue", type=int, default=480, help="LiL queue for the formula loop")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared, loaded machine more threads only add noise)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.what in ("step", "all"):
        step_main(a)
    if a.what in ("ops", "all"):
        ops_main(a)


def ops_main(a) -> None:
    g = torch.Generator().manual_seed(0)

    def par_inputs(size):
        return (torch.rand(1, 3, size, size, generator=g),
                torch.rand(1, a.classes, size // 2, size // 2, generator=g).softmax(1))

    image, masks = par_inputs(a.loop_size)
    ref = par_refine(image, masks)
    torch.testing.assert_close(par_pixel_loop(image, masks), ref, rtol=1e-4, atol=1e-5)
    tv, tl = _median_times([lambda: par_refine(image, masks), lambda: par_pixel_loop(image, masks)],
                           a.repeats)
    print(f"PAR, {a.classes} masks, 48 neighbours, 10 iterations")
    print(f"  {a.loop_size}x{a.loop_size}: vectorised {tv * 1e3:9.2f} ms | formula loop "
          f"{tl * 1e3:10.2f} ms  ({tl / tv:7.1f}x)")
    image, masks = par_inputs(a.size)
    torch.testing.assert_close(par_dilation_loop(image, masks), par_refine(image, masks), rtol=1e-4, atol=1e-5)
    tv, td = _median_times([lambda: par_refine(image, masks), lambda: par_dilation_loop(image, masks)],
                           a.repeats)
    print(f"  {a.size}x{a.size}: vectorised {tv * 1e3:9.2f} ms | per-dilation conv (official) "
          f"{td * 1e3:9.2f} ms  ({td / tv:5.2f}x)")

    def lil_inputs(queue):
        n, m = a.anchors, a.anchors + queue
        return (F.normalize(torch.randn(n, a.dim, generator=g), dim=1),
                F.normalize(torch.randn(m, a.dim, generator=g), dim=1),
                torch.randint(-1, 5, (n,), generator=g).float(),
                torch.randint(-1, 5, (m,), generator=g).float())

    print(f"LiL (reference variant, forward), {a.anchors} anchors, dim {a.dim}")
    args = lil_inputs(a.loop_queue)
    (lv, tv_), (ll, tl_) = lil_loss(*args), lil_entry_loop(*args)
    torch.testing.assert_close(lv, ll.to(lv.dtype), rtol=1e-4, atol=1e-6)
    assert tv_.tolist() == tl_.tolist()
    tv, tl = _median_times([lambda: lil_loss(*args), lambda: lil_entry_loop(*args)], a.repeats)
    print(f"  bank {args[1].shape[0]}: vectorised {tv * 1e3:9.2f} ms | formula loop "
          f"{tl * 1e3:10.2f} ms  ({tl / tv:7.1f}x)")
    args = lil_inputs(a.queue)
    (lv, tv_), (ll, tl_) = lil_loss(*args), lil_row_loop(*args)
    torch.testing.assert_close(lv, ll.reshape(()), rtol=1e-4, atol=1e-6)
    assert torch.equal(tv_, tl_)
    tv, tr = _median_times([lambda: lil_loss(*args), lambda: lil_row_loop(*args)], a.repeats)
    print(f"  bank {args[1].shape[0]}: vectorised {tv * 1e3:9.2f} ms | per-row loop (official) "
          f"{tr * 1e3:9.2f} ms  ({tr / tv:5.2f}x)")


if __name__ == "__main__":
    main()
