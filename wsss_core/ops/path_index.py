"""IRN path index: which pixel pairs are related and which pixels lie between them.

Reimplements `misc/indexing.py::PathIndex` of IRNet (Ahn et al., CVPR 2019) exactly (docs/algorithms.md §irn):
same direction order, same paths, same grouping by path length, same flat source/destination
indices. On top of it:

* `affinity_from_boundary` — `aff = 1 − max_{path} b` for every (direction, source) pair;
* `affinity_labels` — the bg-positive / fg-positive / negative pair masks of
  `GetAffinityLabelFromIndices` (docs/algorithms.md §irn), computed in torch on the label's device from the
  ↓4 label instead of in the data loader ([FIX]).

Index convention: a grid `(G_h, G_w)` is flattened row-major; a source is `(i, j)` with
`0 ≤ i < c_h`, `rf ≤ j < rf + c_w` where `rf = ceil(r) − 1`, `c_h = G_h − rf`,
`c_w = G_w − 2·rf`; every direction-indexed tensor uses the grouped order of `search_dst`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

Direction = tuple[int, int]


def search_directions(radius: int) -> list[Direction]:
    """Forward half-plane offsets `(dy, dx)` with `dy² + dx² < r²`, in IRN's generation order."""
    dirs: list[Direction] = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius ** 2:
                dirs.append((dy, dx))
    return dirs


def direction_path(direction: Direction) -> list[Direction]:
    """Integer points within distance < 1 of the segment origin→direction (closed box),
    ordered by decreasing |y|+|x| (stable, y-major enumeration): destination first, origin last."""
    dy, dx = direction
    length_sq = dy * dy + dx * dx
    y0, y1 = sorted((0, dy))
    x0, x1 = sorted((0, dx))
    points = [(y, x) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1)
              if (dy * x - dx * y) ** 2 / length_sq < 1]
    points.sort(key=lambda p: -abs(p[0]) - abs(p[1]))
    return points


class PathIndex:
    """IRN's path index for a radius on a fixed grid.

    Attributes:
        radius, radius_floor (`rf = ceil(r) − 1`), grid `(G_h, G_w)`, crop `(c_h, c_w)`;
        search_paths: per path-length group an int64 array `[n_dirs_g, len_g, 2]` of `(py, px)`
            path points (destination first, origin last), groups by increasing length;
        search_dst: int64 `[n_dirs, 2]` destinations `(dy, dx)` in the global direction order;
        src_indices: LongTensor `[n_src]` flat source indices (row-major over the crop window);
        dst_indices: LongTensor `[n_dirs, n_src]` flat destination indices;
        n_dirs, n_src.
    The per-group path index tensors of the reference code are `path_indices` (built lazily).
    """

    def __init__(self, radius: int, grid: tuple[int, int]) -> None:
        if radius < 2:
            raise ValueError(f"PathIndex radius must be ≥ 2 (got {radius})")
        self.radius = radius
        self.radius_floor = int(math.ceil(radius) - 1)
        self.grid = (int(grid[0]), int(grid[1]))
        rf = self.radius_floor
        self.crop = (self.grid[0] - rf, self.grid[1] - 2 * rf)
        if self.crop[0] <= 0 or self.crop[1] <= 0:
            raise ValueError(f"grid {self.grid} too small for path radius {radius}")

        by_length: dict[int, list[list[Direction]]] = {}
        for d in search_directions(radius):
            path = direction_path(d)
            by_length.setdefault(len(path), []).append(path)
        self.search_paths: list[np.ndarray] = [
            np.asarray(by_length[n], dtype=np.int64) for n in sorted(by_length)]
        self.search_dst: np.ndarray = np.concatenate([p[:, 0] for p in self.search_paths], axis=0)
        self.n_dirs = int(self.search_dst.shape[0])
        #: path points `(py, px)` of every direction, in the global (grouped) order
        self.paths: list[list[Direction]] = [
            [(int(py), int(px)) for py, px in path] for group in self.search_paths for path in group]

        g_w = self.grid[1]
        c_h, c_w = self.crop
        rows = torch.arange(c_h, dtype=torch.int64)[:, None]
        cols = torch.arange(rf, rf + c_w, dtype=torch.int64)[None, :]
        self.src_indices: torch.Tensor = (rows * g_w + cols).reshape(-1)
        self.n_src = int(self.src_indices.numel())
        # A path point (py, px) of source (i, j) sits at flat index src + py·G_w + px, so the
        # whole index tensor is one broadcast add of small per-group offset tables.
        self._group_offsets: list[torch.Tensor] = [
            torch.from_numpy(p[..., 0] * g_w + p[..., 1]) for p in self.search_paths]
        dst_off = torch.from_numpy(self.search_dst[:, 0] * g_w + self.search_dst[:, 1])
        self.dst_indices: torch.Tensor = self.src_indices[None, :] + dst_off[:, None]
        self._device_cache: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    # -- reference-style views --------------------------------------------------------------
    @property
    def group_sizes(self) -> list[int]:
        return [int(p.shape[0]) for p in self.search_paths]

    @property
    def path_lengths(self) -> list[int]:
        return [int(p.shape[1]) for p in self.search_paths]

    @property
    def path_indices(self) -> list[torch.Tensor]:
        """Per group LongTensor `[n_dirs_g, len_g, n_src]` of flat path-point indices."""
        return [self.src_indices[None, None, :] + off[:, :, None] for off in self._group_offsets]

    def indices_on(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(src_indices, per-group flat offsets `[n_dirs_g, len_g]`) on `device` (cached)."""
        device = torch.device(device)
        if device not in self._device_cache:
            self._device_cache[device] = (self.src_indices.to(device),
                                          [o.to(device) for o in self._group_offsets])
        return self._device_cache[device]

    def disp_target(self, device: torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Displacement target `τ_d = (dy, dx)` as `[1, 2, n_dirs, 1]`."""
        return torch.as_tensor(self.search_dst.T, dtype=dtype, device=device)[None, :, :, None]

    def __repr__(self) -> str:
        return (f"PathIndex(radius={self.radius}, grid={self.grid}, n_dirs={self.n_dirs}, "
                f"n_src={self.n_src})")


def _check_flat(t: torch.Tensor, path_index: PathIndex, name: str) -> None:
    n = path_index.grid[0] * path_index.grid[1]
    if t.dim() != 2 or t.shape[1] != n:
        raise ValueError(f"{name}: expected [B, {n}] for grid {path_index.grid}, got {tuple(t.shape)}")


def affinity_from_boundary(boundary_flat: torch.Tensor, path_index: PathIndex) -> torch.Tensor:
    """Pair affinities `1 − max_{path points} b` → `[B, n_dirs, n_src]`.

    `boundary_flat` is a boundary probability map `[B, G_h·G_w]` (a `[B, 1, G_h, G_w]` or
    `[B, G_h, G_w]` map is flattened). The max is taken over shifted windows of the 2-D map
    (one slice per path point; much faster than index gathers, and no `[B, n_dirs, len, n_src]`
    temporary). When a gradient is needed it flows to the arg-max path point, the first one in
    path order on ties — as the reference `max_pool2d` — and only the chosen indices are kept
    for backward.
    """
    if boundary_flat.dim() > 2:
        boundary_flat = boundary_flat.reshape(boundary_flat.shape[0], -1)
    _check_flat(boundary_flat, path_index, "boundary")
    n_b = boundary_flat.shape[0]
    (g_h, g_w), (c_h, c_w), rf = path_index.grid, path_index.crop, path_index.radius_floor
    need_grad = boundary_flat.requires_grad and torch.is_grad_enabled()
    maps = boundary_flat.detach().reshape(n_b, g_h, g_w)
    path_max, best_offsets = [], []
    with torch.no_grad():
        for path in path_index.paths:
            best = best_off = None
            for py, px in path:
                window = maps[:, py:py + c_h, rf + px:rf + px + c_w]
                if best is None:
                    best = window
                    if need_grad:
                        best_off = torch.full_like(window, py * g_w + px, dtype=torch.int64)
                elif need_grad:
                    greater = window > best   # strict: the first path point wins ties
                    best = torch.where(greater, window, best)
                    best_off = torch.where(greater, py * g_w + px, best_off)
                else:
                    best = torch.maximum(best, window)
            path_max.append(best.reshape(n_b, -1))
            if need_grad:
                best_offsets.append(best_off.reshape(n_b, -1))
    if not need_grad:
        return 1.0 - torch.stack(path_max, dim=1)
    src = path_index.indices_on(boundary_flat.device)[0]
    chosen = torch.stack(best_offsets, dim=1) + src                        # [B, n_dirs, n_src]
    picked = torch.gather(boundary_flat, 1, chosen.reshape(n_b, -1))
    return 1.0 - picked.reshape(n_b, path_index.n_dirs, path_index.n_src)


def affinity_labels(label_lowres: torch.Tensor, path_index: PathIndex, num_valid: int = 21
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affinity pair masks from a ↓4 label map (docs/algorithms.md §irn), on the label's device.

    Args:
        label_lowres: `[B, G_h, G_w]` (or `[G_h, G_w]`) uint8/int label; 0 = background,
            1..num_valid−1 = classes, anything ≥ num_valid (e.g. 255) = ignore.
        path_index: the training path index on the same grid.
        num_valid: labels below this are valid (21 for VOC: background + 20 classes).
    Returns:
        bool masks `(bg_pos, fg_pos, neg)`, each `[B, n_dirs, n_src]`: both ends background;
        both ends the same foreground class; both ends valid and different. Pairs touching an
        ignored pixel are in none of them.
    """
    if label_lowres.dim() == 2:
        label_lowres = label_lowres[None]
    if tuple(label_lowres.shape[1:]) != path_index.grid:
        raise ValueError(f"label {tuple(label_lowres.shape)} does not match the path-index grid "
                         f"{path_index.grid}")
    flat = label_lowres.reshape(label_lowres.shape[0], -1).long()
    device = flat.device
    src = path_index.src_indices.to(device)
    dst = path_index.dst_indices.to(device)
    lab_from = flat[:, src][:, None, :]                                    # [B, 1, n_src]
    lab_to = flat[:, dst]                                                  # [B, n_dirs, n_src]
    valid = (lab_from < num_valid) & (lab_to < num_valid)
    equal = lab_from == lab_to
    pos = equal & valid
    bg_pos = pos & (lab_from == 0)
    fg_pos = pos & (lab_from > 0)
    neg = valid & ~equal
    return bg_pos, fg_pos, neg
