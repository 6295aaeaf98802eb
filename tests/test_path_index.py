"""PathIndex, path affinities and affinity labels (docs/algorithms.md §irn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss_core.ops.path_index import PathIndex, affinity_from_boundary, affinity_labels

R5_DST = [(0, 1), (1, 0), (0, 2), (2, 0), (0, 3), (1, -1), (1, 1), (3, 0), (0, 4), (4, 0), (1, -2),
          (1, 2), (2, -1), (2, 1), (2, -2), (2, 2), (1, -3), (1, 3), (2, -3), (2, 3), (3, -2),
          (3, -1), (3, 1), (3, 2), (1, -4), (1, 4), (3, -3), (3, 3), (4, -1), (4, 1), (2, -4),
          (2, 4), (4, -2), (4, 2)]


def _path_of(pi: PathIndex, direction: tuple[int, int]) -> list[tuple[int, int]]:
    return pi.paths[[tuple(d) for d in pi.search_dst.tolist()].index(direction)]


def test_radius5_directions_groups_and_paths():
    pi = PathIndex(5, (20, 20))
    assert pi.n_dirs == 34
    assert pi.path_lengths == [2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert pi.group_sizes == [2, 2, 4, 2, 4, 2, 8, 6, 4]
    assert [tuple(d) for d in pi.search_dst.tolist()] == R5_DST
    assert _path_of(pi, (1, -1)) == [(1, -1), (0, -1), (1, 0), (0, 0)]
    assert _path_of(pi, (2, -2)) == [(2, -2), (1, -2), (2, -1), (1, -1), (0, -1), (1, 0), (0, 0)]
    for path, dst in zip(pi.paths, R5_DST):
        assert path[0] == dst and path[-1] == (0, 0)


def test_radius10_directions_and_training_grid():
    pi = PathIndex(10, (128, 128))
    assert pi.n_dirs == 152
    assert pi.path_lengths == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22]
    assert pi.group_sizes == [2, 2, 4, 2, 6, 4, 10, 2, 12, 4, 12, 2, 8, 8, 22, 16, 6, 20, 4, 6]
    assert pi.radius_floor == 9 and pi.crop == (119, 110)
    assert pi.n_src == 13090 and pi.src_indices.shape == (13090,)
    assert pi.dst_indices.shape == (152, 13090)
    assert [p.shape for p in pi.path_indices] == [
        (n, length, 13090) for n, length in zip(pi.group_sizes, pi.path_lengths)]


def test_index_tensors_match_loop_oracle():
    pi = PathIndex(5, (11, 14))
    g_w, rf = 14, 4
    src = [i * g_w + j for i in range(11 - rf) for j in range(rf, 14 - rf)]
    assert pi.src_indices.tolist() == src
    for d, (dy, dx) in enumerate(pi.search_dst.tolist()):
        assert pi.dst_indices[d].tolist() == [s + dy * g_w + dx for s in src]
    d = 0
    for group in pi.path_indices:
        for per_dir in group:
            for k, (py, px) in enumerate(pi.paths[d]):
                assert per_dir[k].tolist() == [s + py * g_w + px for s in src]
            d += 1
    assert d == 34


def _reference_affinity(b_flat: torch.Tensor, pi: PathIndex) -> torch.Tensor:
    """The reference `edge_to_affinity` (index_select + max_pool2d over path points)."""
    out = []
    for ind in pi.path_indices:
        dist = torch.index_select(b_flat, -1, ind.reshape(-1))
        dist = dist.view(b_flat.shape[0], ind.shape[0], ind.shape[1], ind.shape[2])
        out.append(torch.squeeze(1 - F.max_pool2d(dist, (dist.shape[2], 1)), dim=2))
    return torch.cat(out, dim=1)


def test_affinity_from_boundary_loop_oracle():
    g_h, g_w = 9, 12
    pi = PathIndex(5, (g_h, g_w))
    b = torch.rand(2, g_h * g_w, generator=torch.Generator().manual_seed(0))
    aff = affinity_from_boundary(b, pi)
    assert aff.shape == (2, 34, pi.n_src)
    bm = b.view(2, g_h, g_w)
    c_w, rf = pi.crop[1], pi.radius_floor
    for n in range(2):
        for d, path in enumerate(pi.paths):
            for s in range(pi.n_src):
                i, j = s // c_w, rf + s % c_w
                expected = 1 - max(float(bm[n, i + py, j + px]) for py, px in path)
                assert aff[n, d, s].item() == pytest.approx(expected, abs=1e-7)


def test_affinity_gradient_matches_reference_with_ties():
    pi = PathIndex(10, (30, 32))
    gen = torch.Generator().manual_seed(1)
    # quantised values create many ties: the gradient must go to the first path point
    base = (torch.rand(3, 30 * 32, generator=gen) * 4).floor() / 4
    weights = torch.rand(3, pi.n_dirs, pi.n_src, generator=gen)
    b1 = base.clone().requires_grad_()
    b2 = base.clone().requires_grad_()
    (affinity_from_boundary(b1, pi) * weights).sum().backward()
    ref = _reference_affinity(b2, pi)
    (ref * weights).sum().backward()
    assert torch.equal(affinity_from_boundary(base, pi), ref.detach())
    assert torch.allclose(b1.grad, b2.grad, atol=1e-5)


def _hand_label(size: int = 128) -> torch.Tensor:
    lab = torch.zeros(size, size, dtype=torch.uint8)
    lab[20:70, 15:60] = 3
    lab[50:110, 70:120] = 15
    lab[80:100, 30:50] = 3
    lab[:, 60:66] = 255          # ignore band
    lab[115:118, 5:40] = 30      # out-of-range value: also ignore
    return lab


def test_affinity_labels_counts_and_ignore():
    pi = PathIndex(10, (128, 128))
    lab = _hand_label()
    bg_pos, fg_pos, neg = affinity_labels(lab[None], pi)
    assert bg_pos.shape == fg_pos.shape == neg.shape == (1, 152, 13090)
    assert bg_pos.dtype == torch.bool
    # per-direction oracle with 2-D windows (independent of the flat index tensors)
    lab_np = lab.numpy().astype(np.int64)
    c_h, c_w, rf = 119, 110, 9
    src = lab_np[:c_h, rf:rf + c_w]
    exp = np.zeros(3, np.int64)
    for d, (dy, dx) in enumerate(pi.search_dst.tolist()):
        dst = lab_np[dy:dy + c_h, rf + dx:rf + dx + c_w]
        valid = (src < 21) & (dst < 21)
        e = [(valid & (src == dst) & (src == 0)), (valid & (src == dst) & (src > 0)),
             (valid & (src != dst))]
        for k, (mask, got) in enumerate(zip(e, (bg_pos, fg_pos, neg))):
            assert np.array_equal(got[0, d].numpy(), mask.reshape(-1))
            exp[k] += mask.sum()
    assert [int(bg_pos.sum()), int(fg_pos.sum()), int(neg.sum())] == exp.tolist()
    assert exp.min() > 0
    # no pair touching an ignored pixel is in any mask
    flat = lab.reshape(-1).long()
    touches = (flat[pi.src_indices][None, :] >= 21) | (flat[pi.dst_indices] >= 21)
    assert touches.any()
    assert not (touches & (bg_pos[0] | fg_pos[0] | neg[0])).any()
    # the three masks partition the valid pairs
    assert torch.equal((bg_pos | fg_pos | neg)[0], ~touches)
    assert not (bg_pos & fg_pos).any() and not (bg_pos & neg).any()


def test_affinity_labels_elementwise_loop_oracle():
    g_h, g_w = 14, 16
    pi = PathIndex(5, (g_h, g_w))
    gen = torch.Generator().manual_seed(2)
    lab = torch.randint(0, 4, (2, g_h, g_w), generator=gen).to(torch.uint8)
    lab[lab == 3] = 255
    bg_pos, fg_pos, neg = affinity_labels(lab, pi)
    c_w, rf = pi.crop[1], pi.radius_floor
    for n in range(2):
        for d, (dy, dx) in enumerate(pi.search_dst.tolist()):
            for s in range(pi.n_src):
                i, j = s // c_w, rf + s % c_w
                a, b = int(lab[n, i, j]), int(lab[n, i + dy, j + dx])
                valid = a < 21 and b < 21
                assert bool(bg_pos[n, d, s]) == (valid and a == b == 0)
                assert bool(fg_pos[n, d, s]) == (valid and a == b and a > 0)
                assert bool(neg[n, d, s]) == (valid and a != b)


def test_shape_errors():
    pi = PathIndex(5, (10, 12))
    with pytest.raises(ValueError):
        affinity_labels(torch.zeros(1, 10, 11, dtype=torch.uint8), pi)
    with pytest.raises(ValueError):
        affinity_from_boundary(torch.zeros(1, 100), pi)
    with pytest.raises(ValueError):
        PathIndex(10, (8, 30))
