"""PAR (wsss_core.ops.par) against a per-pixel loop written from the formula."""
from __future__ import annotations

import math

import torch

from wsss_core.ops.par import neighbour_offsets, par_refine, par_weights, shifted_views

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _par_loop(image: torch.Tensor, masks: torch.Tensor, dilations, iterations) -> torch.Tensor:
    """One pixel, one neighbour at a time (float64), replicate border by clamping."""
    _, _, h, w = image.shape
    masks = torch.nn.functional.interpolate(masks, size=(h, w), mode="bilinear", align_corners=True)
    offs = [(dy * d, dx * d) for d in dilations for dy, dx in OFFSETS]
    dist = torch.tensor([math.sqrt(dy * dy + dx * dx) for dy, dx in offs], dtype=torch.float64)
    pos = torch.softmax(-(dist / (dist.std() + 1e-8) / 0.3) ** 2, dim=0)
    out = masks.clone()
    weights = {}
    for b in range(image.shape[0]):
        for i in range(h):
            for j in range(w):
                nbs = [(min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)) for dy, dx in offs]
                kappa = torch.zeros(len(offs), dtype=torch.float64)
                for c in range(3):
                    vals = torch.stack([image[b, c, y, x] for y, x in nbs])
                    s = vals.std()
                    kappa += -((vals - image[b, c, i, j]).abs() / (s + 1e-8) / 0.3) ** 2
                weights[b, i, j] = (torch.softmax(kappa / 3, dim=0) + 0.01 * pos, nbs)
        for _ in range(iterations):
            prev = out[b].clone()
            for i in range(h):
                for j in range(w):
                    a, nbs = weights[b, i, j]
                    out[b, :, i, j] = sum(a[n] * prev[:, y, x] for n, (y, x) in enumerate(nbs))
    return out


def test_par_matches_loop_oracle():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 7, 9, generator=g, dtype=torch.float64)
    masks = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    got = par_refine(image, masks, dilations=(1, 2, 5), iterations=3)
    want = _par_loop(image, masks, (1, 2, 5), 3)
    assert got.shape == (2, 3, 7, 9)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_par_constant_mask_grows_by_1_01_per_iteration():
    """Spec invariant 9: weights sum to 1.01; a constant mask c becomes c * 1.01^10."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 20, 30, generator=g, dtype=torch.float64)
    a = par_weights(image)
    torch.testing.assert_close(a.sum(dim=1), torch.full((1, 20, 30), 1.01, dtype=torch.float64))
    out = par_refine(image, torch.full((1, 2, 10, 15), 0.3, dtype=torch.float64))
    assert out.shape == (1, 2, 20, 30)
    torch.testing.assert_close(out, torch.full_like(out, 0.3 * 1.01 ** 10))


def test_par_keeps_labels_inside_colour_regions():
    """A soft mask that bleeds over a colour edge is pulled back to the edge."""
    image = torch.zeros(1, 3, 16, 16)
    image[..., :, 8:] = 1.0
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, 6:] = 1.0  # two columns too far to the left
    out = par_refine(image, mask, dilations=(1, 2), iterations=10)
    assert out[0, 0, :, 8:].min() > out[0, 0, :, :6].max() + 0.5
    assert out[0, 0, :, 6:8].mean() < 0.5 * out[0, 0, :, 8:].mean()


def _gather_neighbours(x: torch.Tensor, dilations) -> torch.Tensor:
    """x [B, K, h, w] → [B, K, N, h, w]: one `gather` on the flat indices of each pixel's
    neighbours, coordinates clamped to the image (the replicate border)."""
    B, K, h, w = x.shape
    offs = torch.tensor(neighbour_offsets(dilations))
    rows = (torch.arange(h)[None, :] + offs[:, :1]).clamp_(0, h - 1)  # [N, h]
    cols = (torch.arange(w)[None, :] + offs[:, 1:]).clamp_(0, w - 1)  # [N, w]
    index = (rows[:, :, None] * w + cols[:, None, :]).flatten()
    return torch.gather(x.reshape(B, K, h * w), 2, index.expand(B, K, -1)).view(B, K, -1, h, w)


def test_shifted_views_are_the_clamped_index_neighbours():
    """The padded views against one gather on the clamped index grids (replicate border)."""
    x = torch.arange(2 * 3 * 9 * 11, dtype=torch.float64).reshape(2, 3, 9, 11)
    dil = (1, 3, 12)  # 12 > the image: every neighbour of that dilation is a border pixel
    want = _gather_neighbours(x, dil)
    assert torch.equal(torch.stack(shifted_views(x, dil), dim=2), want)


def test_par_zero_channels_stay_zero_and_gradients_flow():
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 6, 8, generator=g, dtype=torch.float64)
    masks = torch.rand(1, 2, 6, 8, generator=g, dtype=torch.float64)
    masks[:, 1] = 0
    masks.requires_grad_()
    out = par_refine(image, masks, dilations=(1, 2), iterations=3)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    out[:, 0].sum().backward()
    assert masks.grad[:, 0].abs().sum() > 0


def test_par_chunks_the_batch_like_one_image_at_a_time(monkeypatch):
    from wsss_core.ops import par
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 3, 10, 12, generator=g, dtype=torch.float64)
    masks = torch.rand(3, 2, 5, 6, generator=g, dtype=torch.float64)
    whole = par_refine(image, masks, dilations=(1, 3), iterations=4)
    monkeypatch.setattr(par, "CHUNK_FLOATS", 16 * 10 * 12)  # one image per chunk
    torch.testing.assert_close(par_refine(image, masks, dilations=(1, 3), iterations=4), whole,
                               rtol=1e-12, atol=1e-14)
    per_image = torch.cat([par_refine(i, m, (1, 3), 4) for i, m in zip(image.split(1), masks.split(1))])
    torch.testing.assert_close(whole, per_image, rtol=1e-12, atol=1e-14)


def test_replicate_pad_into_is_replicate_padding():
    from wsss_core.ops.par import replicate_pad_into
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    padded = torch.full((2, 3, 5 + 8, 7 + 8), float("nan"), dtype=torch.float64)
    assert torch.equal(replicate_pad_into(padded, x, 4),
                       torch.nn.functional.pad(x, [4] * 4, mode="replicate"))
