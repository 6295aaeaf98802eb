"""CPU time of SeCo's PAR refinement and LiL loss: vectorised vs loop forms, side by side.

    python bench/bench_seco.py [--size 48] [--anchors 48] [--queue 4608] [--dim 768] [--repeats 3]

PAR: `wsss_core.ops.par.par_refine` (all neighbours gathered at once) against the formula
looped per pixel and neighbour, and the official structure (one replicate pad + one conv per
dilation: vectorised over pixels, looped over dilations).
LiL: `lil_loss` (reference variant) against the formula looped per anchor and bank entry, and
the official per-row structure (the similarity matmul vectorised; one Python iteration per
anchor for the rectification and another for the loss, the global count recomputed in each).
The formula loops run on a smaller problem (--loop-size, --loop-queue) that the vectorised
form also runs for the ratio. Forms are checked to agree before timing; medians of
interleaved runs.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

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
    """The formula (seco.md §12.1), one anchor and one bank entry at a time."""
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
