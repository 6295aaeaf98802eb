"""FBR's training terms (docs/methods/fbr.md, IEEE TCSVT 2024 §III) and their machinery: host
pseudo labels, class prototypes, the query set, per-image K-means NROIs and their FIFO memory
bank, the FB and IF contrastive losses with their negative sampling, the background target and
the FG/BG decorrelation term. The `fbr` plug-in (wsss_core/methods/fbr.py) combines them.

Conventions: feature maps are [B, D, h, w]; image labels [B, C] (foreground classes only);
score maps [B, C+1, h, w] with channel 0 = background; pseudo labels [B, h, w] (long, 0 =
background). Every switch that reproduces the official code (official files `region_utils.py`,
`AMN/region_utils.py`, `network/resnet38_contrast.py`) is named below; defaults follow the paper.
Similarities, softmaxes and normalisations run in fp32 even under autocast.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from ..errors import ConfigError

EPS = 1e-8  # cosine similarity (official: torch.cosine_similarity's default)
QUERY_MODES = ("quantile", "absolute", "all")


# ----------------------------------------------------------------------------- pseudo labels

@torch.no_grad()
def host_pseudo_labels(cam: torch.Tensor, labels: torch.Tensor, bg_score: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores Ŝ [B, C+1, h, w], probabilities π (softmax over channels) and pseudo labels ŷ
    [B, h, w] from the raw CAM A [B, C, h, w] (docs/methods/fbr.md "What one training step
    computes" 2).

    Ŝ_0 = `bg_score`; Ŝ_c = ReLU(A_c) / (max ReLU(A_c) + 1e-5) · y_c. ŷ = argmax (first wins).
    """
    a = F.relu(cam.float())
    norm = a / (a.amax(dim=(2, 3), keepdim=True) + 1e-5) * labels.float()[:, :, None, None]
    scores = torch.cat([torch.full_like(norm[:, :1], bg_score), norm], dim=1)
    return scores, scores.softmax(dim=1), scores.argmax(dim=1)


# ----------------------------------------------------------------------------- prototypes

@torch.no_grad()
def class_prototypes(f: torch.Tensor, scores: torch.Tensor, pseudo: torch.Tensor, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k weighted prototypes (paper Eq. 3), vectorised over classes.

    f [B, d, h, w], scores Ŝ [B, C+1, h, w], pseudo ŷ [B, h, w]. For each channel c:
    s_c = Ŝ_c · 1[ŷ = c]; over all B·h·w positions take the k largest s_c; ρ_c = Σ s_c f / Σ s_c.
    Returns (ρ [C+1, d] fp32, valid [C+1] bool: a foreground class with Σ s_c > 0).
    """
    ch, d = scores.shape[1], f.shape[1]
    own = scores.float() * F.one_hot(pseudo, ch).permute(0, 3, 1, 2)
    own = own.transpose(0, 1).reshape(ch, -1)  # [C+1, B*h*w]
    vals, idx = own.topk(min(k, own.shape[1]), dim=1)
    feats = f.detach().float().permute(0, 2, 3, 1).reshape(-1, d)
    wsum = vals.sum(dim=1)
    protos = torch.einsum("ck,ckd->cd", vals, feats[idx]) / wsum.clamp_min(1e-12)[:, None]
    valid = wsum > 0
    valid[0] = False
    return protos, valid


# ----------------------------------------------------------------------------- queries

def _group_sort(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation that sorts by group, then by value (both ascending)."""
    by_value = values.argsort(dim=1, stable=True)
    by_group = groups.gather(1, by_value).argsort(dim=1, stable=True)
    return by_value.gather(1, by_group)


@torch.no_grad()
def query_mask(scores: torch.Tensor, probs: torch.Tensor, pseudo: torch.Tensor, mode: str = "quantile",
               rho_q: float = 0.4, rho_e: float = 0.25, abs_thresh: float = 0.4,
               sure_floor: float = 0.05) -> torch.Tensor:
    """Query pixels [B, h, w] bool; a query of class c is a pixel with ŷ = c (paper Eq. 4,
    official `get_reliable_pseudo_label`).

    `quantile`: per image i and class c, V = sorted Ŝ_c over {ŷ = c, Ŝ_c > sure_floor},
    t = V[⌊|V|·ρ_q⌋]; sure = ŷ = c and Ŝ_c > t; entropy e = −Σ π log(π + 1e-10) with the
    per-image threshold η = quantile(e, ρ_e); query = foreground, not sure, e > η.
    `absolute` (paper text): ŷ = c and Ŝ_c < abs_thresh. `all`: every foreground pixel.
    """
    fg = pseudo > 0
    own = scores.float().gather(1, pseudo[:, None])[:, 0]
    if mode == "all":
        return fg
    if mode == "absolute":
        return fg & (own < abs_thresh)
    if mode != "quantile":
        raise ConfigError(f"config key fbr.query_mode: {mode!r} unknown ({', '.join(QUERY_MODES)})")
    B, ch = scores.shape[:2]
    own_f, lab = own.flatten(1), pseudo.flatten(1)
    cand = fg.flatten(1) & (own_f > sure_floor)
    group = torch.where(cand, lab, torch.full_like(lab, ch))  # non-candidates sort last
    order = _group_sort(own_f, group)
    ranked = own_f.gather(1, order)
    counts = torch.zeros(B, ch + 1, dtype=torch.long, device=lab.device).scatter_add_(1, group, torch.ones_like(group))
    starts = counts.cumsum(1) - counts
    pos = starts + (counts.double() * rho_q).floor().long()
    thr = ranked.gather(1, pos.clamp_max(ranked.shape[1] - 1))
    thr = torch.where(counts > 0, thr, torch.full_like(thr, float("inf")))  # no sure pixels
    sure = fg.flatten(1) & (own_f > thr.gather(1, lab))
    p = probs.float()
    entropy = -(p * torch.log(p + 1e-10)).sum(dim=1).flatten(1)
    eta = torch.quantile(entropy, rho_e, dim=1, keepdim=True)
    return (fg.flatten(1) & ~sure & (entropy > eta)).view_as(pseudo)


@torch.no_grad()
def cap_queries(query: torch.Tensor, pseudo: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """Keep at most `cap` queries per class over the batch, drawn uniformly without replacement."""
    q, lab = query.flatten()[None], pseudo.flatten()[None]
    group = torch.where(q, lab, torch.full_like(lab, int(lab.max()) + 1))
    order = _group_sort(torch.rand(q.shape, generator=generator, device=q.device), group)[0]
    sorted_group = group[0, order]
    counts = torch.bincount(group[0])
    rank = torch.arange(order.numel(), device=q.device) - (counts.cumsum(0) - counts)[sorted_group]
    keep = torch.zeros_like(q[0])
    keep[order] = rank < cap
    return (query.flatten() & keep).view_as(query)


# ----------------------------------------------------------------------------- NROIs, bank

@torch.no_grad()
def batched_kmeans(x: torch.Tensor, valid: torch.Tensor, k: int, iters: int,
                   generator: torch.Generator, inits: int = 1) -> torch.Tensor:
    """K-means (Euclidean, k-means++ init, Lloyd iterations) of every row at once.

    x [B, N, d]; valid [B, N] bool (each row needs ≥ 1 valid point; rows with fewer than k
    distinct points repeat centroids). Stops after `iters` iterations or when no assignment
    changes. With `inits` > 1 the whole run is repeated `inits` times (each from its own
    k-means++ draws, one after the other from `generator`) and each row keeps the run with the
    lowest inertia Σ_valid min_j ‖x − c_j‖² (the first on a tie), as scikit-learn's KMeans
    with `n_init` (the official FBR code: `AMN/region_utils.py`, KMeans(n_clusters=8), 10
    starts in the scikit-learn releases of its time). Returns centroids [B, k, d] fp32.
    Deterministic for a given generator state.
    """
    if inits < 1:
        raise ConfigError(f"config key fbr.kmeans_inits: {inits} must be ≥ 1")
    best, best_inertia = None, None
    for _ in range(inits):
        cent = _kmeans_once(x, valid, k, iters, generator)
        if inits == 1:
            return cent
        inertia = (torch.cdist(x.float(), cent).amin(dim=-1) ** 2 * valid.float()).sum(1)  # [B]
        if best is None:
            best, best_inertia = cent, inertia
            continue
        better = inertia < best_inertia
        best = torch.where(better[:, None, None], cent, best)
        best_inertia = torch.where(better, inertia, best_inertia)
    return best


def _kmeans_once(x: torch.Tensor, valid: torch.Tensor, k: int, iters: int,
                 generator: torch.Generator) -> torch.Tensor:
    """One k-means++ start and its Lloyd iterations for every row (`batched_kmeans`)."""
    x = x.float()
    B, N, d = x.shape
    w = valid.float()
    pick = torch.multinomial(w, 1, generator=generator)
    cent = x.gather(1, pick[..., None].expand(-1, -1, d))
    dmin = ((x - cent) ** 2).sum(-1)
    for _ in range(1, k):  # k-means++: next centre ∝ D² (uniform where every D² is 0)
        p = dmin * w
        p = torch.where(p.sum(1, keepdim=True) > 0, p, w)
        nxt = x.gather(1, torch.multinomial(p, 1, generator=generator)[..., None].expand(-1, -1, d))
        cent = torch.cat([cent, nxt], dim=1)
        dmin = torch.minimum(dmin, ((x - nxt) ** 2).sum(-1))
    assign = None
    for _ in range(iters):
        new = torch.cdist(x, cent).argmin(dim=-1)
        if assign is not None and torch.equal(new[valid], assign[valid]):
            break
        assign = new
        onehot = F.one_hot(assign, k).float() * w[..., None]  # [B, N, k]
        count = onehot.sum(1)[..., None]
        cent = torch.where(count > 0, onehot.transpose(1, 2) @ x / count.clamp_min(1), cent)
    return cent


@torch.no_grad()
def image_nrois(b: torch.Tensor, pseudo: torch.Tensor, k: int, iters: int,
                generator: torch.Generator, inits: int = 1) -> torch.Tensor:
    """NROIs of a batch [n, d] fp32 (§III-B2): per image, the k K-means centroids of its
    background features b [B, d, h, w] at ŷ = 0 when it has more than k background pixels
    (`batched_kmeans` with `inits` starts), otherwise those pixels' raw features (0..k vectors)."""
    x = b.detach().float().flatten(2).transpose(1, 2)  # [B, N, d]
    bg = (pseudo == 0).flatten(1)
    many = bg.sum(1) > k
    parts = []
    if many.any():
        parts.append(batched_kmeans(x[many], bg[many], k, iters, generator, inits).reshape(-1, x.shape[-1]))
    parts.append(x[~many][bg[~many]])
    return torch.cat(parts)


def gather_from_ranks(v: torch.Tensor) -> torch.Tensor:
    """Concatenate the [n_r, d] tensors of every process (rank order); `v` itself alone."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return v
    n = torch.tensor([v.shape[0]], device=v.device)
    sizes = [torch.zeros_like(n) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = v.new_zeros(longest, v.shape[1])
    padded[: v.shape[0]] = v
    parts = [torch.empty_like(padded) for _ in sizes]
    tdist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class NROIBank:
    """FIFO memory bank of NROIs [capacity, d] fp32, never requiring grad (§III-B2)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError("config key fbr.bank_capacity: must be ≥ 1")
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self.ptr = 0
        self.size = 0

    def push(self, v: torch.Tensor) -> None:
        """Append the rows of `v` [n, d]; past capacity the oldest rows are dropped."""
        v = v.detach().float()[-self.capacity:]
        if v.shape[0] == 0:
            return
        if self.buffer is None or self.buffer.device != v.device:
            old = self.contents() if self.buffer is not None else None
            self.buffer = v.new_zeros(self.capacity, v.shape[1])
            self.ptr = self.size = 0
            if old is not None:
                self.push(old.to(v.device))
        idx = (self.ptr + torch.arange(v.shape[0], device=v.device)) % self.capacity
        self.buffer[idx] = v
        self.ptr = (self.ptr + v.shape[0]) % self.capacity
        self.size = min(self.size + v.shape[0], self.capacity)

    def entries(self) -> torch.Tensor:
        """The stored rows [size, d] in storage order (what uniform sampling draws from)."""
        if self.buffer is None:
            return torch.zeros(0, 0)
        return self.buffer[: self.size]

    def contents(self) -> torch.Tensor:
        """The stored rows [size, d], oldest first."""
        if self.buffer is None:
            return torch.zeros(0, 0)
        if self.size < self.capacity:
            return self.buffer[: self.size]
        return torch.cat([self.buffer[self.ptr:], self.buffer[: self.ptr]])


# ----------------------------------------------------------------------------- losses

def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / x.norm(dim=-1).clamp_min(EPS)  # rows are scaled after gathering: no unit copy


def _sampled_dots(a: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a_q · rows[idx[q, j]] as [Q, n] (a [Q, d], rows [M, d], idx [Q, n] long, each row of idx
    ascending), without materialising the [Q, n, d] keys: one sampled dense-dense matmul
    (`torch.sparse.sampled_addmm`) over the distinct (q, m) pairs. A CSR pattern holds sorted,
    distinct columns per row: the draws come sorted (`sample_bank_negatives`,
    `sample_if_negatives`), and repeats of a row (draws are with replacement) share one entry."""
    q, n = idx.shape
    first = torch.ones_like(idx, dtype=torch.bool)
    first[:, 1:] = idx[:, 1:] != idx[:, :-1]
    crow = F.pad(first.sum(1).cumsum(0), (1, 0))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is stable API
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx[first], a.new_zeros(int(crow[-1])),
                                          size=(q, rows.shape[0]), check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, a, rows.t(), beta=0.0).values()
    return dots.take(first.flatten().cumsum(0) - 1).view(q, n)


class _SampledCosine(torch.autograd.Function):
    """cos(a[q], rows[idx[q, j]]) for unit a [Q, d]: [Q, n], differentiable in a only. The
    forward is `_sampled_dots` scaled by the rows' inverse norms (one pass over the M rows,
    then a gather of Q·n scalars); the backward, ∂L/∂a_q = Σ_j g_qj k̂_j, is one `embedding_bag`
    with per-sample weights. Neither keeps the [Q, n, d] keys."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        inv = _inv_norm(rows).take(idx)
        ctx.save_for_backward(rows, idx, inv)
        return _sampled_dots(a, rows, idx) * inv

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, idx, inv = ctx.saved_tensors
        return F.embedding_bag(idx, rows, per_sample_weights=(grad * inv).contiguous(), mode="sum"), None, None


def key_similarities(a: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """cos(a_q, rows[idx[q, j]]) as [Q, n] fp32 for unit anchors a [Q, d], rows [M, d] (treated
    as constants; a zero row gives cosine 0), idx [Q, n] long with every row ascending (the
    samplers draw them so; the losses only see the multiset of a query's keys); the gradient
    flows to a only. Raises ValueError on a row of idx that is not ascending.

    The FB loss's keys are 256 draws from a 50,000-row bank per query and the IF loss's 256
    draws from the batch's pixels: a dense [Q, M] product would compute 200x (FB) or 30x (IF)
    more dot products than needed, and gathering the keys is memory-bound, so only the drawn
    pairs are computed (`_SampledCosine`).
    """
    if idx.shape[1] > 1 and bool((idx[:, 1:] < idx[:, :-1]).any()):
        raise ValueError("key_similarities: every row of idx must be ascending (sort it, or draw "
                         "it with sample_bank_negatives / sample_if_negatives)")
    return _SampledCosine.apply(a.float(), rows.detach().float(), idx)


def _nce(anchor: torch.Tensor, positive: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
         tau: float) -> torch.Tensor:
    """−log softmax([cos(a, p), cos(a, k_1..k_n)] / τ)[0] per query: a, p [Q, d]; the keys are
    rows[idx] (rows [M, d], idx [Q, n])."""
    a = _unit(anchor)
    pos = (a * _unit(positive)).sum(-1, keepdim=True)
    logits = torch.cat([pos, key_similarities(a, rows, idx)], dim=1) / tau
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _nce_axis_bug(anchor: torch.Tensor, positive: torch.Tensor, keys: torch.Tensor, tau: float) -> torch.Tensor:
    """[OFFICIAL] FB logits: the cosine taken over the 1+n keys instead of the d channels
    (a [Q, d] logit matrix, cross-entropy against channel 0); un-normalised keys."""
    allk = torch.cat([positive[:, None], keys], dim=1)  # [Q, 1+n, d]
    num = anchor * allk.sum(1)
    den = (allk.shape[1] * anchor ** 2 * (allk ** 2).sum(1)).clamp_min(EPS ** 2).sqrt()
    logits = num / den / tau
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _class_mean(ce: torch.Tensor, cls: torch.Tensor, ch: int, n_present: int) -> torch.Tensor:
    """(1/|C_b|) Σ_c mean_{q ∈ Q_c} CE_q."""
    sums = ce.new_zeros(ch).index_add(0, cls, ce)
    count = ce.new_zeros(ch).index_add(0, cls, torch.ones_like(ce))
    return (sums / count.clamp_min(1)).sum() / n_present


def _present(pseudo: torch.Tensor, ch: int) -> torch.Tensor:
    present = torch.bincount(pseudo.flatten(), minlength=ch) > 0
    present[0] = False
    return present


@torch.no_grad()
def sorted_uniforms(n_rows: int, n: int, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """[n_rows, n] fp32, each row n i.i.d. U(0, 1) draws in ascending order (the order
    statistics, made without a sort: the normalised partial sums of n + 1 Exp(1) variables)."""
    s = torch.rand(n_rows, n + 1, generator=generator, device=device).neg_().log1p_().neg_().cumsum(1)
    return (s[:, :n] / s[:, n:]).clamp_(0.0, 1.0 - 2 ** -24)


@torch.no_grad()
def sample_bank_negatives(n_queries: int, bank_size: int, n_neg: int, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """FB negatives (spec: `n_neg` bank rows per query, uniform, with replacement, independent per
    query): [n_queries, n_neg] long in [0, bank_size), each row ascending. The losses only see a
    query's keys as a set of logits, and a sorted row is what `key_similarities` computes without
    a gather; sorting i.i.d. draws and drawing the order statistics directly give the same
    distribution."""
    u = sorted_uniforms(n_queries, n_neg, generator, device)
    return (u * bank_size).long().clamp_max(bank_size - 1)


def fb_loss(f: torch.Tensor, query: torch.Tensor, pseudo: torch.Tensor, protos: torch.Tensor,
            bank: torch.Tensor, n_neg: int, tau: float, generator: torch.Generator,
            axis_bug: bool = False) -> torch.Tensor:
    """Fore-to-background (pixel-to-NROI) loss (paper Eq. 7), scalar fp32.

    f [B, d, h, w] (gradient flows to the queries only), query/pseudo [B, h, w], protos ρ
    [C+1, d] (detached), bank [M, d] (detached). Each query draws `n_neg` bank rows uniformly
    with replacement; CE_q = −log softmax([cos(f_q, ρ_c), cos(f_q, n_j)] / τ)[0];
    L = (1/|C_b|) Σ_{c ∈ C_b} mean_{q ∈ Q_c} CE_q, 0 when C_b, the queries or the bank are empty.
    """
    ch = protos.shape[0]
    present = _present(pseudo, ch)
    n_present = int(present.sum())
    if n_present == 0 or bank.shape[0] == 0 or not bool(query.any()):
        return f.new_zeros((), dtype=torch.float32)
    fq = f.float().permute(0, 2, 3, 1)[query]
    cls = pseudo[query]
    idx = sample_bank_negatives(fq.shape[0], bank.shape[0], n_neg, generator, f.device)
    pos = protos.detach()[cls]
    if axis_bug:
        ce = _nce_axis_bug(fq, pos, bank.detach()[idx], tau)
    else:
        ce = _nce(fq, pos, bank.detach(), idx, tau)
    return _class_mean(ce, cls, ch, n_present)


def active_class_distribution(protos: torch.Tensor, present: torch.Tensor, tau_graph: float) -> torch.Tensor:
    """P(c' | c) = softmax over c' ∈ C_b \\ {c} of cos(ρ_c, ρ_c') / τ_g (paper Eq. 8), [C+1, C+1];
    rows of classes outside C_b are undefined (NaN)."""
    p = _unit(protos.float())
    allowed = present[None, :] & ~torch.eye(len(present), dtype=torch.bool, device=protos.device)
    return (p @ p.t() / tau_graph).masked_fill(~allowed, float("-inf")).softmax(dim=1)


@torch.no_grad()
def _if_negative_slots(query: torch.Tensor, pseudo: torch.Tensor, protos: torch.Tensor, n_neg: int,
                       tau_graph: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_if_negatives` as (slots [Q, n_neg] ascending, order [B·h·w]): slot s names pixel
    order[s], `order` listing the batch pixels grouped by pseudo label. One sorted uniform u per
    draw gives both choices: its class c by inverse CDF of P(· | c_q), its pixel from the residual
    (u − F(c−1)) / P(c | c_q), which is U(0, 1) and independent of c; sorted u give slots sorted
    by (class, pixel), i.e. ascending."""
    ch = protos.shape[0]
    cls = pseudo[query]
    dist = active_class_distribution(protos, _present(pseudo, ch), tau_graph).nan_to_num(0.0)
    cdf = F.pad(dist.cumsum(1), (1, 0))[cls]  # [Q, ch + 1]: class c is [cdf[c], cdf[c + 1])
    u = sorted_uniforms(cls.shape[0], n_neg, generator, pseudo.device) * cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(cdf[:, -1:], torch.zeros_like(cdf[:, -1:])))  # below the row's end
    # the u are sorted, so draw j is of class #{k ≥ 1 : cdf[k] ≤ u_j} = #{k : cut_k ≤ j} with
    # cut_k = #{u < cdf[k]}: a search of the ch − 1 inner bounds into each row (not of every
    # draw into the bounds), a histogram and a running sum; an empty interval gets no draw
    cut = torch.searchsorted(u, cdf[:, 1:ch].contiguous())
    drawn = torch.zeros(u.shape[0], n_neg + 1, dtype=torch.long, device=u.device).scatter_add_(
        1, cut, torch.ones_like(cut)).cumsum(1)[:, :n_neg]
    low, high = cdf.gather(1, drawn), cdf.gather(1, drawn + 1)
    residual = (u - low) / (high - low)
    flat = pseudo.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=ch)
    starts = counts.cumsum(0) - counts
    n_of = counts.take(drawn)
    offset = torch.minimum((residual * n_of).long(), n_of - 1)
    return starts.take(drawn) + offset, order


def sample_if_negatives(query: torch.Tensor, pseudo: torch.Tensor, protos: torch.Tensor, n_neg: int,
                        tau_graph: float, generator: torch.Generator) -> torch.Tensor:
    """Active sampling (paper Eq. 8): for each query (in `query`'s row-major order) of class c,
    `n_neg` classes drawn i.i.d. from `active_class_distribution` row c, then for each one pixel
    uniformly among all batch pixels with that pseudo label. Returns flat pixel indices into
    B·h·w, [Q, n_neg] long, each row grouped by class (the multiset is what matters). Needs
    |C_b| ≥ 2."""
    slots, order = _if_negative_slots(query, pseudo, protos, n_neg, tau_graph, generator)
    return order[slots]


def if_loss(f: torch.Tensor, query: torch.Tensor, pseudo: torch.Tensor, protos: torch.Tensor,
            n_neg: int, tau: float, tau_graph: float, generator: torch.Generator) -> torch.Tensor:
    """Intra-foreground loss with active negative sampling (paper Eq. 8-9), scalar fp32.

    For a query of class c the keys are stopgrad(f) at the pixels `sample_if_negatives` draws;
    CE and normalisation as `fb_loss` (temperature τ_IF); 0 when |C_b| ≤ 1 or there are no
    queries.
    """
    ch = protos.shape[0]
    n_present = int(_present(pseudo, ch).sum())
    if n_present <= 1 or not bool(query.any()):
        return f.new_zeros((), dtype=torch.float32)
    slots, order = _if_negative_slots(query, pseudo, protos, n_neg, tau_graph, generator)
    fq = f.float().permute(0, 2, 3, 1)[query]
    cls = pseudo[query]
    rows = f.detach().float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])[order]
    ce = _nce(fq, protos.detach()[cls], rows, slots, tau)
    return _class_mean(ce, cls, ch, n_present)


@torch.no_grad()
def background_target(cam: torch.Tensor, labels: torch.Tensor, thresh: float = 0.05) -> torch.Tensor:
    """y_bg [B, 1, h, w] in {0, 1} (§III-B2 Eq. 6): 1 where Σ_c of the max-normalised ReLU CAM of
    the present classes is below `thresh`."""
    a = F.relu(cam.float()) * labels.float()[:, :, None, None]
    a = a / (a.amax(dim=(2, 3), keepdim=True) + 1e-5)
    return (a.sum(dim=1, keepdim=True) < thresh).float()


def decorrelation_loss(f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_sim = mean over B·h·w of cos(f(p), b(p)) along channels (official `cosine_loss`)."""
    return (_unit(f.float().movedim(1, -1)) * _unit(b.float().movedim(1, -1))).sum(-1).mean()
