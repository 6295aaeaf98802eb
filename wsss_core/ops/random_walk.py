"""Random-walk propagation of CAMs over an IRN class-boundary map (docs/algorithms.md §irn).

* `transition_matrix_dense` / `random_walk_dense`: the reference `propagate_to_edge` literally
  (dense `(hw)²` matrix, `T^(2^exp_times)` by repeated squaring) — for tests and tiny maps.
* `random_walk`: the same result without the dense matrix ([FIX], docs/algorithms.md §walk): the
column-stochastic
  transition has ≤ 69 non-zeros per column (68 neighbours with `dy²+dx² < 25` plus itself),
  stored as a sparse CSR matrix (scipy on CPU, torch elsewhere) and applied `2**exp_times`
  times as `v ← v·T`. Memory is `O(69·hw)`; a VOC image (94×125 at stride 4) takes about a
  second on one CPU core.
* `upsample_rw`: the two ways of bringing `rw` back to image size (`resize`, `upsample_crop`).

All functions run on the device of their inputs.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from .path_index import PathIndex, affinity_from_boundary


def _check_boundary(boundary: torch.Tensor) -> tuple[int, int]:
    if boundary.dim() != 3 or boundary.shape[0] != 1:
        raise ValueError(f"boundary must be [1, h, w], got {tuple(boundary.shape)}")
    return int(boundary.shape[1]), int(boundary.shape[2])


def _padded_pair_affinities(boundary: torch.Tensor, radius: int
                            ) -> tuple[PathIndex, torch.Tensor]:
    """Steps 1–2: pad with 1.0 (r left/right, r bottom) and take path affinities `[34, n_src]`."""
    h, w = _check_boundary(boundary)
    padded = F.pad(boundary, (radius, radius, 0, radius), mode="constant", value=1.0)
    path_index = PathIndex(radius, (h + radius, w + 2 * radius))
    aff = affinity_from_boundary(padded.reshape(1, -1), path_index)[0]
    return path_index, aff


def transition_matrix_dense(boundary: torch.Tensor, radius: int = 5, beta: float = 10.0
                            ) -> torch.Tensor:
    """Column-stochastic transition matrix `T [hw, hw]` of docs/algorithms.md §walk (before the
    powers).

    Builds the dense symmetric affinity matrix over the padded grid exactly as the reference
    (`affinity_sparse2dense`), keeps the in-image vertices, raises it element-wise to `beta`
    and divides every column by its sum.
    """
    return _dense_transition(boundary, radius, beta)[0]


def dense_affinity_matrix(boundary: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """The symmetric in-image affinity matrix `A [hw, hw]` of docs/algorithms.md §walk (unit
    diagonal)."""
    return _dense_transition(boundary, radius, 1.0)[1]


def _dense_transition(boundary: torch.Tensor, radius: int, beta: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = _check_boundary(boundary)
    path_index, aff = _padded_pair_affinities(boundary, radius)
    g_h, g_w = path_index.grid
    n_vertices = g_h * g_w
    device = boundary.device
    ind_from = path_index.src_indices.to(device).repeat(path_index.n_dirs)
    ind_to = path_index.dst_indices.to(device).reshape(-1)
    ind_id = torch.arange(n_vertices, device=device)
    indices = torch.cat([torch.stack([ind_from, ind_to]), torch.stack([ind_id, ind_id]),
                         torch.stack([ind_to, ind_from])], dim=1)
    values = torch.cat([aff.reshape(-1), torch.ones(n_vertices, dtype=aff.dtype, device=device),
                        aff.reshape(-1)])
    dense = torch.sparse_coo_tensor(indices, values, (n_vertices, n_vertices),
                                    check_invariants=False).to_dense()
    dense = dense.view(g_h, g_w, g_h, g_w)[:-radius, radius:-radius, :-radius, radius:-radius]
    affinity = dense.reshape(h * w, h * w)
    scaled = torch.pow(affinity, beta)
    return scaled / scaled.sum(dim=0, keepdim=True), affinity


def random_walk_dense(cams: torch.Tensor, boundary: torch.Tensor, radius: int = 5,
                      beta: float = 10.0, exp_times: int = 8) -> torch.Tensor:
    """Reference propagation: `x' = x ⊙ (1 − B)`, `rw = x'·T^(2^exp_times)` (repeated squaring).

    cams `[K, h, w]`, boundary `[1, h, w]` → `[K, h, w]`. Memory `O((hw)²)`: small maps only.
    """
    h, w = _check_boundary(boundary)
    trans = transition_matrix_dense(boundary, radius, beta)
    for _ in range(exp_times):
        trans = trans @ trans
    x = cams.reshape(-1, h, w) * (1 - boundary)
    return (x.reshape(-1, h * w) @ trans).reshape(-1, h, w)


def _sparse_transition_entries(boundary: torch.Tensor, radius: int, beta: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COO entries `(rows, cols, vals)` of `Tᵀ` (row t = column t of T), float64.

    Only in-image pairs are kept (the padded vertices are cropped away in the reference), so
    every row has at most `2·n_dirs + 1` entries (69 for r = 5).
    """
    h, w = _check_boundary(boundary)
    path_index, aff = _padded_pair_affinities(boundary, radius)
    g_w = path_index.grid[1]
    device = boundary.device
    src = path_index.src_indices.to(device).expand(path_index.n_dirs, -1)
    dst = path_index.dst_indices.to(device)
    src_y, src_x = src // g_w, src % g_w - radius
    dst_y, dst_x = dst // g_w, dst % g_w - radius
    inside = ((src_y < h) & (src_x >= 0) & (src_x < w) &
              (dst_y < h) & (dst_x >= 0) & (dst_x < w))
    s = (src_y * w + src_x)[inside]
    t = (dst_y * w + dst_x)[inside]
    # float64 so that 2**exp_times sparse steps match the dense squaring to ~1e-12
    a = torch.pow(aff[inside].to(torch.float64), beta)
    diag = torch.arange(h * w, device=device)
    rows = torch.cat([s, t, diag])
    cols = torch.cat([t, s, diag])
    vals = torch.cat([a, a, torch.ones(h * w, dtype=a.dtype, device=device)])
    # Ã is symmetric, so column sums = row sums and Tᵀ = diag(1/colsum)·Ã.
    colsum = torch.zeros(h * w, dtype=a.dtype, device=device).index_add_(0, rows, vals)
    return rows, cols, vals / colsum[rows]


def transition_matrix_sparse(boundary: torch.Tensor, radius: int = 5, beta: float = 10.0
                             ) -> scipy.sparse.csr_matrix:
    """Transposed transition `Tᵀ [hw, hw]` as a float64 scipy CSR matrix (≤ 69 entries a row)."""
    h, w = _check_boundary(boundary)
    rows, cols, vals = (t.detach().cpu().numpy()
                        for t in _sparse_transition_entries(boundary, radius, beta))
    return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(h * w, h * w))


def random_walk(cams: torch.Tensor, boundary: torch.Tensor, radius: int = 5, beta: float = 10.0,
                exp_times: int = 8, backend: Literal["auto", "scipy", "torch"] = "auto"
                ) -> torch.Tensor:
    """Propagate CAMs along the boundary-aware transition (sparse, `2**exp_times` steps).

    Args:
        cams: `[K, h, w]` stride-4 class maps (non-negative).
        boundary: `[1, h, w]` boundary probabilities in [0, 1] (`IRN.boundary_map`).
        radius, beta, exp_times: path radius, affinity exponent β, log2 of the walk length.
        backend: `auto` = scipy CSR for CPU tensors (much faster there than torch's CPU sparse
            kernels), torch sparse CSR on the tensors' device otherwise.
    Returns:
        `[K, h, w]` propagated maps (dtype/device of `cams`); equals `random_walk_dense` up to
        float rounding (the walk itself runs in float64).
    """
    if backend not in ("auto", "scipy", "torch"):
        raise ValueError(f"random_walk backend must be auto, scipy or torch, got {backend!r}")
    use_scipy = backend == "scipy" or (backend == "auto" and cams.device.type == "cpu")
    h, w = _check_boundary(boundary)
    with torch.no_grad():
        x = (cams.reshape(-1, h, w) * (1 - boundary)).reshape(-1, h * w)
        if use_scipy:
            trans_t = transition_matrix_sparse(boundary, radius, beta)
            v = np.ascontiguousarray(x.double().cpu().numpy().T)
            for _ in range(2 ** exp_times):
                v = trans_t @ v
            out = torch.from_numpy(np.ascontiguousarray(v.T))
        else:
            rows, cols, vals = _sparse_transition_entries(boundary, radius, beta)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                trans_t = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals,
                                                  (h * w, h * w), check_invariants=False
                                                  ).coalesce().to_sparse_csr()
            v = x.double().t().contiguous()
            for _ in range(2 ** exp_times):
                v = trans_t @ v
            out = v.t()
    return out.to(device=cams.device, dtype=cams.dtype).reshape(-1, h, w)


def upsample_rw(rw: torch.Tensor, size: tuple[int, int],
                mode: Literal["resize", "upsample_crop"] = "resize") -> torch.Tensor:
    """Bring `rw [K, h, w]` to image size `(H, W)` (bilinear, align_corners False).

    `resize`: resize straight to `(H, W)` (official `make_sem_seg_labels_npy.py` of docs/algorithms.md §walk);
    `upsample_crop`: upsample ×4 then crop to `[:H, :W]` (IRN-REPO `make_sem_seg_labels.py`).
    """
    if mode == "resize":
        return F.interpolate(rw[None], size=size, mode="bilinear", align_corners=False)[0]
    if mode == "upsample_crop":
        up = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
        return up[:, :size[0], :size[1]]
    raise ValueError(f"upsample_rw mode must be 'resize' or 'upsample_crop', got {mode!r}")
