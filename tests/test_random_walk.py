"""Random-walk propagation (docs/algorithms.md §walk)."""
from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import torch

from wsss_core.ops.random_walk import (dense_affinity_matrix, random_walk, random_walk_dense,
                                       transition_matrix_dense, transition_matrix_sparse,
                                       upsample_rw)


def _inputs(seed: int, k: int, h: int, w: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    boundary = torch.rand(1, h, w, generator=gen, dtype=dtype) ** 3
    boundary[0, h // 3, :] = 0.95  # a wall the walk must not cross easily
    cams = torch.rand(k, h, w, generator=gen, dtype=dtype)
    return cams, boundary


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 1), (2, 5)])
def test_dense_vs_sparse(seed, k):
    cams, boundary = _inputs(seed, k, 20, 24)
    dense = random_walk_dense(cams, boundary)
    sparse = random_walk(cams, boundary)
    assert sparse.shape == dense.shape == (k, 20, 24) and sparse.dtype == cams.dtype
    assert torch.allclose(sparse, dense, rtol=1e-4, atol=1e-4 * float(dense.abs().max()))


def test_torch_sparse_backend_matches_scipy():
    cams, boundary = _inputs(7, 2, 14, 18)
    assert torch.allclose(random_walk(cams, boundary, backend="torch"),
                          random_walk(cams, boundary, backend="scipy"), rtol=1e-6, atol=1e-7)


def test_dense_vs_sparse_short_walk_float64():
    cams, boundary = _inputs(3, 2, 9, 11, torch.float64)
    for exp_times in (0, 1, 3):
        assert torch.allclose(random_walk(cams, boundary, exp_times=exp_times),
                              random_walk_dense(cams, boundary, exp_times=exp_times), rtol=1e-10)


def _oracle_affinity(boundary: torch.Tensor, radius: int = 5) -> np.ndarray:
    """A[p, q] from the definition: pairs with dy²+dx² < r², 1 − max B on the straight path."""
    from wsss_core.ops.path_index import direction_path, search_directions
    b = boundary[0].double().numpy()
    h, w = b.shape
    a = np.eye(h * w)
    for dy, dx in search_directions(radius):
        path = direction_path((dy, dx))
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    val = 1 - max(b[y + py, x + px] for py, px in path)
                    a[y * w + x, (y + dy) * w + x + dx] = a[(y + dy) * w + x + dx, y * w + x] = val
    return a


def test_affinity_and_transition_invariants():
    _, boundary = _inputs(4, 1, 8, 10, torch.float64)
    a = dense_affinity_matrix(boundary).numpy()
    assert np.allclose(a, a.T) and np.allclose(np.diag(a), 1)
    assert np.allclose(a, _oracle_affinity(boundary), atol=1e-12)
    t = transition_matrix_dense(boundary, beta=10).numpy()
    assert np.allclose(t.sum(axis=0), 1)
    assert np.allclose(t, (a ** 10) / (a ** 10).sum(axis=0, keepdims=True))
    t_sparse_transposed = transition_matrix_sparse(boundary, beta=10).toarray()
    assert np.allclose(t_sparse_transposed.T, t, atol=1e-12)


def test_neighbourhood_size():
    boundary = torch.zeros(1, 15, 16)
    a = dense_affinity_matrix(boundary)
    counts = (a > 0).sum(dim=1).view(15, 16)
    assert int(counts[7, 8]) == 69  # 68 neighbours with dy²+dx² < 25, plus itself
    assert int(counts.max()) == 69
    assert transition_matrix_sparse(boundary).getnnz(axis=1).max() == 69


def test_constant_input_no_boundary():
    boundary = torch.zeros(1, 13, 17)
    cams = torch.full((2, 13, 17), 0.7)
    assert torch.allclose(random_walk(cams, boundary), cams, atol=1e-6)
    assert torch.allclose(random_walk_dense(cams, boundary), cams, atol=1e-5)


def test_convex_combination():
    cams, boundary = _inputs(5, 3, 20, 24)
    suppressed = cams * (1 - boundary)
    rw = random_walk(cams, boundary)
    assert float(rw.min()) >= 0
    assert (rw.amax(dim=(1, 2)) <= suppressed.amax(dim=(1, 2)) + 1e-6).all()
    assert (rw.amin(dim=(1, 2)) >= suppressed.amin(dim=(1, 2)) - 1e-6).all()


def test_wall_blocks_propagation():
    boundary = torch.zeros(1, 20, 20)
    boundary[0, :, 9:11] = 1.0
    cams = torch.zeros(1, 20, 20)
    cams[0, 5:15, 2:6] = 1.0
    rw = random_walk(cams, boundary)
    assert float(rw[0, :, 11:].max()) < 1e-6 < float(rw[0, :, :9].min())


def test_voc_size_runs_fast_without_dense_matrix():
    cams, boundary = _inputs(6, 3, 94, 125)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    rw = random_walk(cams, boundary)
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert rw.shape == (3, 94, 125) and torch.isfinite(rw).all()
    assert elapsed < 20.0          # ~1–2 s on one idle core
    assert grown_mib < 300         # the dense (hw)² float32 matrix alone would be 550 MB


def test_upsample_rw_modes():
    rw = torch.rand(2, 4, 5)
    assert upsample_rw(rw, (15, 18), "resize").shape == (2, 15, 18)
    irn = upsample_rw(rw, (15, 18), "upsample_crop")
    assert irn.shape == (2, 15, 18)
    full = torch.nn.functional.interpolate(rw[None], scale_factor=4, mode="bilinear",
                                           align_corners=False)[0]
    assert torch.equal(irn, full[:, :15, :18])
    with pytest.raises(ValueError):
        upsample_rw(rw, (15, 18), "nearest")
